"""A small asyncio TCP proxy with fault injection, for tests against a real topology.

:class:`FaultProxy` forwards one loopback listening port to one upstream ``host:port`` and can
be told to add latency (:meth:`FaultProxy.delay`), to swallow traffic while keeping every
connection open (:meth:`FaultProxy.blackhole`), to drop every current connection at once
(:meth:`FaultProxy.cut`), and to go back to plain forwarding (:meth:`FaultProxy.heal`).

:class:`ProxyThread` runs any number of such proxies in a private event loop in a daemon
thread, so that synchronous code (``LocalTopology``) can drive them while the code under
test runs its own event loop. Every control call is thread-safe and returns once the change
is in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

__all__ = ["FaultProxy", "ProxyThread"]

_T = TypeVar("_T")

_CHUNK = 65536
_QUEUE_CHUNKS = 64  # per direction; past that the reader waits (TCP back-pressure)
_EOF = b""


class _Link:
    """One client connection and its upstream connection, pumped in both directions."""

    def __init__(
        self, proxy: FaultProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.proxy = proxy
        self.client_reader = reader
        self.client_writer = writer
        self.upstream_writer: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.task: asyncio.Task[Any] | None = None  # the one running run()

    async def run(self) -> None:
        proxy = self.proxy
        graceful = False
        try:
            # A blackholed proxy accepts the client but does not even reach the server.
            await proxy._open.wait()
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    proxy.upstream_host, proxy.upstream_port
                )
            except OSError:
                return  # server down: the client sees its connection closed
            self.upstream_writer = up_writer
            self.tasks = [
                asyncio.create_task(self._pump(self.client_reader, up_writer)),
                asyncio.create_task(self._pump(up_reader, self.client_writer)),
            ]
            # The first direction to end (EOF or error) ends the link, gracefully: what
            # was already forwarded is still flushed (e.g. the server's last error message).
            await asyncio.wait(self.tasks, return_when=asyncio.FIRST_COMPLETED)
            graceful = True
        finally:
            if graceful:
                self.close()
            else:
                self.abort()
            for task in self.tasks:
                task.cancel()
            for task in self.tasks:
                with contextlib.suppress(BaseException):
                    await task

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy ``reader`` to ``writer``, each chunk held back by the delay and the gate."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(_QUEUE_CHUNKS)

        async def read() -> None:
            while True:
                try:
                    data = await reader.read(_CHUNK)
                except OSError:
                    data = _EOF
                await queue.put((loop.time() + self.proxy._delay, data))
                if not data:
                    return

        reading = asyncio.create_task(read())
        try:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self.proxy._open.wait()
                if not data:
                    return
                writer.write(data)
                await writer.drain()
        except OSError:
            return
        finally:
            reading.cancel()
            with contextlib.suppress(BaseException):
                await reading

    def close(self) -> None:
        """Close both sides once their pending output is flushed."""
        for writer in (self.client_writer, self.upstream_writer):
            if writer is not None:
                writer.close()

    def abort(self) -> None:
        """Close both sides at once, dropping pending output (a reset)."""
        for writer in (self.client_writer, self.upstream_writer):
            if writer is not None:
                writer.transport.abort()
                writer.close()


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
        self._tasks: set[asyncio.Task[Any]] = set()
        self._delay = 0.0
        self._open = asyncio.Event()
        self._open.set()

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
            self._server = await asyncio.start_server(
                self._accept, self.listen_host, self._listen_port
            )

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(self, reader, writer)
        self._links.add(link)
        task = link.task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await link.run()
        except asyncio.CancelledError:
            pass  # stop() ends every link this way; the task itself is done then
        finally:
            self._links.discard(link)
            if task is not None:
                self._tasks.discard(task)

    def delay(self, ms: float) -> None:
        """Hold every chunk, in both directions, ``ms`` milliseconds before forwarding it."""
        if ms < 0:
            raise ValueError("delay must be >= 0 ms")
        self._delay = ms / 1000.0

    def blackhole(self) -> None:
        """Accept and keep connections, but forward nothing either way until :meth:`heal`.

        Data sent meanwhile is held (as a partitioned TCP network would keep retransmitting
        it) and flows on once healed, so existing connections are not corrupted.
        """
        self._open.clear()

    def cut(self) -> None:
        """Reset every current connection now; new connections are accepted as usual."""
        for link in list(self._links):
            link.abort()
            if link.upstream_writer is None and link.task is not None:
                link.task.cancel()  # still waiting for a blackhole to heal: end it too

    def heal(self) -> None:
        """Back to plain forwarding: no delay, no blackhole."""
        self._delay = 0.0
        self._open.set()

    async def stop(self) -> None:
        """Stop listening, reset every connection and wait for their tasks to end."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        self.cut()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()


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
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
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
