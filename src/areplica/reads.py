"""The read path: candidates, eligibility, the policy's choice, catch-up, slot waits, retry.

How a replica is chosen (DESIGN.md section 3, rules 2, 4 and 5): a scope or ``on=`` decides
first; otherwise every standby that is ``up``, has read weight above 0, is within the lag
limits (and the call's ``max_staleness``) and, in ``causal`` mode, has replayed the session's
position is eligible, and the policy picks one (preferring nodes with a free connection).
When only the causal position keeps the replicas out, the read waits up to ``causal_wait``
for one to catch up, then falls back to the primary (or raises ``NoReplicaAvailableError``).

What happens when a read fails: a connection-level failure, a ``read_timeout``, a full pool
or a recovery conflict on a standby runs the read again on another eligible node (then the
primary), up to ``read_retries`` times; a connection failure also takes the node down at
once. A standby that refuses a "read" as a write (SQLSTATE 25006) sends it once to the
primary. SQL errors pass through.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from time import perf_counter
from typing import Any, Literal, NoReturn, cast

import peewee

from ._compat import within
from .consistency import format_lsn, parse_lsn, token_position
from .core import Core
from .drivers import sqlstate_of
from .errors import (
    NodeUnavailableError,
    NoPrimaryError,
    NoReplicaAvailableError,
    PoolTimeoutError,
    ReadTimeoutError,
)
from .node import Node
from .pool import EvictedError, NodePool, take_slot
from .replay import ReplayWatch
from .results import FetchResults, fetchone_raw
from .sessions import UNKNOWN_LSN, Cell, Route, Sessions
from .writes import WritePath

__all__ = ["ReadPath"]

logger = logging.getLogger("areplica")

_REPLAY_SQL = "SELECT pg_last_wal_replay_lsn()::text"
#: How ``ReadPath.settle_unknown`` ended: the position is known, no primary answered within
#: ``primary_wait``, or the caller's deadline passed first.
Settled = Literal["settled", "no primary", "timed out"]
#: A read's own check that its standby has replayed the session's position, sent in front
#: of the read as one simple query (both drivers, see ``Driver.all_results``): one round trip
#: instead of a replay poll and then the read. It fails, naming areplica, when the standby is
#: behind (or is no standby: NULL), and when the transaction is not READ COMMITTED: only then
#: does the read take its own snapshot after the check (under REPEATABLE READ the check's
#: snapshot, taken before it ran, would serve the read).
_GUARD_SQL = (
    "SELECT CASE WHEN pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn"
    " AND current_setting('transaction_isolation') = 'read committed' THEN 1"
    " ELSE ('areplica-behind:' || coalesce(pg_last_wal_replay_lsn()::text, 'none')"
    " || ':' || current_setting('transaction_isolation'))::int END; "
)
#: The guard's refusal in the server's error message: (replay position, isolation).
_REFUSAL = re.compile(r"areplica-behind:([0-9A-Fa-f]+/[0-9A-Fa-f]+|none):([a-z ]+)")
#: The primary's insert position (what a genuine token can be at most) and its flush
#: position (what standbys can have received: WAL is sent once flushed).
_CURRENT_SQL = "SELECT pg_current_wal_insert_lsn()::text, pg_current_wal_flush_lsn()::text"


#: "Use the option's value" for ``run_read(limit=)`` (``None`` means no limit there).
_DEFAULT: object = object()
#: Seconds a read attempt may outlast its ``read_timeout`` (the README states it): the
#: query runs in its own task, so the caller stops waiting at the deadline whatever the
#: driver does on cancel; this covers the event loop's own latency under load.
ATTEMPT_BOUND = 0.25


class _CatchUp(Exception):
    """Internal: only the causal token keeps these replicas from a read; wait for them."""

    def __init__(self, nodes: list[Node], lsn: int) -> None:
        self.nodes = nodes
        self.lsn = lsn


class ReadPath:
    """Reads of one manager (see the module docstring)."""

    def __init__(
        self,
        core: Core,
        sessions: Sessions,
        writes: WritePath,
        policy: Callable[[Sequence[Any]], Any],
    ) -> None:
        self._core = core
        self._sessions = sessions
        self._writes = writes
        self._policy = policy
        self._watch = ReplayWatch(core.name, self._replay_position)
        #: Members whose transactions were not READ COMMITTED: their reads wait unguarded.
        self._unguarded: set[str] = set()
        writes.positions.bind(self._primary_position)

    # ------------------------------------------------------------------ choosing a node

    def eligible(
        self,
        exclude: Iterable[Node],
        max_staleness: float | None,
        min_lsn: int | None,
        *,
        with_primary: bool = True,
        spill: bool = True,
    ) -> list[Node]:
        """The nodes that may serve a read now; those with a free connection when ``spill``."""
        # The hot path of every read: plain loops, no generators (benchmarks/versus.py).
        out = []
        for node in self._core.cluster.readers():
            if node.state != "up" or node.paused or node.weight <= 0 or node in exclude:
                continue
            if max_staleness is not None and (
                node.lag_seconds is None or node.lag_seconds > max_staleness
            ):
                continue
            if min_lsn is not None and (node.lsn is None or node.lsn < min_lsn):
                continue
            out.append(node)
        if with_primary and self._core.options.primary_weight > 0:
            primary = self._core.cluster.primary
            if (
                primary is not None
                and primary.state == "up"
                and not primary.paused
                and primary not in exclude
            ):
                out.append(primary)  # one more reader, always caught up, at primary_weight
        if spill and len(out) > 1:
            for node in out:
                if node.pool.saturated:
                    # A node whose every connection is taken (load, or queries stuck on a
                    # hung server) makes a read wait; spill to one with room if there is.
                    free = [node for node in out if not node.pool.saturated]
                    return free or out
        return out

    def target(
        self,
        route: Route | None,
        exclude: set[Node],
        max_staleness: float | None,
        session: Cell | None = None,
    ) -> Node:
        """Pick the node for a read (rules 2, 4 and 5 of DESIGN.md)."""
        return self.pick(self.candidates(route, exclude, max_staleness, session))

    def pick(self, nodes: list[Node]) -> Node:
        """The policy's choice among a read's candidates (no call for a single one)."""
        return nodes[0] if len(nodes) == 1 else self._policy(nodes)

    def candidates(
        self,
        route: Route | None,
        exclude: set[Node],
        max_staleness: float | None,
        session: Cell | None,
    ) -> list[Node]:
        """The nodes a read may go to now, those with a free connection first.

        More than one only for a choice of the policy: the eligible replicas, and only the
        ones with room when some have (``eligible``). Raises ``_CatchUp`` when the
        session's replicas must be waited for.
        """
        if route is not None and route.target == "primary":
            return [self.readable_primary()]
        if route is not None and route.name is not None:
            return [self._named(route.name, exclude)]
        min_lsn = None
        if session is not None:
            if route is None and self._sessions.sticky(session):
                return [self.readable_primary()]
            min_lsn = self._sessions.required(session)
        eligible = self.eligible(exclude, max_staleness, min_lsn, with_primary=route is None)
        if eligible:
            return eligible
        if min_lsn is not None and self._core.options.causal_wait > 0:
            behind = self.eligible(exclude, max_staleness, None)
            if behind:
                raise _CatchUp(behind, min_lsn)
        return [self.fallback(route)]

    def _named(self, name: str, exclude: set[Node]) -> Node:
        node = self._core.cluster.get(name)
        if node is None or node.retired or node.state in ("down", "diverged") or node in exclude:
            state = "removed" if node is None or node.retired else node.state
            raise NodeUnavailableError(f"{self._core.name}: replica {name!r} is {state}", node=name)
        return node

    def fallback(self, route: Route | None) -> Node:
        """The primary for a read no replica can serve (or ``NoReplicaAvailableError``)."""
        core = self._core
        if route is not None:  # replica(): never the primary
            raise NoReplicaAvailableError(
                f"{core.name}: no eligible replica for a read in replica()"
            )
        if not core.options.fallback_to_primary:
            raise NoReplicaAvailableError(
                f"{core.name}: no eligible replica and fallback_to_primary is off"
            )
        core.counters.fallback_reads += 1
        return self.readable_primary()

    def _no_primary_for_unknown(self) -> NoReturn:
        """``NoPrimaryError``: a session of unknown position, and no primary told its position.

        Also while the health task still has the primary "up": its position read has just
        failed (a primary dying between a write's commit and that read), so a read sent
        there would fail too, and no standby is known to have the write.
        """
        core = self._core
        node = core.cluster.primary
        if node is None:
            state = "no primary is known"
        elif node.state == "up":
            state = f"primary {node.label} did not answer"
        else:
            state = f"primary {node.label} is {node.state}"
        waited = f" within primary_wait ({core.primary_wait:g}s)" if core.primary_wait > 0 else ""
        raise NoPrimaryError(
            f"{core.name}: this session wrote, but its write's WAL position was never read "
            f"(its primary failed after the commit) and {state}{waited}; the read was not "
            "run (a standby could be behind the write)",
            node=node.name if node else None,
        )

    def readable_primary(self) -> Node:
        """The primary for a read routed there; ``NoPrimaryError`` when it is not up."""
        node = self._core.cluster.primary
        if node is None or node.state != "up":
            reason = (
                "no primary is known" if node is None else f"primary {node.label} is {node.state}"
            )
            raise NoPrimaryError(f"{self._core.name}: {reason}", node=node.name if node else None)
        return node

    def still_eligible(
        self,
        node: Node,
        route: Route | None,
        tried: set[Node],
        max_staleness: float | None,
        session: Cell | None,
    ) -> bool:
        """Whether ``node``, chosen before a wait for a slot, may still serve the read."""
        eligible = self.eligible(
            tried,
            max_staleness,
            self._sessions.required(session),
            with_primary=route is None,
            spill=False,
        )
        return node in eligible

    # ------------------------------------------------------------------ the read

    async def read(
        self,
        sql: str,
        params: Sequence[Any] | None,
        fetch: FetchResults | None,
        route: Route | None,
        max_staleness: float | None,
        timeout: float | None = None,
    ) -> Any:
        """Run a read on the node the rules choose, retrying elsewhere on failure.

        The bounds (README, "Failure semantics"): each attempt's query ends by
        ``read_timeout`` + ``ATTEMPT_BOUND``; every wait for a connection, over all
        attempts, shares one ``pool_timeout``; waiting for a replica to catch up shares
        one ``causal_wait``. ``timeout``: the whole call's bound (``ReadTimeoutError``).
        """
        core = self._core
        loop = asyncio.get_running_loop()
        started = loop.time()
        call_deadline = None if timeout is None else started + timeout
        pool_timeout = core.options.pool_timeout
        pool_deadline = None if pool_timeout is None else started + pool_timeout
        if call_deadline is not None:
            pool_deadline = (
                call_deadline if pool_deadline is None else min(pool_deadline, call_deadline)
            )
        tried: set[Node] = set()
        attempt = 0
        session = self._sessions.current()
        if session is not None and session.pos:
            if session.external:
                await self._sessions.vet(session, self.current_positions, self._learn)
            else:
                self._sessions.check_history(session)  # written before a failover?
        if self._sessions.required(session) == UNKNOWN_LSN and session is not None:
            settled = await self.settle_unknown(session, call_deadline)
            if settled == "timed out":
                raise ReadTimeoutError(
                    f"{core.name}: a read ran out of its timeout ({timeout:g}s) waiting for "
                    "the primary's WAL position (this session's last write was acknowledged "
                    "before its position was read)",
                    node=core.cluster.primary.name if core.cluster.primary else None,
                    timeout=timeout,
                )
            if settled == "no primary":
                if route is None:
                    self._no_primary_for_unknown()
                route = Route("primary")  # in primary(): the primary's own error, below
        # Judging a token (a health round while no primary answers) and reading an unknown
        # position are not catching up: the standbys get one causal_wait from here on.
        catch_up_until = loop.time() + core.options.causal_wait
        guarded = True  # until a check refuses: then this read waits for a replay
        while True:
            node, nodes, guard = await self._choose(
                route, tried, max_staleness, session, catch_up_until, call_deadline, guarded
            )
            if session is not None and (node.timeline or 0) > session.pos >> 64 > 0:
                # A failover was seen while this read waited: judged on the new history.
                self._sessions.check_history(session)
            held: NodePool | None = None
            try:
                if node.pool.saturated and len(nodes) > 1:
                    # Every candidate is busy (the choice prefers one with room): take the
                    # first slot freed on any of them, rather than queue behind one node
                    # whose queries may be stuck on a hung server.
                    held, node = await self._slot_on_any(nodes, pool_deadline)
                    if held.closed or not self.still_eligible(
                        node, route, tried, max_staleness, session
                    ):
                        # Evicted, paused, lagging or closed while we waited: choose again.
                        held.free_slot()
                        core.require_open()
                        continue
                limit = core.options.read_timeout
                if call_deadline is not None:
                    left = max(0.0, call_deadline - loop.time())
                    limit = left if limit is None else min(limit, left)
                result = await self.run_read(
                    node,
                    sql,
                    params,
                    fetch,
                    held=held,
                    deadline=pool_deadline,
                    limit=limit,
                    guard=guard,
                )
                if guard is not None:
                    _replayed(node, guard)  # later reads of that position need no check
                    core.counters.caught_up_reads += 1
                return result
            except Exception as exc:
                if core.cut_by_close(exc):
                    raise core.not_open() from exc
                if guard is not None and self._refused_by_guard(node, exc):
                    guarded = False  # behind: this read waits for a replay, as unguarded
                    continue
                if self._refused_as_write(node, exc, sql):
                    return await self._writes.write(sql, params, fetch)
                if call_deadline is not None and loop.time() >= call_deadline:
                    if isinstance(exc, ReadTimeoutError):
                        raise
                    raise ReadTimeoutError(
                        f"{core.name}: a read ran out of its timeout ({timeout:g}s) on "
                        f"{node.label} ({type(exc).__name__})",
                        node=node.name,
                        timeout=timeout,
                    ) from exc
                primary = core.cluster.primary
                if not self._retryable(node, exc, route, attempt):
                    raise
                if node is primary and core.driver.is_disconnect(exc):
                    # The primary failed at the connection level: one broken connection
                    # is not proof it is down, so the next pick could be it again (a
                    # switchover stopping it). A health round decides now; meanwhile the
                    # standbys get the switchover's window to reach the session.
                    window = core.primary_wait or core.options.health_timeout
                    if call_deadline is not None:
                        window = min(window, max(0.0, call_deadline - loop.time()))
                    await self._learn(window)
                    catch_up_until = max(catch_up_until, loop.time() + window)
                attempt += 1
                tried.add(node)
                core.counters.retried_reads += 1
                logger.info(
                    "%s: read on %s failed (%s); retrying elsewhere",
                    core.name,
                    node.name,
                    type(exc).__name__,
                )

    async def _choose(
        self,
        route: Route | None,
        tried: set[Node],
        max_staleness: float | None,
        session: Cell | None,
        catch_up_until: float,
        call_deadline: float | None,
        guarded: bool = True,
    ) -> tuple[Node, list[Node], int | None]:
        """The node for this attempt, the candidates it was chosen from, and its guard.

        Catching up waits until ``catch_up_until`` (one ``causal_wait`` per call, over all
        attempts) and never past the call's deadline. With ``guarded`` (until a check
        refused this read), a standby the policy picks among those behind is read at once
        with the session's position checked in the same round trip (the third value: the
        read fails with the check when the standby has not replayed it yet).
        """
        try:
            nodes = self.candidates(route, tried, max_staleness, session)
            return self.pick(nodes), nodes, None
        except _CatchUp as wait:
            core = self._core
            primary = core.cluster.primary
            if guarded and asyncio.get_running_loop().time() < catch_up_until:
                chosen = self.pick(wait.nodes)
                if chosen is primary:
                    return chosen, [chosen], None  # always caught up
                if chosen.name not in self._unguarded:
                    return chosen, [chosen], wait.lsn
            if core.primary_wait > 0 and (primary is None or primary.state != "up"):
                # No primary to fall back to (a failover): the standbys get the window a
                # write would wait for a primary, to reach the session's position.
                catch_up_until = max(
                    catch_up_until, asyncio.get_running_loop().time() + core.primary_wait
                )
            until = catch_up_until if call_deadline is None else min(catch_up_until, call_deadline)
            left = until - asyncio.get_running_loop().time()
            node = None
            if left > 0:
                started = perf_counter()
                try:
                    node = await self._catch_up(wait.nodes, wait.lsn, left)
                finally:
                    self._core.timings.catch_up_s += perf_counter() - started
            if node is None:
                node = await self._fallback_waiting(route, call_deadline)
            return node, [node], None

    def _refused_by_guard(self, node: Node, exc: Exception) -> bool:
        """True when ``exc`` is a read's guard refusing (``_GUARD_SQL``); notes what it saw."""
        found = _REFUSAL.search(str(exc))
        if found is None or sqlstate_of(exc) != "22P02":
            return False
        replayed, isolation = found.groups()
        if replayed != "none":
            _replayed(node, parse_lsn(replayed))
        if isolation != "read committed" and node.name not in self._unguarded:
            self._unguarded.add(node.name)
            logger.info(
                "%s: %s runs reads at %s isolation: its reads after a write wait for its "
                "replay position instead of checking it in their own round trip",
                self._core.name,
                node.name,
                isolation,
            )
        return True

    async def _fallback_waiting(self, route: Route | None, until: float | None) -> Node:
        """``fallback()``; while the primary is not up, wait up to ``primary_wait`` for one."""
        core = self._core
        primary = core.cluster.primary
        if core.primary_wait > 0 and (primary is None or primary.state != "up"):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + core.primary_wait
            if until is not None:
                deadline = min(deadline, until)
            await self._writes.wait_for_primary(deadline)
        return self.fallback(route)

    def _refused_as_write(self, node: Node, exc: Exception, sql: str) -> bool:
        """A standby refused a "read" as a write (SQLSTATE 25006): the classifier erred."""
        if node is self._core.cluster.primary or not self._core.driver.is_read_only_violation(exc):
            return False
        logger.warning(
            "%s: replica %s refused a query classified as a read (SQLSTATE 25006); "
            "running it once on the primary: %.80r",
            self._core.name,
            node.name,
            sql,
        )
        return True

    def _retryable(self, node: Node, exc: Exception, route: Route | None, attempt: int) -> bool:
        """Whether a failed read may run again elsewhere (and what the failure says)."""
        core = self._core
        if isinstance(exc, (ReadTimeoutError, PoolTimeoutError, EvictedError)):
            # A slow query or a busy pool: try elsewhere, but the node is not down. An
            # evicted node is down already, its reason recorded: just go elsewhere.
            retry = True
        elif core.driver.is_disconnect(exc) or isinstance(exc, NodeUnavailableError):
            retry = True
            node.note_error(exc)
            core.connection_failed(node, exc)
        else:
            retry = core.driver.is_recovery_conflict(exc) and node is not core.cluster.primary
        named = route is not None and route.name is not None
        return retry and attempt < core.options.read_retries and not named

    async def _slot_on_any(
        self, nodes: Sequence[Node], deadline: float | None
    ) -> tuple[NodePool, Node]:
        """A connection slot on the first of ``nodes`` to free one, held by the caller.

        Raises ``PoolTimeoutError`` once ``deadline`` (``pool_timeout``) has passed.
        """
        pools = {node.pool: node for node in nodes}
        remaining = None
        if deadline is not None:
            remaining = max(0.0, deadline - asyncio.get_running_loop().time())
        started = perf_counter()
        try:
            held = await take_slot(tuple(pools), remaining)
        finally:
            self._core.timings.slot_wait_s += perf_counter() - started
        if held is None:
            names = ", ".join(repr(node.name) for node in nodes)
            raise PoolTimeoutError(
                f"{self._core.name}: every connection of {names} stayed busy for "
                f"{self._core.options.pool_timeout:g}s (pool_timeout); nothing was sent",
                node=nodes[0].name,
                timeout=self._core.options.pool_timeout,
            )
        return held, pools[held]

    # ------------------------------------------------------------------ catch-up

    async def _catch_up(
        self, nodes: list[Node], lsn: int, wait: float | None = None
    ) -> Node | None:
        """The first of ``nodes`` to replay ``lsn`` within ``wait`` (``causal_wait``)."""
        if wait is None:
            wait = self._core.options.causal_wait
        node = await self._watch.wait(nodes, lsn, wait)
        if node is None or node.state != "up":
            return None
        self._core.counters.caught_up_reads += 1
        return node

    async def settle_unknown(self, cell: Cell, until: float | None) -> Settled:
        """Give a cell whose position is unknown the primary's ("settled" once it has one).

        Its writes were acknowledged before their position was read (under contention, or
        the read failed): the first read of the primary's position started after them
        covers them (``Positions``, shared by every session waiting; no round trip when its
        answer is in). While no primary is usable (the one that took the write died before
        its position was read, a crash failover), that read waits up to ``primary_wait``
        for one, as a write would: the promoted standby's position covers every write that
        survived ("no primary" when none answered). ``until`` (loop time, the call's
        deadline) bounds this caller's wait ("timed out").
        """
        sessions = self._sessions
        timings = self._core.timings
        started = perf_counter()
        try:
            while not sessions.settle_cached(cell):
                future = self._writes.positions.request(cell.unknown)
                left = (
                    None if until is None else max(0.0, until - asyncio.get_running_loop().time())
                )
                done, answer = await within(asyncio.shield(future), left)
                if not done:
                    return "timed out"
                if answer is None:
                    return "no primary"
                sessions.settle_unknown(cell, answer[1], answer[0], answer[2])
            return "settled"
        finally:
            timings.write_position_s += perf_counter() - started

    async def _primary_position(self) -> tuple[int, int | None] | None:
        """The primary's insert position now and its timeline (``Positions``' source).

        While there is no usable primary, or it fails to answer (a switchover stopping
        it), tries again up to ``primary_wait``; ``None`` when no primary answered.
        """
        core = self._core
        loop = asyncio.get_running_loop()
        deadline = loop.time() + core.primary_wait
        while True:
            primary = core.usable_primary()
            if primary is None and core.primary_wait > 0:
                primary = await self._writes.wait_for_primary(deadline)
            if primary is None:
                return None
            timeline = primary.timeline
            try:
                row = await self.run_read(
                    primary, _CURRENT_SQL, None, fetchone_raw, count=False, first=True
                )
                return token_position(parse_lsn(row[0])), timeline
            except Exception as exc:
                if core.cut_by_close(exc):
                    raise core.not_open() from exc
                if core.driver.is_disconnect(exc) or isinstance(exc, NodeUnavailableError):
                    primary.note_error(exc)
                    core.connection_failed(primary, exc)
                if loop.time() >= deadline:
                    return None
                await asyncio.sleep(0.05)

    async def close(self) -> None:
        """Stop the replay pollers (the manager is closing)."""
        await self._watch.close()

    async def _replay_position(self, node: Node) -> int:
        row = await self.run_read(node, _REPLAY_SQL, None, fetchone_raw, count=False, first=True)
        position = parse_lsn(row[0])
        _replayed(node, position)
        return position

    async def _learn(self, timeout: float) -> bool:
        """Learn the cluster's state now (one shared health round); True when done in time."""
        monitor = self._core.monitor
        return monitor is not None and await monitor.learn(timeout)

    async def wait_replayed(self, lsn: int, timeout: float) -> list[Node]:
        """Wait until every standby that is up has replayed ``lsn``; those still behind."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            behind = [
                node
                for node in self._core.cluster.readers()
                if node.state == "up" and (node.lsn is None or node.lsn < lsn)
            ]
            if not behind or loop.time() >= deadline:
                return behind
            await asyncio.gather(
                *(self._replay_position(node) for node in behind), return_exceptions=True
            )
            await asyncio.sleep(0.01)

    async def current_positions(self, wait: float = 0.0) -> tuple[int, int] | None:
        """The primary's insert and flush positions now; ``None`` when it cannot answer.

        ``wait``: seconds to wait for a usable primary while there is none.
        """
        core = self._core
        primary = core.usable_primary()
        if primary is None and wait > 0:
            deadline = asyncio.get_running_loop().time() + wait
            primary = await self._writes.wait_for_primary(deadline)
        if primary is None:
            return None
        try:
            row = await self.run_read(primary, _CURRENT_SQL, None, fetchone_raw, count=False)
            return token_position(parse_lsn(row[0])), token_position(parse_lsn(row[1]))
        except Exception:
            return None

    # ------------------------------------------------------------------ running it

    async def run_read(
        self,
        node: Node,
        sql: str,
        params: Sequence[Any] | None,
        fetch: FetchResults | None,
        *,
        count: bool = True,
        held: NodePool | None = None,
        deadline: float | None = None,
        limit: float | object | None = _DEFAULT,
        first: bool = False,
        guard: int | None = None,
    ) -> Any:
        """Run a read on ``node``; ``held``: a slot of its pool the caller already took.

        ``count``: a read of the caller's (counted, timed), not one of areplica's own (a
        replay poll). ``first``: wait for a connection at the head of the queue (reads the
        queue itself waits on). ``guard``: a position the standby must have replayed,
        checked in front of ``sql`` in the same query (``_GUARD_SQL``).

        ``deadline`` (loop time) bounds the wait for a connection (``pool_timeout`` from
        now by default); ``limit`` the query (``read_timeout`` by default). The query runs
        in its own task (``NodePool.run``): at its limit the caller gets
        ``ReadTimeoutError`` at once, and the cancel on the server and the connection's
        disposal go on in the background, the connection's slot taken until they end.
        """
        core = self._core
        timings = core.timings
        node.in_flight += 1
        pool = node.pool if held is None else held
        started = perf_counter()
        try:
            conn = await pool.acquire(slot_taken=held is not None, deadline=deadline, first=first)
        except BaseException:
            node.done()
            raise
        finally:
            acquired = perf_counter()
            timings.slot_wait_s += acquired - started
        read_timeout = cast(
            "float | None", core.options.read_timeout if limit is _DEFAULT else limit
        )
        try:
            result = await pool.run(
                conn,
                self._query(conn, sql, params, fetch, guard),
                read_timeout,
                done=node.done,
            )
        except asyncio.TimeoutError as exc:
            raise ReadTimeoutError(
                f"{core.name}: a read on {node.label} ran longer than "
                f"{read_timeout:g}s (read_timeout); cancelled on the server",
                node=node.name,
                timeout=read_timeout,
            ) from exc
        finally:
            if count:
                timings.query_s += perf_counter() - acquired
        if count:
            node.reads += 1
            timings.reads += 1
        return result

    async def _query(
        self,
        conn: Any,
        sql: str,
        params: Sequence[Any] | None,
        fetch: FetchResults | None,
        guard: int | None = None,
    ) -> Any:
        if guard is not None:
            sql = _GUARD_SQL.format(lsn=format_lsn(guard)) + sql
        with peewee.__exception_wrapper__:  # type: ignore[attr-defined]
            async with conn.cursor() as cursor:
                await cursor.execute(sql, params or ())
                if guard is not None and self._core.driver.all_results:
                    cursor.nextset()  # past the guard's row, to the read's own result
                return await fetch(self._core.database, cursor) if fetch else None


def _replayed(node: Node, position: int) -> None:
    """Note that ``node`` has replayed ``position`` (its known replay position only grows)."""
    if node.lsn is None or position > node.lsn:
        node.lsn = position
