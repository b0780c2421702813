"""What LocalTopology, DockerTopology, the tests and the benchmarks share."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import psycopg2

__all__ = ["REPLAY_TARGET_SQL", "TopologyLifecycle", "replay_target", "run_sql"]

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
