"""Version shims: one place for what differs between the supported Pythons.

``timeout(delay)`` bounds a block like ``asyncio.timeout`` (3.11+). It replaces
``asyncio.wait_for`` everywhere in areplica: on Python 3.10 and 3.11, ``wait_for`` drops a
cancellation that lands as the awaited operation completes (the caller's ``cancel()`` is
lost and the call returns a result), which let cancelled reads return rows and cancelled
transactions commit. ``delay=None`` means no bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

__all__ = ["bounded", "timeout", "within"]

if sys.version_info >= (3, 11):

    def timeout(delay: float | None) -> contextlib.AbstractAsyncContextManager[None]:
        """``asyncio.timeout``: raises ``TimeoutError`` when the block outlives ``delay``."""
        return asyncio.timeout(delay)

else:  # pragma: no cover - Python 3.10

    @contextlib.asynccontextmanager
    async def timeout(delay: float | None) -> AsyncIterator[None]:
        """The 3.10 form: cancel the task at the deadline, turn that cancel into a timeout.

        A cancellation from anyone else stays a ``CancelledError``; the timer's own cancel
        becomes ``asyncio.TimeoutError``.
        """
        if delay is None:
            yield
            return
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("timeout() must be used inside a task")
        loop = asyncio.get_running_loop()
        fired = False

        def fire() -> None:
            nonlocal fired
            fired = True
            task.cancel()

        handle = loop.call_later(delay, fire)
        try:
            yield
        except asyncio.CancelledError as exc:
            if fired:
                raise asyncio.TimeoutError from exc
            raise
        finally:
            handle.cancel()


T = TypeVar("T")

if sys.version_info >= (3, 11):

    async def bounded(
        awaitable: Awaitable[T],
        delay: float | None,
        dispose: Callable[[T], Awaitable[None]] | None = None,
    ) -> T:
        """Await ``awaitable`` for at most ``delay`` seconds (``TimeoutError`` past it).

        ``dispose`` cleans up a result nobody will receive (3.10 only needs it).
        """
        async with asyncio.timeout(delay):
            return await awaitable

else:  # pragma: no cover - Python 3.10

    async def bounded(
        awaitable: Awaitable[T],
        delay: float | None,
        dispose: Callable[[T], Awaitable[None]] | None = None,
    ) -> T:
        """The 3.10 form runs the work in its own task and cancels only that task.

        Python 3.10 cannot tell a timer's cancel from a caller's once both land in one
        loop pass (there is no ``Task.uncancel``): a ``timeout()`` block could then turn
        the caller's cancel into a ``TimeoutError`` that areplica handles (a read retried
        elsewhere), and the call would return rows after being cancelled. Here the
        caller's task is never cancelled by the timer, so its cancels always propagate.
        """
        if delay is None:
            return await awaitable
        inner = asyncio.ensure_future(awaitable)
        try:
            done, _ = await asyncio.wait({inner}, timeout=delay)
        except BaseException:
            _abandon(inner)
            await asyncio.wait({inner})  # let its cleanup run before the cancel goes on
            if dispose is not None and not inner.cancelled() and inner.exception() is None:
                await asyncio.shield(dispose(inner.result()))  # done as we were cancelled
            raise
        if not done:
            inner.cancel()
            await asyncio.wait({inner})
            if inner.cancelled():
                raise asyncio.TimeoutError
        return inner.result()


async def within(awaitable: Awaitable[T], delay: float | None) -> tuple[bool, T | None]:
    """``(True, result)`` when ``awaitable`` finished within ``delay``, else ``(False, None)``.

    For waits whose expiry is not an error (a catch-up poll, a wait for a free slot): the
    work runs as its own task and only that task is cancelled at the deadline, so a cancel
    of the caller is never swallowed as an expiry, on any Python.
    """
    future = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({future}, timeout=delay)
    except BaseException:
        _abandon(future)
        raise
    if done:
        return True, future.result()
    _abandon(future)
    return False, None


def _abandon(future: asyncio.Future[Any]) -> None:
    """Cancel work nobody waits for any more, and retrieve whatever it ends with."""
    future.cancel()
    future.add_done_callback(_retrieve)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # nobody else will look: no "exception was never retrieved"
