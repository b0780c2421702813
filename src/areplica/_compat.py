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
from collections.abc import AsyncIterator

__all__ = ["timeout"]

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
