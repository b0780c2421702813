"""A node's probe: one round trip on a dedicated connection, and what it saw.

A probe runs on a dedicated connection per node (never a pool connection), bounded by
``health_timeout``, and reads in one round trip whether the node is in recovery, its WAL
position (replay position on a standby, current position on a primary), on a standby the
age of the last replayed transaction, and the server's identity and timeline. What the
results mean (states, lag, eviction) is ``health.py``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._compat import bounded
from ._compat import timeout as _timeout
from .cluster import Identity
from .consistency import parse_lsn, token_position
from .errors import NodeUnavailableError
from .node import Node
from .pool import IDENTITY_SQL
from .servers import ServerKey

__all__ = [
    "ABANDON_WAIT",
    "HISTORY_SQL",
    "PROBE_SQL",
    "SAMPLES",
    "SLOW_FLOOR_MS",
    "WARM",
    "ProbeConnection",
    "ProbeResult",
    "first_probe",
]

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

#: Fresh connections, beyond the probe's, that judge what a member's address leads to.
SAMPLES = 2
#: Pooled connections opened at connect, at the same time as the probe's (their servers
#: must all be one).
WARM = 2
#: Seconds ``close()`` waits for an abandoned probe query to end.
ABANDON_WAIT = 1.0

# A replica is "slow" when its probe latency stays above ``slow_factor`` times the median of
# its peers' (the other readers', or the primary's when it has no peer) and above this floor:
# sub-millisecond loopback latencies vary by far more than 10x without meaning anything.
SLOW_FLOOR_MS = 20.0


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
