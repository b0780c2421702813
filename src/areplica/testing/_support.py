"""What LocalTopology, DockerTopology, the tests and the benchmarks share."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import psycopg2

__all__ = ["TopologyLifecycle", "run_sql"]

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
