"""One server: its connection pool, its health state and its counters.

``NodePool`` is deliberately small: connections are opened on demand by the driver (so a
dead server fails the acquire at once instead of parking it in a background reconnect
loop), broken or non-idle connections are closed instead of reused, and ``close()`` closes
idle connections at once and in-use ones as they come back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any, Literal

from .consistency import format_lsn
from .drivers import Driver
from .dsn import NodeDSN
from .errors import NodeUnavailableError

__all__ = ["Node", "NodePool", "NodeStatus", "Role", "State"]

logger = logging.getLogger("areplica")

Role = Literal["primary", "replica"]
State = Literal["up", "lagging", "down"]


@dataclass(frozen=True)
class NodeStatus:
    """A snapshot of one node, as ``mgr.status()`` and ``mgr.check()`` return it."""

    name: str
    role: Role
    state: State
    dsn: str
    lag_bytes: int | None = None
    lag_seconds: float | None = None
    replay_lsn: str | None = None
    latency_ms: float | None = None
    in_flight: int = 0
    reads: int = 0
    writes: int = 0
    errors: int = 0
    evictions: int = 0
    pool_in_use: int = 0
    pool_size: int = 0
    last_error: str | None = None

    @property
    def healthy(self) -> bool:
        """True when the node can serve its role now."""
        return self.state == "up"


class NodePool:
    """A bounded pool of driver connections to one node."""

    def __init__(self, name: str, driver: Driver, conninfo: str, *, size: int, timeout: float):
        self.name = name
        self._driver = driver
        self._conninfo = conninfo
        self.size = size
        self.connect_timeout = timeout
        self._idle: collections.deque[Any] = collections.deque()
        self._in_use: set[Any] = set()
        self._slots = asyncio.Semaphore(size)
        self._closed = False

    def __repr__(self) -> str:
        return f"<NodePool {self.name} in_use={len(self._in_use)} idle={len(self._idle)}>"

    @property
    def in_use(self) -> int:
        return len(self._in_use)

    @property
    def closed(self) -> bool:
        return self._closed

    async def acquire(self) -> Any:
        """A connection, opened now if no idle one is left; raises on a dead server."""
        if self._closed:
            raise NodeUnavailableError(f"node {self.name!r}: pool is closed", node=self.name)
        await self._slots.acquire()
        try:
            while self._idle:
                conn = self._idle.pop()
                if not self._driver.is_closed(conn):
                    self._in_use.add(conn)
                    return conn
            conn = await self._driver.connect(self._conninfo, self.connect_timeout)
            if self._closed:  # closed while we were connecting: do not leak it
                await self._driver.close(conn)
                raise NodeUnavailableError(f"node {self.name!r}: pool is closed", node=self.name)
            self._in_use.add(conn)
            return conn
        except BaseException:
            self._slots.release()
            raise

    def put_back(self, conn: Any, *, discard: bool = False) -> Coroutine[Any, Any, None] | None:
        """Give a connection back without awaiting; returns the close to await, if any.

        A healthy connection goes back to the idle queue and its slot is freed at once, so
        the hot path needs no task (``asyncio.shield`` of a coroutine creates one, two event
        loop passes per query). A broken, busy or discarded connection must be closed: the
        caller awaits (and shields) the returned coroutine.
        """
        if conn not in self._in_use:
            return None
        self._in_use.discard(conn)
        self._slots.release()
        if (
            discard
            or self._closed
            or self._driver.is_closed(conn)
            or not self._driver.is_idle(conn)
        ):
            return self._close_quietly(conn)
        self._idle.append(conn)
        return None

    async def _close_quietly(self, conn: Any) -> None:
        with contextlib.suppress(Exception):
            await self._driver.close(conn)

    async def release(self, conn: Any, *, discard: bool = False) -> None:
        """Give a connection back; a broken, busy or discarded one is closed instead."""
        closing = self.put_back(conn, discard=discard)
        if closing is not None:
            await asyncio.shield(closing)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """Acquire and release around a block; an error inside discards the connection."""
        conn = await self.acquire()
        discard = True
        try:
            yield conn
            discard = False
        finally:
            await self.release(conn, discard=discard)

    async def close(self) -> None:
        """Close idle connections now and in-use ones (they are closed, not returned)."""
        self._closed = True
        conns = list(self._idle) + list(self._in_use)
        self._idle.clear()
        for conn in conns:
            with contextlib.suppress(Exception):
                await self._driver.close(conn)


class Node:
    """One PostgreSQL server known to a manager."""

    def __init__(
        self,
        name: str,
        dsn: NodeDSN,
        *,
        role: Role,
        driver: Driver,
        pool_size: int,
        connect_timeout: float,
        weight: float = 1.0,
    ) -> None:
        self.name = name
        self.dsn = dsn
        self.role: Role = role
        self.driver = driver
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.weight = weight
        self.state: State = "down"
        self.pool = NodePool(name, driver, dsn.conninfo, size=pool_size, timeout=connect_timeout)
        # Observed by probes.
        self.in_recovery: bool | None = None
        self.lsn: int | None = None
        self.lag_bytes: int | None = None
        self.lag_seconds: float | None = None
        self.latency_ms: float | None = None
        self.last_error: str | None = None
        self.last_probe: float | None = None
        # Counters.
        self.in_flight = 0
        self.reads = 0
        self.writes = 0
        self.errors = 0
        self.evictions = 0
        self.retired = False
        self._drained: asyncio.Event | None = None

    def __repr__(self) -> str:
        return f"<Node {self.name} {self.role} {self.state} {self.dsn.masked!r}>"

    @property
    def label(self) -> str:
        """The node's name and masked DSN, for messages."""
        return f"{self.name!r} ({self.dsn.masked})"

    def done(self) -> None:
        """One query finished (``in_flight`` is incremented inline on the hot path)."""
        self.in_flight -= 1
        if self.in_flight == 0 and self._drained is not None:
            self._drained.set()

    async def drained(self) -> None:
        """Wait until no query is in flight on this node."""
        if self.in_flight == 0:
            return
        self._drained = asyncio.Event()
        await self._drained.wait()

    def reset_pool(self) -> NodePool:
        """Swap in a fresh pool (readmission); the caller closes the old one."""
        old = self.pool
        self.pool = NodePool(
            self.name,
            self.driver,
            self.dsn.conninfo,
            size=self.pool_size,
            timeout=self.connect_timeout,
        )
        return old

    def status(self) -> NodeStatus:
        """A snapshot, without I/O."""
        return NodeStatus(
            name=self.name,
            role=self.role,
            state=self.state,
            dsn=self.dsn.masked,
            lag_bytes=self.lag_bytes,
            lag_seconds=self.lag_seconds,
            replay_lsn=format_lsn(self.lsn) if self.lsn is not None else None,
            latency_ms=self.latency_ms,
            in_flight=self.in_flight,
            reads=self.reads,
            writes=self.writes,
            errors=self.errors,
            evictions=self.evictions,
            pool_in_use=self.pool.in_use,
            pool_size=self.pool_size,
            last_error=self.last_error,
        )

    def note_error(self, exc: BaseException) -> None:
        """Remember the last error (its text never carries a password: DSNs are masked)."""
        self.errors += 1
        text = f"{type(exc).__name__}: {exc}".strip()
        password = self.dsn.password
        if password:
            text = text.replace(password, "***")
        self.last_error = text[:300]
