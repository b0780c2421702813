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

In ``causal`` mode every write records the primary's WAL position after its commit in the
session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
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


class WritePath:
    """Writes of one manager (see the module docstring)."""

    def __init__(self, core: Core, sessions: Sessions) -> None:
        self._core = core
        self._sessions = sessions
        self.positions = Positions(core)

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
        short by areplica (its outcome would be unknown). The connection goes back as soon
        as the statement and its results are done when other callers wait for one; the
        position covering the commit is then read by ``Positions`` (one read covers every
        write committed before it). Without contention it is read on the same connection.
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
        lsn: int | None = None
        node.in_flight += 1
        try:
            with peewee.__exception_wrapper__:  # type: ignore[attr-defined]
                async with conn.cursor() as cursor:
                    sent = True
                    await cursor.execute(sql, params or ())
                    # The statement ran (autocommit: it committed). Whatever the result
                    # handling does next, the session's token must cover it.
                    committed = True
                    result, fetch_error = await _fetch_guarded(core.database, cursor, fetch)
                    if causal and (pool.closed or not pool.saturated):
                        # Nobody waits for this connection (or the pool is closing): the
                        # position is read on it at once, which leaves the least time for
                        # a crash between the commit and its position. Under contention
                        # the connection goes back first and a shared read follows.
                        lsn = await _read_position(cursor)
                        timings.position_reads += 1
            discard = fetch_error is not None and core.driver.is_disconnect(fetch_error)
        except Exception as exc:
            if not committed:
                discard = self._failed(node, exc)
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
            await self._record(node, timeline)
        if fetch_error is not None:
            self._failed(node, fetch_error)  # raises NoPrimaryError on a broken connection
            with peewee.__exception_wrapper__:  # type: ignore[attr-defined]
                raise fetch_error  # peewee's error types, as before
        return result

    async def _record(self, node: Node, timeline: int | None) -> None:
        """Note the committed write in the session with the position covering it."""
        started = perf_counter()
        try:
            lsn = await self.positions.after_commit(node)
        except asyncio.CancelledError:
            # Cancelled after the commit: the write stands, its position is unknown.
            self._core.counters.unknown_positions += 1
            self._sessions.note_unknown_write()
            raise
        except Exception as exc:
            self._unknown_position(node, exc)
            return
        finally:
            self._core.timings.write_position_s += perf_counter() - started
        self._sessions.note_write(lsn, timeline)

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


class Positions:
    """The primary's WAL position after commits, one read for every write waiting on it.

    A write committed, its connection given back, waits for the position that covers its
    commit: the result of a read of ``pg_current_wal_insert_lsn()`` *started after* the
    commit was acknowledged (then it covers the commit record). Writes that commit while
    one such read is in flight wait for the next, so each read covers every write that
    committed before it started. One reader task per node reads as long as writes wait,
    on a pool connection taken ahead of the queue (a write's connection is back by then,
    so this never waits behind the writes it serves). A failed read fails every write of
    its batch over to an unknown position (``WritePath._unknown_position``).
    """

    def __init__(self, core: Core) -> None:
        self._core = core
        self._next: dict[Node, asyncio.Future[int]] = {}
        self._readers: dict[Node, asyncio.Task[None]] = {}

    async def after_commit(self, node: Node) -> int:
        """The position covering a write on ``node`` committed before this call."""
        loop = asyncio.get_running_loop()
        future = self._next.get(node)
        if future is None:
            future = loop.create_future()
            future.add_done_callback(_retrieve)
            self._next[node] = future
        reader = self._readers.get(node)
        if reader is None or reader.done():
            self._readers[node] = loop.create_task(
                self._serve(node), name=f"{node.name}-write-positions"
            )
        return await asyncio.shield(future)

    async def _serve(self, node: Node) -> None:
        while (future := self._next.pop(node, None)) is not None:
            try:
                lsn = await self._read(node)
            except BaseException as exc:
                if not future.done():
                    future.set_exception(
                        self._core.not_open() if isinstance(exc, asyncio.CancelledError) else exc
                    )
                if isinstance(exc, asyncio.CancelledError):
                    raise
            else:
                if not future.done():
                    future.set_result(lsn)

    async def _read(self, node: Node) -> int:
        """The primary's insert position now, on a connection of its pool."""
        pool = node.pool
        deadline = None
        if node.pool_timeout is not None:
            deadline = asyncio.get_running_loop().time() + node.pool_timeout
        conn = await pool.acquire(deadline=deadline, first=True)
        self._core.timings.position_reads += 1
        discard = True
        try:
            async with conn.cursor() as cursor:
                lsn = await _read_position(cursor)
            discard = False
        finally:
            pool.release(conn, discard=discard)
        return lsn

    async def close(self) -> None:
        """Stop the readers; a write still waiting sees its position unknown."""
        readers = list(self._readers.values())
        self._readers.clear()
        for reader in readers:
            reader.cancel()
        for reader in readers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        for future in self._next.values():
            if not future.done():
                future.set_exception(self._core.not_open())
        self._next.clear()


async def _read_position(cursor: Any) -> int:
    """The primary's insert position, read on ``cursor`` (after a commit: it covers it)."""
    await cursor.execute(WAL_POSITION_SQL)
    row = await cursor.fetchone()
    return token_position(parse_lsn(row[0]))


def _retrieve(future: asyncio.Future[int]) -> None:
    """Mark a batch's error retrieved: its writers may all be gone (cancelled)."""
    if not future.cancelled():
        future.exception()
