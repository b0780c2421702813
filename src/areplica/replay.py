"""``ReplayWatch``: reads waiting for standbys to replay a WAL position.

A read whose causal position no eligible standby has shown yet waits here, on every standby
that could serve it, for at most ``causal_wait``. One poller per standby serves every read
waiting on it: it reads the standby's replay position back to back (paced, on a pooled
connection), and wakes each waiter the moment a position covers it. A poller runs only while
someone waits, so an idle manager polls nothing; a waiter that times out falls back to the
primary without any task being cancelled under it (a timer answers its future).

Valid because a member is one server: the replay position polled is the one the read meets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

from .node import Node

__all__ = ["ReplayWatch"]

logger = logging.getLogger("areplica")

#: Seconds between the starts of two polls of one standby while reads wait on it: replay
#: on a LAN takes well under a millisecond, and this bounds a poller to 2,000 queries/s.
PACE = 0.0005

Poll = Callable[[Node], Awaitable[int]]


class _Waiter:
    __slots__ = ("future", "lsn", "nodes")

    def __init__(self, lsn: int, nodes: Sequence[Node], future: asyncio.Future[Node | None]):
        self.lsn = lsn
        self.nodes = nodes
        self.future = future


class ReplayWatch:
    """Waiters per standby, and the pollers that wake them (see the module docstring)."""

    def __init__(self, name: str, poll: Poll) -> None:
        self.name = name
        self._poll = poll
        self._waiters: dict[Node, list[_Waiter]] = {}
        self._pollers: dict[Node, asyncio.Task[None]] = {}
        self.polls = 0

    def __repr__(self) -> str:
        waiting = sum(len(w) for w in self._waiters.values())
        return f"<ReplayWatch {self.name} waiting={waiting} pollers={len(self._pollers)}>"

    async def wait(self, nodes: Sequence[Node], lsn: int, timeout: float) -> Node | None:
        """The first of ``nodes`` seen at or past ``lsn`` within ``timeout``; else ``None``."""
        ready = [node for node in nodes if node.lsn is not None and node.lsn >= lsn]
        if ready:
            return ready[0]
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Node | None] = loop.create_future()
        waiter = _Waiter(lsn, nodes, future)
        for node in nodes:
            self._waiters.setdefault(node, []).append(waiter)
            self._ensure_poller(node)
        timer = loop.call_later(timeout, _answer, future, None)
        try:
            return await future
        finally:
            timer.cancel()
            self._forget(waiter)

    def _ensure_poller(self, node: Node) -> None:
        if node not in self._pollers:
            self._pollers[node] = asyncio.get_running_loop().create_task(
                self._run(node), name=f"{self.name}-{node.name}-replay"
            )

    def _forget(self, waiter: _Waiter) -> None:
        for node in waiter.nodes:
            waiters = self._waiters.get(node)
            if waiters is not None:
                with contextlib.suppress(ValueError):
                    waiters.remove(waiter)
                if not waiters:
                    del self._waiters[node]

    async def _run(self, node: Node) -> None:
        """Poll ``node`` while reads wait on it; wake each one its position covers."""
        loop = asyncio.get_running_loop()
        try:
            while self._waiters.get(node) and node.state == "up":
                started = loop.time()
                try:
                    position = await self._poll(node)
                except Exception as exc:  # the read path marks the node; its waiters time out
                    logger.debug("%s: replay poll of %s failed: %r", self.name, node.name, exc)
                    break
                self.polls += 1
                self._wake(node, position)
                rest = PACE - (loop.time() - started)
                if rest > 0 and self._waiters.get(node):
                    await asyncio.sleep(rest)
        finally:
            self._pollers.pop(node, None)

    def _wake(self, node: Node, position: int) -> None:
        for waiter in list(self._waiters.get(node, ())):
            if waiter.lsn <= position:
                _answer(waiter.future, node)

    async def close(self) -> None:
        """Stop every poller and answer every waiter with ``None``."""
        for waiters in list(self._waiters.values()):
            for waiter in waiters:
                _answer(waiter.future, None)
        pollers = list(self._pollers.values())
        for task in pollers:
            task.cancel()
        for task in pollers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _answer(future: asyncio.Future[Node | None], node: Node | None) -> None:
    if not future.done():
        future.set_result(node)
