"""``TransactionTestCase``: run a test inside one primary transaction that is rolled back.

areplica's counterpart of ``peewee_async.testing.TransactionTestCase`` (which works on
``mgr.database`` too, forbidding transactions inside). While the block runs, every query of
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

import contextlib
from types import TracebackType
from typing import Any

from ..database import HeldConnection
from ..engine import Engine
from ..errors import ConfigurationError
from ..transactions import Adopted

__all__ = ["TransactionTestCase"]


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
        self._held: HeldConnection | None = None
        self._adoption: contextlib.ExitStack | None = None

    @property
    def name(self) -> str:
        """The manager's name."""
        return self.engine.core.name

    def __repr__(self) -> str:
        state = "active" if self._held is not None else "idle"
        return f"<TransactionTestCase of {self.name!r} {state}>"

    @property
    def adopted(self) -> Adopted | None:
        """The adopted transaction while the block runs."""
        return self.engine.transactions.adopted if self._held is not None else None

    # ------------------------------------------------------------------ enter / exit

    async def __aenter__(self) -> TransactionTestCase:
        if self._held is not None:
            raise RuntimeError(f"{self!r} is already active")
        transactions = self.engine.transactions
        if transactions.adopted is not None:
            raise RuntimeError(f"a TransactionTestCase is already active on manager {self.name!r}")
        await self.database._ensure_open()
        # The connection is pinned in a task of its own (HeldConnection): the manager's
        # ContextVar is set and reset there, whatever task or context (a pytest fixture)
        # enters and exits us. Its release() rolls the transaction back.
        held = await HeldConnection.pin(self.engine, "test-transaction")
        try:
            binding = held.binding
            await transactions.run_bound(binding, "BEGIN", None, None)
            binding.transaction = True
            adoption = contextlib.ExitStack()
            adoption.enter_context(transactions.adopt(binding))
        except BaseException:
            await held.release()
            raise
        self._held = held
        self._adoption = adoption
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        adoption, self._adoption = self._adoption, None
        if adoption is not None:
            adoption.close()
        held, self._held = self._held, None
        if held is not None:
            await held.release()
