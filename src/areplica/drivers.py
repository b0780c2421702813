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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import peewee
import peewee_async

from ._compat import bounded
from .errors import AreplicaError, ConfigurationError

__all__ = ["DRIVERS", "QUERY_CANCELED", "Driver", "get_driver", "sqlstate_of"]

# SQLSTATEs that mean the connection (or the server behind it) is gone.
_DISCONNECT_STATES = frozenset({"57P01", "57P02", "57P03", "57P04", "57P05"})
# A standby cancelled the query because replay needed what it was reading.
_RECOVERY_CONFLICT_STATES = frozenset({"40001", "40P01"})
READ_ONLY_TRANSACTION = "25006"
# A cancel request (ours, or close() cutting a query short) ended the statement.
QUERY_CANCELED = "57014"


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
    #: Ask the server to cancel the query running on a connection with the driver's own
    #: non-blocking cancel request, bounded by the timeout; never raises. ``None`` when the
    #: driver has none that is safe (aiopg: psycopg2's cancel() holds the GIL while it
    #: blocks, so a hung server would freeze the process): the pool then cancels by
    #: backend pid over the node's probe connection (``pg_cancel_backend``).
    cancel: Callable[[Any, float], Awaitable[None]] | None
    backend_pid: Callable[[Any], int | None]
    is_closed: Callable[[Any], bool]
    is_idle: Callable[[Any], bool]
    #: True while a query runs on the connection (the server is still working on it).
    is_busy: Callable[[Any], bool]
    disconnect_errors: tuple[type[BaseException], ...]

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
    def is_recovery_conflict(exc: BaseException) -> bool:
        """True when a standby cancelled the query to apply WAL (the read may run elsewhere)."""
        return sqlstate_of(exc) in _RECOVERY_CONFLICT_STATES

    @staticmethod
    def is_read_only_violation(exc: BaseException) -> bool:
        """True when a standby refused a statement as a write (SQLSTATE 25006)."""
        return sqlstate_of(exc) == READ_ONLY_TRANSACTION


def _aiopg_driver() -> Driver:
    import aiopg
    import psycopg2
    import psycopg2.extensions

    class Connection(aiopg.Connection):
        """aiopg's connection, minus its own reaction to a cancelled wait.

        Stock aiopg closes the connection when a query's wait is cancelled and turns a
        server-side cancel (57014) into ``CancelledError`` plus a loop error report. The
        close happens without a cancel request, so the query runs on in the server (an
        orphan), and the pool's later close is a second one: aiopg then removes the event
        loop reader of whatever socket reused the file descriptor, and that connection never
        wakes. Here a cancelled wait leaves the connection as it is: the node pool, its one
        owner, sends the cancel request and closes it exactly once. The reader callback
        keeps consuming the connection's input meanwhile, so the late result is drained.
        """

        async def _poll(self, waiter: asyncio.Future[None], timeout: float | None) -> None:
            self._ready(self._weakref)
            try:
                # Bounds are applied by the callers (read_timeout, connect timeout).
                await waiter
            finally:
                # Nobody waits on it any more: a late close must not set an exception on
                # it (that would be a "Future exception was never retrieved").
                self._waiter = None

    async def connect(conninfo: str, timeout: float) -> Any:
        # Bounded here: libpq's connect_timeout does not apply to non-blocking connects.
        # hstore discovery is off: it costs a query per connection.
        conn = Connection(conninfo, None, False, enable_hstore=False)  # type: ignore[arg-type]
        # _connect() closes the connection itself if it fails or is cancelled.
        return await bounded(conn._connect(), timeout, dispose=close)

    async def close(conn: Any) -> None:
        if not conn.closed:
            conn.close()

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
        cancel=None,
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
        return await bounded(
            psycopg.AsyncConnection.connect(
                conninfo, autocommit=True, cursor_factory=psycopg.AsyncClientCursor
            ),
            timeout,
            dispose=close,
        )

    async def close(conn: Any) -> None:
        await conn.close()  # idempotent in psycopg

    async def cancel(conn: Any, timeout: float) -> None:
        # psycopg cancels on the server itself when a wait is cancelled; this covers a
        # connection handed back while still busy (close() of the pool under load).
        if conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.ACTIVE:
            return
        with contextlib.suppress(Exception):
            await conn.cancel_safe(timeout=timeout)

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
        backend_pid=lambda conn: None if conn.closed else int(conn.info.backend_pid),
        is_closed=lambda conn: bool(conn.closed or conn.broken),
        is_idle=is_idle,
        is_busy=is_busy,
        disconnect_errors=(psycopg.OperationalError, psycopg.InterfaceError),
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
