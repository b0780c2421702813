"""A small asyncio TCP proxy with fault injection, for tests against a real topology.

:class:`FaultProxy` forwards one loopback listening port to one upstream ``host:port`` and can
be told to add latency (:meth:`FaultProxy.delay`), to swallow traffic while keeping every
connection open (:meth:`FaultProxy.blackhole`), to drop every current connection at once
(:meth:`FaultProxy.cut`), and to go back to plain forwarding (:meth:`FaultProxy.heal`).

Forwarding is done by protocol callbacks, not tasks: a chunk read from one side is written
to the other at once (no delay), or held in that direction's queue and written by a timer
when it is due. Each direction of each connection has its own queue and timer, so a delay
never serializes connections, and chunks following each other within the delay are all in
flight together (the delay is latency, not a bandwidth limit). Holding more than
``_HIGH_WATER`` chunks in one direction, or a peer that does not read, pauses reading
(TCP back-pressure).

On Linux the proxies' event loop wakes its timers through a ``timerfd``: ``epoll_wait``
counts its timeout in whole milliseconds and asyncio rounds it up, so a 0.5 ms delay would
otherwise take 1 ms or more.

:class:`ProxyThread` runs any number of such proxies in a private event loop in a daemon
thread, so that synchronous code (``LocalTopology``) can drive them while the code under
test runs its own event loop. :class:`ProxyProcess` offers the same interface with the
proxies in a child process (this file run as a script): they then share no interpreter lock
with the code under test (benchmarks). Every control call is thread-safe and returns once
the change is in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import math
import os
import select
import selectors
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

__all__ = ["FaultProxy", "ProxyProcess", "ProxyThread"]

_T = TypeVar("_T")

_HIGH_WATER = 64  # chunks held per direction; past that reading pauses (back-pressure)
_LOW_WATER = 16  # reading resumes once no more than this many are held


# --------------------------------------------------------------------------------------
# Sub-millisecond timers


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_CLOCK_MONOTONIC = 1


def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.timerfd_create  # noqa: B018 - present?
        libc.timerfd_settime  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


if hasattr(selectors, "EpollSelector"):

    class _TimerfdSelector(selectors.EpollSelector):
        """An epoll selector whose timeouts are kept to the microsecond by a ``timerfd``."""

        def __init__(self, libc: Any) -> None:
            super().__init__()
            self._libc = libc
            fd = libc.timerfd_create(_CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
            if fd < 0:
                super().close()
                raise OSError(ctypes.get_errno(), "timerfd_create failed")
            self._timer_fd: int = fd
            self._spec = _Itimerspec()
            self._epoll: select.epoll = getattr(self, "_selector")  # noqa: B009
            self._keys: dict[int, selectors.SelectorKey] = getattr(self, "_fd_to_key")  # noqa: B009
            # Straight on the epoll object: unknown to the selector's map, never reported.
            self._epoll.register(fd, select.EPOLLIN)

        def _arm(self, timeout: float) -> None:
            ns = max(1000, int(timeout * 1e9))
            self._spec.it_value.tv_sec, self._spec.it_value.tv_nsec = divmod(ns, 1_000_000_000)
            self._libc.timerfd_settime(self._timer_fd, 0, ctypes.byref(self._spec), None)

        def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
            if timeout is None:
                wait = -1.0
            elif timeout <= 0:
                wait = 0.0
            else:
                self._arm(timeout)
                # The timerfd wakes epoll on time; this is only a backstop.
                wait = math.ceil(timeout * 1e3) * 1e-3 + 0.001
            max_events = max(len(self.get_map()) + 1, 1)
            ready: list[tuple[selectors.SelectorKey, int]] = []
            try:
                events = self._epoll.poll(wait, max_events)
            except InterruptedError:
                return ready
            for fd, event in events:
                if fd == self._timer_fd:
                    with contextlib.suppress(BlockingIOError):
                        os.read(fd, 8)
                    continue
                key = self._keys.get(fd)
                if key is not None:
                    mask = 0
                    if event & ~select.EPOLLIN:
                        mask |= selectors.EVENT_WRITE
                    if event & ~select.EPOLLOUT:
                        mask |= selectors.EVENT_READ
                    ready.append((key, mask & key.events))
            return ready

        def close(self) -> None:
            with contextlib.suppress(OSError):
                os.close(self._timer_fd)
            super().close()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """An event loop whose timers fire to the microsecond where the system allows it."""
    libc = _libc()
    if libc is not None and hasattr(selectors, "EpollSelector"):
        with contextlib.suppress(OSError):
            return asyncio.SelectorEventLoop(_TimerfdSelector(libc))
    return asyncio.new_event_loop()


def _tight_timer_slack() -> None:
    """Ask Linux to wake this thread's timers without its default 50 µs of slack."""
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(Exception):
            libc.prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK, 1 ns


# --------------------------------------------------------------------------------------
# The proxy


class _Side(asyncio.Protocol):
    """One socket of a link; what it receives is held (delay, blackhole), then sent on."""

    def __init__(self, link: _Link) -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.held: deque[tuple[float, bytes | None]] = deque()  # (due, chunk); None: EOF
        self.timer: asyncio.TimerHandle | None = None
        self.ended = False  # its input ended (EOF or lost)
        self.lost = False
        self.full = False  # too much held: reading paused
        self.blocked = False  # the peer's output buffer is full: reading paused

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.link.made(self)

    def data_received(self, data: bytes) -> None:
        self.link.received(self, data)

    def eof_received(self) -> bool:
        self.link.received(self, None)
        return True  # keep the socket: the link closes it once the EOF is due

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.link.gone(self)

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.blocked = True
            self.peer.update_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.blocked = False
            self.peer.update_reading()

    def update_reading(self) -> None:
        transport = self.transport
        if transport is None or self.lost or transport.is_closing():
            return
        if self.full or self.blocked:
            if transport.is_reading():
                transport.pause_reading()
        elif not transport.is_reading():
            transport.resume_reading()


class _Link:
    """One client connection and its upstream connection, forwarded in both directions."""

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.loop = asyncio.get_running_loop()
        self.client = _Side(self)
        self.upstream: _Side | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.finished = False
        self.done: asyncio.Future[None] = self.loop.create_future()

    # ---------------------------------------------------------------- life cycle

    def made(self, side: _Side) -> None:
        if side is self.client:
            self.proxy._links.add(self)
            if self.proxy._open:
                self.connect()

    def connect(self) -> None:
        """Reach the server (once the proxy is open); a blackholed link waits for heal()."""
        if self.connecting is None and not self.finished:
            self.connecting = self.loop.create_task(self._connect())
            self.connecting.add_done_callback(lambda _: self._check_done())

    async def _connect(self) -> None:
        proxy = self.proxy
        side = _Side(self)
        try:
            await self.loop.create_connection(
                lambda: side, proxy.upstream_host, proxy.upstream_port
            )
        except OSError:
            self.end(graceful=False)  # server down: the client sees its connection closed
            return
        if self.finished:
            if side.transport is not None:
                side.transport.abort()
            return
        self.upstream, side.peer, self.client.peer = side, self.client, side
        self.kick(self.client)
        self.kick(side)

    def gone(self, side: _Side) -> None:
        """A socket closed: if it was not us, its EOF ends the link once due."""
        if not self.finished:
            self.received(side, None)
        self._check_done()

    def _check_done(self) -> None:
        sides = [s for s in (self.client, self.upstream) if s is not None]
        connecting = self.connecting is not None and not self.connecting.done()
        if self.finished and all(s.lost for s in sides) and not connecting:
            if not self.done.done():
                self.done.set_result(None)

    def end(self, graceful: bool) -> None:
        """Close both sides: gracefully (what they were sent is flushed) or by a reset."""
        if not self.finished:
            self.finished = True
            self.proxy._links.discard(self)
            for side in (self.client, self.upstream):
                if side is None:
                    continue
                if side.timer is not None:
                    side.timer.cancel()
                    side.timer = None
                side.held.clear()
                if side.transport is not None:
                    if graceful:
                        side.transport.close()
                    else:
                        side.transport.abort()
            connecting = self.connecting
            if connecting is not None and connecting is not asyncio.current_task():
                connecting.cancel()
        self._check_done()

    # ---------------------------------------------------------------- forwarding

    def received(self, side: _Side, data: bytes | None) -> None:
        if side.ended or self.finished:
            return
        if data is None:
            side.ended = True
        proxy = self.proxy
        if not side.held and side.peer is not None and proxy._open and not proxy._delay:
            self.deliver(side, data)
            return
        side.held.append((self.loop.time() + proxy._delay, data))
        if len(side.held) >= _HIGH_WATER and not side.full:
            side.full = True
            side.update_reading()
        self.kick(side)

    def kick(self, side: _Side) -> None:
        """Have the timer of ``side`` fire when its first held chunk is due."""
        if side.timer is None and side.held and side.peer is not None and self.proxy._open:
            side.timer = self.loop.call_at(side.held[0][0], self.flush, side)

    def flush(self, side: _Side) -> None:
        side.timer = None
        if self.finished or not self.proxy._open or side.peer is None:
            return
        now = self.loop.time()
        first = True  # the timer fired for it: it is due
        while side.held and (first or side.held[0][0] <= now):
            first = False
            _, data = side.held.popleft()
            self.deliver(side, data)
            if self.finished:
                return
        if side.full and len(side.held) <= _LOW_WATER:
            side.full = False
            side.update_reading()
        self.kick(side)

    def deliver(self, side: _Side, data: bytes | None) -> None:
        peer = side.peer
        if data is None:
            # The first direction to end ends the link, gracefully: what was forwarded
            # already is still flushed (e.g. the server's last error message).
            self.end(graceful=True)
        elif peer is not None and peer.transport is not None and not peer.lost:
            peer.transport.write(data)

    def resume(self) -> None:
        """The proxy opened again (heal): connect, and send on what was held."""
        if self.upstream is None:
            self.connect()
        else:
            self.kick(self.client)
            self.kick(self.upstream)


class FaultProxy:
    """Forward ``listen_host:listen_port`` to ``upstream_host:upstream_port``, with faults.

    Must be created, started and driven inside one event loop (see :class:`ProxyThread` to
    drive it from other threads). ``listen_port=0`` picks a free port; read :attr:`port`
    after :meth:`start`.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.listen_host = listen_host
        self._listen_port = listen_port
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._delay = 0.0
        self._open = True

    @property
    def port(self) -> int:
        """The port the proxy listens on (known once started)."""
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def connections(self) -> int:
        """How many client connections the proxy holds right now."""
        return len(self._links)

    async def start(self) -> None:
        """Start listening."""
        if self._server is None:
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(
                lambda: _Link(self).client, self.listen_host, self._listen_port
            )

    def delay(self, ms: float) -> None:
        """Hold every chunk, in both directions, ``ms`` milliseconds before forwarding it.

        Chunks read from then on; what is held already keeps the time it was given.
        """
        if ms < 0 or ms != ms:
            raise ValueError("delay must be >= 0 ms")
        self._delay = ms / 1000.0

    def blackhole(self) -> None:
        """Accept and keep connections, but forward nothing either way until :meth:`heal`.

        Data sent meanwhile is held (as a partitioned TCP network would keep retransmitting
        it) and flows on once healed, so existing connections are not corrupted.
        """
        self._open = False

    def cut(self) -> None:
        """Reset every current connection now; new connections are accepted as usual."""
        for link in list(self._links):
            link.end(graceful=False)

    def heal(self) -> None:
        """Back to plain forwarding: no delay, no blackhole."""
        self._delay = 0.0
        if not self._open:
            self._open = True
            for link in list(self._links):
                link.resume()

    async def stop(self) -> None:
        """Stop listening, reset every connection and wait for them to be closed."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        links = list(self._links)
        self.cut()
        if links:
            await asyncio.wait([link.done for link in links], timeout=10)
        if server is not None:
            await server.wait_closed()


# --------------------------------------------------------------------------------------
# Driving proxies from other threads, or from another process


class ProxyThread:
    """Runs :class:`FaultProxy` objects in an event loop of their own, in a daemon thread.

    Every public method may be called from any thread except the proxy thread itself.
    """

    def __init__(self, name: str = "areplica-proxy") -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._proxies: dict[str, FaultProxy] = {}

    def start(self) -> None:
        """Start the loop thread (idempotent)."""
        if self._thread is not None:
            return
        loop = new_event_loop()
        ready = threading.Event()

        def run() -> None:
            _tight_timer_slack()
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        thread = threading.Thread(target=run, name=self._name, daemon=True)
        self._loop, self._thread = loop, thread
        thread.start()
        ready.wait()

    def _call(self, coro: Coroutine[Any, Any, _T], timeout: float = 30.0) -> _T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("the proxy thread is not running")
        future: Future[_T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    def add(self, name: str, upstream_host: str, upstream_port: int) -> int:
        """Start a proxy called ``name`` towards the upstream; return its listening port."""
        if name in self._proxies:
            raise ValueError(f"a proxy called {name!r} exists already")

        async def create() -> FaultProxy:
            proxy = FaultProxy(upstream_host, upstream_port)
            await proxy.start()
            return proxy

        proxy = self._call(create())
        self._proxies[name] = proxy
        return proxy.port

    def names(self) -> list[str]:
        """The names of the proxies."""
        return list(self._proxies)

    def proxy(self, name: str) -> FaultProxy:
        """The proxy called ``name`` (drive it only through this object's methods)."""
        try:
            return self._proxies[name]
        except KeyError:
            raise KeyError(f"no proxy called {name!r}") from None

    def _control(self, name: str, action: str, *args: float) -> None:
        proxy = self.proxy(name)

        async def apply() -> None:
            getattr(proxy, action)(*args)

        self._call(apply())

    def delay(self, name: str, ms: float) -> None:
        """See :meth:`FaultProxy.delay`."""
        self._control(name, "delay", ms)

    def blackhole(self, name: str) -> None:
        """See :meth:`FaultProxy.blackhole`."""
        self._control(name, "blackhole")

    def cut(self, name: str) -> None:
        """See :meth:`FaultProxy.cut`."""
        self._control(name, "cut")

    def heal(self, name: str) -> None:
        """See :meth:`FaultProxy.heal`."""
        self._control(name, "heal")

    def connections(self, name: str) -> int:
        """Client connections the proxy called ``name`` holds now."""
        proxy = self.proxy(name)

        async def count() -> int:
            return proxy.connections

        return self._call(count())

    def close(self, timeout: float = 10.0) -> None:
        """Stop every proxy, close their sockets, stop the loop and join the thread.

        Idempotent; safe to call from an ``atexit`` handler.
        """
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        proxies = list(self._proxies.values())
        self._proxies.clear()
        if threading.current_thread() is thread:
            # Called from the loop itself (e.g. a finalizer run by the garbage collector
            # there): nothing may be awaited here, so reset everything and stop the loop.
            for proxy in proxies:
                proxy.cut()
                if proxy._server is not None:
                    proxy._server.close()
            loop.stop()
            self._loop = self._thread = None
            return

        async def stop_all() -> None:
            await asyncio.gather(*(p.stop() for p in proxies), return_exceptions=True)

        try:
            if thread.is_alive() and not loop.is_closed():
                with contextlib.suppress(Exception):
                    self._call(stop_all(), timeout)
                loop.call_soon_threadsafe(loop.stop)
                thread.join(timeout)
        finally:
            self._loop = self._thread = None
            if not thread.is_alive() and not loop.is_closed():
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()


def _end_process(process: subprocess.Popen[bytes]) -> None:
    """Ask the proxy process to stop (EOF on its input), then kill it by its pid."""
    if process.poll() is None:
        with contextlib.suppress(OSError, ValueError):
            if process.stdin is not None:
                process.stdin.close()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    for stream in (process.stdin, process.stdout):
        with contextlib.suppress(OSError, ValueError):
            if stream is not None:
                stream.close()


class ProxyProcess:
    """:class:`ProxyThread`'s interface, with the proxies in a child process.

    The child is this file run by the same Python (``-I``: the standard library only). It
    takes one JSON request per line on its standard input and answers each on its standard
    output; it stops its proxies and exits on a ``close`` request or at the end of its input
    (so also when this process dies). :meth:`close` (also run when the object is garbage
    collected, or at interpreter exit) ends it, and kills it by its pid if it lingers.
    Every method may be called from any thread.

    ``nice``: the child's scheduling priority, set when allowed (root): by default -10, so
    that on a busy machine its timers fire on time, as a network's delay would not wait
    for a CPU. :attr:`niced` says whether it was set.
    """

    def __init__(self, name: str = "areplica-proxy", nice: int | None = -10) -> None:
        self._name = name
        self._nice = nice
        self.niced = False
        self._process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[[subprocess.Popen[bytes]], ProxyProcess] | None = None
        self._lock = threading.Lock()
        self._names: list[str] = []
        self._next = 0

    @property
    def pid(self) -> int | None:
        """The child's pid (None before :meth:`start` and after :meth:`close`)."""
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start the child process (idempotent)."""
        if self._process is not None:
            return
        process = subprocess.Popen(
            [sys.executable, "-I", os.path.abspath(__file__), self._name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,  # Ctrl-C reaches us only: we stop it in order
        )
        self._process = process
        self._finalizer = weakref.finalize(self, _end_process, process)
        if self._nice is not None:
            try:
                os.setpriority(os.PRIO_PROCESS, process.pid, self._nice)
                self.niced = True
            except OSError:
                pass  # not allowed: it runs at our priority
        try:
            self._request("ping", timeout=30)
        except BaseException:
            self.close()
            raise

    def _request(self, op: str, *args: Any, timeout: float = 30.0) -> Any:
        process = self._process
        if process is None or process.stdin is None or process.stdout is None:
            raise RuntimeError("the proxy process is not running")
        with self._lock:
            self._next += 1
            ident = self._next
            line = json.dumps({"id": ident, "op": op, "args": list(args)}) + "\n"
            try:
                process.stdin.write(line.encode())
                process.stdin.flush()
            except (OSError, ValueError) as exc:
                raise RuntimeError(f"the proxy process is gone: {exc}") from None
            deadline = time.monotonic() + timeout
            fd = process.stdout.fileno()
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the proxy process did not answer {op!r} in {timeout}s")
                readable, _, _ = select.select([fd], [], [], left)
                if readable:
                    break
            answer = process.stdout.readline()
        if not answer:
            raise RuntimeError(f"the proxy process exited (code {process.poll()})")
        reply = json.loads(answer)
        if reply.get("id") != ident:
            raise RuntimeError(f"the proxy process answered {reply!r} to request {ident}")
        if "error" in reply:
            kind = {"KeyError": KeyError, "ValueError": ValueError}.get(reply.get("kind", ""))
            raise (kind or RuntimeError)(reply["error"])
        return reply.get("ok")

    def add(self, name: str, upstream_host: str, upstream_port: int) -> int:
        """Start a proxy called ``name`` towards the upstream; return its listening port."""
        port = int(self._request("add", name, upstream_host, upstream_port))
        self._names.append(name)
        return port

    def names(self) -> list[str]:
        """The names of the proxies."""
        return list(self._names)

    def delay(self, name: str, ms: float) -> None:
        """See :meth:`FaultProxy.delay`."""
        self._request("delay", name, ms)

    def blackhole(self, name: str) -> None:
        """See :meth:`FaultProxy.blackhole`."""
        self._request("blackhole", name)

    def cut(self, name: str) -> None:
        """See :meth:`FaultProxy.cut`."""
        self._request("cut", name)

    def heal(self, name: str) -> None:
        """See :meth:`FaultProxy.heal`."""
        self._request("heal", name)

    def connections(self, name: str) -> int:
        """Client connections the proxy called ``name`` holds now."""
        return int(self._request("connections", name))

    def close(self, timeout: float = 10.0) -> None:
        """Stop every proxy and the child process (killed by its pid if it lingers).

        Idempotent; safe to call from an ``atexit`` handler.
        """
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(Exception):
            if process.poll() is None:
                self._process = process
                try:
                    self._request("close", timeout=timeout)
                finally:
                    self._process = None
        if self._finalizer is not None:
            self._finalizer()


def _serve(name: str) -> int:
    """The child of :class:`ProxyProcess`: requests on stdin, answers on stdout."""
    _tight_timer_slack()
    with contextlib.suppress(OSError):
        if hasattr(os, "setproctitle"):  # pragma: no cover - not in the standard library
            os.setproctitle(name)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    proxies: dict[str, FaultProxy] = {}
    out = sys.stdout.buffer

    def proxy(key: str) -> FaultProxy:
        try:
            return proxies[key]
        except KeyError:
            raise KeyError(f"no proxy called {key!r}") from None

    async def handle(op: str, args: list[Any]) -> Any:
        if op == "ping":
            return os.getpid()
        if op == "add":
            key, host, port = args
            if key in proxies:
                raise ValueError(f"a proxy called {key!r} exists already")
            created = FaultProxy(host, int(port))
            await created.start()
            proxies[key] = created
            return created.port
        if op == "connections":
            return proxy(args[0]).connections
        if op in ("delay", "blackhole", "cut", "heal"):
            getattr(proxy(args[0]), op)(*args[1:])
            return None
        if op == "close":
            return None
        raise ValueError(f"unknown request {op!r}")

    async def main() -> None:
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            line = await reader.readline()
            if not line:
                break  # the parent is gone
            request = json.loads(line)
            op = request.get("op", "")
            reply: dict[str, Any] = {"id": request.get("id")}
            try:
                reply["ok"] = await handle(op, request.get("args", []))
            except Exception as exc:
                reply["error"] = str(exc.args[0]) if isinstance(exc, KeyError) else str(exc)
                reply["kind"] = type(exc).__name__
            if op == "close":
                await asyncio.gather(*(p.stop() for p in proxies.values()))
                proxies.clear()
            out.write((json.dumps(reply) + "\n").encode())
            out.flush()
            if op == "close":
                return
        await asyncio.gather(*(p.stop() for p in proxies.values()), return_exceptions=True)

    try:
        loop.run_until_complete(main())
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        if exc.errno != errno.EPIPE:
            raise
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1] if len(sys.argv) > 1 else "areplica-proxy"))
