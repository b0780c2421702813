"""``TransactionTestCase``: run a test inside one primary transaction that is rolled back.

areplica's counterpart of ``peewee_async.testing.TransactionTestCase`` (which cannot work on
``mgr.database``: that object has no pool of its own). While the block runs, every query of
the manager, through ``mgr.database`` (``AioModel`` API, ``aio_execute``...) or the manager
API (``mgr.get``, ``mgr.create``...), in any task, reads and writes on the test's one primary
connection, inside its transaction; the transaction is rolled back at the end, so nothing a
test did stays on the servers and a read always sees the test's own writes.

Transactions opened inside behave as in production, one level down: a top-level
``aio_atomic()``, ``aio_transaction()``, ``mgr.atomic()``, ``mgr.transaction()`` or
``aio_begin()`` becomes a savepoint of the test's transaction (its rollback undoes only its
own work, its commit keeps it until the test ends), and anything nested inside follows the
production rules (``aio_transaction()`` inside one raises "Transaction already opened").
peewee-async's test case forbids ``aio_atomic()`` and ``aio_begin()`` instead.

One connection serves the whole test: concurrent tasks share it, one statement at a time,
and while one task is inside a savepoint block the others wait for it to end (so a rollback
never undoes a sibling's work): do not await, inside such a block, a task that was started
outside it and queries (an application under test served by another task, say).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextvars import ContextVar
from types import TracebackType
from typing import TYPE_CHECKING, Any
from unittest import mock

from ..errors import ConfigurationError

if TYPE_CHECKING:
    from ..manager import ReplicaManager

__all__ = ["TransactionTestCase"]

logger = logging.getLogger("areplica")

# The test transaction whose user-level block (a top-level transaction turned savepoint,
# or an aio_connection() block) the current task is inside. Child tasks inherit it.
_USER_BLOCK: ContextVar[object | None] = ContextVar("areplica_test_user_block", default=None)


class TransactionTestCase:
    """Run the block in one primary transaction, rolled back on exit.

    ``database`` is ``mgr.database`` or the manager itself. Use as
    ``async with TransactionTestCase(mgr.database):``; the manager is connected first if it
    never was (peewee-async's lazy connect). Only one may be active per manager at a time.
    """

    def __init__(self, database: Any) -> None:
        manager = getattr(database, "manager", None) if hasattr(database, "aio_execute") else None
        if manager is None:
            manager = database
        if not hasattr(manager, "database") or not hasattr(manager.database, "_bind_manager"):
            raise ConfigurationError(
                f"TransactionTestCase: expected mgr.database or a ReplicaManager, got {database!r}",
                option="database",
            )
        self.manager: ReplicaManager = manager
        self.database: Any = manager.database
        self._binding: Any = None
        self._manual = 0
        self._holder: asyncio.Task[None] | None = None
        self._done: asyncio.Event | None = None
        self._patches: contextlib.ExitStack | None = None

    def __repr__(self) -> str:
        state = "active" if self._binding is not None else "idle"
        return f"<TransactionTestCase of {self.manager.name!r} {state}>"

    # ------------------------------------------------------------------ what the database asks

    def is_root(self, binding: Any) -> bool:
        """True when ``binding`` is this test's transaction and no user transaction is open."""
        return (
            binding is not None
            and binding is self._binding
            and _USER_BLOCK.get() is not binding
            and self._manual == 0
        )

    def in_user_block(self) -> bool:
        """True inside a user transaction of the test (peewee-async: inside aio_connection)."""
        return self._binding is not None and _USER_BLOCK.get() is self._binding

    def manual_begun(self, delta: int) -> None:
        """A manual ``aio_begin()`` (a savepoint here) started (+1) or ended (-1)."""
        self._manual = max(0, self._manual + delta)

    # ------------------------------------------------------------------ enter / exit

    async def __aenter__(self) -> TransactionTestCase:
        if self._holder is not None:
            raise RuntimeError(f"{self!r} is already active")
        database, manager = self.database, self.manager
        if database._test_case is not None:
            raise RuntimeError(
                f"a TransactionTestCase is already active on manager {manager.name!r}"
            )
        await database._ensure_open()
        if manager._binding() is not None:
            raise RuntimeError(
                "TransactionTestCase cannot start inside a transaction or aio_connection()"
            )
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[Any] = loop.create_future()
        self._done = asyncio.Event()
        # The connection is pinned in a task of its own: the manager's ContextVar is set and
        # reset there, whatever task or context (a pytest fixture) enters and exits us.
        self._holder = asyncio.create_task(
            self._hold(ready, self._done), name=f"{manager.name}-test-transaction"
        )
        try:
            self._binding = await asyncio.shield(ready)
        except BaseException:
            self._done.set()
            await asyncio.shield(self._finish())
            raise
        self._patches = contextlib.ExitStack()
        original_binding = manager._binding
        original_atomic = manager.atomic
        original_transaction = manager.transaction

        def binding() -> Any:
            own = original_binding()
            if own is not None:
                return own
            test = self._binding
            return test if test is not None and test.active else None

        def atomic() -> contextlib.AbstractAsyncContextManager[Any]:
            return self._user_block(original_atomic)

        def transaction() -> contextlib.AbstractAsyncContextManager[Any]:
            if self.is_root(binding()):
                return self._user_block(original_atomic)  # a savepoint of the test's one
            return original_transaction()

        self._patches.enter_context(mock.patch.object(manager, "_binding", binding))
        self._patches.enter_context(mock.patch.object(manager, "atomic", atomic))
        self._patches.enter_context(mock.patch.object(manager, "transaction", transaction))
        database._test_case = self
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._patches is not None:
            self._patches.close()
            self._patches = None
        self.database._test_case = None
        if self._done is not None:
            self._done.set()
        await asyncio.shield(self._finish())

    @contextlib.asynccontextmanager
    async def _user_block(self, opener: Any) -> AsyncIterator[Any]:
        token = _USER_BLOCK.set(self._binding) if self.is_root(self.manager._binding()) else None
        try:
            async with opener() as scope:
                yield scope
        finally:
            if token is not None:
                _USER_BLOCK.reset(token)

    async def _hold(self, ready: asyncio.Future[Any], done: asyncio.Event) -> None:
        manager = self.manager
        try:
            async with manager._pinned_primary():
                binding = manager._binding()
                if binding is None:  # pragma: no cover - _pinned_primary() always binds
                    raise RuntimeError("no pinned primary connection")
                await manager._run_bound(binding, "BEGIN", None, None)
                binding.transaction = True
                ready.set_result(binding)
                try:
                    await done.wait()
                finally:
                    binding.transaction = False
                    # A broken connection (a statement was cancelled) is discarded on
                    # release instead: the server aborts its transaction when it closes.
                    if not binding.broken:
                        try:
                            await manager._run_bound(binding, "ROLLBACK", None, None)
                        except Exception:
                            binding.broken = True
                            logger.warning(
                                "%s: test transaction rollback failed; connection discarded",
                                manager.name,
                            )
        except BaseException as exc:
            if not ready.done():
                if isinstance(exc, Exception):
                    ready.set_exception(exc)
                else:
                    ready.cancel()
            raise

    async def _finish(self) -> None:
        holder, self._holder = self._holder, None
        self._binding = None
        self._manual = 0
        if holder is not None:
            with contextlib.suppress(Exception):
                await holder
