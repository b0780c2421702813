"""Bound connections: transactions, savepoints and pinned primary connections.

How a transaction pins a connection: ``atomic()`` / ``transaction()`` take one primary
connection and bind it in areplica's own ContextVar (an immutable mapping keyed by manager,
reset with the token ``set()`` returned; peewee-async's module-wide connection variable is
never read or set). Every query of the manager inside the block, in the task and in child
tasks it spawns, runs on that connection, one statement at a time (a per-binding lock).
A nested ``atomic()`` is a savepoint that owns the shared connection until it ends, so one
child's ``ROLLBACK TO SAVEPOINT`` never undoes a sibling's work. Once the block has ended the
binding is inactive and late child tasks route normally.

A test case may *adopt* a transaction it owns (``adopt()``): while adopted, every query of
the manager outside a binding of its own runs on it, and a top-level ``atomic()`` /
``transaction()`` becomes a savepoint of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import peewee

from .consistency import WAL_POSITION_SQL, parse_lsn, token_position
from .core import Core
from .errors import NodeUnavailableError, ReadOnlyScopeError
from .node import Node
from .results import FetchResults, fetchone_raw
from .sessions import Sessions
from .writes import WritePath

__all__ = ["Adopted", "Binding", "Transactions"]

logger = logging.getLogger("areplica")


@dataclass
class Binding:
    """A connection bound to one manager's scope: a transaction or a pinned connection.

    Child tasks spawned inside the scope share it. ``lock`` keeps their statements from
    using the connection at the same time. ``exclusive`` serializes savepoint blocks: while
    a task is inside a nested ``atomic()``, only that block (its task and the tasks it
    spawns, which inherit the block's id through ``_SAVEPOINTS``) may use the connection;
    other tasks wait for it to release or roll back. ``broken``: a statement was cancelled
    or the connection failed; nothing else may run on it, and it is discarded at the end.
    """

    node: Node
    conn: Any
    transaction: bool
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    active: bool = True
    wrote: bool = False
    broken: bool = False
    exclusive: object | None = None
    released: asyncio.Event = field(default_factory=asyncio.Event)
    #: The pool the connection came from: it goes back there even if the node's pool was
    #: replaced meanwhile (an eviction), or it would be lost unclosed.
    pool: Any = None

    def allows(self) -> bool:
        """True when the current task may use the connection now."""
        return self.exclusive is None or self.exclusive in _SAVEPOINTS.get()

    def end_exclusive(self, previous: object | None) -> None:
        """A savepoint block ended: hand the connection back and wake the waiters."""
        self.exclusive = previous
        released, self.released = self.released, asyncio.Event()
        released.set()


# manager key -> binding. Immutable mappings: a child task copies the context, and nothing
# it sets can leak back into its parent's view.
_BOUND: ContextVar[Mapping[object, Binding]] = ContextVar(
    "areplica_bound", default=MappingProxyType({})
)
# The savepoint blocks the current task is inside (ids, outermost first).
_SAVEPOINTS: ContextVar[tuple[object, ...]] = ContextVar("areplica_savepoints", default=())
# The adopted transaction whose user-level block (a top-level transaction turned savepoint,
# or an aio_connection() block) the current task is inside. Child tasks inherit it.
_USER_BLOCK: ContextVar[object | None] = ContextVar("areplica_user_block", default=None)


class Adopted:
    """A transaction owned by a test case, that every query of the manager joins.

    ``root`` questions come from the routing database: whether a transaction opened now is
    the user's top-level one (a savepoint of the adopted transaction) or nested in one.
    """

    def __init__(self, binding: Binding) -> None:
        self.binding = binding
        self._manual = 0

    def is_root(self, binding: Binding | None) -> bool:
        """True when ``binding`` is the adopted transaction and no user block is open."""
        return (
            binding is not None
            and binding is self.binding
            and _USER_BLOCK.get() is not binding
            and self._manual == 0
        )

    def in_user_block(self) -> bool:
        """True inside a user transaction (or connection) block of the adopted one."""
        return _USER_BLOCK.get() is self.binding

    def manual_begun(self, delta: int) -> None:
        """A manual ``aio_begin()`` (a savepoint here) started (+1) or ended (-1)."""
        self._manual = max(0, self._manual + delta)

    @contextlib.contextmanager
    def user_block(self, current: Binding | None) -> Iterator[None]:
        """Mark the block as the user's own transaction when it starts at the root."""
        token = _USER_BLOCK.set(self.binding) if self.is_root(current) else None
        try:
            yield
        finally:
            if token is not None:
                _USER_BLOCK.reset(token)


class Transactions:
    """Transactions and bound connections of one manager (see the module docstring)."""

    def __init__(self, core: Core, sessions: Sessions, writes: WritePath) -> None:
        self._core = core
        self._sessions = sessions
        self._writes = writes
        self._key = object()
        self._sp_counter = itertools.count(1)
        self.adopted: Adopted | None = None

    def binding(self) -> Binding | None:
        """The active binding of the current task (or the adopted transaction), if any."""
        binding: Binding | None = _BOUND.get().get(self._key)
        if binding is not None and binding.active:
            return binding
        adopted = self.adopted
        if adopted is not None and adopted.binding.active:
            return adopted.binding
        return None

    @contextlib.contextmanager
    def adopt(self, binding: Binding) -> Iterator[Adopted]:
        """Make ``binding`` (a transaction the caller owns) every query's, for the block."""
        if self.adopted is not None:
            raise RuntimeError(f"a transaction is already adopted on manager {self._core.name!r}")
        adopted = self.adopted = Adopted(binding)
        try:
            yield adopted
        finally:
            self.adopted = None

    # ------------------------------------------------------------------ scopes

    def atomic(self) -> contextlib.AbstractAsyncContextManager[Binding]:
        """A transaction on the primary; nested ``atomic()`` blocks are savepoints."""
        return self._user_level(savepoint=True)

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Binding]:
        """A transaction on the primary; nested inside another, it joins the outer one."""
        return self._user_level(savepoint=False)

    @contextlib.asynccontextmanager
    async def _user_level(self, *, savepoint: bool) -> AsyncIterator[Binding]:
        adopted = self.adopted
        if adopted is None:
            async with self._transaction(savepoint=savepoint) as binding:
                yield binding
            return
        current = self.binding()
        root = adopted.is_root(current)
        with adopted.user_block(current):
            # At the adopted transaction's root, a transaction is a savepoint of it.
            async with self._transaction(savepoint=savepoint or root) as binding:
                yield binding

    @contextlib.asynccontextmanager
    async def _transaction(self, *, savepoint: bool) -> AsyncIterator[Binding]:
        self._core.require_open()
        outer = self.binding()
        if outer is not None and outer.transaction:
            if not savepoint:
                yield outer
                return
            async with self._savepoint(outer):
                yield outer
            return
        route = self._sessions.route()
        if route is not None and route.target == "replica":
            raise ReadOnlyScopeError(
                f"{self._core.name}: a transaction cannot start inside replica() (it runs on "
                "the primary)"
            )
        async with self._begun(outer) as binding:
            yield binding

    @contextlib.asynccontextmanager
    async def _begun(self, pinned: Binding | None) -> AsyncIterator[Binding]:
        """BEGIN on a pinned connection or a new primary one; COMMIT or ROLLBACK at the end."""
        if pinned is not None:  # a pinned connection: run the transaction on it
            binding = pinned
            binding.transaction = True
            token = None
        else:
            node, conn = await self._writes.primary_connection()
            binding = Binding(node, conn, transaction=True, pool=node.pool)
            token = _BOUND.set(MappingProxyType({**_BOUND.get(), self._key: binding}))
        try:
            await self.run_bound(binding, "BEGIN", None, None)
            try:
                yield binding
            except BaseException:
                # A broken binding (a statement was cancelled, the connection failed) is
                # not rolled back here: it is discarded, and the server aborts the
                # transaction when the connection closes.
                if not binding.broken:
                    await asyncio.shield(self._rollback(binding))
                raise
            # A cancellation that lands before this line leaves the transaction
            # uncommitted. One that lands while COMMIT is in flight cannot unsend it: the
            # caller gets CancelledError, like a lost acknowledgement.
            await self.run_bound(binding, "COMMIT", None, None)
            if binding.wrote:
                await self.after_write_bound(binding)
        finally:
            if token is not None:
                self._unbind(binding, token)
            else:
                binding.transaction = False
                binding.wrote = False

    def _unbind(self, binding: Binding, token: Any) -> None:
        binding.active = False
        _BOUND.reset(token)
        pool = binding.pool if binding.pool is not None else binding.node.pool
        pool.release(binding.conn, discard=binding.broken)

    @contextlib.asynccontextmanager
    async def _savepoint(self, binding: Binding) -> AsyncIterator[None]:
        """A nested ``atomic()``: a savepoint that owns the shared connection until it ends.

        Concurrent children each opening a nested ``atomic()`` run one after the other
        (see ``Binding``); the block's statements, and those of tasks it spawns, pass.
        """
        await self._hold(binding)
        block = object()
        previous = binding.exclusive
        binding.exclusive = block
        binding.lock.release()
        chain = _SAVEPOINTS.set((*_SAVEPOINTS.get(), block))
        name = f"areplica_sp_{next(self._sp_counter)}"
        ended = False
        try:
            await self.run_bound(binding, f"SAVEPOINT {name}", None, None)
            try:
                yield
            except BaseException:
                # Shielded together with the hand-over, so that no sibling's statement can
                # slip in between this block's work and its rollback.
                ended = True
                await asyncio.shield(self._end_savepoint(binding, name, previous, rollback=True))
                raise
            ended = True
            await self._end_savepoint(binding, name, previous, rollback=False)
        finally:
            _SAVEPOINTS.reset(chain)
            if not ended:  # the SAVEPOINT itself failed or was cancelled
                binding.end_exclusive(previous)

    async def _end_savepoint(
        self, binding: Binding, name: str, previous: object | None, *, rollback: bool
    ) -> None:
        try:
            if not rollback:
                await self.run_bound(binding, f"RELEASE SAVEPOINT {name}", None, None)
            elif not binding.broken:
                await self.run_bound(binding, f"ROLLBACK TO SAVEPOINT {name}", None, None)
        finally:
            binding.end_exclusive(previous)

    async def _rollback(self, binding: Binding) -> None:
        try:
            await self.run_bound(binding, "ROLLBACK", None, None)
        except Exception:
            binding.broken = True
            logger.warning(
                "%s: rollback failed on %s; connection discarded",
                self._core.name,
                binding.node.name,
            )

    @contextlib.asynccontextmanager
    async def pinned_primary(self) -> AsyncIterator[Any]:
        """Pin one primary connection for the block (peewee-async's ``aio_connection``)."""
        self._core.require_open()
        outer = self.binding()
        if outer is not None:
            yield outer.conn
            return
        node, conn = await self._writes.primary_connection()
        binding = Binding(node, conn, transaction=False, pool=node.pool)
        token = _BOUND.set(MappingProxyType({**_BOUND.get(), self._key: binding}))
        try:
            yield conn
        finally:
            self._unbind(binding, token)

    # ------------------------------------------------------------------ statements

    async def _hold(self, binding: Binding) -> None:
        """Take the binding's statement lock once this task may use the connection."""
        while True:
            while not binding.allows():
                await binding.released.wait()
            await binding.lock.acquire()
            if binding.allows():
                return
            binding.lock.release()

    async def run_bound(
        self, binding: Binding, sql: str, params: Sequence[Any] | None, fetch: FetchResults | None
    ) -> Any:
        """Run one statement on a bound connection, one task at a time."""
        await self._hold(binding)
        try:
            if binding.broken:
                raise NodeUnavailableError(
                    f"{self._core.name}: the connection of this transaction on "
                    f"{binding.node.label} was lost (a statement was cancelled or failed at "
                    "the connection level); the transaction is rolled back and nothing more "
                    "runs on it",
                    node=binding.node.name,
                )
            return await self._statement(binding, sql, params, fetch)
        finally:
            binding.lock.release()

    async def _statement(
        self, binding: Binding, sql: str, params: Sequence[Any] | None, fetch: FetchResults | None
    ) -> Any:
        core = self._core
        node = binding.node
        node.in_flight += 1
        try:
            with peewee.__exception_wrapper__:  # type: ignore[attr-defined]
                async with binding.conn.cursor() as cursor:
                    await cursor.execute(sql, params or ())
                    return await fetch(core.database, cursor) if fetch else None
        except Exception as exc:
            if core.driver.is_disconnect(exc):
                binding.broken = True
                node.note_error(exc)
                core.connection_failed(node, exc)
            if core.cut_by_close(exc):
                binding.broken = True
                raise core.not_open() from exc
            raise
        except BaseException:
            # Cancelled mid-statement: the connection's state is unknown. It is cancelled
            # on the server and discarded when the scope ends.
            binding.broken = True
            raise
        finally:
            node.done()

    async def after_write_bound(self, binding: Binding) -> None:
        """A bound connection's writes committed: record the causal token that covers them."""
        if self._core.options.consistency != "causal":
            self._sessions.note_write(None)
            return
        try:
            row = await self.run_bound(binding, WAL_POSITION_SQL, None, fetchone_raw)
        except Exception as exc:
            # COMMIT was answered: the transaction is applied. Its position is unknown:
            # the session's next reads need the primary's current position.
            binding.broken = True
            self._core.counters.unknown_positions += 1
            self._sessions.note_unknown_write()
            logger.warning(
                "%s: a transaction on %s committed, but reading its WAL position failed "
                "(%s): acknowledged; the session's next reads need the primary's position",
                self._core.name,
                binding.node.name,
                type(exc).__name__,
            )
            return
        self._sessions.note_write(token_position(parse_lsn(row[0])), binding.node.timeline)
