"""Health: probes, the per-node state machine and the background ``HealthMonitor``.

A probe runs on a dedicated connection per node (never a pool connection), bounded by
``health_timeout``, and reads in one round trip whether the node is in recovery, its WAL
position (replay position on a standby, current position on a primary) and, on a standby,
the age of the last replayed transaction.

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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .consistency import parse_lsn, token_position
from .node import Node, State

if TYPE_CHECKING:
    from .manager import ReplicaManager

__all__ = ["HealthMonitor", "HealthState", "ProbeResult", "probe"]

logger = logging.getLogger("areplica")

PROBE_SQL = (
    "SELECT pg_is_in_recovery(),"
    " CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()::text"
    " ELSE pg_current_wal_insert_lsn()::text END,"
    " CASE WHEN pg_is_in_recovery()"
    " THEN extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp())::float8"
    " END"
)


@dataclass(frozen=True)
class ProbeResult:
    """What one probe saw of one node."""

    in_recovery: bool
    lsn: int | None
    replay_age: float | None
    latency_ms: float


class ProbeConnection:
    """A node's dedicated probe connection, reopened after any failure."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._conn: Any = None
        # check() may probe while the background round does: one probe at a time per
        # connection, or both would open (and one leak) a connection, or share a cursor.
        self._lock = asyncio.Lock()

    async def probe(self, timeout: float) -> ProbeResult:
        """Probe the node, bounded by ``timeout``; a failure closes the connection."""
        async with self._lock:
            try:
                return await asyncio.wait_for(self._probe(timeout), timeout)
            except BaseException:
                await self.close()
                raise

    async def _probe(self, timeout: float) -> ProbeResult:
        driver = self.node.driver
        if self._conn is None or driver.is_closed(self._conn):
            self._conn = await driver.connect(self.node.dsn.conninfo, timeout)
        # Latency is the query's round trip only: a reconnect is not the node being slow.
        started = time.perf_counter()
        async with self._conn.cursor() as cursor:
            await cursor.execute(PROBE_SQL)
            row = await cursor.fetchone()
        latency_ms = (time.perf_counter() - started) * 1000.0
        in_recovery, lsn_text, replay_age = row
        return ProbeResult(
            in_recovery=bool(in_recovery),
            lsn=_position(lsn_text, bool(in_recovery)),
            replay_age=float(replay_age) if replay_age is not None else None,
            latency_ms=latency_ms,
        )

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await self.node.driver.close(conn)


def _position(text: str | None, in_recovery: bool) -> int | None:
    if not text:
        return None
    lsn = parse_lsn(text)
    # A primary's insert position may sit just past a page header that no replay can end
    # in: count from the page start, or an idle, caught-up replica would show 24 bytes lag.
    return lsn if in_recovery else token_position(lsn)


async def probe(node: Node, timeout: float) -> ProbeResult:
    """One probe on a throwaway connection (used by ``connect()`` and ``areplica status``)."""
    connection = ProbeConnection(node)
    try:
        return await connection.probe(timeout)
    finally:
        await connection.close()


@dataclass
class HealthState:
    """The state machine of one node (pure: fed with probe outcomes, returns the state).

    - ``up``/``lagging`` -> ``down`` after ``fail_after`` failed probes in a row, or at once
      by ``force_down()`` (a query failed at the connection level).
    - ``down`` -> ``up`` (or ``lagging``) after ``recover_after`` good probes in a row.
    - ``up`` -> ``lagging`` when lag exceeds a limit (or the node is slow);
      ``lagging`` -> ``up`` only when lag is back under ``hysteresis`` x the limit (and the
      node is no longer slow), so a node hovering at the limit does not flap.
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

    def success(
        self, lag_seconds: float | None, lag_bytes: int | None, *, slow: bool = False
    ) -> State:
        """A probe answered; lag is ``None`` on a primary."""
        self.failures = 0
        self.successes += 1
        if self.state == "down":
            if self.successes < self.recover_after:
                return self.state
            self.state = "lagging" if slow or self._over(lag_seconds, lag_bytes, 1.0) else "up"
        elif self.state == "up":
            if slow or self._over(lag_seconds, lag_bytes, 1.0):
                self.state = "lagging"
        elif not slow and not self._over(lag_seconds, lag_bytes, self.hysteresis):
            self.state = "up"
        return self.state


# A replica is "slow" when its probe latency stays above ``slow_factor`` times the median of
# its peers' (the other readers', or the primary's when it has no peer) and above this floor:
# sub-millisecond loopback latencies vary by far more than 10x without meaning anything.
SLOW_FLOOR_MS = 20.0
_EWMA = 0.5


class HealthMonitor:
    """The background task that probes every node of a manager each ``health_interval``."""

    def __init__(self, manager: ReplicaManager) -> None:
        self.manager = manager
        self.name = f"{manager.name}-health"
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
        self.split_brain = False
        self.rounds = 0
        self._tasks: set[asyncio.Future[Any]] = set()

    def __repr__(self) -> str:
        return f"<HealthMonitor {self.name} rounds={self.rounds}>"

    def _state(self, node: Node) -> HealthState:
        state = self._states.get(node)
        if state is None:
            mgr = self.manager
            state = HealthState(
                fail_after=mgr.fail_after,
                recover_after=mgr.recover_after,
                max_lag=mgr.max_lag,
                max_lag_bytes=mgr.max_lag_bytes,
                state=node.state,
            )
            self._states[node] = state
        return state

    def seed(self, outcome: Mapping[str, ProbeResult | BaseException]) -> None:
        """Initial states from ``connect()``'s probes: reachable nodes start up at once."""
        primary = self.manager._primary
        now = time.monotonic()
        if primary is not None and primary.lsn is not None:
            self._history.append((now, primary.lsn))
        for node in self.manager._all_nodes():
            result = outcome.get(node.name)
            state = self._state(node)
            if isinstance(result, ProbeResult):
                state.successes = state.recover_after
                self._apply(node, result, now)
            else:
                state.state = "down"
                node.state = "down"

    def start(self) -> None:
        """Start the probe loop (called by ``connect()``)."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        """Ask the loop to stop, wait a little, then cancel it; close probe connections."""
        self._stop.set()
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), self.manager.health_timeout + 1.0)
            except (asyncio.TimeoutError, Exception):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for connection in list(self._probes.values()):
            await connection.close()
        self._probes.clear()
        while self._tasks:  # pool closings and async callbacks started by transitions
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _spawn(self, awaitable: Any, name: str) -> None:
        task = asyncio.ensure_future(awaitable)
        if isinstance(task, asyncio.Task):
            task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self) -> None:
        interval = self.manager.health_interval
        while not self._stop.is_set():
            try:
                await self.round()
            except Exception:  # CancelledError passes: close() must win
                logger.exception("%s: health round failed", self.name)
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)

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
        mgr = self.manager
        nodes = list(only) if only is not None else mgr._all_nodes()
        timeout = mgr.health_timeout
        results = await asyncio.gather(
            *(self._probe_connection(node).probe(timeout) for node in nodes),
            return_exceptions=True,
        )
        self.rounds += 1
        now = time.monotonic()
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result
        # The primary's position first: replica lag is measured against it.
        self._discover_primary(dict(zip(nodes, results, strict=True)))
        primary = mgr._primary
        if primary is not None and primary in nodes:
            result = results[nodes.index(primary)]
            if isinstance(result, ProbeResult) and result.lsn is not None:
                self._history.append((now, result.lsn))
        for node, result in zip(nodes, results, strict=True):
            if isinstance(result, ProbeResult):
                self._apply(node, result, now)
            else:
                node.note_error(result)
                self._transition(node, self._state(node).failure())

    def _probe_connection(self, node: Node) -> ProbeConnection:
        connection = self._probes.get(node)
        if connection is None:
            connection = self._probes[node] = ProbeConnection(node)
        return connection

    def _discover_primary(self, results: Mapping[Node, ProbeResult | BaseException]) -> None:
        """Follow the node that is out of recovery; refuse to pick between two (split brain)."""
        mgr = self.manager
        for node, result in results.items():
            if isinstance(result, ProbeResult):
                node.in_recovery = result.in_recovery
        writers = [
            n
            for n in mgr._all_nodes()
            if n.in_recovery is False
            and not isinstance(results.get(n), BaseException)
            and (n in results or n is mgr._primary)
        ]
        current = mgr._primary
        if len(writers) > 1:
            if not self.split_brain:
                logger.error(
                    "%s: split brain: %s are all out of recovery; refusing writes until one "
                    "is a standby again",
                    mgr.name,
                    ", ".join(n.label for n in writers),
                )
            self.split_brain = True
            return
        if self.split_brain:
            logger.warning("%s: split brain resolved", mgr.name)
        self.split_brain = False
        if len(writers) == 1 and writers[0] is not current:
            new = writers[0]
            reachable_old = current is not None and isinstance(results.get(current), ProbeResult)
            if current is not None and reachable_old and current.in_recovery is False:
                return  # cannot happen (two writers) but never switch while the old one writes
            logger.warning(
                "%s: %s is out of recovery: it is the primary now (was %s)",
                mgr.name,
                new.label,
                current.name if current else None,
            )
            if current is not None:
                current.role = "replica"
                current.weight = mgr._weights.get(current.name, 1.0)
            new.role = "primary"
            new.lag_bytes = new.lag_seconds = None
            mgr._primary = new
        elif current is not None and current.in_recovery is True and not writers:
            # The primary went into recovery (demoted); no node takes writes right now.
            logger.error(
                "%s: primary %s is in recovery; no node takes writes", mgr.name, current.label
            )
            current.role = "replica"
            mgr._primary = None

    def _lag_seconds(self, replay_lsn: int, replay_age: float | None, now: float) -> float:
        behind_since = None
        for seen_at, lsn in self._history:
            if lsn > replay_lsn:
                behind_since = seen_at
                break
        history_lag = max(0.0, now - behind_since) if behind_since is not None else 0.0
        if replay_age is None:
            return history_lag
        return max(0.0, min(replay_age, history_lag)) if behind_since is not None else 0.0

    def _apply(self, node: Node, result: ProbeResult, now: float) -> None:
        mgr = self.manager
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
        primary = mgr._primary
        if node is primary:
            node.lag_bytes = node.lag_seconds = None
            self._transition(node, self._state(node).success(None, None))
            return
        if not result.in_recovery:
            # Out of recovery but not the primary (split brain, or a stray primary): it is
            # on another timeline, so it serves nothing until it is a standby again.
            node.lag_bytes = node.lag_seconds = None
            self._transition(node, self._state(node).force_down())
            return
        lag_bytes: int | None = None
        lag_seconds: float | None = None
        if result.lsn is not None and primary is not None and primary.lsn is not None:
            lag_bytes = max(0, primary.lsn - result.lsn)
            lag_seconds = (
                0.0 if lag_bytes == 0 else self._lag_seconds(result.lsn, result.replay_age, now)
            )
        node.lag_bytes = lag_bytes
        node.lag_seconds = lag_seconds
        slow = self._is_slow(node, latency)
        self._transition(node, self._state(node).success(lag_seconds, lag_bytes, slow=slow))

    def _is_slow(self, node: Node, latency: float) -> bool:
        factor = self.manager.slow_factor
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
                self.manager.name,
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
        if node is self.manager._primary:
            self._wake.set()
            return
        if node.state != "down":
            self._transition(node, self._state(node).force_down(), reason=exc)

    def _transition(
        self, node: Node, new_state: State, reason: BaseException | None = None
    ) -> None:
        old_state = node.state
        if new_state == old_state:
            return
        old = node.status()
        node.state = new_state
        if new_state == "down":
            node.evictions += 1
            stale = node.reset_pool()
            self._spawn(stale.close(), f"{self.manager.name}-{node.name}-evict")
        why = (
            node.last_error
            if new_state == "down"
            else (
                f"lag {node.lag_seconds:.2f}s/{node.lag_bytes}B latency {node.latency_ms:.1f}ms"
                if node.lag_seconds is not None and node.latency_ms is not None
                else ""
            )
        )
        level = logging.INFO if new_state == "up" else logging.WARNING
        logger.log(
            level, "%s: %s %s -> %s %s", self.manager.name, node.name, old_state, new_state, why
        )
        new = node.status()
        for callback in list(self.manager._callbacks):
            try:
                outcome = callback(old, new)
                if inspect.isawaitable(outcome):
                    self._spawn(_guard(outcome, self.manager.name), f"{self.manager.name}-callback")
            except Exception:
                logger.exception("%s: on_state_change callback failed", self.manager.name)


async def _guard(awaitable: Any, name: str) -> None:
    try:
        await awaitable
    except Exception:
        logger.exception("%s: on_state_change callback failed", name)
