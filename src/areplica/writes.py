"""The write path: the writable primary, ``primary_wait``, the write and its causal token.

A write goes to the primary the cluster knows, never to a standby. While there is no usable
primary (a switchover), it waits up to ``primary_wait`` before anything is sent, so waiting
never sends a write twice. Writes are never retried. What a failure says is what is known:

- no connection was established, or a pooler refused the statement before forwarding it
  (PgBouncer's ``query_wait_timeout``, say): ``NoPrimaryError`` saying it was not applied;
- the statement was sent and the connection broke before its answer: ``NoPrimaryError``
  saying it may or may not have been applied;
- the statement completed but the WAL position read after it failed: the write is
  acknowledged (it committed); its session's position is marked unknown
  (``Sessions.note_unknown_write``), so its next reads require the primary's current
  position or go to the primary. Logged and counted (``unknown_positions``).

In ``causal`` mode every write records in its session the primary's WAL position after its
commit. Without contention (no caller waits for a connection to the primary when the write
is sent, for psycopg; when it is done, for aiopg), the position comes with the write: with
a driver that keeps every result of a query string (psycopg), a single INSERT, UPDATE,
DELETE, MERGE or WITH statement is sent as ``BEGIN; <write>; COMMIT; SELECT
pg_current_wal_insert_lsn()``, one simple query, the position in the write's own round trip
(a failed write leaves the block aborted: it is rolled back before the connection is
reused); other writes, and every write with aiopg (psycopg2 keeps only the last result),
read it on their connection after the commit. Under contention the write is sent as it is
and returns at its commit, reading no position: its session notes it as not read yet (an
epoch), and the session's next read (or ``settled_token()``) settles it with one read of
the primary's position started after it, shared by every write noted before that read
started (``Positions``). A write nobody reads after costs no position at all: under
contention the primary's connections go to writes, not to positions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from time import perf_counter
from typing import Any

import peewee

from .consistency import WAL_POSITION_SQL, parse_lsn, token_position
from .core import Core
from .errors import NodeUnavailableError, NoPrimaryError, PoolTimeoutError
from .node import Node
from .results import FetchResults
from .sessions import Sessions

__all__ = ["Positions", "WritePath"]

logger = logging.getLogger("areplica")

#: A single statement that may run in a transaction block (not DDL such as CREATE INDEX
#: CONCURRENTLY, not a CALL that commits): its position can come in its own round trip.
_IN_BAND = re.compile(r"\s*(?:INSERT|UPDATE|DELETE|MERGE|WITH)\b", re.IGNORECASE)


def in_band(sql: str) -> str | None:
    """``sql`` with its WAL position read after its commit in the same query, or ``None``.

    ``None`` unless ``sql`` is one write statement (no ``;`` in its text: parameters are
    merged in after this, so a semicolon in a value does not count).
    """
    if ";" in sql or not _IN_BAND.match(sql):
        return None
    return f"BEGIN; {sql}; COMMIT; {WAL_POSITION_SQL}"


class WritePath:
    """Writes of one manager (see the module docstring)."""

    def __init__(self, core: Core, sessions: Sessions) -> None:
        self._core = core
        self._sessions = sessions
        self.positions = Positions(core, sessions)

    async def primary_connection(self, until: float | None = None) -> tuple[Node, Any]:
        """The primary and a connection to it, for a write or a transaction.

        While there is no usable primary, or connecting to it fails (a switchover stops the
        old primary before the new one is known), wait up to ``primary_wait``. Nothing has
        been sent at that point, so trying again never sends a write twice. ``until``
        (loop time): no wait for a connection goes past it (a call's ``timeout=``).
        """
        core = self._core
        if core.primary_wait <= 0:
            node = await self._writable_primary(None)
            return node, await self._acquire(node, until)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + core.primary_wait
        if until is not None:
            deadline = min(deadline, until)
        while True:
            node = await self._writable_primary(deadline)
            try:
                return node, await self._acquire(node, until)
            except NoPrimaryError:
                if loop.time() >= deadline:
                    raise
                await asyncio.sleep(0.05)

    async def _writable_primary(self, deadline: float | None) -> Node:
        """The primary for a write; while there is none, wait until ``deadline``."""
        core = self._core
        node = core.usable_primary()
        if node is not None:
            return node
        if deadline is not None:
            node = await self.wait_for_primary(deadline)
            if node is not None:
                return node
        raise self._no_primary()

    async def wait_for_primary(self, deadline: float) -> Node | None:
        """A usable primary, waiting for one until ``deadline`` (loop time); else ``None``."""
        core = self._core
        loop = asyncio.get_running_loop()
        if core.monitor is not None:
            core.monitor.wake()
        node = None
        while node is None and loop.time() < deadline:
            await asyncio.sleep(0.02)
            core.require_open()
            node = core.usable_primary()
        return node

    def _no_primary(self) -> NoPrimaryError:
        core = self._core
        cluster = core.cluster
        node = cluster.primary
        if cluster.split_brain:
            return NoPrimaryError(
                f"{core.name}: more than one node is out of recovery (split brain); "
                "refusing writes, the write was not sent",
                node=node.name if node else None,
            )
        if node is None:
            reason = "no primary is known"
        elif node.paused:
            reason = f"primary {node.label} is stopping (per its HA manager)"
        else:
            reason = f"primary {node.label} is {node.state}"
        waited = f" after waiting {core.primary_wait:g}s" if core.primary_wait > 0 else ""
        return NoPrimaryError(
            f"{core.name}: {reason}{waited}; the write was not sent",
            node=node.name if node else None,
        )

    async def _acquire(self, node: Node, until: float | None = None) -> Any:
        core = self._core
        deadline = None
        if node.pool_timeout is not None or until is not None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + node.pool_timeout if node.pool_timeout is not None else until
            if until is not None and deadline is not None:
                deadline = min(deadline, until)
        try:
            return await node.pool.acquire(deadline=deadline)
        except Exception as exc:
            if not core.is_open:
                raise core.not_open() from exc
            if isinstance(exc, PoolTimeoutError):
                raise  # load, not a dead primary
            if isinstance(exc, NodeUnavailableError) or core.driver.is_disconnect(exc):
                node.note_error(exc)
                core.connection_failed(node, exc)
                raise NoPrimaryError(
                    f"{core.name}: primary {node.label} is unreachable "
                    f"({type(exc).__name__}); the write was not sent (not applied)",
                    node=node.name,
                ) from exc
            raise

    async def write(
        self,
        sql: str,
        params: Sequence[Any] | None,
        fetch: FetchResults | None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Run one write on the primary (autocommit) and record its causal token.

        ``timeout`` bounds the wait for a connection only: a write once sent is never cut
        short by areplica (its outcome would be unknown). Without contention the position
        covering the commit comes in the write's round trip (psycopg) or is read on the same
        connection (aiopg). When other callers wait for a connection, it goes back as soon as
        the statement and its results are done and the write returns, its position unread:
        the session's next read settles it (``Positions``, one read for every write before).
        """
        core = self._core
        timings = core.timings
        until = None if timeout is None else asyncio.get_running_loop().time() + timeout
        started = perf_counter()
        try:
            node, conn = await self.primary_connection(until)
        finally:
            acquired = perf_counter()
            timings.slot_wait_s += acquired - started
        pool = node.pool  # the connection goes back where it came from, evicted or not
        timeline = node.timeline
        discard = True
        sent = committed = False
        result: Any = None
        fetch_error: Exception | None = None
        after_commit: Exception | None = None
        causal = core.options.consistency == "causal"
        # With callers waiting for a connection the write is sent bare: no position now.
        in_band_ok = causal and core.driver.all_results and not pool.contended
        wrapped = in_band(sql) if in_band_ok else None
        lsn: int | None = None
        node.in_flight += 1
        try:
            with peewee.__exception_wrapper__:  # type: ignore[attr-defined]
                async with conn.cursor() as cursor:
                    sent = True
                    await cursor.execute(wrapped or sql, params or ())
                    # The statement ran (autocommit, or the block's COMMIT: it committed).
                    # Whatever the result handling does next, the session's token must
                    # cover it.
                    committed = True
                    if wrapped is not None:
                        cursor.nextset()  # past BEGIN, to the write's own result
                    result, fetch_error = await _fetch_guarded(core.database, cursor, fetch)
                    if wrapped is not None:
                        lsn = await _position_in_band(cursor)
                        timings.positions_in_band += 1
                    elif causal and (pool.closed or not pool.contended):
                        # Nobody waits for this connection (or the pool is closing): the
                        # position is read on it at once, which leaves the least time for
                        # a crash between the commit and its position. Under contention
                        # the connection goes back first; the session's next read settles.
                        lsn = await _read_position(cursor)
                        timings.position_reads += 1
            discard = fetch_error is not None and core.driver.is_disconnect(fetch_error)
        except Exception as exc:
            if not committed:
                discard = self._failed(node, exc)
                if wrapped is not None and not core.driver.is_idle(conn):
                    discard = True  # unless the failed write's aborted block ends now
                    discard = not await _roll_back(conn)
                raise
            after_commit = exc  # closing the cursor failed: committed all the same
        except asyncio.CancelledError:
            # Cancelled once the statement was sent: it may have committed (or did). The
            # session's next reads then need the primary's current position.
            if sent:
                core.counters.unknown_positions += 1
                self._sessions.note_unknown_write()
            raise
        finally:
            node.done()
            pool.release(conn, discard=discard)
            timings.write_s += perf_counter() - acquired
        node.writes += 1
        timings.writes += 1
        if after_commit is not None:
            self._unknown_position(node, after_commit)
        elif lsn is not None or not causal:
            self._sessions.note_write(lsn, timeline)
        else:
            # Under contention: acknowledged at its commit. The session requires a position
            # read after it (an epoch): its next read starts one, shared with every write
            # noted before it starts; a session that never reads again costs none.
            self._sessions.note_unknown_write()
            self.positions.noted()
        if fetch_error is not None:
            self._failed(node, fetch_error)  # raises NoPrimaryError on a broken connection
            with peewee.__exception_wrapper__:  # type: ignore[attr-defined]
                raise fetch_error  # peewee's error types, as before
        return result

    def _unknown_position(self, node: Node, exc: Exception) -> None:
        core = self._core
        core.counters.unknown_positions += 1
        self._sessions.note_unknown_write()
        if core.driver.is_disconnect(exc):
            node.note_error(exc)
            core.connection_failed(node, exc)
        logger.warning(
            "%s: a write on %s committed, but reading its WAL position failed (%s): "
            "acknowledged; the session's next reads need the primary's current position",
            core.name,
            node.name,
            type(exc).__name__,
        )

    async def close(self) -> None:
        """Stop the position readers (the manager is closing)."""
        await self.positions.close()

    def _failed(self, node: Node, exc: Exception) -> bool:
        """Translate a failed write's error (raises); False when the connection is reusable."""
        core = self._core
        if core.cut_by_close(exc):
            raise core.not_open() from exc
        if core.driver.not_sent(exc):
            node.note_error(exc)
            raise NoPrimaryError(
                f"{core.name}: a pooler in front of primary {node.label} refused the write "
                f"before forwarding it ({_first_line(exc)}); it was not applied and is not "
                "retried",
                node=node.name,
            ) from exc
        if core.driver.is_disconnect(exc):
            node.note_error(exc)
            core.connection_failed(node, exc)
            raise NoPrimaryError(
                f"{core.name}: the connection to primary {node.label} failed during a write "
                f"({type(exc).__name__}); it may or may not have been applied and is not "
                "retried",
                node=node.name,
            ) from exc
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:120] if text else type(exc).__name__


async def _fetch_guarded(
    database: Any, cursor: Any, fetch: FetchResults | None
) -> tuple[Any, Exception | None]:
    """Run the result handling; an error is returned, not raised (the write committed)."""
    if fetch is None:
        return None, None
    try:
        return await fetch(database, cursor), None
    except Exception as exc:
        return None, exc


#: A read of the primary's position for sessions: (``Sessions.unknown_writes`` when it
#: started, its insert position, the primary's timeline); ``None``: the primary could not say.
Answer = tuple[int, int, "int | None"]
#: Reads the primary's insert position now and the timeline it is on (``None``: no primary
#: answered within ``primary_wait``); given by the read path (``Positions.bind``).
PositionSource = Callable[[], Awaitable["tuple[int, int | None] | None"]]


class Positions:
    """The primary's WAL position for sessions whose writes' positions are not read yet.

    A session needs a read of the primary's insert position *started after* its write was
    acknowledged (then it covers the commit record); ``Sessions.unknown_writes`` orders
    them: a read started when it was N covers every write noted as N or before. A write
    under contention only counts itself (``noted``); the reader task reads while a read of
    a session that needs a position waits for one (``request``), so writes nobody reads
    after cost nothing. Requests that come while a read covering them is in flight join
    it; the others wait for the next, which covers them all. Each answer is remembered by
    the sessions (``Sessions.remember``), which settles later reads it covers without a
    round trip. A read that fails leaves the positions of the writes noted before it
    unknown (counted in ``unknown_positions``, logged): the next read needing one tries
    again.
    """

    def __init__(self, core: Core, sessions: Sessions) -> None:
        self._core = core
        self._sessions = sessions
        self._source: PositionSource | None = None
        self._next: asyncio.Future[Answer | None] | None = None
        #: Writes noted since the last read started (what a failed read leaves unknown).
        self._noted = 0
        self._inflight: tuple[int, asyncio.Future[Answer | None]] | None = None
        self._reader: asyncio.Task[None] | None = None

    def bind(self, source: PositionSource) -> None:
        """Read positions with ``source`` (the read path's, with its bounds and retries)."""
        self._source = source

    def noted(self) -> None:
        """A write under contention was acknowledged without its position (no read starts)."""
        self._noted += 1

    def request(self, need: int) -> asyncio.Future[Answer | None]:
        """The first read covering writes noted up to ``need``, started if none is coming."""
        inflight = self._inflight
        if inflight is not None and inflight[0] >= need:
            return inflight[1]
        loop = asyncio.get_running_loop()
        future = self._next
        if future is None:
            future = self._next = loop.create_future()
            future.add_done_callback(_retrieve)
        if self._reader is None or self._reader.done():
            self._reader = loop.create_task(
                self._serve(), name=f"{self._core.name}-write-positions"
            )
        return future

    async def _serve(self) -> None:
        while (future := self._next) is not None:
            writes, self._next, self._noted = self._noted, None, 0
            start = self._sessions.unknown_writes
            self._inflight = (start, future)
            try:
                found = await self._read()
            except BaseException as exc:
                if not future.done():
                    future.set_exception(
                        self._core.not_open() if isinstance(exc, asyncio.CancelledError) else exc
                    )
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            finally:
                self._inflight = None
            if found is None:
                self._unread(writes)
                answer = None
            else:
                answer = (start, found[0], found[1])
                self._sessions.remember(*answer)
            if not future.done():
                future.set_result(answer)

    async def _read(self) -> tuple[int, int | None] | None:
        if self._source is None:
            raise RuntimeError("Positions.bind() was not called")
        try:
            return await self._source()
        finally:
            self._core.timings.position_reads += 1

    def _unread(self, writes: int) -> None:
        if not writes:
            return
        core = self._core
        core.counters.unknown_positions += writes
        logger.warning(
            "%s: %d write(s) committed, but reading the primary's WAL position after them "
            "failed: acknowledged; their sessions' next reads need the primary's position",
            core.name,
            writes,
        )

    async def close(self) -> None:
        """Stop the reader; a read still waiting sees ``ManagerClosedError``."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        future, self._next = self._next, None
        if future is not None and not future.done():
            future.set_exception(self._core.not_open())


async def _read_position(cursor: Any) -> int:
    """The primary's insert position, read on ``cursor`` (after a commit: it covers it)."""
    await cursor.execute(WAL_POSITION_SQL)
    row = await cursor.fetchone()
    return token_position(parse_lsn(row[0]))


async def _position_in_band(cursor: Any) -> int:
    """The position ``in_band`` read after the commit: the last of the query's results."""
    while cursor.nextset():
        pass
    row = await cursor.fetchone()
    return token_position(parse_lsn(row[0]))


async def _roll_back(conn: Any) -> bool:
    """End a block an in-band write's error left aborted; False: the connection is unusable."""
    try:
        async with conn.cursor() as cursor:
            await cursor.execute("ROLLBACK")
    except Exception:
        return False
    return True


def _retrieve(future: asyncio.Future[Answer | None]) -> None:
    """Mark a batch's error retrieved: its writers may all be gone (cancelled)."""
    if not future.cancelled():
        future.exception()
