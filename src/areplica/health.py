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
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ._compat import bounded
from ._compat import timeout as _timeout
from .cluster import Cluster, Identity
from .consistency import format_lsn, parse_lsn, token_position
from .errors import NodeUnavailableError
from .history import History, parse_history
from .node import IDENTITY_SQL, Node, NodeStatus, ServerKey, State
from .options import Options

__all__ = [
    "HealthMonitor",
    "HealthSettings",
    "HealthState",
    "ProbeConnection",
    "ProbeResult",
    "first_probe",
    "probe",
]

logger = logging.getLogger("areplica")

PROBE_SQL = (
    "SELECT pg_is_in_recovery(),"
    " CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()::text"
    " ELSE pg_current_wal_insert_lsn()::text END,"
    " extract(epoch FROM pg_last_xact_replay_timestamp())::float8,"
    " extract(epoch FROM clock_timestamp())::float8,"
    " (SELECT system_identifier FROM pg_control_system()),"
    # A primary's timeline is in its current WAL file name (the checkpoint's lags behind a
    # promotion); a standby's is the one it replays.
    " CASE WHEN pg_is_in_recovery() THEN (SELECT timeline_id FROM pg_control_checkpoint())"
    " ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END,"
    " extract(epoch FROM pg_postmaster_start_time())::float8,"
    " current_setting('port')::int,"
    # The timeline a standby receives (its upstream's): NULL on a primary, and while its
    # WAL receiver is not running (then the last one seen stands, else the checkpoint's).
    " (SELECT received_tli FROM pg_stat_wal_receiver)"
)

#: The primary's timeline history file (a promotion writes it): needs pg_read_server_files
#: (or EXECUTE on pg_read_file), see the README's "What it needs from PostgreSQL".
HISTORY_SQL = "SELECT pg_read_file('pg_wal/' || upper(lpad(to_hex(%s), 8, '0')) || '.history')"
#: Seconds before a history file that could not be read is tried again.
HISTORY_RETRY = 30.0


#: Fresh connections, beyond the probe's, that judge what a member's address leads to.
SAMPLES = 2
#: Pooled connections opened at connect, at the same time as the probe's (their servers
#: must all be one).
WARM = 2
#: Seconds ``close()`` waits for an abandoned probe query to end.
ABANDON_WAIT = 1.0


@dataclass(frozen=True)
class ProbeResult:
    """What one probe saw of one node."""

    in_recovery: bool
    lsn: int | None
    #: When the last replayed transaction committed (epoch seconds, standbys only).
    replay_at: float | None
    #: The server's clock at the probe (epoch seconds).
    clock: float
    latency_ms: float
    identity: Identity
    #: The timeline a standby's WAL receiver receives (``None``: a primary, or not streaming).
    received_tli: int | None = None

    @property
    def replay_age(self) -> float | None:
        """Seconds since the last replayed commit, by the node's own clock."""
        return None if self.replay_at is None else max(0.0, self.clock - self.replay_at)


class ProbeConnection:
    """A node's dedicated probe connection, reopened after any failure.

    What it measures is the server's, not a pooler's in front of it:

    - latency is the probe query's round trip alone; when that is over ``SLOW_FLOOR_MS``
      a second, trivial round trip is timed and the better one counts (a pooler that had to
      open a server connection for the first query made it slow, not the server);
    - a probe that got no answer within its timeout is left waiting on its connection, and
      the probes after it fail at once while it is still unanswered: a hung server costs one
      timeout, not one per round, also behind a pooler (which answers a new connection
      itself, so a reconnect would wait a whole timeout again), and the node is ``down``
      within ``health_interval * fail_after + health_timeout``;
    - its first answer on a fresh connection says which server it reached
      (``ServerWatch``); while the member is in question or refused, fresh connections
      opened at the same time (``SAMPLES`` more) judge what its address leads to.
      ``on_change`` is told when the server behind the address changed.
    """

    def __init__(
        self, node: Node, on_change: Callable[[Node, BaseException], None] | None = None
    ) -> None:
        self.node = node
        self.on_change = on_change
        self._conn: Any = None
        #: The server the connection reached (its first answer).
        self._key: ServerKey | None = None
        # check() may probe while the background round does: one probe at a time per
        # connection, or both would open (and one leak) a connection, or share a cursor.
        self._lock = asyncio.Lock()
        #: A probe query that outlived its timeout, still waiting for its answer.
        self._pending: asyncio.Task[ProbeResult] | None = None
        self._pending_since = 0.0
        #: Abandoned probe queries ending in the background (closed with the connection).
        self._abandoned: set[asyncio.Task[Any]] = set()

    async def probe(self, timeout: float) -> ProbeResult:
        """Probe the node, bounded by ``timeout``; a failure closes the connection.

        A node that is down is probed on a fresh connection every time: readmission needs
        the node to accept new connections (a server at ``max_connections`` still answers
        on an old one, and would flap up and down).
        """
        self._check_pending(timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        fresh = False
        try:
            # The wait for the connection (a cancel request may be using it) counts: a
            # probe that cannot run within its timeout is a failed probe.
            async with _timeout(timeout), self._lock:
                current = self.node.servers.current
                if self.node.state == "down" or (
                    self._key is not None and current is not None and self._key != current
                ):
                    await self.close()  # readmission, or its server is not the member's now
                driver = self.node.driver
                if self._conn is None or driver.is_closed(self._conn):
                    await self.close()
                    self._conn = await driver.connect(self.node.dsn.conninfo, timeout)
                    fresh = True
                # The query in its own task: when it outlives the timeout it is left
                # waiting for its answer (see the class docstring).
                task = loop.create_task(self._probe(timeout), name=f"{self.node.name}-probe")
                try:
                    result = await asyncio.shield(task)
                except asyncio.CancelledError:
                    if task.done():
                        raise
                    self._pending = task
                    self._pending_since = time.monotonic()
                    task.add_done_callback(_retrieve)
                    raise
        except asyncio.TimeoutError as exc:
            if self._pending is None:
                await asyncio.shield(self.close())
            raise asyncio.TimeoutError(f"no answer within {timeout:g}s") from exc
        except BaseException:
            if self._pending is None:
                await asyncio.shield(self.close())
            raise
        key = result.identity.server
        if key is not None:
            await self._check_server(key, fresh, deadline)
        return result

    def _check_pending(self, timeout: float) -> None:
        """Fail at once while an earlier probe query is still unanswered (node not down)."""
        pending = self._pending
        if pending is None:
            return
        if not pending.done() and self.node.state != "down":
            waited = time.monotonic() - self._pending_since
            raise asyncio.TimeoutError(
                f"no answer within {timeout:g}s (still none {waited:.1f}s later)"
            )
        self._pending = None
        if not pending.done():  # down: probe afresh; this one ends in the background
            self._abandon(pending)
        elif pending.cancelled() or pending.exception() is not None:
            self._forget_connection()

    def _abandon(self, task: asyncio.Task[Any]) -> None:
        conn, self._conn, self._key = self._conn, None, None
        task.cancel()
        self._abandoned.add(task)
        task.add_done_callback(self._abandoned.discard)
        driver = self.node.driver

        def closed(_: asyncio.Task[Any]) -> None:
            if conn is not None:
                disposal = asyncio.ensure_future(driver.close(conn))
                self._abandoned.add(disposal)
                disposal.add_done_callback(self._abandoned.discard)
                disposal.add_done_callback(_retrieve)

        task.add_done_callback(closed)

    def _forget_connection(self) -> None:
        """Its last query failed in the background: reconnect next time (closed later)."""
        conn, self._conn, self._key = self._conn, None, None
        if conn is not None:
            disposal = asyncio.ensure_future(self.node.driver.close(conn))
            self._abandoned.add(disposal)
            disposal.add_done_callback(self._abandoned.discard)
            disposal.add_done_callback(_retrieve)

    async def _check_server(self, key: ServerKey, fresh: bool, deadline: float) -> None:
        """Check the server this connection reached against the member's (``ServerWatch``)."""
        watch = self.node.servers
        usable = True
        if fresh:
            self._key = key
            usable = watch.opened(key)
        if usable and not watch.unsettled:
            return
        keys = {key, *await self._samples(deadline)}
        verdict = watch.judge(keys)
        if verdict == "several":
            self.note_refusal()
        elif verdict == "changed":
            exc = NodeUnavailableError(
                f"node {self.node.name!r}: the server behind its address changed; "
                "connections to the old one are discarded",
                node=self.node.name,
            )
            self.node.note_error(exc)
            if self.on_change is not None:
                self.on_change(self.node, exc)

    def note_refusal(self) -> None:
        """Show why the member is refused in its status (``last_error``) and its logs."""
        refusal = self.node.servers.refusal
        if refusal is not None:
            self.node.note_error(NodeUnavailableError(f"refused: {refusal}", node=self.node.name))

    async def _samples(self, deadline: float) -> list[ServerKey]:
        """The servers ``SAMPLES`` fresh connections reach, opened at the same time."""
        driver = self.node.driver
        loop = asyncio.get_running_loop()

        async def one() -> ServerKey:
            conn = await driver.connect(self.node.dsn.conninfo, deadline - loop.time())
            try:
                async with conn.cursor() as cursor:
                    await cursor.execute(IDENTITY_SQL)
                    row = await cursor.fetchone()
            finally:
                await driver.close(conn)
            return (int(row[0]), float(row[1]), int(row[2]))

        left = max(0.0, deadline - loop.time())
        found = await asyncio.gather(
            *(bounded(one(), left) for _ in range(SAMPLES)), return_exceptions=True
        )
        for item in found:
            if isinstance(item, BaseException) and not isinstance(item, Exception):
                raise item
        return [item for item in found if isinstance(item, tuple)]

    async def _probe(self, timeout: float) -> ProbeResult:
        # Latency is the query's round trip only: a reconnect is not the node being slow.
        started = time.perf_counter()
        async with self._conn.cursor() as cursor:
            await cursor.execute(PROBE_SQL)
            row = await cursor.fetchone()
        latency_ms = (time.perf_counter() - started) * 1000.0
        if latency_ms > SLOW_FLOOR_MS:
            latency_ms = min(latency_ms, await self._round_trip())
        in_recovery, lsn_text, replay_at, clock, system_id, timeline, started_at, port = row[:8]
        received_tli = int(row[8]) if row[8] is not None else None
        in_recovery = bool(in_recovery)
        if received_tli is not None:
            timeline = received_tli  # the checkpoint's trails a promotion upstream
        return ProbeResult(
            in_recovery=in_recovery,
            lsn=_position(lsn_text, in_recovery),
            replay_at=float(replay_at) if replay_at is not None else None,
            clock=float(clock),
            latency_ms=latency_ms,
            identity=Identity(
                in_recovery=in_recovery,
                system_id=int(system_id) if system_id is not None else None,
                timeline=int(timeline) if timeline is not None else None,
                server=(int(system_id), float(started_at), int(port))
                if system_id is not None
                else None,
            ),
            received_tli=received_tli,
        )

    async def _round_trip(self) -> float:
        """Milliseconds of one trivial query: the server's latency, a pooler's set-up aside."""
        started = time.perf_counter()
        async with self._conn.cursor() as cursor:
            await cursor.execute("SELECT 1")
            await cursor.fetchone()
        return (time.perf_counter() - started) * 1000.0

    def _busy(self) -> bool:
        return self._pending is not None and not self._pending.done()

    async def read_history(self, timeline: int, timeout: float) -> str:
        """The text of timeline ``timeline``'s history file on this node (its primary)."""
        if self._busy():
            raise asyncio.TimeoutError("its probe connection is still waiting for an answer")
        row = await self._on_probe(timeout, HISTORY_SQL, (timeline,))
        return str(row[0])

    async def cancel_backend(self, pid: int, timeout: float) -> None:
        """``pg_cancel_backend(pid)`` on this node, over the probe connection.

        The fallback cancel path when no cancel request could be sent, for a backend pid
        read from the server itself (never behind a pooler): it needs no connection beyond
        the probe's, so a node never sees more than ``pool_size`` + 1 of our backends.
        """
        if self.node.state == "down" or self._busy():
            return  # its pool was dropped already; a hung server would only make us wait
        await self._on_probe(timeout, "SELECT pg_cancel_backend(%s)", (pid,))

    async def wait_gone(self, pid: int, timeout: float) -> None:
        """Wait until backend ``pid`` has left ``pg_stat_activity`` (it exits after a close)."""
        if self.node.state == "down" or self._busy():
            return
        sql = "SELECT 1 FROM pg_stat_activity WHERE pid = %s"
        await self._on_probe(timeout, sql, (pid,), until_none=True)

    async def _on_probe(
        self, timeout: float, sql: str, params: tuple[Any, ...], *, until_none: bool = False
    ) -> Any:
        """One row of ``sql`` on the probe connection (opened if needed), within ``timeout``.

        ``until_none``: run it again (backing off) until it returns no row. Any failure
        closes the probe connection (a probe opens a new one).
        """
        async with _timeout(timeout), self._lock:
            try:
                driver = self.node.driver
                if self._conn is None or driver.is_closed(self._conn):
                    await self.close()
                    self._conn = await driver.connect(self.node.dsn.conninfo, timeout)
                delay = 0.001
                while True:
                    async with self._conn.cursor() as cursor:
                        await cursor.execute(sql, params)
                        row = await cursor.fetchone()
                    if not until_none or row is None:
                        return row
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.02)
            except BaseException:
                await asyncio.shield(self.close())
                raise

    async def close(self) -> None:
        """Close the connection; a query still waiting on it is cancelled first (bounded)."""
        pending, self._pending = self._pending, None
        if pending is not None and not pending.done():
            self._abandon(pending)
        conn, self._conn, self._key = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await self.node.driver.close(conn)
        if self._abandoned:
            # Bounded: psycopg waits for a cancelled query to end (up to 10 s on a hung
            # server); the connection is closed when it has.
            with contextlib.suppress(asyncio.TimeoutError):
                async with _timeout(ABANDON_WAIT):
                    while self._abandoned:
                        await asyncio.wait(list(self._abandoned))


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _position(text: str | None, in_recovery: bool) -> int | None:
    if not text:
        return None
    lsn = parse_lsn(text)
    # A primary's insert position may sit just past a page header that no replay can end
    # in: count from the page start, or an idle, caught-up replica would show 24 bytes lag.
    return lsn if in_recovery else token_position(lsn)


async def probe(node: Node, timeout: float) -> ProbeResult:
    """One probe on a throwaway connection (``areplica status``, tests)."""
    connection = ProbeConnection(node)
    try:
        return await first_probe(connection, timeout)
    finally:
        await connection.close()


async def first_probe(connection: ProbeConnection, timeout: float) -> ProbeResult:
    """A node's first probe, and its first ``WARM`` pooled connections opened meanwhile.

    Connections open at the same time on several servers mean the address is several
    servers: the member is refused before any read (``ServerWatch``).
    """
    node = connection.node
    result = await connection.probe(timeout)
    loop = asyncio.get_running_loop()
    keys = await node.pool.warm(WARM, loop.time() + timeout)
    if result.identity.server is not None and keys:
        seen = {result.identity.server, *keys}
        if len(seen) > 1 and node.servers.judge(seen) == "several":
            connection.note_refusal()
    return result


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


# A replica is "slow" when its probe latency stays above ``slow_factor`` times the median of
# its peers' (the other readers', or the primary's when it has no peer) and above this floor:
# sub-millisecond loopback latencies vary by far more than 10x without meaning anything.
SLOW_FLOOR_MS = 20.0
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
