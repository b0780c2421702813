"""Driver adapters: the one place that knows aiopg and psycopg 3 apart.

Each driver opens a single connection in autocommit mode (transactions are explicit BEGIN /
COMMIT, as peewee-async does), closes it, and says what an exception means: a broken
connection (retry a read elsewhere, discard the connection), a recovery conflict on a standby
(retry a read elsewhere), or a SQL error (pass through untouched).

The peewee ``# type: ignore`` comments of the package live here and in ``database.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import threading
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import peewee
import peewee_async

from ._compat import bounded
from ._compat import timeout as _timeout
from .errors import AreplicaError, ConfigurationError

__all__ = ["DRIVERS", "QUERY_CANCELED", "Driver", "get_driver", "sqlstate_of"]


# SQLSTATEs that mean the connection (or the server behind it) is gone.
_DISCONNECT_STATES = frozenset({"57P01", "57P02", "57P03", "57P04", "57P05"})
# A standby cancelled the query because replay needed what it was reading.
_RECOVERY_CONFLICT_STATES = frozenset({"40001", "40P01"})
READ_ONLY_TRANSACTION = "25006"
# A cancel request (ours, or close() cutting a query short) ended the statement.
QUERY_CANCELED = "57014"
# The server admits no more connections (max_connections, a role's connection limit).
_FULL_STATES = frozenset({"53300"})
# What PgBouncer answers when it refuses a client or gives up on a query *before* forwarding
# it to a server (its ErrorResponse texts, 1.x): the statement never reached PostgreSQL.
_POOLER_NOT_SENT = (
    "query_wait_timeout",
    "no more connections allowed",
    "pgbouncer cannot connect to server",
    "server login has been failing",
    "client_login_timeout",
    "database configuration changed",
    "pooler is shutting down",
)
_POOLER_FULL = ("no more connections allowed",)


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE of a driver exception, or of the driver exception peewee wrapped."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = getattr(current, "pgcode", None) or getattr(current, "sqlstate", None)
        if isinstance(code, str) and code:
            return code
        current = _inner(current)
    return None


def _inner(exc: BaseException) -> BaseException | None:
    """The driver exception behind a peewee one (peewee keeps it as ``orig``)."""
    orig = getattr(exc, "orig", None)
    if isinstance(orig, BaseException):
        return orig
    if exc.args and isinstance(exc.args[0], BaseException):
        return exc.args[0]
    return exc.__cause__ or exc.__context__


@dataclass(frozen=True)
class Driver:
    """A database driver: how to connect, and what its errors mean."""

    name: str
    database_cls: type[peewee_async.databases.AioDatabase]
    connect: Callable[[str, float], Awaitable[Any]]
    #: Close a connection; a second call is a no-op (closing twice breaks aiopg, see below).
    close: Callable[[Any], Awaitable[None]]
    #: Send a PostgreSQL cancel request for the query running on a connection (the
    #: protocol's CancelRequest, which PgBouncer forwards to the server connection serving
    #: that client), bounded by the timeout; never raises. True when the request was
    #: delivered (the postmaster or the pooler took it), False when it was not, or could not
    #: be sent (then the pool falls back to ``pg_cancel_backend`` with the real backend pid,
    #: where it knows one). aiopg: libpq's ``PQcancel`` in a daemon thread through ctypes,
    #: which releases the GIL (psycopg2's own ``cancel()`` holds it while it blocks: a hung
    #: server froze the whole process); psycopg: ``cancel_safe()``.
    cancel: Callable[[Any, float], Awaitable[bool]]
    #: True when a busy connection's input keeps being consumed without an owner (aiopg's
    #: event loop reader): after a cancel, the pool can see the query end on it.
    drains: bool
    #: The pid the protocol gave the client (BackendKeyData); behind PgBouncer a fake one.
    backend_pid: Callable[[Any], int | None]
    is_closed: Callable[[Any], bool]
    is_idle: Callable[[Any], bool]
    #: True while a query runs on the connection (the server is still working on it).
    is_busy: Callable[[Any], bool]
    disconnect_errors: tuple[type[BaseException], ...]
    #: Both drivers' ``cursor.execute`` sends a string of several statements as one simple
    #: query (client-side binding: psycopg2, and psycopg's ``AsyncClientCursor``, which
    #: peewee-async uses): a read checks its standby's replay position in its own round
    #: trip (``reads.py``). True when the cursor keeps the result of every statement of
    #: such a string, positioned on the first (psycopg: ``nextset()`` moves on); False when
    #: only the last one's is kept (psycopg2). With every result kept, a write's WAL
    #: position after its commit comes back in the write's own round trip (``writes.py``).
    all_results: bool = False

    def is_disconnect(self, exc: BaseException) -> bool:
        """True when ``exc`` means the connection or its server is gone (retry a read)."""
        if isinstance(exc, AreplicaError):  # our own verdicts (pool wait, read timeout, ...)
            return False
        if isinstance(exc, (asyncio.TimeoutError, ConnectionError, OSError)):
            return True
        state = sqlstate_of(exc)
        if state is not None:
            return state.startswith("08") or state in _DISCONNECT_STATES
        inner = _inner(exc)
        if isinstance(exc, self.disconnect_errors) or isinstance(inner, self.disconnect_errors):
            return True
        # peewee wraps driver errors; a wrapped OperationalError/InterfaceError without a
        # SQLSTATE is a client-side connection failure.
        return isinstance(exc, (peewee.OperationalError, peewee.InterfaceError))

    @staticmethod
    def not_sent(exc: BaseException) -> bool:
        """True when a pooler refused the statement before forwarding it (never applied)."""
        text = _text_of(exc)
        return any(marker in text for marker in _POOLER_NOT_SENT)

    @staticmethod
    def is_full(exc: BaseException) -> bool:
        """True when the server or its pooler admits no more connections (capacity, not death)."""
        if sqlstate_of(exc) in _FULL_STATES:
            return True
        text = _text_of(exc)
        return "too many clients" in text or any(marker in text for marker in _POOLER_FULL)

    @staticmethod
    def is_recovery_conflict(exc: BaseException) -> bool:
        """True when a standby cancelled the query to apply WAL (the read may run elsewhere)."""
        return sqlstate_of(exc) in _RECOVERY_CONFLICT_STATES

    @staticmethod
    def is_read_only_violation(exc: BaseException) -> bool:
        """True when a standby refused a statement as a write (SQLSTATE 25006)."""
        return sqlstate_of(exc) == READ_ONLY_TRANSACTION


def _text_of(exc: BaseException) -> str:
    """The messages of an exception and of the driver exceptions behind it, lower-cased."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts.append(str(current))
        current = _inner(current)
    return " ".join(parts).lower()


class _LibpqCancel:
    """libpq's blocking ``PQcancel``, run in a daemon thread with the GIL released.

    ``PQgetCancel`` copies the address and the cancel key of a live connection (it does not
    block); ``PQcancel`` then opens a connection to that address and sends the
    CancelRequest, and waits until the postmaster (or PgBouncer) has taken it. On a hung
    server that wait has no end: the thread is a daemon, and the caller stops waiting for it
    after its timeout (the thread frees the handle whenever it returns).
    """

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._get = lib.PQgetCancel
        self._get.argtypes = [ctypes.c_void_p]
        self._get.restype = ctypes.c_void_p
        self._cancel = lib.PQcancel
        self._cancel.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
        self._cancel.restype = ctypes.c_int
        self._free = lib.PQfreeCancel
        self._free.argtypes = [ctypes.c_void_p]
        self._free.restype = None

    @classmethod
    def load(cls) -> _LibpqCancel | None:
        """The libpq psycopg2 is linked with (its extension module's dependency), or None."""
        try:
            import psycopg2._psycopg as extension

            return cls(ctypes.CDLL(extension.__file__))
        except (ImportError, OSError, AttributeError):  # pragma: no cover - exotic builds
            return None

    async def __call__(self, pgconn_ptr: int | None, timeout: float) -> bool:
        if not pgconn_ptr:
            return False
        handle = self._get(pgconn_ptr)
        if not handle:
            return False
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()

        def deliver(ok: bool) -> None:
            if not done.done():
                done.set_result(ok)

        def run() -> None:
            buffer = ctypes.create_string_buffer(256)
            try:
                ok = bool(self._cancel(handle, buffer, 256))
            finally:
                self._free(handle)
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(deliver, ok)

        threading.Thread(target=run, name="areplica-cancel", daemon=True).start()
        try:
            async with _timeout(timeout):
                return await asyncio.shield(done)
        except asyncio.TimeoutError:
            return False


def _drop_frames(exc: BaseException) -> None:
    """Clear the locals of the finished frames an exception (and its causes) keeps alive."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        current = current.__cause__ or current.__context__


def _aiopg_driver() -> Driver:
    import aiopg
    import psycopg2
    import psycopg2.extensions

    class Connection(aiopg.Connection):
        """aiopg's connection, minus its own reaction to a cancelled wait, with one owner of
        its event loop registration.

        Stock aiopg closes the connection when a query's wait is cancelled and turns a
        server-side cancel (57014) into ``CancelledError`` plus a loop error report. The
        close happens without a cancel request, so the query runs on in the server (an
        orphan). Here a cancelled wait leaves the connection as it is: the node pool, its one
        owner, sends the cancel request and closes it exactly once. The reader callback
        keeps consuming the connection's input meanwhile, so the late result is drained.

        The socket's registration with the event loop is dropped the moment libpq closes
        the socket (a server gone: libpq closes it inside ``poll()`` or ``execute()``), in
        the same callback, before any other connection can be given the same descriptor
        number. Stock aiopg left it registered in some of those paths, and removed it only
        at ``close()``, by number: by then the number could belong to a new connection,
        whose reader was removed (it never woke), or whose ``add_reader`` in the
        constructor failed on the stale registration, leaving a half-built connection with
        an open psycopg2 connection and a pending future to the garbage collector: the
        ``ResourceWarning`` and "Future exception was never retrieved:
        OperationalError('Connection closed')" seen when a replica was killed under load.
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._areplica_closed = False
            try:
                super().__init__(*args, **kwargs)
            except BaseException:
                # Half built (the loop refused the socket, say): close what was opened, and
                # let nobody wait on the connect future.
                raw = self.__dict__.get("_conn")
                if raw is not None:
                    with contextlib.suppress(Exception):
                        raw.close()
                self._waiter = None
                self._areplica_closed = True
                raise

        @staticmethod
        def _ready(weak_self: Any) -> None:
            aiopg.Connection._ready(weak_self)
            self = weak_self()
            if self is not None:
                self._forget_dropped_socket()

        def _forget_dropped_socket(self) -> None:
            """Unregister the socket from the loop once libpq no longer has it open."""
            fileno = self._fileno
            if fileno is None:
                return
            try:
                current = self._conn.fileno()
            except (psycopg2.Error, OSError):
                current = -1
            if current == fileno:
                return
            # libpq dropped the socket (a broken connection): the number is free for reuse.
            with contextlib.suppress(OSError, ValueError):
                self._loop.remove_reader(fileno)
            with contextlib.suppress(OSError, ValueError):
                self._loop.remove_writer(fileno)
            self._writing = False
            self._fileno = None

        async def _cursor(self, *args: Any, **kwargs: Any) -> Any:
            cursor = await super()._cursor(*args, **kwargs)
            cursor.__class__ = Cursor
            return cursor

        async def _poll(self, waiter: asyncio.Future[None], timeout: float | None) -> None:
            self._ready(self._weakref)
            try:
                # Bounds are applied by the callers (read_timeout, connect timeout).
                await waiter
            finally:
                # Nobody waits on it any more: a late close must not set an exception on
                # it (that would be a "Future exception was never retrieved").
                self._waiter = None

        def close(self) -> Any:
            """Close once; a second call touches nothing (the descriptor may be reused)."""
            if self._areplica_closed:
                return None
            self._areplica_closed = True
            self._forget_dropped_socket()
            waiter, self._waiter = self._waiter, None
            try:
                return super().close()
            finally:
                self._fileno = None
                if waiter is not None and not waiter.done():
                    waiter.cancel()  # a connect nobody awaits: no unretrieved exception

    class Cursor(aiopg.Cursor):
        """aiopg's cursor; a failed send drops the socket's registration at once."""

        async def execute(self, operation: str, parameters: Any = None, **kwargs: Any) -> None:
            try:
                await super().execute(operation, parameters, **kwargs)
            except BaseException:
                connection: Any = self._conn
                connection._forget_dropped_socket()
                raise

    async def connect(conninfo: str, timeout: float) -> Any:
        # Bounded here: libpq's connect_timeout does not apply to non-blocking connects.
        # hstore discovery is off: it costs a query per connection.
        conn = Connection(conninfo, None, False, enable_hstore=False)
        # _connect() closes the connection itself if it fails or is cancelled.
        return await bounded(conn._connect(), timeout, dispose=close)

    async def close(conn: Any) -> None:
        # Always through the connection's own close (once): it unregisters the socket from
        # the event loop even when psycopg2 already calls the connection closed (broken).
        conn.close()

    libpq_cancel = _LibpqCancel.load()

    async def cancel(conn: Any, timeout: float) -> bool:
        if libpq_cancel is None or conn.closed:
            return False
        try:
            pointer = conn.raw.pgconn_ptr
        except (psycopg2.Error, AttributeError):
            return False
        return await libpq_cancel(pointer, timeout)

    def backend_pid(conn: Any) -> int | None:
        if conn.closed:
            return None
        return int(conn.raw.get_backend_pid())

    def is_idle(conn: Any) -> bool:
        status = conn.raw.get_transaction_status()
        return bool(status == psycopg2.extensions.TRANSACTION_STATUS_IDLE)

    def is_busy(conn: Any) -> bool:
        return not conn.closed and bool(conn.raw.isexecuting())

    return Driver(
        name="aiopg",
        database_cls=peewee_async.PostgresqlDatabase,
        connect=connect,
        close=close,
        cancel=cancel,
        drains=True,
        backend_pid=backend_pid,
        is_closed=lambda conn: bool(conn.closed),
        is_idle=is_idle,
        is_busy=is_busy,
        disconnect_errors=(psycopg2.OperationalError, psycopg2.InterfaceError),
    )


def _psycopg_driver() -> Driver:
    import psycopg
    import psycopg.pq

    async def connect(conninfo: str, timeout: float) -> Any:
        # A connect cut off midway (cancelled, or past the timeout) leaves its libpq
        # connection, possibly logged in already, in a local of psycopg's connect generator,
        # kept alive by the exception's traceback until the garbage collector runs: one
        # backend more on the server than the pool holds. Clearing those finished frames
        # frees it (and closes its socket) now.
        try:
            return await bounded(
                psycopg.AsyncConnection.connect(
                    conninfo, autocommit=True, cursor_factory=psycopg.AsyncClientCursor
                ),
                timeout,
                dispose=close,
            )
        except (asyncio.CancelledError, asyncio.TimeoutError) as exc:
            _drop_frames(exc)
            raise

    async def close(conn: Any) -> None:
        await conn.close()  # idempotent in psycopg

    async def cancel(conn: Any, timeout: float) -> bool:
        # psycopg cancels on the server itself when a wait is cancelled (in the query's own
        # task, see NodePool.run); this covers a connection handed back while still busy
        # (close() of the pool under load).
        if conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.ACTIVE:
            return True
        try:
            await conn.cancel_safe(timeout=timeout)
        except Exception:
            return False
        return True

    def is_idle(conn: Any) -> bool:
        return bool(conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE)

    def is_busy(conn: Any) -> bool:
        return bool(
            not conn.closed and conn.info.transaction_status == psycopg.pq.TransactionStatus.ACTIVE
        )

    return Driver(
        name="psycopg",
        database_cls=peewee_async.Psycopg3Database,
        connect=connect,
        close=close,
        cancel=cancel,
        drains=False,
        backend_pid=lambda conn: None if conn.closed else int(conn.info.backend_pid),
        is_closed=lambda conn: bool(conn.closed or conn.broken),
        is_idle=is_idle,
        is_busy=is_busy,
        disconnect_errors=(psycopg.OperationalError, psycopg.InterfaceError),
        all_results=True,
    )


DRIVERS: dict[str, Callable[[], Driver]] = {"aiopg": _aiopg_driver, "psycopg": _psycopg_driver}
_loaded: dict[str, Driver] = {}


def get_driver(name: str) -> Driver:
    """The driver called ``name``; a missing package raises ``ConfigurationError``."""
    if name not in DRIVERS:
        raise ConfigurationError(
            f"driver: expected one of {sorted(DRIVERS)}, got {name!r}", option="driver"
        )
    if name not in _loaded:
        try:
            _loaded[name] = DRIVERS[name]()
        except ImportError as exc:
            extra = "psycopg" if name == "psycopg" else "postgresql"
            raise ConfigurationError(
                f"driver: {name!r} is not installed (pip install 'areplica[{extra}]')",
                option="driver",
            ) from exc
    return _loaded[name]
