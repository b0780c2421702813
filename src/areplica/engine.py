"""``Engine``: one manager's query paths wired together, and the one door into them.

``execute(query)`` / ``execute_sql(sql)`` compile and classify a query, then dispatch it:
inside a transaction (or a pinned connection) to its bound connection; a write to the
primary (never inside ``replica()``); a read by the read path's rules. The routing database
(``database.py``), the manager's query API (``queries.py``) and the test case
(``testing/transaction.py``) all go through this object and its public parts:
``sessions``, ``transactions``, ``reads``, ``writes`` and ``core``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import peewee

from .core import Core
from .errors import ConfigurationError, ReadOnlyScopeError
from .reads import ReadPath
from .results import FetchResults, default_fetch, fetch_raw, fetchall_or_none
from .routing import QueryKind, classify_query, classify_sql
from .sessions import Route, Sessions
from .transactions import Transactions
from .writes import WritePath

__all__ = ["SCHEMA_LOCK", "Engine"]

#: The advisory lock (``pg_advisory_xact_lock``) that ``create_tables`` holds on the primary:
#: "areplica" in ASCII, read as a bigint. Workers that start together and each create the
#: same tables wait for each other instead of failing (see ``Engine.schema_change``).
SCHEMA_LOCK = 0x617265706C696361


class Engine:
    """The query paths of one manager (see the module docstring)."""

    def __init__(self, core: Core, policy: Callable[[Sequence[Any]], Any]) -> None:
        self.core = core
        self.sessions = Sessions(core)
        self.writes = WritePath(core, self.sessions)
        self.reads = ReadPath(core, self.sessions, self.writes, policy)
        self.transactions = Transactions(core, self.sessions, self.writes)

    def __repr__(self) -> str:
        return f"<Engine {self.core.name!r}>"

    def compile(self, query: Any) -> tuple[str, Sequence[Any]]:
        """A peewee query's SQL and parameters, in the driver's dialect."""
        sql, params = self.core.database.get_sql_context().sql(query).query()
        return sql, params

    async def execute(
        self,
        query: Any,
        fetch_results: FetchResults | None = None,
        *,
        on: str | None = None,
        max_staleness: float | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Run a peewee query where the rules send it; ``fetch_results`` handles its rows.

        ``timeout``: seconds the whole call may take when it is a routed read (every
        attempt, wait and retry; ``ReadTimeoutError``); for a write, the wait for a
        connection before it is sent (a write once sent is never cut short).
        """
        self.core.require_open()
        sql, params = self.compile(query)
        kind = classify_query(query, sql)
        fetch: FetchResults | None
        if fetch_results is None and isinstance(query, peewee.RawQuery):
            fetch = fetch_raw(query)  # a raw write has no rows: return its row count
        else:
            fetch = fetch_results or getattr(query, "fetch_results", None) or default_fetch(query)
        return await self.dispatch(sql, params, fetch, kind, on, max_staleness, timeout)

    async def execute_sql(
        self,
        sql: str,
        params: Sequence[Any] | None = None,
        fetch_results: FetchResults | None = None,
        *,
        on: str | None = None,
        max_staleness: float | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Run raw SQL where the classifier sends it (``timeout``: as ``execute``)."""
        self.core.require_open()
        return await self.dispatch(
            sql, params or (), fetch_results, classify_sql(sql), on, max_staleness, timeout
        )

    async def dispatch(
        self,
        sql: str,
        params: Sequence[Any] | None,
        fetch: FetchResults | None,
        kind: QueryKind,
        on: str | None,
        max_staleness: float | None,
        timeout: float | None = None,
    ) -> Any:
        """Send compiled SQL of a known kind: bound connection, primary, or a read."""
        if timeout is not None and not timeout > 0:
            raise ConfigurationError(
                f"timeout: expected seconds > 0, got {timeout!r}", option="timeout"
            )
        binding = self.transactions.binding()
        route = self.sessions.route() if on is None else self.on_route(on)
        if kind is QueryKind.WRITE:
            if route is not None and route.target == "replica":
                where = f"replica {route.name!r}" if route.name else "a replica"
                raise ReadOnlyScopeError(
                    f"{self.core.name}: refusing to send a write to {where}: {sql[:80]!r}"
                )
            if binding is not None:
                binding.wrote = True
                return await self.transactions.run_bound(binding, sql, params, fetch)
            return await self.writes.write(sql, params, fetch, timeout=timeout)
        if binding is not None:
            return await self.transactions.run_bound(binding, sql, params, fetch)
        return await self.reads.read(sql, params, fetch, route, max_staleness, timeout)

    @contextlib.asynccontextmanager
    async def schema_change(self) -> AsyncIterator[None]:
        """A transaction on the primary that holds ``SCHEMA_LOCK`` until it ends.

        PostgreSQL's ``CREATE ... IF NOT EXISTS`` is not safe against itself: two sessions
        that both find a name free both insert it, and one fails on a catalog's unique index
        (``pg_type_typname_nsp_index``). Under the lock the second worker finds the first
        one's tables and skips them. Inside a transaction it joins that transaction.
        """
        async with self.transactions.transaction():
            await self.execute_sql(
                "SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,), fetchall_or_none
            )
            yield

    def on_route(self, on: str) -> Route:
        """The route of a per-call ``on="primary" | "replica" | NAME``."""
        if on == "primary":
            return Route("primary")
        if on == "replica":
            return Route("replica")
        cluster = self.core.cluster
        node = cluster.get(on)
        if node is not None:
            return Route("primary") if node is cluster.primary else Route("replica", on)
        raise ConfigurationError(
            f"on: expected 'primary', 'replica' or a member name {cluster.names}, got {on!r}",
            option="on",
        )
