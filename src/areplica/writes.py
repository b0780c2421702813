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
import logging
from collections.abc import Sequence
from typing import Any

import peewee

from .consistency import WAL_POSITION_SQL, parse_lsn, token_position
from .core import Core
from .errors import NodeUnavailableError, NoPrimaryError, PoolTimeoutError
from .node import Node
from .results import FetchResults
from .sessions import Sessions

__all__ = ["WritePath"]

logger = logging.getLogger("areplica")


class WritePath:
    """Writes of one manager (see the module docstring)."""

    def __init__(self, core: Core, sessions: Sessions) -> None:
        self._core = core
        self._sessions = sessions

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
            node = await self._wait_for_primary(deadline)
            if node is not None:
                return node
        raise self._no_primary()

    async def _wait_for_primary(self, deadline: float) -> Node | None:
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
        short by areplica (its outcome would be unknown).
        """
        core = self._core
        until = None if timeout is None else asyncio.get_running_loop().time() + timeout
        node, conn = await self.primary_connection(until)
        pool = node.pool  # the connection goes back where it came from, evicted or not
        discard = True
        committed = False
        result: Any = None
        fetch_error: Exception | None = None
        node.in_flight += 1
        try:
            with peewee.__exception_wrapper__:  # type: ignore[attr-defined]
                async with conn.cursor() as cursor:
                    await cursor.execute(sql, params or ())
                    # The statement ran (autocommit: it committed). Whatever the result
                    # handling does next, the session's token must cover it.
                    committed = True
                    result, fetch_error = await _fetch_guarded(core.database, cursor, fetch)
                    lsn = await self._position(cursor)
                node.writes += 1
                self._sessions.note_write(lsn, node.timeline)
                if fetch_error is not None:
                    raise fetch_error  # inside the wrapper: peewee's error types, as before
            discard = False
            return result
        except Exception as exc:
            if not committed or exc is fetch_error:
                discard = self._failed(node, exc)
                raise
            # Committed, but the position after it could not be read (a fast shutdown
            # between the two, say): acknowledged; its session's reads require the
            # primary's position from now on.
            discard = True
            node.writes += 1
            self._unknown_position(node, exc)
            if fetch_error is not None:
                with peewee.__exception_wrapper__:  # type: ignore[attr-defined]
                    raise fetch_error from None
            return result
        finally:
            node.done()
            pool.release(conn, discard=discard)

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

    async def _position(self, cursor: Any) -> int | None:
        """The WAL position covering the write just committed (``causal`` only).

        A second statement, after the write's own (autocommit) transaction ended: the
        position then covers its commit record. psycopg's pipeline mode could send both at
        once but was measured slower here (see benchmarks/README.md), so both drivers do this.
        """
        if self._core.options.consistency != "causal":
            return None
        await cursor.execute(WAL_POSITION_SQL)
        row = await cursor.fetchone()
        return token_position(parse_lsn(row[0]))

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
