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
  ``aio_sequence_exists``) read the primary;
- deferred initialisation: ``ReplicaManager()`` without members makes a deferred database
  (``deferred`` is true, ``is_connected`` false, every use raises peewee-async's "database
  must be initialized" error) until ``mgr.init(...)`` or ``mgr.database.init(...)`` gives
  the members; a ``peewee.DatabaseProxy`` may point at it before that;
- ``pool_backend``: the manager's nodes own the pools, but a connection taken with
  ``pool_backend.acquire()`` (what ``peewee_async.testing.TransactionTestCase`` does) is a
  primary connection that every query of the manager joins until ``release()``: so
  peewee-async's own test case works on ``mgr.database``.

peewee ships no type information: the ``# type: ignore`` comments for it stay in this module
and ``drivers.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
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
    "AdoptedConnection",
    "DatabaseClosedError",
    "HeldConnection",
    "PsycopgRoutingDatabase",
    "RoutedTransaction",
    "RoutingDatabase",
    "bind_routing_database",
    "not_initialised",
    "routing_database_for",
]

logger = logging.getLogger("areplica")
# peewee-async's own SQL logger: ``(sql, params)`` at DEBUG for every query.
sql_logger = logging.getLogger("peewee.async")

_NOT_IN_CONNECTION = "This method can only be called within the aio_connection context manager"
_TRANSACTION_OPENED = "Transaction already opened"
# peewee-async's words for a deferred database (``Database(None)`` before ``init()``).
_NOT_INITIALISED = "Error, database must be initialized before creating a connection pool"

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


def not_initialised(name: str) -> ConfigurationError:
    """The error for a manager (or ``mgr.database``) used before it was given members.

    It carries peewee-async's message for a deferred database, so handlers and tests
    written for ``Database(None)`` match it.
    """
    return ConfigurationError(
        f"{_NOT_INITIALISED}: manager {name!r} was created without members; call "
        "mgr.init(primary=..., replicas=...) or mgr.database.init(...) first",
        option="primary",
    )


class Opener(Protocol):
    """What the database asks of its manager: open it, close it, (re)initialise it."""

    @property
    def name(self) -> str:
        """The manager's name."""

    @property
    def deferred(self) -> bool:
        """True while the manager has no members (created without them, not yet ``init()``)."""

    async def connect(self) -> None:
        """Open the manager (a no-op when open)."""

    async def close(self) -> None:
        """Close the manager."""

    def init(self, *args: Any, **kwargs: Any) -> None:
        """Give the manager its members and options (``ReplicaManager.init``)."""


async def _snapshot(database: Any, cursor: Any) -> tuple[Any, int, list[Any], Any]:
    """Everything a cursor holds after ``execute``: description, row count, rows, lastrowid."""
    description = cursor.description
    rows = list(await cursor.fetchall()) if description is not None else []
    return description, cursor.rowcount, rows, getattr(cursor, "lastrowid", None)


def _transaction_verb(sql: str) -> str | None:
    """``"begin"`` or ``"end"`` for a statement that opens or ends a transaction, else None."""
    words = sql.strip().rstrip(";").split()
    if not words:
        return None
    first = words[0].upper()
    if first == "BEGIN" or (
        first == "START" and len(words) > 1 and words[1].upper() == "TRANSACTION"
    ):
        return "begin"
    if first in ("COMMIT", "END", "ABORT"):
        return "end"
    if first == "ROLLBACK" and not any(w.upper() == "TO" for w in words[1:]):
        return "end"
    return None


class HeldConnection:
    """A primary connection pinned in a task of its own, for a test's transaction.

    The manager's ContextVar is set and reset inside that task, so whatever task (or pytest
    fixture) pins the connection and whatever task lets it go, the ContextVar discipline
    holds. ``release()`` rolls back a transaction still open on it (unless the connection
    broke: it is then discarded and the server aborts the transaction) and returns it.
    """

    def __init__(
        self, engine: Engine, binding: Binding, holder: asyncio.Task[None], done: asyncio.Event
    ) -> None:
        self.engine = engine
        self.binding = binding
        self._holder: asyncio.Task[None] | None = holder
        self._done = done

    def __repr__(self) -> str:
        state = "held" if self._holder is not None else "released"
        return f"<HeldConnection of {self.engine.core.name!r} on {self.binding.node.name} {state}>"

    @classmethod
    async def pin(cls, engine: Engine, purpose: str) -> HeldConnection:
        """Pin a primary connection of an open manager (not inside a transaction)."""
        if engine.transactions.binding() is not None:
            raise RuntimeError(
                f"{purpose} cannot start inside a transaction, aio_connection() or another "
                "test transaction"
            )
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[Binding] = loop.create_future()
        done = asyncio.Event()
        holder = asyncio.create_task(
            _hold(engine, ready, done), name=f"{engine.core.name}-{purpose}"
        )
        try:
            binding = await asyncio.shield(ready)
        except BaseException:
            done.set()
            with contextlib.suppress(Exception):
                await asyncio.shield(holder)
            raise
        return cls(engine, binding, holder, done)

    async def release(self) -> None:
        """Roll back what is still open on the connection and return it. Idempotent."""
        holder, self._holder = self._holder, None
        if holder is None:
            return
        self._done.set()
        with contextlib.suppress(Exception):
            await asyncio.shield(holder)


async def _hold(engine: Engine, ready: asyncio.Future[Binding], done: asyncio.Event) -> None:
    transactions = engine.transactions
    try:
        async with transactions.pinned_primary():
            binding = transactions.binding()
            if binding is None:  # pragma: no cover - pinned_primary() always binds
                raise RuntimeError("no pinned primary connection")
            ready.set_result(binding)
            try:
                await done.wait()
            finally:
                if binding.transaction and not binding.broken:
                    binding.transaction = False
                    try:
                        await transactions.run_bound(binding, "ROLLBACK", None, None)
                    except Exception:
                        binding.broken = True
                        logger.warning(
                            "%s: test transaction rollback failed; connection discarded",
                            engine.core.name,
                        )
    except BaseException as exc:
        if not ready.done():
            if isinstance(exc, Exception):
                ready.set_exception(exc)
            else:
                ready.cancel()
        raise


class _BufferedCursor:
    """A cursor of an ``AdoptedConnection``: each statement runs through the manager's
    bound-connection path (one task at a time on the connection) and its rows are buffered.

    The DB-API subset peewee-async uses: ``execute``, ``fetchone``, ``fetchmany``,
    ``fetchall``, ``description``, ``rowcount``, ``lastrowid``, ``async with``.
    """

    def __init__(self, connection: AdoptedConnection) -> None:
        self._connection = connection
        self.description: Any = None
        self.rowcount = -1
        self.lastrowid: Any = None
        self._rows: deque[Any] = deque()

    async def __aenter__(self) -> _BufferedCursor:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    async def execute(self, sql: str, params: Sequence[Any] | None = None) -> None:
        """Run ``sql`` on the adopted connection; a BEGIN/COMMIT/ROLLBACK is tracked."""
        connection = self._connection
        binding = connection.binding
        # Not logged on ``peewee.async``: peewee-async does not log statements sent on a
        # connection's own cursor (its Transaction's BEGIN / ROLLBACK) either.
        result = await connection.engine.transactions.run_bound(binding, sql, params, _snapshot)
        self.description, self.rowcount, rows, self.lastrowid = result
        self._rows = deque(rows)
        verb = _transaction_verb(sql)
        if verb is not None:
            binding.transaction = verb == "begin"

    async def fetchone(self) -> Any:
        return self._rows.popleft() if self._rows else None

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        count = len(self._rows) if size is None else min(size, len(self._rows))
        return [self._rows.popleft() for _ in range(count)]

    async def fetchall(self) -> list[Any]:
        rows = list(self._rows)
        self._rows.clear()
        return rows

    def close(self) -> None:
        self._rows.clear()


class AdoptedConnection:
    """What ``mgr.database.pool_backend.acquire()`` returns: a pinned primary connection
    that every query of the manager joins (from any task) until ``release()``.

    peewee-async's ``testing.TransactionTestCase`` takes one, runs ``BEGIN`` on it, makes
    every ``aio_connection()`` of the database yield it, and rolls it back at the end: with
    this object, every query of ``mgr.database`` (and of the manager's own API) runs inside
    that transaction, so the test's reads see its writes and nothing stays on the servers.
    Statements sent through ``cursor()`` run one at a time with everything else on it.
    """

    def __init__(self, held: HeldConnection, adoption: contextlib.ExitStack) -> None:
        self.held = held
        self.engine = held.engine
        self.binding = held.binding
        self._adoption: contextlib.ExitStack | None = adoption

    def __repr__(self) -> str:
        return f"<AdoptedConnection of {self.engine.core.name!r} on {self.binding.node.name}>"

    @property
    def raw(self) -> Any:
        """The driver's connection underneath (do not run statements on it directly)."""
        return self.binding.conn

    def cursor(self) -> _BufferedCursor:
        """A cursor whose statements run on this connection, through the manager."""
        return _BufferedCursor(self)

    async def release(self) -> None:
        """Stop every query joining it, roll back what is open, return it. Idempotent."""
        adoption, self._adoption = self._adoption, None
        if adoption is not None:
            adoption.close()
        await self.held.release()


class _ManagerPoolBackend(PoolBackend):
    """``mgr.database.pool_backend``: the manager, seen as peewee-async's pool.

    ``connect()`` / ``close()`` open and close the manager; ``is_connected`` is whether it is
    open. The manager's nodes own the real pools: ``acquire()`` pins a primary connection
    and makes every query of the manager join it (an ``AdoptedConnection``) until
    ``release()``. That is what ``peewee_async.testing.TransactionTestCase`` needs; only one
    may be taken at a time, and never inside a transaction.
    """

    def __init__(self, *, database: str | None = None, **kwargs: Any) -> None:
        super().__init__(database=database or "")  # no libpq parameters kept here
        self.owner: Any = None
        self._taken: set[AdoptedConnection] = set()

    @property
    def is_connected(self) -> bool:
        owner = self.owner
        return bool(owner is not None and owner.is_connected)

    def has_acquired_connections(self) -> bool:
        return bool(self._taken)

    async def create(self) -> None:
        await self._database().aio_connect()

    async def close(self) -> None:
        owner = self.owner
        if owner is not None and not owner.deferred:
            await owner.aio_close()

    async def acquire(self) -> AdoptedConnection:
        database = self._database()
        await database._ensure_open()
        engine: Engine = database.engine
        if engine.transactions.adopted is not None:
            raise RuntimeError(
                f"a connection of manager {engine.core.name!r} is already taken from "
                "pool_backend (a test transaction is active)"
            )
        held = await HeldConnection.pin(engine, "pool-backend-connection")
        adoption = contextlib.ExitStack()
        try:
            adoption.enter_context(engine.transactions.adopt(held.binding))
        except BaseException:
            await held.release()
            raise
        connection = AdoptedConnection(held, adoption)
        self._taken.add(connection)
        return connection

    async def release(self, conn: Any) -> None:
        if not isinstance(conn, AdoptedConnection) or conn not in self._taken:
            raise RuntimeError(f"{conn!r} was not acquired from this pool_backend")
        self._taken.discard(conn)
        await conn.release()

    def _database(self) -> Any:
        if self.owner is None:  # pragma: no cover - bound by the database's init()
            raise RuntimeError("this pool backend belongs to no routing database")
        return self.owner


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

    def init(self, *args: Any, **kwargs: Any) -> None:
        """(Re)initialise the manager: the arguments of ``ReplicaManager.init()``.

        ``mgr.database.init(primary=..., replicas=..., **options)`` is
        ``mgr.init(...)``: the peewee pattern of a database created deferred and
        initialised later (``Database(None)`` then ``.init(...)``), also through a
        ``peewee.DatabaseProxy`` pointed at it. Allowed while the manager is new or closed.
        """
        opener = self.__dict__.get("_opener")
        if opener is None:  # peewee's own constructor: Database.__init__ calls init(database)
            super().init(*args, **kwargs)  # type: ignore[misc]
            return
        opener.init(*args, **kwargs)

    def _configure(
        self, engine: Engine, opener: Opener, dbname: str | None, deferred: bool
    ) -> None:
        """Route through ``engine`` (a manager's, freshly built); ``deferred``: no members yet."""
        self.__dict__["_engine"] = None  # peewee's init below must see the stored parameters
        self.__dict__["_opener"] = None
        super().init(dbname)  # type: ignore[misc]
        self.pool_backend.owner = self  # type: ignore[attr-defined]
        self._engine = engine
        self._opener = opener
        self._open_lock: asyncio.Lock | None = None
        self.deferred = deferred  # peewee's flag; a member DSN may name no database
        engine.core.database = self

    def __repr__(self) -> str:
        deferred = " (deferred)" if self._opener.deferred else ""
        return f"<{type(self).__name__} of {self._engine.core.name!r}{deferred}>"

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
        """True while the manager is open, as peewee-async's is while its pool is.

        False before the first connect (lazy or ``aio_connect()``), after ``aio_close()``
        and while deferred; true from a connect until the close.
        """
        return self._engine.core.is_open

    def _require_initialised(self) -> None:
        if self._opener.deferred:
            raise not_initialised(self._engine.core.name)

    async def aio_connect(self) -> None:
        """Open the manager; reopens it after ``aio_close()``. A no-op when open."""
        self._require_initialised()
        await self._opener.connect()

    async def aio_close(self) -> None:
        """Close the manager (every pool, the health task) until ``aio_connect()``.

        On a manager that was never opened this does nothing, as peewee-async's does on a
        pool never created: the next query still connects lazily. On a deferred one it
        raises, as peewee-async's does.
        """
        self._require_initialised()
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
        self._require_initialised()
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

    async def aio_create_tables(self, models: list[Any], **options: Any) -> None:
        """peewee-async's ``aio_create_tables``, in one transaction on the primary.

        The transaction holds the advisory lock ``mgr.create_tables`` holds, so that workers
        starting together (each creating the same tables) wait for each other.
        """
        await self._ensure_open()
        async with self._engine.schema_change():
            await super().aio_create_tables(models, **options)  # type: ignore[misc]

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

    def aio_connection(self) -> AbstractAsyncContextManager[Any]:
        """A primary connection pinned for the block (peewee-async's ``aio_connection``).

        Every query inside, read or write, runs on it; nested blocks reuse it. Writes made
        outside a transaction in the block record the causal token when the block ends. On
        a deferred database it raises at the call, as peewee-async's does.
        """
        self._require_initialised()
        return self._aio_connection()

    @contextlib.asynccontextmanager
    async def _aio_connection(self) -> AsyncIterator[Any]:
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
        return self._aio_atomic(use_savepoint=True)

    def aio_transaction(self) -> AbstractAsyncContextManager[None]:
        """A transaction on the primary; inside another one it raises, as peewee-async does."""
        return self._aio_atomic(use_savepoint=False)

    @contextlib.asynccontextmanager
    async def _aio_atomic(self, use_savepoint: bool = False) -> AsyncIterator[None]:
        # peewee-async's name and signature: its testing.TransactionTestCase patches this
        # method (and _aio_begin) to forbid transactions inside a test.
        await self._ensure_open()
        transactions = self._engine.transactions
        if not use_savepoint:
            binding = transactions.binding()
            if binding is not None and binding.transaction:
                adopted = transactions.adopted
                if adopted is None or not adopted.is_root(binding):
                    raise peewee.OperationalError(_TRANSACTION_OPENED)
        scope = transactions.atomic() if use_savepoint else transactions.transaction()
        with self._connection_scope():
            async with scope:
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
        target = _sync_target(engine) if engine is not None else None
        if target is None:  # peewee's __init__ / init() fill the stored dict in place
            return stored
        return {**stored, **target.params}

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


def _sync_target(engine: Engine) -> NodeDSN | None:
    """Where sync queries go: the current primary, or the first configured one (None: none)."""
    cluster = engine.core.cluster
    node = cluster.primary
    if node is None:  # before connect: the first configured primary, else the first member
        members = list(cluster)
        if not members:  # deferred: peewee refuses to connect before init() anyway
            return None
        node = next((n for n in members if n.source == "primary"), members[0])
    return node.dsn


class RoutingDatabase(_RoutingMixin, peewee_async.PostgresqlDatabase):
    """The routing database for the aiopg driver (peewee's psycopg2 dialect)."""


class PsycopgRoutingDatabase(_RoutingMixin, peewee_async.Psycopg3Database):
    """The routing database for the psycopg 3 driver (peewee's psycopg 3 dialect)."""


def routing_database_for(driver: str) -> Any:
    """An unbound routing database of the driver's dialect (no I/O).

    ``bind_routing_database`` makes it route through a manager's engine.
    """
    cls = PsycopgRoutingDatabase if driver == "psycopg" else RoutingDatabase
    return cls(None)


def bind_routing_database(
    database: Any, engine: Engine, opener: Opener, dbname: str | None, *, deferred: bool
) -> None:
    """Make ``database`` route through ``engine``; ``opener`` (the manager) opens it.

    Called at construction and again by every ``init()``: models bound to the database (or
    to a ``peewee.DatabaseProxy`` pointing at it) keep it across re-initialisation.
    """
    database._configure(engine, opener, dbname, deferred)
