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
import urllib.parse
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ._compat import timeout
from .consistency import format_lsn
from .drivers import Driver
from .dsn import MASK, NodeDSN, mask_dsn
from .errors import NodeUnavailableError, PoolTimeoutError

__all__ = ["Node", "NodePool", "NodeStatus", "Role", "State", "take_slot"]

logger = logging.getLogger("areplica")

Role = Literal["primary", "replica"]
#: Cancels a backend's query by pid (``pg_cancel_backend`` over a control connection).
Canceller = Callable[[int, float], Awaitable[None]]
State = Literal["up", "lagging", "down", "diverged"]


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
    """A bounded pool of driver connections to one node, and their one owner.

    Every connection areplica opens for queries lives and dies here, so its life has one
    shape whatever path used it (a read, a write, a transaction):

    - ``acquire()`` waits at most ``wait_timeout`` for a free slot (``PoolTimeoutError``:
      load, not a dead node), then reuses an idle connection or opens one.
    - ``put_back()``/``release()`` returns it; one that is broken, discarded, not idle, or
      still running a query is retired instead: the query is cancelled on the server (a
      PostgreSQL cancel request) and the connection closed exactly once. Its slot is freed
      only after that, so the server never sees more than ``size`` backends of this pool.
    - ``close(grace)`` closes idle connections at once, lets in-use ones finish for
      ``grace`` seconds, then cancels their queries on the server; their owners then retire
      them. A connection another task still uses is never closed under it (psycopg crashes
      when it is).
    """

    def __init__(
        self,
        name: str,
        driver: Driver,
        conninfo: str,
        *,
        size: int,
        timeout: float,
        wait_timeout: float | None = None,
        cancel_timeout: float = 2.0,
        canceller: Canceller | None = None,
    ):
        self.name = name
        self._driver = driver
        self._conninfo = conninfo
        self.size = size
        self.connect_timeout = timeout
        self.wait_timeout = wait_timeout
        self.cancel_timeout = cancel_timeout
        self.canceller = canceller
        #: Waits until a closed connection's backend has exited (same signature).
        self.exit_waiter: Canceller | None = None
        self._idle: collections.deque[Any] = collections.deque()
        self._in_use: set[Any] = set()
        #: Free slots, and the callers waiting for one, first come first served. A freed
        #: slot goes straight to the first waiter (no newcomer can take it meanwhile); a
        #: waiter may wait on several pools at once (``take_slot``).
        self._free = size
        self._waiters: collections.deque[asyncio.Future[NodePool | None]] = collections.deque()
        self._closed = False
        self._returned: asyncio.Event | None = None
        self._retiring: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<NodePool {self.name} in_use={len(self._in_use)} idle={len(self._idle)}>"

    @property
    def in_use(self) -> int:
        return len(self._in_use)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def saturated(self) -> bool:
        """True when every slot is taken: an acquire would wait."""
        return self._free <= 0

    async def acquire(self, *, slot_taken: bool = False) -> Any:
        """A connection, opened now if no idle one is left; raises on a dead server.

        ``slot_taken``: the caller already holds a slot of this pool (``take_slot``); it
        is the connection's slot from here on, and freed again if this raises.
        """
        if not slot_taken:
            if self._closed:
                raise NodeUnavailableError(f"node {self.name!r}: pool is closed", node=self.name)
            if await take_slot((self,), self.wait_timeout) is None:
                raise PoolTimeoutError(
                    f"node {self.name!r}: all {self.size} connections stayed busy for "
                    f"{self.wait_timeout:g}s (pool_timeout); nothing was sent",
                    node=self.name,
                    timeout=self.wait_timeout,
                )
        try:
            if self._closed:  # closed while we waited for the slot
                raise NodeUnavailableError(f"node {self.name!r}: pool is closed", node=self.name)
            while self._idle:
                conn = self._idle.pop()
                if not self._driver.is_closed(conn):
                    self._in_use.add(conn)
                    return conn
                await self._driver.close(conn)
            conn = await self._driver.connect(self._conninfo, self.connect_timeout)
            if self._closed:  # closed while we were connecting: do not leak it
                await asyncio.shield(self._driver.close(conn))
                raise NodeUnavailableError(f"node {self.name!r}: pool is closed", node=self.name)
            self._in_use.add(conn)
            return conn
        except BaseException:
            self.free_slot()
            raise

    def put_back(self, conn: Any, *, discard: bool = False) -> Coroutine[Any, Any, None] | None:
        """Give a connection back without awaiting; returns the retirement to await, if any.

        A healthy idle connection goes back to the idle queue and its slot is freed at once,
        so the hot path needs no task (``asyncio.shield`` of a coroutine creates one, two
        event loop passes per query). Any other must be retired: the caller awaits (and
        shields) the returned coroutine.
        """
        if conn not in self._in_use:
            return None
        self._in_use.discard(conn)
        if (
            discard
            or self._closed
            or self._driver.is_closed(conn)
            or not self._driver.is_idle(conn)
        ):
            return self._retire(conn)
        self._idle.append(conn)
        self.free_slot()
        return None

    async def cancel(self, conn: Any) -> None:
        """Cancel the query running on ``conn`` on the server (bounded; never raises)."""
        if not self._driver.is_busy(conn):
            return
        if self._driver.cancel is not None:
            await self._driver.cancel(conn, self.cancel_timeout)
            return
        pid = self._driver.backend_pid(conn)
        if pid is None or self.canceller is None:
            return
        with contextlib.suppress(Exception):
            async with timeout(self.cancel_timeout):
                await self.canceller(pid, self.cancel_timeout)
                # Wait for the cancelled statement's error to come back (the driver's reader
                # consumes it): the backend is idle then and exits as soon as we close.
                delay = 0.001
                while self._driver.is_busy(conn):
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.05)

    async def _retire(self, conn: Any) -> None:
        """Cancel what still runs on the server, close once, then free the slot.

        The slot is freed once the server has let the backend go (bounded), so a new
        connection never overlaps an exiting one: the server never lists more than
        ``size`` backends of this pool.
        """
        pid = None
        try:
            with contextlib.suppress(Exception):
                pid = self._driver.backend_pid(conn)
            await self.cancel(conn)
            with contextlib.suppress(Exception):
                await self._driver.close(conn)
            if pid is not None and self.exit_waiter is not None:
                with contextlib.suppress(Exception):
                    async with timeout(self.cancel_timeout):
                        await self.exit_waiter(pid, self.cancel_timeout)
        finally:
            self.free_slot()

    def free_slot(self) -> None:
        """Give a slot back: to the first caller still waiting for one, else to the pool.

        Once the pool is closed every waiter is woken with it (``acquire`` then raises).
        """
        handed = False
        while self._waiters and not handed:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(self)
                handed = not self._closed
        if not handed:
            self._free += 1
        self._note_returned()

    def _note_returned(self) -> None:
        if not self._in_use and self._returned is not None:
            self._returned.set()

    def release(self, conn: Any, *, discard: bool = False) -> None:
        """Give a connection back; a broken, busy or discarded one is retired in the background.

        The caller does not wait for the retirement (a cancel request to a hung server may
        take ``cancel_timeout``): a read goes on to its retry at once. The slot stays taken
        until the retirement ends, and ``close()`` waits for every retirement.
        """
        retiring = self.put_back(conn, discard=discard)
        if retiring is not None:
            task = asyncio.get_running_loop().create_task(retiring, name=f"{self.name}-retire")
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def close(self, grace: float | None = None) -> None:
        """Close idle connections now; with ``grace``, drain the in-use ones.

        ``grace=None`` (an evicted node's old pool) leaves in-use connections to their
        owners, who retire them as they come back. With a number, queries still running
        after ``grace`` seconds are cancelled on the server; their owners then see the
        error and hand the connections back, and this waits for that (bounded).
        """
        self._closed = True
        while self._waiters:  # nothing will be handed out any more: wake them all
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(self)
        idle = list(self._idle)
        self._idle.clear()
        for conn in idle:
            with contextlib.suppress(Exception):
                await self._driver.close(conn)
        if grace is not None and self._in_use and not await self._wait_returned(grace):
            await asyncio.gather(*(self.cancel(conn) for conn in list(self._in_use)))
            if not await self._wait_returned(self.cancel_timeout + 1.0):
                logger.warning(
                    "%s: %d connection(s) still in use after close; their owners close them",
                    self.name,
                    len(self._in_use),
                )
        # Wait for every retirement; look at done-ness, not at the set (a finished task
        # leaves it only when its done callback has run).
        pending = [task for task in self._retiring if not task.done()]
        while pending:
            await asyncio.wait(pending)
            pending = [task for task in self._retiring if not task.done()]

    async def _wait_returned(self, delay: float) -> bool:
        if not self._in_use:
            return True
        self._returned = asyncio.Event()
        with contextlib.suppress(asyncio.TimeoutError):
            async with timeout(delay):
                await self._returned.wait()
        return not self._in_use


async def take_slot(pools: Sequence[NodePool], wait: float | None) -> NodePool | None:
    """A slot of the first of ``pools`` to have one, held by the caller; None after ``wait``.

    Waiters queue in each pool first come first served, and a freed slot is handed to one
    waiter only, so a busy pool wakes one task per freed slot, not all of them. No task is
    created and no timer cancels the caller (the timer only answers the wait with None):
    the caller's own cancel propagates, and a slot handed to it meanwhile goes back. A
    pool closed during the wait is returned too; its slot is not usable
    (``acquire(slot_taken=True)`` raises and frees it).
    """
    for pool in pools:
        if pool._free > 0:
            pool._free -= 1
            return pool
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[NodePool | None] = loop.create_future()
    for pool in pools:
        pool._waiters.append(waiter)
    timer = None if wait is None else loop.call_later(wait, _expire, waiter)
    try:
        return await waiter
    except BaseException:
        if waiter.done() and not waiter.cancelled() and (got := waiter.result()) is not None:
            got.free_slot()  # handed to us just as we were cancelled
        raise
    finally:
        if timer is not None:
            timer.cancel()
        granted = waiter.result() if waiter.done() and not waiter.cancelled() else None
        for pool in pools:
            if pool is not granted:  # the granting pool already let go of it
                with contextlib.suppress(ValueError):
                    pool._waiters.remove(waiter)


def _expire(waiter: asyncio.Future[NodePool | None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


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
        pool_timeout: float | None = None,
        weight: float = 1.0,
    ) -> None:
        self.name = name
        self.dsn = dsn
        self.role: Role = role
        self.driver = driver
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.pool_timeout = pool_timeout
        #: Read weight as a standby (``weights``); 0 takes no reads (``noloadbalance``).
        self.read_weight = weight
        #: Read weight while it is the primary (``primary_weight``; 0: no reads).
        self.primary_weight = 0.0
        self.state: State = "down"
        self.pool = self._new_pool()
        # Observed by probes.
        self.in_recovery: bool | None = None
        self.system_id: int | None = None
        self.timeline: int | None = None
        self.server: tuple[int, float, int] | None = None
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
        #: How the pool cancels a query when the driver has no safe cancel of its own.
        self.canceller: Canceller | None = None
        #: Waits until a backend of this node has exited (set by the manager).
        self.exit_waiter: Canceller | None = None
        #: An HA manager says it is stopping or demoting: it takes no new queries.
        self.paused = False
        #: Where the member came from: "primary"/"replicas"/"members"/"dsn"/"patroni".
        self.source = "members"
        self._drained: asyncio.Event | None = None

    def __repr__(self) -> str:
        return f"<Node {self.name} {self.role} {self.state} {self.dsn.masked!r}>"

    @property
    def weight(self) -> float:
        """The node's weight for the load-balancing policy in its current role."""
        return self.primary_weight if self.role == "primary" else self.read_weight

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

    def _new_pool(self) -> NodePool:
        pool = NodePool(
            self.name,
            self.driver,
            self.dsn.conninfo,
            size=self.pool_size,
            timeout=self.connect_timeout,
            wait_timeout=self.pool_timeout,
            # A cancel request is a control round trip: bounded like a probe.
            cancel_timeout=self.connect_timeout,
            canceller=self._cancel_backend,
        )
        pool.exit_waiter = self._backend_gone
        return pool

    async def _backend_gone(self, pid: int, timeout: float) -> None:
        if self.exit_waiter is not None:
            await self.exit_waiter(pid, timeout)

    async def _cancel_backend(self, pid: int, timeout: float) -> None:
        if self.canceller is not None:
            await self.canceller(pid, timeout)

    def reset_pool(self) -> NodePool:
        """Swap in a fresh pool (eviction, reopen); the caller closes the old one."""
        old = self.pool
        self.pool = self._new_pool()
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
        text = f"{type(exc).__name__}: {exc}".strip()[:2000]
        password = self.dsn.password
        if password:  # the password itself first, in the forms a driver may echo it
            for form in {password, urllib.parse.quote(password, safe=""), repr(password)[1:-1]}:
                text = text.replace(form, MASK)
        self.last_error = mask_dsn(text)[:300]
