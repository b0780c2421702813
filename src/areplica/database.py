"""``RoutingDatabase``: the peewee-async facing database object of a manager.

Models whose ``Meta.database`` is ``mgr.database`` route every ``aio_*`` call through the
manager: ``query.aio_execute()``, ``Model.aio_get()``, ``aio_get_or_create()`` (its
``aio_atomic()`` is the manager's), ``aio_create_table()`` and so on. The object also
compiles SQL for the manager (``get_sql_context``), with the driver's dialect.

It behaves as a plain peewee-async 2.1 database on the primary would (the README's
"Migrating from peewee-async" lists the few differences):

- lazy connect: the first query, ``aio_connection()`` or transaction on a manager that was
  never opened connects it; after ``aio_close()`` every use raises ``DatabaseClosedError``
  until ``aio_connect()`` reopens it;
- ``aio_transaction()`` inside a transaction raises ``peewee.OperationalError("Transaction
  already opened")``; ``aio_begin()`` / ``aio_savepoint()`` work inside ``aio_connection()``
  (on the primary) and raise peewee-async's ``OperationalError`` outside it;
- every query is logged as ``(sql, params)`` at DEBUG on the ``peewee.async`` logger;
- sync queries under ``allow_sync()`` go to the primary, with its connection parameters, and
  a sync write advances the causal session like an async one;
- the catalog reads that decide DDL (``aio_get_tables``, ``aio_table_exists``,
  ``aio_sequence_exists``) read the primary.

peewee ships no type information: the ``# type: ignore`` comments for it stay in this module
and ``drivers.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from typing import Any, Protocol

import peewee
import peewee_async
from peewee_async.databases import FetchResults
from peewee_async.pool import PoolBackend

from .consistency import WAL_POSITION_SQL, parse_lsn, token_position
from .core import Lifecycle
from .dsn import NodeDSN
from .engine import Engine
from .errors import ClosedError, ConfigurationError
from .routing import QueryKind, classify_sql
from .sessions import Route
from .transactions import Adopted, Binding

__all__ = [
    "DatabaseClosedError",
    "PsycopgRoutingDatabase",
    "RoutedTransaction",
    "RoutingDatabase",
    "routing_database_for",
]

# peewee-async's own SQL logger: ``(sql, params)`` at DEBUG for every query.
sql_logger = logging.getLogger("peewee.async")

_NOT_IN_CONNECTION = "This method can only be called within the aio_connection context manager"
_TRANSACTION_OPENED = "Transaction already opened"

# The routing databases whose aio_connection() / aio_atomic() / aio_transaction() block the
# current task is inside (peewee-async's ``connection_context``, kept per database and reset
# with its token: never shared with plain peewee-async databases).
_IN_CONNECTION: ContextVar[frozenset[int]] = ContextVar(
    "areplica_in_connection", default=frozenset()
)


class DatabaseClosedError(ClosedError, RuntimeError):
    """``mgr.database`` was used after ``aio_close()`` (or the manager's ``close()``).

    A ``ClosedError`` and so a ``peewee.OperationalError`` (what peewee-async raises for a
    query on a closed psycopg pool), and also a ``RuntimeError`` (what it raises for one on
    a closed aiopg pool): handlers written for either keep catching it.
    """


class Opener(Protocol):
    """What the database asks of its manager: open it (lazy connect) and close it."""

    @property
    def name(self) -> str:
        """The manager's name."""

    async def connect(self) -> None:
        """Open the manager (a no-op when open)."""

    async def close(self) -> None:
        """Close the manager."""


class _ManagerPoolBackend(PoolBackend):
    """``mgr.database`` has no pool of its own: the manager's nodes own the pools.

    peewee-async code that reaches for ``database.pool_backend`` (its
    ``testing.TransactionTestCase`` does) gets a clear error instead of a pool opened with
    libpq defaults.
    """

    def _refuse(self) -> ConfigurationError:
        return ConfigurationError(
            "mgr.database has no pool of its own (the manager's nodes do); for tests use "
            "areplica.testing.TransactionTestCase instead of "
            "peewee_async.testing.TransactionTestCase",
            option="pool_backend",
        )

    def has_acquired_connections(self) -> bool:
        return False

    async def acquire(self) -> Any:
        raise self._refuse()

    async def release(self, conn: Any) -> None:
        raise self._refuse()

    async def create(self) -> None:
        raise self._refuse()

    async def close(self) -> None:
        return None


async def _no_results(database: Any, cursor: Any) -> None:
    """peewee-async returns ``None`` for a query without ``fetch_results``: so do we."""
    return None


class RoutedTransaction(peewee_async.Transaction):
    """What ``mgr.database.aio_begin()`` / ``aio_savepoint()`` return.

    peewee-async's ``Transaction`` (same savepoint names, same ``commit()`` / ``rollback()``,
    usable as an async context manager), with every statement run through the manager on the
    pinned primary connection. A commit of a transaction that wrote records the session's
    causal token, as ``mgr.atomic()`` does.
    """

    def __init__(
        self,
        engine: Engine,
        binding: Binding,
        *,
        is_savepoint: bool,
        adopted: Adopted | None = None,
    ) -> None:
        super().__init__(binding.conn, is_savepoint=is_savepoint)
        self._engine = engine
        self._binding = binding
        self._outer_transaction = bool(binding.transaction)
        self._adopted = adopted  # set: a manual BEGIN turned into a test savepoint
        self._open = False

    async def execute(self, sql: str) -> None:
        await self._engine.transactions.run_bound(self._binding, sql, None, None)

    async def begin(self) -> None:
        await super().begin()
        self._open = True
        if self._adopted is not None:
            self._adopted.manual_begun(+1)
        elif not self.is_savepoint:
            # Nested aio_atomic() blocks become savepoints, aio_transaction() raises.
            self._binding.transaction = True

    async def commit(self) -> None:
        try:
            await super().commit()
        except BaseException:
            self._end()  # a failed COMMIT ends the transaction too (PostgreSQL rolls it back)
            raise
        if self._end() and self._binding.wrote:
            await self._engine.transactions.after_write_bound(self._binding)
            self._binding.wrote = False

    async def rollback(self) -> None:
        try:
            await super().rollback()
        finally:
            self._end()

    def _end(self) -> bool:
        """Close the bookkeeping; True for the end of a real (not savepoint) transaction."""
        if not self._open:
            return False
        self._open = False
        if self._adopted is not None:
            self._adopted.manual_begun(-1)
            return False
        if self.is_savepoint:
            return False
        self._binding.transaction = self._outer_transaction
        return not self._outer_transaction


class _RoutingMixin:
    """Overrides of peewee-async's I/O entry points that hand every query to a manager."""

    _engine: Engine
    _opener: Opener
    pool_backend_cls = _ManagerPoolBackend

    def _bind(self, engine: Engine, opener: Opener) -> None:
        self._engine = engine
        self._opener = opener
        self._open_lock: asyncio.Lock | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self._engine.core.name!r}>"

    @property
    def manager(self) -> Opener:
        """The manager this database routes through."""
        return self._opener

    @property
    def engine(self) -> Engine:
        """The manager's query engine (for test cases and integrations, not applications)."""
        return self._engine

    # ------------------------------------------------------------------ lifecycle

    @property
    def is_connected(self) -> bool:
        """True while the manager is open (peewee-async: while the pool is)."""
        return self._engine.core.is_open

    async def aio_connect(self) -> None:
        """Open the manager; reopens it after ``aio_close()``. A no-op when open."""
        await self._opener.connect()

    async def aio_close(self) -> None:
        """Close the manager (every pool, the health task) until ``aio_connect()``.

        On a manager that was never opened this does nothing, as peewee-async's does on a
        pool never created: the next query still connects lazily.
        """
        if self._never_opened():
            return
        await self._opener.close()

    def _never_opened(self) -> bool:
        """True for a manager that was never connected (peewee-async: no pool created yet)."""
        return self._engine.core.lifecycle is Lifecycle.NEW

    async def _ensure_open(self) -> None:
        """Lazy connect (a manager never opened), or ``DatabaseClosedError`` (a closed one)."""
        core = self._engine.core
        if core.is_open:
            return
        if not self._never_opened():
            raise DatabaseClosedError(
                f"manager {core.name!r} is closed: await mgr.database.aio_connect() "
                "(or mgr.connect()) to reopen it"
            )
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:  # concurrent first queries connect once
            if not core.is_open:
                if not self._never_opened():
                    raise DatabaseClosedError(f"manager {core.name!r} was closed meanwhile")
                await self._opener.connect()

    # ------------------------------------------------------------------ queries

    async def aio_execute(self, query: Any, fetch_results: FetchResults | None = None) -> Any:
        """Execute a peewee query, routed; returns what peewee-async's ``aio_execute`` does."""
        engine = self._engine
        if not engine.core.is_open:
            await self._ensure_open()
        if sql_logger.isEnabledFor(logging.DEBUG):
            sql_logger.debug(engine.compile(query))
        # peewee-async's result handling exactly: the query's own fetch_results, else None.
        fetch = fetch_results or getattr(query, "fetch_results", None) or _no_results
        return await engine.execute(query, fetch)

    async def aio_execute_sql(
        self,
        sql: str,
        params: Sequence[Any] | None = None,
        fetch_results: FetchResults | None = None,
    ) -> Any:
        """Execute raw SQL, routed by the classifier."""
        engine = self._engine
        if not engine.core.is_open:
            await self._ensure_open()
        if sql_logger.isEnabledFor(logging.DEBUG):
            sql_logger.debug((sql, params))
        return await engine.execute_sql(sql, params, fetch_results)

    async def aio_sequence_exists(self, seq: str) -> bool:
        """Catalog reads that decide DDL read the primary: never a replica's stale catalog."""
        async with self._engine.sessions.scope(Route("primary")):
            exists: bool = await super().aio_sequence_exists(seq)  # type: ignore[misc]
        return exists

    async def aio_get_tables(self, schema: str | None = None) -> list[str]:
        """The primary's tables (``aio_table_exists`` and ``aio_create_table`` use it)."""
        async with self._engine.sessions.scope(Route("primary")):
            tables: list[str] = await super().aio_get_tables(schema)  # type: ignore[misc]
        return tables

    # ------------------------------------------------------------------ connections, transactions

    def _in_connection(self) -> bool:
        """True inside an ``aio_connection()`` (or transaction) block of this database."""
        if id(self) in _IN_CONNECTION.get():
            return True
        adopted = self._engine.transactions.adopted
        if adopted is not None:
            return adopted.in_user_block()
        return self._engine.transactions.binding() is not None  # mgr.atomic() / transaction()

    @contextlib.contextmanager
    def _connection_scope(self) -> Iterator[None]:
        token = _IN_CONNECTION.set(_IN_CONNECTION.get() | {id(self)})
        try:
            yield
        finally:
            _IN_CONNECTION.reset(token)

    @contextlib.asynccontextmanager
    async def aio_connection(self) -> AsyncIterator[Any]:
        """A primary connection pinned for the block (peewee-async's ``aio_connection``).

        Every query inside, read or write, runs on it; nested blocks reuse it. Writes made
        outside a transaction in the block record the causal token when the block ends.
        """
        await self._ensure_open()
        transactions = self._engine.transactions
        owner = transactions.binding() is None
        with self._connection_scope():
            async with transactions.pinned_primary() as conn:
                if not owner:
                    yield conn
                    return
                binding = transactions.binding()
                try:
                    yield conn
                except BaseException:
                    if binding is not None and binding.wrote and not binding.broken:
                        with contextlib.suppress(Exception):
                            await asyncio.shield(self._note_pinned_writes(binding))
                    raise
                if binding is not None and binding.wrote:
                    await self._note_pinned_writes(binding)

    async def _note_pinned_writes(self, binding: Binding) -> None:
        # Autocommit writes on a pinned connection: the token covers them once the block
        # ends. A transaction still open here is rolled back on release: nothing to cover.
        if not binding.transaction:
            await self._engine.transactions.after_write_bound(binding)
            binding.wrote = False

    def aio_atomic(self) -> AbstractAsyncContextManager[None]:
        """A transaction on the primary, a savepoint when nested (``mgr.atomic()``)."""
        return self._atomic()

    @contextlib.asynccontextmanager
    async def _atomic(self) -> AsyncIterator[None]:
        await self._ensure_open()
        with self._connection_scope():
            async with self._engine.transactions.atomic():
                yield None

    def aio_transaction(self) -> AbstractAsyncContextManager[None]:
        """A transaction on the primary; inside another one it raises, as peewee-async does."""
        return self._transaction()

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        await self._ensure_open()
        transactions = self._engine.transactions
        binding = transactions.binding()
        if binding is not None and binding.transaction:
            adopted = transactions.adopted
            if adopted is None or not adopted.is_root(binding):
                raise peewee.OperationalError(_TRANSACTION_OPENED)
        with self._connection_scope():
            async with transactions.transaction():
                yield None

    async def aio_begin(self) -> RoutedTransaction:
        """``BEGIN`` on the ``aio_connection()`` block's primary connection."""
        return await self._aio_begin(use_savepoint=False)

    async def aio_savepoint(self) -> RoutedTransaction:
        """``SAVEPOINT`` on the ``aio_connection()`` block's primary connection."""
        return await self._aio_begin(use_savepoint=True)

    async def _aio_begin(self, use_savepoint: bool = False) -> RoutedTransaction:
        transactions = self._engine.transactions
        binding = transactions.binding() if self._in_connection() else None
        if binding is None:
            raise peewee.OperationalError(_NOT_IN_CONNECTION)
        adopted = transactions.adopted if not use_savepoint else None
        if adopted is not None and not adopted.is_root(binding):
            adopted = None
        transaction = RoutedTransaction(
            self._engine,
            binding,
            is_savepoint=use_savepoint or adopted is not None,
            adopted=adopted,
        )
        await transaction.begin()
        return transaction

    # ------------------------------------------------------------------ sync (allow_sync)

    @property
    def connect_params(self) -> dict[str, Any]:
        """The current primary's libpq parameters (the first configured one before connect).

        peewee's sync connections (``allow_sync()``) are opened with these: sync queries go
        to the primary. A fresh dict on every read.
        """
        stored: dict[str, Any] = self.__dict__.setdefault("_connect_params", {})
        engine = self.__dict__.get("_engine")
        if engine is None:  # peewee's __init__ / init() fill the stored dict in place
            return stored
        return {**stored, **_sync_target(engine).params}

    @connect_params.setter
    def connect_params(self, value: Mapping[str, Any]) -> None:
        # peewee's __init__ assigns {} and init() updates it in place: keep that dict.
        self.__dict__["_connect_params"] = dict(value)

    def execute_sql(self, sql: str, params: Any = None, *args: Any, **kwargs: Any) -> Any:
        """peewee's sync ``execute_sql`` (``allow_sync()`` only), on the primary.

        A write outside a sync transaction advances the causal session, so the async reads
        that follow see it.
        """
        cursor = super().execute_sql(sql, params, *args, **kwargs)  # type: ignore[misc]
        if not self.in_transaction() and classify_sql(sql) is QueryKind.WRITE:  # type: ignore[attr-defined]
            self._note_sync_write()
        return cursor

    def commit(self) -> None:
        """peewee's sync ``COMMIT``; records the causal token of what it committed."""
        super().commit()  # type: ignore[misc]
        self._note_sync_write()

    def _note_sync_write(self) -> None:
        engine = self._engine
        if engine.core.options.consistency != "causal":
            engine.sessions.note_write(None)
            return
        with peewee.__exception_wrapper__:  # type: ignore[attr-defined]
            cursor = self.cursor()  # type: ignore[attr-defined]
            cursor.execute(WAL_POSITION_SQL)
            row = cursor.fetchone()
        primary = engine.core.cluster.primary
        timeline = primary.timeline if primary is not None else None
        engine.sessions.note_write(token_position(parse_lsn(row[0])), timeline)


def _sync_target(engine: Engine) -> NodeDSN:
    """Where sync queries go: the current primary, or the first configured one."""
    cluster = engine.core.cluster
    node = cluster.primary
    if node is None:  # before connect: the first configured primary, else the first member
        members = list(cluster)
        node = next((n for n in members if n.source == "primary"), members[0])
    return node.dsn


class RoutingDatabase(_RoutingMixin, peewee_async.PostgresqlDatabase):
    """The routing database for the aiopg driver (peewee's psycopg2 dialect)."""


class PsycopgRoutingDatabase(_RoutingMixin, peewee_async.Psycopg3Database):
    """The routing database for the psycopg 3 driver (peewee's psycopg 3 dialect)."""


def routing_database_for(engine: Engine, opener: Opener, driver: str, dbname: str | None) -> Any:
    """A routing database of the driver's dialect over ``engine`` (no I/O).

    ``opener`` (the manager) opens and closes it: the first query connects lazily.
    """
    cls = PsycopgRoutingDatabase if driver == "psycopg" else RoutingDatabase
    database = cls(dbname)
    database._bind(engine, opener)
    engine.core.database = database
    return database
