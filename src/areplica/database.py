"""``RoutingDatabase``: the peewee-async facing database object of a manager.

Models whose ``Meta.database`` is ``mgr.database`` route every ``aio_*`` call through the
manager: ``query.aio_execute()``, ``Model.aio_get()``, ``aio_get_or_create()`` (its
``aio_atomic()`` is the manager's), ``aio_create_table()`` and so on. The object also
compiles SQL for the manager (``get_sql_context``), with the driver's dialect.

peewee ships no type information: the ``# type: ignore`` comments for it stay in this module
and ``drivers.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

import peewee_async
from peewee_async.databases import FetchResults

from .errors import ConfigurationError

if TYPE_CHECKING:
    from .manager import ReplicaManager

__all__ = ["PsycopgRoutingDatabase", "RoutingDatabase", "routing_database_for"]


class _RoutingMixin:
    """Overrides of peewee-async's I/O entry points that hand every query to a manager."""

    _manager: ReplicaManager

    def _bind_manager(self, manager: ReplicaManager) -> None:
        self._manager = manager

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self._manager.name!r}>"

    @property
    def manager(self) -> ReplicaManager:
        """The manager this database routes through."""
        return self._manager

    @property
    def is_connected(self) -> bool:
        return self._manager.is_open

    async def aio_connect(self) -> None:
        await self._manager.connect()

    async def aio_close(self) -> None:
        await self._manager.close()

    async def aio_execute(self, query: Any, fetch_results: FetchResults | None = None) -> Any:
        return await self._manager._execute(query, fetch_results)

    async def aio_execute_sql(
        self,
        sql: str,
        params: Sequence[Any] | None = None,
        fetch_results: FetchResults | None = None,
    ) -> Any:
        return await self._manager._execute_sql(sql, params, fetch_results)

    def aio_atomic(self) -> AbstractAsyncContextManager[None]:
        return self._none_scope(self._manager.atomic())

    def aio_transaction(self) -> AbstractAsyncContextManager[None]:
        return self._none_scope(self._manager.transaction())

    def aio_connection(self) -> Any:
        """A primary connection pinned for the block (peewee-async's ``aio_connection``)."""
        return self._manager._pinned_primary()

    async def aio_begin(self) -> Any:
        raise ConfigurationError(
            "aio_begin()/aio_savepoint() are not routed: use `async with mgr.atomic()`",
            option="aio_begin",
        )

    aio_savepoint = aio_begin

    @staticmethod
    @contextlib.asynccontextmanager
    async def _none_scope(scope: AbstractAsyncContextManager[Any]) -> AsyncIterator[None]:
        async with scope:
            yield None


class RoutingDatabase(_RoutingMixin, peewee_async.PostgresqlDatabase):
    """The routing database for the aiopg driver (peewee's psycopg2 dialect)."""


class PsycopgRoutingDatabase(_RoutingMixin, peewee_async.Psycopg3Database):
    """The routing database for the psycopg 3 driver (peewee's psycopg 3 dialect)."""


def routing_database_for(manager: ReplicaManager, driver: str, dbname: str | None) -> Any:
    """A routing database of the driver's dialect, bound to ``manager`` (no I/O)."""
    cls = PsycopgRoutingDatabase if driver == "psycopg" else RoutingDatabase
    database = cls(dbname)
    database._bind_manager(manager)
    return database
