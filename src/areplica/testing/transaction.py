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
from types import TracebackType
from typing import Any

from ..engine import Engine
from ..errors import ConfigurationError
from ..transactions import Adopted, Binding

__all__ = ["TransactionTestCase"]

logger = logging.getLogger("areplica")


class TransactionTestCase:
    """Run the block in one primary transaction, rolled back on exit.

    ``database`` is ``mgr.database`` or the manager itself. Use as
    ``async with TransactionTestCase(mgr.database):``; the manager is connected first if it
    never was (peewee-async's lazy connect). Only one may be active per manager at a time.
    """

    def __init__(self, database: Any) -> None:
        if not isinstance(getattr(database, "engine", None), Engine):
            database = getattr(database, "database", None)
        engine = getattr(database, "engine", None)
        if not isinstance(engine, Engine):
            raise ConfigurationError(
                f"TransactionTestCase: expected mgr.database or a ReplicaManager, got {database!r}",
                option="database",
            )
        self.database: Any = database
        self.engine = engine
        self._binding: Binding | None = None
        self._holder: asyncio.Task[None] | None = None
        self._done: asyncio.Event | None = None
        self._adoption: contextlib.ExitStack | None = None

    @property
    def name(self) -> str:
        """The manager's name."""
        return self.engine.core.name

    def __repr__(self) -> str:
        state = "active" if self._binding is not None else "idle"
        return f"<TransactionTestCase of {self.name!r} {state}>"

    @property
    def adopted(self) -> Adopted | None:
        """The adopted transaction while the block runs."""
        return self.engine.transactions.adopted if self._binding is not None else None

    # ------------------------------------------------------------------ enter / exit

    async def __aenter__(self) -> TransactionTestCase:
        if self._holder is not None:
            raise RuntimeError(f"{self!r} is already active")
        transactions = self.engine.transactions
        if transactions.adopted is not None:
            raise RuntimeError(f"a TransactionTestCase is already active on manager {self.name!r}")
        await self.database._ensure_open()
        if transactions.binding() is not None:
            raise RuntimeError(
                "TransactionTestCase cannot start inside a transaction or aio_connection()"
            )
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[Binding] = loop.create_future()
        self._done = asyncio.Event()
        # The connection is pinned in a task of its own: the manager's ContextVar is set and
        # reset there, whatever task or context (a pytest fixture) enters and exits us.
        self._holder = asyncio.create_task(
            self._hold(ready, self._done), name=f"{self.name}-test-transaction"
        )
        try:
            self._binding = await asyncio.shield(ready)
        except BaseException:
            self._done.set()
            await asyncio.shield(self._finish())
            raise
        self._adoption = contextlib.ExitStack()
        self._adoption.enter_context(transactions.adopt(self._binding))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._adoption is not None:
            self._adoption.close()
            self._adoption = None
        if self._done is not None:
            self._done.set()
        await asyncio.shield(self._finish())

    async def _hold(self, ready: asyncio.Future[Binding], done: asyncio.Event) -> None:
        transactions = self.engine.transactions
        try:
            async with transactions.pinned_primary():
                binding = transactions.binding()
                if binding is None:  # pragma: no cover - pinned_primary() always binds
                    raise RuntimeError("no pinned primary connection")
                await transactions.run_bound(binding, "BEGIN", None, None)
                binding.transaction = True
                ready.set_result(binding)
                try:
                    await done.wait()
                finally:
                    binding.transaction = False
                    await self._roll_back(binding)
        except BaseException as exc:
            if not ready.done():
                if isinstance(exc, Exception):
                    ready.set_exception(exc)
                else:
                    ready.cancel()
            raise

    async def _roll_back(self, binding: Binding) -> None:
        # A broken connection (a statement was cancelled) is discarded on release instead:
        # the server aborts its transaction when it closes.
        if binding.broken:
            return
        try:
            await self.engine.transactions.run_bound(binding, "ROLLBACK", None, None)
        except Exception:
            binding.broken = True
            logger.warning("%s: test transaction rollback failed; connection discarded", self.name)

    async def _finish(self) -> None:
        holder, self._holder = self._holder, None
        self._binding = None
        if holder is not None:
            with contextlib.suppress(Exception):
                await holder
