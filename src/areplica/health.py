"""Health: the per-node state machine and the background ``HealthMonitor``.

The monitor probes every node each ``health_interval`` (``probe.py``: one round trip on a
dedicated connection), feeds each node's ``HealthState``, evicts and readmits, follows roles
and timelines, and reads a new primary's timeline history.

Lag in bytes is the primary's position minus the replica's replay position. Lag in seconds
is zero when the byte lag is zero (an idle primary writes nothing, so an old replay
timestamp is not lag), else now minus the last replay timestamp.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import statistics
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ._compat import timeout as _timeout
from .cluster import Cluster
from .consistency import format_lsn
from .history import History, parse_history
from .node import Node, NodeStatus, State
from .options import Options
from .probe import SLOW_FLOOR_MS, ProbeConnection, ProbeResult, first_probe

__all__ = ["HealthMonitor", "HealthSettings", "HealthState"]

logger = logging.getLogger("areplica")

#: Seconds before a history file that could not be read is tried again.
HISTORY_RETRY = 30.0


@dataclass
class HealthState:
    """The state machine of one node (pure: fed with probe outcomes, returns the state).

    - ``up``/``lagging`` -> ``down`` after ``fail_after`` failed probes in a row, or at once
      by ``force_down()`` (a query failed at the connection level).
    - ``down`` -> ``up`` (or ``lagging``) after ``recover_after`` good probes in a row.
    - ``up`` -> ``lagging`` when lag exceeds a limit (or the node is slow);
      ``lagging`` -> ``up`` only when lag is back under ``hysteresis`` x the limit (and the
      node is no longer slow), so a node hovering at the limit does not flap.
    - any answering state -> ``diverged`` when a standby replays off the primary's history;
      back to ``up`` (or ``lagging``) at its first probe on that history again.
    """

    fail_after: int
    recover_after: int
    max_lag: float | None
    max_lag_bytes: int | None
    hysteresis: float = 0.5
    state: State = "down"
    failures: int = 0
    successes: int = 0

    def _over(self, lag_seconds: float | None, lag_bytes: int | None, factor: float) -> bool:
        if self.max_lag is not None and lag_seconds is not None:
            if lag_seconds > self.max_lag * factor:
                return True
        if self.max_lag_bytes is not None and lag_bytes is not None:
            if lag_bytes > self.max_lag_bytes * factor:
                return True
        return False

    def failure(self) -> State:
        """A probe failed."""
        self.successes = 0
        self.failures += 1
        if self.state != "down" and self.failures >= self.fail_after:
            self.state = "down"
        return self.state

    def force_down(self) -> State:
        """A query on the node failed at the connection level: down at once."""
        self.successes = 0
        self.failures = max(self.failures, self.fail_after)
        self.state = "down"
        return self.state

    def diverge(self) -> State:
        """A probe answered from off the primary's history: it serves nothing."""
        self.failures = 0
        self.successes += 1
        if self.state != "down" or self.successes >= self.recover_after:
            self.state = "diverged"
        return self.state

    def success(
        self, lag_seconds: float | None, lag_bytes: int | None, *, slow: bool = False
    ) -> State:
        """A probe answered; lag is ``None`` on a primary."""
        self.failures = 0
        self.successes += 1
        if self.state == "diverged":
            # It answered all along: back on the primary's history, it serves at once.
            self.state = "lagging" if slow or self._over(lag_seconds, lag_bytes, 1.0) else "up"
        elif self.state == "down":
            if self.successes < self.recover_after:
                return self.state
            self.state = "lagging" if slow or self._over(lag_seconds, lag_bytes, 1.0) else "up"
        elif self.state == "up":
            if slow or self._over(lag_seconds, lag_bytes, 1.0):
                self.state = "lagging"
        elif not slow and not self._over(lag_seconds, lag_bytes, self.hysteresis):
            self.state = "up"
        return self.state


_EWMA = 0.5


@dataclass(frozen=True)
class HealthSettings:
    """The manager options the health loop uses."""

    name: str
    interval: float
    timeout: float
    fail_after: int
    recover_after: int
    max_lag: float | None
    max_lag_bytes: int | None
    slow_factor: float | None

    @classmethod
    def of(cls, options: Options) -> HealthSettings:
        """The health settings of a manager's options."""
        return cls(
            options.name,
            options.health_interval,
            options.health_timeout,
            options.fail_after,
            options.recover_after,
            options.max_lag,
            options.max_lag_bytes,
            options.slow_factor,
        )


StateCallback = Callable[[NodeStatus, NodeStatus], Any]


class HealthMonitor:
    """The background task that probes every member of a cluster each ``interval``.

    It owns the probe connections and the per-node state machines, feeds what the probes
    saw to the ``Cluster`` (which decides roles), and calls ``callbacks`` on state changes.
    ``before_round`` (a member source's refresh) runs at the start of every round.
    """

    def __init__(
        self,
        cluster: Cluster,
        settings: HealthSettings,
        callbacks: list[StateCallback],
        before_round: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.cluster = cluster
        self.settings = settings
        self.callbacks = callbacks
        self.before_round = before_round
        self.name = f"{settings.name}-health"
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._states: dict[Node, HealthState] = {}
        self._probes: dict[Node, ProbeConnection] = {}
        self._latency: dict[Node, float] = {}
        self._slow: dict[Node, bool] = {}
        # (monotonic time, primary WAL position) per round: how long ago the primary was
        # where a replica is now is that replica's lag in seconds.
        self._history: collections.deque[tuple[float, int]] = collections.deque(maxlen=4096)
        # The primary's clock at its last probe, against our monotonic clock.
        self._primary_clock: tuple[float, float] | None = None
        self._learning: asyncio.Task[None] | None = None
        self._learnt_at = float("-inf")
        #: Timeline histories of members out of recovery, by (server, timeline).
        self._histories: dict[tuple[object, int], History] = {}
        self._history_retry: dict[tuple[object, int], float] = {}
        #: The timeline each standby's WAL receiver was last seen receiving.
        self._received: dict[Node, int] = {}
        self._seeding = False
        self._halted = False
        #: Probe connections closed for good: no new one is opened (``stop()``).
        self._stopped = False
        self.rounds = 0
        self._tasks: set[asyncio.Future[Any]] = set()

    def __repr__(self) -> str:
        return f"<HealthMonitor {self.name} rounds={self.rounds}>"

    @property
    def split_brain(self) -> bool:
        return self.cluster.split_brain

    def _state(self, node: Node) -> HealthState:
        state = self._states.get(node)
        if state is None:
            settings = self.settings
            state = HealthState(
                fail_after=settings.fail_after,
                recover_after=settings.recover_after,
                max_lag=settings.max_lag,
                max_lag_bytes=settings.max_lag_bytes,
                state=node.state,
            )
            self._states[node] = state
        return state

    async def seed(self, outcome: Mapping[Node, ProbeResult | BaseException]) -> None:
        """Initial states from ``connect()``'s probes: reachable nodes start up at once.

        Initial states are not changes: nothing is logged or called back for them.
        """
        self._seeding = True
        try:
            for node in outcome:
                state = self._state(node)
                if isinstance(outcome[node], ProbeResult):
                    state.successes = state.recover_after
            await self._absorb(outcome, time.monotonic())
        finally:
            self._seeding = False

    def start(self) -> None:
        """Start the probe loop (called by ``connect()``)."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        """Stop the loop (``halt()``), wait for spawned tasks, close probe connections.

        Probe connections go last: an evicted pool still closing may cancel or wait for a
        backend over one, and a probe connection opened for it after they were closed
        would be left open (an aiopg ``ResourceWarning`` at garbage collection).
        """
        await self.halt()
        # Pool closings and async callbacks started by transitions (by done-ness: a
        # finished task leaves the set only once its done callback has run).
        pending = [task for task in self._tasks if not task.done()]
        while pending:
            await asyncio.wait(pending)
            pending = [task for task in self._tasks if not task.done()]
        self._stopped = True
        for connection in list(self._probes.values()):
            await connection.close()
        self._probes.clear()

    async def halt(self) -> None:
        """Ask the loop to stop, wait a little, then cancel it. Idempotent.

        From here on no state change is applied or logged: a round still finishing is
        shutdown noise, not news about the nodes.
        """
        self._halted = True
        self._stop.set()
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                async with _timeout(self.settings.timeout + 1.0):
                    await asyncio.shield(task)
            except (asyncio.TimeoutError, Exception):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def _spawn(self, awaitable: Any, name: str) -> None:
        task = asyncio.ensure_future(awaitable)
        if isinstance(task, asyncio.Task):
            task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def wake(self) -> None:
        """Run a round now (a member source saw a change, a connection failed)."""
        self._wake.set()

    async def _run(self) -> None:
        interval = self.settings.interval
        while not self._stop.is_set():
            # Cleared before the round: a wake() during it (a failed connection, halt())
            # starts the next round, or ends the loop, at once instead of being lost.
            self._wake.clear()
            try:
                await self.round()
            except Exception:  # CancelledError passes: close() must win
                logger.exception("%s: health round failed", self.name)
            if self._stop.is_set():
                break
            with contextlib.suppress(asyncio.TimeoutError):
                async with _timeout(interval):
                    await self._wake.wait()

    async def learn(self, timeout: float) -> bool:
        """Probe the cluster now, for a caller that holds news it cannot judge yet.

        One round at a time serves every caller (a round in flight is joined), and a round
        finished less than ``interval / 4`` ago counts as fresh: a flood of callers (forged
        tokens, say) costs at most four extra rounds per interval. Waits at most
        ``timeout``; True when the cluster's state was learnt within it.
        """
        loop = asyncio.get_running_loop()
        if self._learning is None or self._learning.done():
            if loop.time() - self._learnt_at < self.settings.interval / 4:
                return True
            self._learning = loop.create_task(self._learn_round(), name=f"{self.name}-learn")
            self._tasks.add(self._learning)
            self._learning.add_done_callback(self._tasks.discard)
        done, _ = await asyncio.wait({self._learning}, timeout=timeout)
        return bool(done)

    async def _learn_round(self) -> None:
        try:
            await self.round()
        except Exception:
            logger.exception("%s: health round failed", self.name)
        finally:
            self._learnt_at = asyncio.get_running_loop().time()

    async def forget(self, node: Node) -> None:
        """Drop a removed node's probe connection and state."""
        self._states.pop(node, None)
        self._latency.pop(node, None)
        self._slow.pop(node, None)
        connection = self._probes.pop(node, None)
        if connection is not None:
            await connection.close()

    async def round(self, only: Iterable[Node] | None = None) -> None:
        """Probe the nodes (all by default) concurrently and apply what the probes saw."""
        if self.before_round is not None and only is None:
            try:
                await self.before_round()
            except Exception:
                logger.exception("%s: member source failed", self.name)
        nodes = list(only) if only is not None else list(self.cluster)
        timeout = self.settings.timeout
        results = await asyncio.gather(
            *(self._probe_connection(node).probe(timeout) for node in nodes),
            return_exceptions=True,
        )
        self.rounds += 1
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result
        await self._absorb(dict(zip(nodes, results, strict=True)), time.monotonic())

    async def _absorb(
        self, results: Mapping[Node, ProbeResult | BaseException], now: float
    ) -> None:
        # Roles first, then the primary's history: standbys are judged against both.
        # Histories first (the only I/O here), so that roles and every standby's verdict
        # change together: no read may see the new primary with standbys judged by the old.
        await self._learn_histories(results)
        self.cluster.observe(
            {n: r.identity if isinstance(r, ProbeResult) else r for n, r in results.items()}
        )
        primary = self.cluster.primary
        result = results.get(primary) if primary is not None else None
        if isinstance(result, ProbeResult):
            if result.lsn is not None:
                self._history.append((now, result.lsn))
            self._primary_clock = (now, result.clock)
        # The primary first: a standby's lag is against this round's primary position.
        ordered = sorted(results.items(), key=lambda item: item[0] is not primary)
        for node, result in ordered:
            if isinstance(result, ProbeResult):
                self._apply(node, result, now)
            else:
                node.note_error(result)
                if node.paused:
                    # Its HA manager stopped it on purpose (a switchover restarts the old
                    # primary): it takes no queries meanwhile, but it is not evicted.
                    continue
                self._transition(node, self._state(node).failure())

    @property
    def history(self) -> History | None:
        """The current primary's timeline history (``None`` before one is known)."""
        primary = self.cluster.primary
        if primary is None or primary.timeline is None:
            return None
        return self._histories.get((primary.server, primary.timeline))

    async def _learn_histories(self, results: Mapping[Node, ProbeResult | BaseException]) -> None:
        """Read the history of every member out of recovery, once per (server, timeline)."""
        now = time.monotonic()
        for node, result in results.items():
            if not isinstance(result, ProbeResult) or result.in_recovery:
                continue
            timeline = result.identity.timeline
            if timeline is None:
                continue
            key = (result.identity.server, timeline)
            known = self._histories.get(key)
            if known is not None and (known.complete or now < self._history_retry.get(key, 0)):
                continue
            self._histories[key] = await self._read_history(node, timeline, key)

    async def _read_history(self, node: Node, timeline: int, key: tuple[object, int]) -> History:
        if timeline <= 1:
            return History(timeline)
        try:
            text = await self._probe_connection(node).read_history(timeline, self.settings.timeout)
            return parse_history(timeline, text)
        except Exception as exc:
            self._history_retry[key] = time.monotonic() + HISTORY_RETRY
            logger.warning(
                "%s: cannot read timeline %s's history on %s (%s); standbys on an older "
                "timeline serve nothing until they receive timeline %s",
                self.settings.name,
                timeline,
                node.name,
                f"{type(exc).__name__}: {exc}".strip()[:200],
                timeline,
            )
            return History(timeline, complete=False)

    def _standby_timeline(self, node: Node, result: ProbeResult) -> int | None:
        """The timeline a standby is on: what its WAL receiver receives, else last seen."""
        if result.received_tli is not None:
            self._received[node] = result.received_tli
            return result.received_tli
        return self._received.get(node, result.identity.timeline)

    async def first_probe(self, node: Node, timeout: float) -> ProbeResult:
        """``connect()``'s probe of ``node``, on the probe connection the loop keeps using."""
        return await first_probe(self._probe_connection(node), timeout)

    async def cancel_backend(self, node: Node, pid: int, timeout: float) -> None:
        """Cancel a query of ``node``'s pool by backend pid (see ``ProbeConnection``)."""
        if not self._stopped:
            await self._probe_connection(node).cancel_backend(pid, timeout)

    async def wait_backend_gone(self, node: Node, pid: int, timeout: float) -> None:
        """Wait until a closed connection's backend has exited on ``node``."""
        if not self._stopped:
            await self._probe_connection(node).wait_gone(pid, timeout)

    def _probe_connection(self, node: Node) -> ProbeConnection:
        connection = self._probes.get(node)
        if connection is None:
            connection = self._probes[node] = ProbeConnection(node, self.connection_failed)
        return connection

    def _lag_seconds(self, result: ProbeResult, now: float) -> float:
        """How far behind the primary a standby is, in seconds, from server facts.

        The history of the primary's positions says when the primary passed the standby's
        replay position. When the standby was already behind before the oldest entry (at
        startup, say), the history cannot tell: the age of its last replayed commit by the
        primary's clock bounds the lag from above, and is used, so that a standby already
        far behind is ``lagging`` from its first probe.
        """
        replay_lsn = result.lsn or 0
        behind_since = None
        for seen_at, lsn in self._history:
            if lsn > replay_lsn:
                behind_since = seen_at
                break
        age = result.replay_age
        if result.replay_at is not None and self._primary_clock is not None:
            seen_at, clock = self._primary_clock
            age = max(0.0, clock + (now - seen_at) - result.replay_at)
        if behind_since is None:
            return 0.0
        history_lag = max(0.0, now - behind_since)
        if self._history and behind_since == self._history[0][0]:
            # Behind since before we started watching: the history is no bound.
            return age if age is not None else history_lag
        return history_lag if age is None else min(age, history_lag)

    def _apply(self, node: Node, result: ProbeResult, now: float) -> None:
        node.last_probe = now
        node.lsn = result.lsn
        previous = self._latency.get(node)
        latency = (
            result.latency_ms
            if previous is None
            else (_EWMA * result.latency_ms + (1 - _EWMA) * previous)
        )
        self._latency[node] = latency
        node.latency_ms = latency
        cluster = self.cluster
        primary = cluster.primary
        if node is primary:
            node.lag_bytes = node.lag_seconds = None
            self._transition(node, self._state(node).success(None, None))
            return
        if cluster.refused(node) is not None or not result.in_recovery:
            # Another cluster, a duplicate entry, or out of recovery without being the
            # primary (a former primary on an older timeline, or split brain): it serves
            # nothing until that changes.
            node.lag_bytes = node.lag_seconds = None
            self._transition(node, self._state(node).force_down())
            return
        timeline = self._standby_timeline(node, result)
        history = self.history
        if history is not None and not history.follows(timeline, result.lsn):
            node.lag_bytes = node.lag_seconds = None
            why = _off_history(timeline, result.lsn, history)
            self._transition(node, self._state(node).diverge(), reason=why)
            return
        lag_bytes: int | None = None
        lag_seconds: float | None = None
        if result.lsn is not None and primary is not None and primary.lsn is not None:
            lag_bytes = max(0, primary.lsn - result.lsn)
            lag_seconds = 0.0 if lag_bytes == 0 else self._lag_seconds(result, now)
        node.lag_bytes = lag_bytes
        node.lag_seconds = lag_seconds
        slow = self._is_slow(node, latency)
        self._transition(node, self._state(node).success(lag_seconds, lag_bytes, slow=slow))

    def _is_slow(self, node: Node, latency: float) -> bool:
        factor = self.settings.slow_factor
        if factor is None:
            return False
        peers = [
            value
            for other, value in self._latency.items()
            if other is not node and other.state != "down" and other in self._states
        ]
        if not peers:
            return False
        threshold = max(factor * statistics.median(peers), SLOW_FLOOR_MS)
        was_slow = self._slow.get(node, False)
        # Hysteresis: once slow, the node must come back under half the threshold.
        slow = latency > (threshold * 0.5 if was_slow else threshold)
        if slow != was_slow:
            logger.warning(
                "%s: %s probe latency %.1f ms is %s (threshold %.1f ms)",
                self.settings.name,
                node.name,
                latency,
                "slow" if slow else "normal again",
                threshold,
            )
        self._slow[node] = slow
        return slow

    def connection_failed(self, node: Node, exc: BaseException) -> None:
        """Passive detection: a query failed at the connection level on ``node``.

        A replica goes down at once (reads have other homes; probes readmit it). For the
        primary one broken connection is not proof (a terminated backend, a restarted
        pooler): wake the loop so a probe decides now.
        """
        if node is self.cluster.primary or node.paused:
            self._wake.set()
            return
        if node.state != "down":
            self._transition(node, self._state(node).force_down(), reason=exc)
            self._wake.set()

    def _transition(
        self, node: Node, new_state: State, reason: BaseException | str | None = None
    ) -> None:
        old_state = node.state
        if new_state == old_state or self._halted:
            return
        if self._seeding and new_state != "diverged":  # initial states are no news
            node.state = new_state
            return
        name = self.settings.name
        old = node.status()
        node.state = new_state
        if new_state == "down":
            node.evictions += 1
            stale = node.reset_pool()
            self._spawn(stale.close(), f"{name}-{node.name}-evict")
        logger.log(
            _LEVELS.get(new_state, logging.WARNING),
            "%s: %s %s -> %s %s",
            name,
            node.name,
            old_state,
            new_state,
            _why(node, new_state, reason),
        )
        new = node.status()
        for callback in list(self.callbacks):
            try:
                outcome = callback(old, new)
                if inspect.isawaitable(outcome):
                    self._spawn(_guard(outcome, name), f"{name}-callback")
            except Exception:
                logger.exception("%s: on_state_change callback failed", name)


_LEVELS = {"up": logging.INFO, "diverged": logging.ERROR}


def _why(node: Node, new_state: State, reason: BaseException | str | None) -> str:
    """The reason a transition logs: the error, the history, or the lag figures."""
    if isinstance(reason, str):
        return reason
    if new_state == "down":
        return node.last_error or ""
    if node.lag_seconds is not None and node.latency_ms is not None:
        return f"lag {node.lag_seconds:.2f}s/{node.lag_bytes}B latency {node.latency_ms:.1f}ms"
    return ""


def _off_history(timeline: int | None, position: int | None, history: History) -> str:
    """Why a standby is off the primary's history, for the log and ``status()``."""
    where = f"timeline {timeline} at {format_lsn(position) if position is not None else '?'}"
    branch = history.branches.get(timeline) if timeline is not None else None
    if branch is not None:
        return (
            f"replays {where}, past where the primary's timeline {history.timeline} "
            f"branched off it ({format_lsn(branch)}): WAL the primary never wrote"
        )
    if not history.complete and timeline is not None and timeline < history.timeline:
        return (
            f"replays {where}, an older timeline than the primary's {history.timeline}, "
            "whose history could not be read"
        )
    return f"replays {where}, which is not on the primary's timeline {history.timeline} history"


async def _guard(awaitable: Any, name: str) -> None:
    try:
        await awaitable
    except Exception:
        logger.exception("%s: on_state_change callback failed", name)
