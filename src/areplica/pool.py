"""One node's connection pool: ``NodePool``, and ``take_slot`` over several pools.

``NodePool`` is deliberately small, and not psycopg_pool (see the README, "Behind PgBouncer /
a load balancer"): connections are opened on demand by the driver (so a dead server fails the
acquire at once instead of parking it in a background reconnect loop), every connection is
checked to reach the member's one server when it opens, broken, non-idle, too old or too
long idle connections are closed instead of reused, each query runs in its own task so that
a deadline holds whatever the driver does on cancel, and ``close()`` closes idle connections
at once and in-use ones as they come back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ._compat import bounded, timeout
from .drivers import Driver
from .errors import NodeUnavailableError, PoolTimeoutError
from .servers import ServerKey, ServerWatch

__all__ = ["CAP_HOLD", "IDENTITY_SQL", "Canceller", "EvictedError", "NodePool", "take_slot"]

logger = logging.getLogger("areplica")

#: Cancels a backend's query by pid (``pg_cancel_backend`` over a control connection).
Canceller = Callable[[int, float], Awaitable[None]]
T = TypeVar("T")

#: Read on every new pooled connection (one round trip): which server it reached, and the
#: real backend pid (behind PgBouncer the protocol's pid is a fake key).
IDENTITY_SQL = (
    "SELECT (SELECT system_identifier FROM pg_control_system()),"
    " extract(epoch FROM pg_postmaster_start_time())::float8,"
    " current_setting('port')::int, pg_backend_pid()"
)
#: Seconds a pool stays capped at the connections a server (or its pooler) admitted before
#: it tries to open one more.
CAP_HOLD = 10.0


@dataclass
class _Conn:
    """What the pool knows of one of its connections."""

    opened: float
    #: When it is retired at the latest (``max_lifetime``, less a random 5%).
    expires: float | None
    idle_since: float
    server: ServerKey
    #: The server backend's pid (``pg_backend_pid()`` when it opened).
    server_pid: int
    #: The protocol's pid is the server backend's: no pooler in between, so the server's
    #: own view (``pg_stat_activity``) can tell when that backend has gone.
    direct: bool


class EvictedError(NodeUnavailableError):
    """The node was evicted (down) while a read ran or was about to run on it.

    Not news about the node (its eviction reason is already recorded): the read simply
    runs elsewhere.
    """


class _Full(Exception):
    """Internal: the server or its pooler admits no more connections for now (capped)."""


_EVICTED = object()
_EXPIRED = object()


class NodePool:
    """A bounded pool of driver connections to one node, and their one owner.

    Every connection areplica opens for queries lives and dies here, so its life has one
    shape whatever path used it (a read, a write, a transaction):

    - ``acquire(deadline=)`` waits until ``deadline`` at most (``pool_timeout``) for a free
      slot, then reuses an idle connection or opens one. Opening includes reading which
      server it reached (``IDENTITY_SQL``): a connection on another server than the
      member's is not used (``ServerWatch``). A login the server (or a pooler) admits but
      whose first query gets no answer, or a refusal for capacity, caps the pool at the
      connections already open (for ``CAP_HOLD`` seconds): callers then wait for one of
      those instead of a connection that will not come. Nothing was sent either way.
    - ``run(conn, query, timeout)`` runs a query in its own task: the caller waits at most
      ``timeout``, or until the pool is evicted; the query task is then cancelled and left
      to end in the background (the driver cancels the query on the server), and the
      connection comes back to the pool when it ends, its slot held until then.
    - ``put_back()``/``release()`` returns it; one that is broken, discarded, not idle,
      still running a query, older than ``max_lifetime`` or on a server no longer the
      member's is retired instead: the query is cancelled on the server (a cancel request)
      and the connection closed exactly once. Its slot is freed only after that, once the
      server shows the backend gone (or, when that cannot be seen, a bound has passed), so
      the server never sees more than ``size`` backends of this pool.
    - Idle connections are closed after ``max_idle`` seconds, so that they pin no pooler's
      server connection and a member that came back gets its share again.
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
        max_lifetime: float | None = None,
        max_idle: float | None = None,
        servers: ServerWatch | None = None,
    ):
        self.name = name
        self._driver = driver
        self._conninfo = conninfo
        self.size = size
        self.connect_timeout = timeout
        self.wait_timeout = wait_timeout
        self.cancel_timeout = cancel_timeout
        self.canceller = canceller
        self.max_lifetime = max_lifetime
        self.max_idle = max_idle
        self.servers = servers if servers is not None else ServerWatch(name)
        #: Waits until a closed connection's backend has exited (same signature).
        self.exit_waiter: Canceller | None = None
        self._idle: collections.deque[Any] = collections.deque()
        self._in_use: set[Any] = set()
        self._info: dict[Any, _Conn] = {}
        #: Free slots, and the callers waiting for one, first come first served. A freed
        #: slot goes straight to the first waiter (no newcomer can take it meanwhile); a
        #: waiter may wait on several pools at once (``take_slot``).
        self._free = size
        self._waiters: collections.deque[asyncio.Future[NodePool | None]] = collections.deque()
        #: Slots out of circulation while the pool is capped, and slots still owed to that.
        self._withheld = 0
        self._owed = 0
        #: Callers opening a connection now (each holds a slot).
        self._opening = 0
        self._cap_handle: asyncio.TimerHandle | None = None
        self._sweep_handle: asyncio.TimerHandle | None = None
        #: Callers waiting on a query task (``run``): answered at once on eviction.
        self._attempts: set[asyncio.Future[Any]] = set()
        self._closed = False
        #: Closed by an eviction: no query starts on it any more.
        self._evicted = False
        self._returned: asyncio.Event | None = None
        self._retiring: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<NodePool {self.name} in_use={len(self._in_use)} idle={len(self._idle)}>"

    @property
    def in_use(self) -> int:
        return len(self._in_use)

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def saturated(self) -> bool:
        """True when every slot is taken: an acquire would wait."""
        return self._free <= 0

    @property
    def contended(self) -> bool:
        """True while callers wait for a slot (a connection handed back goes to one)."""
        return bool(self._waiters)

    @property
    def capped(self) -> bool:
        """True while the pool lives within what the server (or its pooler) admitted."""
        return self._cap_handle is not None

    # ------------------------------------------------------------------ acquiring

    async def acquire(
        self, *, slot_taken: bool = False, deadline: float | None = None, first: bool = False
    ) -> Any:
        """A connection, reused or opened now; raises on a dead server.

        ``deadline`` (loop time) bounds every wait for it, a slot and a connect alike
        (``PoolTimeoutError``, nothing sent); ``None``: ``wait_timeout`` from now.
        ``slot_taken``: the caller already holds a slot of this pool (``take_slot``); it
        is the connection's slot from here on, and freed again if this raises. ``first``:
        wait at the head of the queue (work that others wait on: a write position, a
        replay poll).
        """
        loop = asyncio.get_running_loop()
        if deadline is None and self.wait_timeout is not None:
            deadline = loop.time() + self.wait_timeout
        while True:
            if not slot_taken:
                if self._closed:
                    raise NodeUnavailableError(
                        f"node {self.name!r}: pool is closed", node=self.name
                    )
                wait = None if deadline is None else max(0.0, deadline - loop.time())
                if await take_slot((self,), wait, first=first) is None:
                    raise self._timed_out(deadline, loop.time())
            slot_taken = False
            try:
                if self._closed:  # closed while we waited for the slot
                    raise NodeUnavailableError(
                        f"node {self.name!r}: pool is closed", node=self.name
                    )
                conn = await self._reuse(loop.time())
                if conn is None:
                    conn = await self._open(deadline)
                self._in_use.add(conn)
                return conn
            except _Full:
                continue  # our slot is withheld (capped): wait for an open connection
            except BaseException:
                self.free_slot()
                raise

    def _timed_out(self, deadline: float | None, now: float) -> PoolTimeoutError:
        waited = self.wait_timeout if self.wait_timeout is not None else 0.0
        return PoolTimeoutError(
            f"node {self.name!r}: no connection of {self.size} freed up in time "
            f"(pool_timeout {waited:g}s); nothing was sent",
            node=self.name,
            timeout=self.wait_timeout,
        )

    async def _reuse(self, now: float) -> Any:
        """The most recently used idle connection still fit for use (others are closed)."""
        while self._idle:
            conn = self._idle.pop()
            info = self._info.get(conn)
            if not self._driver.is_closed(conn) and not self._stale(info, now, idle=True):
                return conn
            self._info.pop(conn, None)
            with contextlib.suppress(Exception):
                await self._driver.close(conn)
        return None

    def _stale(self, info: _Conn | None, now: float, *, idle: bool = False) -> bool:
        if info is None:
            return True
        if info.expires is not None and now >= info.expires:
            return True
        if idle and self.max_idle is not None and now - info.idle_since >= self.max_idle:
            return True
        current = self.servers.current
        return current is not None and info.server != current

    def _open_count(self) -> int:
        return len(self._in_use) + len(self._idle)

    async def _open(self, deadline: float | None) -> Any:
        """A new connection, its server read; ``_Full`` when the server admits no more."""
        self._opening += 1
        try:
            return await self._open_one(deadline)
        finally:
            self._opening -= 1

    async def _open_one(self, deadline: float | None) -> Any:
        loop = asyncio.get_running_loop()
        started = loop.time()
        limit = self.connect_timeout
        cut = deadline is not None and deadline - started < limit
        if deadline is not None:
            limit = max(0.0, min(limit, deadline - started))
        try:
            conn = await self._driver.connect(self._conninfo, limit)
        except asyncio.TimeoutError as exc:
            if cut:  # our own wait ran out, not the server's connect timeout
                raise self._timed_out(deadline, loop.time()) from exc
            raise
        except Exception as exc:
            if self._driver.is_full(exc) and self._open_count() > 0:
                self._cap(f"the server refused a connection ({type(exc).__name__})")
                raise _Full from exc
            raise
        try:
            remaining = max(0.0, limit - (loop.time() - started))
            row = await bounded(self._identify(conn), remaining)
        except asyncio.TimeoutError as exc:
            await asyncio.shield(self._driver.close(conn))
            # Logged in, but its first query waits: a pooler queues it (no server
            # connection is free for us) or the server behind the pooler hangs (the probes
            # tell). Nothing was sent: live with the connections already open.
            if self._open_count() > 0:
                self._cap(f"a new connection's first query got no answer within {limit:g}s")
                raise _Full from exc
            raise PoolTimeoutError(
                f"node {self.name!r}: a new connection was admitted but its first query got "
                f"no answer within {limit:g}s (a pooler queueing it, or a hung server); "
                "nothing was sent",
                node=self.name,
                timeout=limit,
            ) from exc
        except BaseException:
            await asyncio.shield(self._driver.close(conn))
            raise
        key: ServerKey = (int(row[0]), float(row[1]), int(row[2]))
        if self._closed or not self.servers.opened(key):
            await asyncio.shield(self._driver.close(conn))
            if self._closed:
                raise NodeUnavailableError(f"node {self.name!r}: pool is closed", node=self.name)
            raise NodeUnavailableError(self.servers.mismatch(key), node=self.name)
        now = loop.time()
        expires = None
        if self.max_lifetime is not None:
            # Less a random 5% (as psycopg_pool does): connections opened together do not
            # all expire together.
            expires = now + self.max_lifetime * (1.0 - 0.05 * random.random())
        pid = int(row[3])
        self._info[conn] = _Conn(
            opened=now,
            expires=expires,
            idle_since=now,
            server=key,
            server_pid=pid,
            direct=self._driver.backend_pid(conn) == pid,
        )
        return conn

    async def _identify(self, conn: Any) -> Any:
        async with conn.cursor() as cursor:
            await cursor.execute(IDENTITY_SQL)
            return await cursor.fetchone()

    async def warm(self, count: int, deadline: float) -> list[ServerKey]:
        """Open up to ``count`` connections now (kept idle); the servers they reached.

        Used at connect: with the probe's, they are several connections open at the same
        time, so an address that leads to several servers shows it before any read.
        """
        loop = asyncio.get_running_loop()
        conns: list[Any] = []
        keys: list[ServerKey] = []
        try:
            for _ in range(min(count, self.size)):
                if await take_slot((self,), max(0.0, deadline - loop.time())) is None:
                    break
                try:
                    conn = await self._open(deadline)
                except NodeUnavailableError:
                    self.free_slot()
                    if self.servers.questioned is not None:
                        keys.append(self.servers.questioned)
                    continue
                except BaseException:
                    self.free_slot()
                    raise
                self._in_use.add(conn)
                conns.append(conn)
                keys.append(self._info[conn].server)
        except (_Full, Exception):
            pass
        finally:
            for conn in conns:
                self.release(conn)
        return keys

    def _cap(self, why: str) -> None:
        """Live within the connections open now: withhold the other slots for a while.

        Slots in circulation should be the open connections: ``size`` - open ones are
        withheld. The caller's slot is withheld at once, free ones too; callers still
        opening withhold their own when they fail, so only the rest is owed by the next
        slots freed. More withheld than that (an opener counted twice) goes back at once.
        """
        self._withheld += 1  # the caller's own slot
        target = max(0, self.size - self._open_count())
        while self._withheld < target and self._free > 0:
            self._free -= 1
            self._withheld += 1
        others = max(0, self._opening - 1)
        self._owed = max(0, target - self._withheld - others)
        while self._withheld > target:
            self._withheld -= 1
            self.free_slot()
        if self._cap_handle is None:
            logger.info(
                "%s: %s; using the %d open connection(s) for %gs",
                self.name,
                why,
                self._open_count(),
                CAP_HOLD,
            )
            self._cap_handle = asyncio.get_running_loop().call_later(CAP_HOLD, self._uncap)

    def _uncap(self) -> None:
        self._cap_handle = None
        self._owed = 0
        withheld, self._withheld = self._withheld, 0
        for _ in range(withheld):
            self.free_slot()

    # ------------------------------------------------------------------ running a query

    async def run(
        self,
        conn: Any,
        work: Coroutine[Any, Any, T],
        limit: float | None,
        done: Callable[[], None] | None = None,
    ) -> T:
        """Run ``work`` (a query on ``conn``) in its own task; ``conn`` comes back when it ends.

        The caller waits at most ``limit`` seconds (then ``asyncio.TimeoutError``), or until
        the pool is evicted (``NodeUnavailableError``): the query task is cancelled and left
        to end in the background, where the driver cancels the query on the server; the
        connection is given back (or retired) when the task ends, its slot taken until
        then. So the caller's wait ends at the deadline whatever the driver does on cancel
        (psycopg waits for the cancelled query to end, up to 10 s). A cancel of the caller
        cancels the task the same way and propagates. ``done`` runs when the task ends.
        """
        if self._evicted:  # evicted between the acquire and now: not on this node
            work.close()
            self.release(conn)
            if done is not None:
                done()
            raise EvictedError(f"node {self.name!r} was evicted (down)", node=self.name)
        loop = asyncio.get_running_loop()
        task = loop.create_task(work, name=f"{self.name}-query")
        waiter: asyncio.Future[Any] = loop.create_future()
        task.add_done_callback(functools.partial(self._ran, conn, waiter, done))
        self._attempts.add(waiter)
        handle = None if limit is None else loop.call_later(limit, _answer, waiter, _EXPIRED)
        try:
            outcome = await waiter
        except BaseException:
            task.cancel()
            raise
        finally:
            if handle is not None:
                handle.cancel()
            self._attempts.discard(waiter)
        if task.done():
            return task.result()
        task.cancel()
        if outcome is _EVICTED:
            raise EvictedError(
                f"node {self.name!r} was evicted (down) while a query ran on it",
                node=self.name,
            )
        raise asyncio.TimeoutError

    def _ran(
        self,
        conn: Any,
        waiter: asyncio.Future[Any],
        done: Callable[[], None] | None,
        task: asyncio.Task[Any],
    ) -> None:
        exc = None if task.cancelled() else task.exception()  # retrieved: the caller may be gone
        self.release(conn, discard=exc is not None and self._driver.is_disconnect(exc))
        if done is not None:
            done()
        _answer(waiter, None)

    # ------------------------------------------------------------------ giving back

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
        now = asyncio.get_running_loop().time()
        info = self._info.get(conn)
        if (
            discard
            or self._closed
            or self._driver.is_closed(conn)
            or not self._driver.is_idle(conn)
            or self._stale(info, now)
        ):
            return self._retire(conn)
        if info is not None:
            info.idle_since = now
        self._idle.append(conn)
        self._arm_sweep(now)
        self.free_slot()
        return None

    def _arm_sweep(self, now: float) -> None:
        if self.max_idle is None or self._sweep_handle is not None or not self._idle:
            return
        oldest = self._info.get(self._idle[0])
        due = self.max_idle if oldest is None else max(0.0, oldest.idle_since + self.max_idle - now)
        self._sweep_handle = asyncio.get_running_loop().call_later(due + 0.01, self._sweep)

    def _sweep(self) -> None:
        """Close the connections idle for ``max_idle`` (the oldest are at the left)."""
        self._sweep_handle = None
        now = asyncio.get_running_loop().time()
        gone: list[Any] = []
        while self._idle:
            info = self._info.get(self._idle[0])
            if info is not None and not self._stale(info, now, idle=True):
                break
            conn = self._idle.popleft()
            self._info.pop(conn, None)
            gone.append(conn)
        if gone:
            self._spawn(self._close_all(gone), f"{self.name}-idle-close")
        self._arm_sweep(now)

    async def _close_all(self, conns: list[Any]) -> None:
        for conn in conns:
            with contextlib.suppress(Exception):
                await self._driver.close(conn)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def cancel(self, conn: Any) -> bool:
        """Cancel the query running on ``conn`` on the server (bounded; never raises).

        True when the query is known to have ended: it ended on the connection after a
        cancel request (or was not running). False when that cannot be confirmed.
        """
        if not self._driver.is_busy(conn):
            return True
        sent = await self._driver.cancel(conn, self.cancel_timeout)
        info = self._info.get(conn)
        if not sent and self.canceller is not None and info is not None and info.direct:
            # No cancel request got through: the real backend pid, over another connection.
            with contextlib.suppress(Exception):
                async with timeout(self.cancel_timeout):
                    await self.canceller(info.server_pid, self.cancel_timeout)
                sent = True
        if not self._driver.drains:
            return sent and not self._driver.is_busy(conn)
        # Wait for the cancelled statement's error to come back (the driver's reader
        # consumes it): the backend is idle then and exits as soon as we close.
        with contextlib.suppress(asyncio.TimeoutError):
            async with timeout(self.cancel_timeout):
                delay = 0.001
                while self._driver.is_busy(conn):
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.05)
        return not self._driver.is_busy(conn)

    async def _retire(self, conn: Any) -> None:
        """Cancel what still runs on the server, close once, then free the slot.

        The slot is freed once the server has let the backend go (bounded), so a new
        connection never overlaps an exiting one: the server never lists more than
        ``size`` backends of this pool. Behind a pooler the server's view is out of reach:
        a query whose end could not be confirmed then holds the slot for the bound.
        """
        info = self._info.pop(conn, None)
        try:
            ended = True
            with contextlib.suppress(Exception):
                ended = await self.cancel(conn)
            with contextlib.suppress(Exception):
                await self._driver.close(conn)
            if info is not None and info.direct and self.exit_waiter is not None:
                with contextlib.suppress(Exception):
                    async with timeout(self.cancel_timeout):
                        await self.exit_waiter(info.server_pid, self.cancel_timeout)
            elif not ended:
                await asyncio.sleep(self.cancel_timeout)
        finally:
            self.free_slot()

    def free_slot(self) -> None:
        """Give a slot back: to the first caller still waiting for one, else to the pool.

        Once the pool is closed every waiter is woken with it (``acquire`` then raises).
        While capped, the slot may be withheld instead.
        """
        if self._owed > 0 and not self._closed:
            self._owed -= 1
            self._withheld += 1
            self._note_returned()
            return
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
            self._spawn(retiring, f"{self.name}-retire")

    async def close(self, grace: float | None = None) -> None:
        """Close idle connections now; with ``grace``, drain the in-use ones.

        ``grace=None`` (an evicted node's old pool) answers every caller waiting on a query
        of this pool at once (they retry elsewhere; the queries are cancelled in the
        background) and leaves in-use connections to their owners, who retire them as
        they come back. With a number, queries still running after ``grace`` seconds are
        cancelled on the server; their owners then see the error and hand the connections
        back, and this waits for that (bounded).
        """
        self._closed = True
        for handle in (self._cap_handle, self._sweep_handle):
            if handle is not None:
                handle.cancel()
        self._cap_handle = self._sweep_handle = None
        self._owed = 0
        while self._waiters:  # nothing will be handed out any more: wake them all
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(self)
        if grace is None:
            self._evicted = True
            for attempt in list(self._attempts):
                _answer(attempt, _EVICTED)
        idle = list(self._idle)
        self._idle.clear()
        for conn in idle:
            self._info.pop(conn, None)
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


async def take_slot(
    pools: Sequence[NodePool], wait: float | None, *, first: bool = False
) -> NodePool | None:
    """A slot of the first of ``pools`` to have one, held by the caller; None after ``wait``.

    Waiters queue in each pool first come first served, and a freed slot is handed to one
    waiter only, so a busy pool wakes one task per freed slot, not all of them. No task is
    created and no timer cancels the caller (the timer only answers the wait with None):
    the caller's own cancel propagates, and a slot handed to it meanwhile goes back. A
    pool closed during the wait is returned too; its slot is not usable
    (``acquire(slot_taken=True)`` raises and frees it). ``first``: ahead of every waiter.
    """
    for pool in pools:
        if pool._free > 0:
            pool._free -= 1
            return pool
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[NodePool | None] = loop.create_future()
    for pool in pools:
        if first:
            pool._waiters.appendleft(waiter)
        else:
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


def _answer(waiter: asyncio.Future[Any], value: Any) -> None:
    if not waiter.done():
        waiter.set_result(value)
