"""What LocalTopology, DockerTopology, the tests and the benchmarks share."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import psycopg2

__all__ = [
    "REPLAY_TARGET_SQL",
    "TopologyLifecycle",
    "poll_until",
    "replay_target",
    "run_sql",
    "set_apply_delay",
]

_T = TypeVar("_T", bound="TopologyLifecycle")


def run_sql(
    dsn: str,
    sql: str,
    params: Sequence[Any] | Mapping[str, Any] = (),
    *,
    connect_timeout: int = 5,
    application_name: str = "areplica-testing",
) -> list[tuple[Any, ...]]:
    """Run one statement straight on a server, outside areplica (blocking).

    ``params`` empty means no parameters at all, so a literal ``%`` in ``sql`` is safe.
    """
    conn = psycopg2.connect(dsn, connect_timeout=connect_timeout, application_name=application_name)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql, params or None)
            return list(cur.fetchall()) if cur.description else []
    finally:
        conn.close()


def poll_until(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.02
) -> None:
    """Call ``predicate`` every ``interval`` seconds until it is true.

    A server error counts as "not yet" (it is named in the ``TimeoutError`` if time runs out).
    """
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            if predicate():
                return
        except psycopg2.Error as exc:
            last = exc
        if time.monotonic() > deadline:
            detail = f" (last error: {str(last).strip()})" if last else ""
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(interval)


#: Runs one statement on a named node of a topology: (node, sql, params) -> rows.
NodeQuery = Callable[[str, str, Sequence[Any]], "list[tuple[Any, ...]]"]


def set_apply_delay(query: NodeQuery, node: str, ms: int) -> None:
    """Make standby ``node`` replay commits ``ms`` milliseconds late (0: no delay).

    Through ``query`` (the topology's): returns once the new ``recovery_min_apply_delay`` is
    in force.
    """
    if ms < 0:
        raise ValueError("ms must be >= 0")
    if ms:
        query(node, "ALTER SYSTEM SET recovery_min_apply_delay = %s", (f"{int(ms)}ms",))
    else:
        query(node, "ALTER SYSTEM RESET recovery_min_apply_delay", ())
    query(node, "SELECT pg_reload_conf()", ())
    sql = "SELECT setting FROM pg_settings WHERE name = 'recovery_min_apply_delay'"
    poll_until(
        lambda: int(query(node, sql, ())[0][0]) == int(ms),
        10.0,
        f"recovery_min_apply_delay = {int(ms)}ms on {node}",
    )


class TopologyLifecycle:
    """Sync and async context managers over blocking ``start()`` and ``close()``."""

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _T) -> _T:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self: _T) -> _T:
        await self.astart()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def astart(self) -> None:
        """:meth:`start` in a worker thread, for async code."""
        await asyncio.to_thread(self.start)

    async def aclose(self) -> None:
        """:meth:`close` in a worker thread, for async code."""
        await asyncio.to_thread(self.close)


#: The primary's position that every replica must replay: what :func:`replay_target` reads.
REPLAY_TARGET_SQL = (
    "SELECT pg_current_wal_lsn() - pg_lsn '0/0', current_setting('wal_block_size')::int,"
    " current_setting('wal_segment_size', true)"
)


def replay_target(row: Sequence[Any]) -> int:
    """The WAL position (bytes) replicas must replay, from a row of :data:`REPLAY_TARGET_SQL`.

    Every commit is written out (synchronous_commit is on), so the write position covers
    them all. A position reported just past a page header, where no replay can end, counts
    from the page start.
    """
    target, block = int(row[0]), int(row[1])
    if target % block == 24:  # short page header
        return target - 24
    if target % block == 40 and target % _segment_bytes(row[2]) == 40:  # long header
        return target - 40
    return target


def _segment_bytes(setting: Any) -> int:
    """``wal_segment_size`` as bytes ('16MB' on recent servers, a count of 8kB blocks on old)."""
    text = str(setting or "16MB").strip()
    match = re.fullmatch(r"(\d+)\s*([kMG]?B)?", text)
    if match is None:
        return 16 * 1024 * 1024
    units = {None: 8192, "kB": 1024, "MB": 1024**2, "GB": 1024**3, "B": 1}
    return int(match.group(1)) * units[match.group(2)]
