"""``ReplicaManager``: lifecycle, the query API, scopes and routing of every query.

Connections and context
-----------------------
peewee-async keeps "the current connection" in one module-wide ContextVar shared by every
database object, so a query issued while another database's connection is held silently
runs on that connection. areplica never reads or sets that variable. It binds connections in
its own ContextVar holding an immutable mapping keyed by manager, resets it with the token
``set()`` returned, and a bound connection only ever serves the manager (and so the node)
that bound it. A transaction's connection may be reached from child tasks spawned inside
the block: a per-binding lock keeps them from using the connection concurrently, and once
the block has ended the binding is inactive and such late tasks route normally.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any, Literal

import peewee
from peewee_async.result_wrappers import fetch_models

from . import dsn as dsn_mod
from .consistency import WAL_POSITION_SQL, format_lsn, parse_lsn, token_position
from .database import routing_database_for
from .drivers import Driver, get_driver
from .errors import (
    ClosedError,
    ConfigurationError,
    NodeUnavailableError,
    NoPrimaryError,
    NoReplicaAvailableError,
    ReadOnlyScopeError,
    TopologyError,
)
from .health import HealthMonitor, probe
from .node import Node, NodeStatus
from .policies import POLICIES
from .routing import QueryKind, classify_query, classify_sql

__all__ = ["ReplicaManager"]

logger = logging.getLogger("areplica")

if sys.version_info >= (3, 11):
    _timeout = asyncio.timeout
else:  # pragma: no cover - Python 3.10

    @contextlib.asynccontextmanager
    async def _timeout(delay: float | None) -> AsyncIterator[None]:
        if delay is None:
            yield
            return
        task = asyncio.current_task()
        assert task is not None
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


Consistency = Literal["causal", "sticky", "eventual"]
_CONSISTENCY = ("causal", "sticky", "eventual")
FetchResults = Callable[[Any, Any], Awaitable[Any]]


class _Lifecycle(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True)
class _Route:
    """A routing scope: ``primary()`` or ``replica(name)``."""

    target: Literal["primary", "replica"]
    name: str | None = None


@dataclass
class _Binding:
    """A connection bound to one manager's scope: a transaction or a pinned connection."""

    node: Node
    conn: Any
    transaction: bool
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    active: bool = True
    wrote: bool = False
    broken: bool = False


class _Session:
    """A consistency session: the causal token and the time of the last write.

    ``external`` marks a token that came from outside (a header, a cookie, a job payload)
    and has not been vetted yet: the first read of the session clamps it to the primary's
    position, so a forged or absurd token cannot pin reads to the primary.
    """

    __slots__ = ("client", "external", "last_write", "lsn")

    def __init__(self, lsn: int | None = None, *, external: bool = False) -> None:
        self.lsn = lsn
        self.last_write: float | None = None
        self.external = external
        self.client: str | None = None


class _CatchUp(Exception):
    """Internal: only the causal token keeps these replicas from a read; wait for them."""

    def __init__(self, nodes: list[Node], lsn: int) -> None:
        self.nodes = nodes
        self.lsn = lsn


# manager key -> binding / route / session. Immutable mappings: a child task copies the
# context, and nothing it sets can leak back into its parent's view.
_BOUND: ContextVar[Mapping[object, _Binding]] = ContextVar(
    "areplica_bound", default=MappingProxyType({})
)
_ROUTE: ContextVar[Mapping[object, _Route]] = ContextVar(
    "areplica_route", default=MappingProxyType({})
)
_SESSION: ContextVar[Mapping[object, _Session]] = ContextVar(
    "areplica_session", default=MappingProxyType({})
)

_REPLAY_SQL = "SELECT pg_last_wal_replay_lsn()::text"
_CURRENT_SQL = WAL_POSITION_SQL

_OPTION_NAMES = (
    "causal_wait",
    "consistency",
    "driver",
    "fail_after",
    "fallback_to_primary",
    "health_interval",
    "health_timeout",
    "max_lag",
    "max_lag_bytes",
    "name",
    "policy",
    "pool_size",
    "read_retries",
    "read_timeout",
    "recover_after",
    "primary_weight",
    "slow_factor",
    "sticky_for",
    "weights",
)


def _positive(option: str, value: Any, *, allow_none: bool = False, integer: bool = False) -> Any:
    if value is None and allow_none:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or value <= 0:
        kind = "a positive integer" if integer else "a positive number of seconds"
        raise ConfigurationError(f"{option}: expected {kind}, got {value!r}", option=option)
    return value if integer else float(value)


class ReplicaManager:
    """Routes peewee queries between a PostgreSQL primary and its streaming replicas.

    Reads go to a healthy, caught-up replica; writes, DDL, locking reads and transactions go
    to the primary. See the README for every option and the failure semantics.
    """

    def __init__(
        self,
        primary: str | Sequence[str],
        replicas: Sequence[str] | Mapping[str, str] = (),
        *,
        name: str = "areplica",
        driver: str = "aiopg",
        pool_size: int = 10,
        policy: str | Callable[[Sequence[Any]], Any] = "round_robin",
        weights: Mapping[str, float] | None = None,
        consistency: Consistency = "causal",
        sticky_for: float = 5.0,
        causal_wait: float = 0.05,
        max_lag: float | None = 30.0,
        max_lag_bytes: int | None = None,
        health_interval: float = 1.0,
        health_timeout: float = 2.0,
        fail_after: int = 3,
        recover_after: int = 2,
        read_timeout: float | None = 30.0,
        read_retries: int = 2,
        fallback_to_primary: bool = True,
        slow_factor: float | None = 10.0,
        primary_weight: float = 0.0,
        **unknown: Any,
    ) -> None:
        if unknown:
            bad = sorted(unknown)[0]
            raise ConfigurationError(
                f"unknown option {bad!r}; the options are {', '.join(_OPTION_NAMES)}",
                option=bad,
            )
        if not isinstance(name, str) or not name:
            raise ConfigurationError(
                f"name: expected a non-empty string, got {name!r}", option="name"
            )
        self.name = name
        self._driver: Driver = (
            get_driver(driver) if isinstance(driver, str) else get_driver(str(driver))
        )
        self.driver_name = self._driver.name
        self.pool_size: int = _positive("pool_size", pool_size, integer=True)
        if consistency not in _CONSISTENCY:
            raise ConfigurationError(
                f"consistency: expected one of {_CONSISTENCY}, got {consistency!r}",
                option="consistency",
            )
        self.consistency: Consistency = consistency
        self.sticky_for: float = _positive("sticky_for", sticky_for)
        if (
            isinstance(causal_wait, bool)
            or not isinstance(causal_wait, (int, float))
            or causal_wait < 0
        ):
            raise ConfigurationError(
                f"causal_wait: expected seconds >= 0, got {causal_wait!r}", option="causal_wait"
            )
        self.causal_wait = float(causal_wait)
        self.max_lag: float | None = _positive("max_lag", max_lag, allow_none=True)
        self.max_lag_bytes: int | None = _positive(
            "max_lag_bytes", max_lag_bytes, allow_none=True, integer=True
        )
        self.health_interval: float = _positive("health_interval", health_interval)
        self.health_timeout: float = _positive("health_timeout", health_timeout)
        self.fail_after: int = _positive("fail_after", fail_after, integer=True)
        self.recover_after: int = _positive("recover_after", recover_after, integer=True)
        self.read_timeout: float | None = _positive("read_timeout", read_timeout, allow_none=True)
        if isinstance(read_retries, bool) or not isinstance(read_retries, int) or read_retries < 0:
            raise ConfigurationError(
                f"read_retries: expected an integer >= 0, got {read_retries!r}",
                option="read_retries",
            )
        self.read_retries = read_retries
        if not isinstance(fallback_to_primary, bool):
            raise ConfigurationError(
                f"fallback_to_primary: expected a bool, got {fallback_to_primary!r}",
                option="fallback_to_primary",
            )
        self.fallback_to_primary = fallback_to_primary
        self.slow_factor: float | None = _positive("slow_factor", slow_factor, allow_none=True)
        if slow_factor is not None and slow_factor <= 1:
            raise ConfigurationError(
                f"slow_factor: expected a multiple > 1 or None, got {slow_factor!r}",
                option="slow_factor",
            )

        if (
            isinstance(primary_weight, bool)
            or not isinstance(primary_weight, (int, float))
            or primary_weight < 0
        ):
            raise ConfigurationError(
                f"primary_weight: expected a weight >= 0, got {primary_weight!r}",
                option="primary_weight",
            )
        self.primary_weight = float(primary_weight)

        # Nodes: every primary candidate, then the replicas.
        candidates = [primary] if isinstance(primary, str) else list(primary)
        if not candidates:
            raise ConfigurationError("primary: expected a DSN or a list of DSNs", option="primary")
        self._candidates: dict[str, Node] = {}
        for index, text in enumerate(candidates, start=1):
            node_name = "primary" if len(candidates) == 1 else f"primary-{index}"
            self._candidates[node_name] = self._make_node(node_name, text, "primary", "primary")
        if isinstance(replicas, str):
            raise ConfigurationError(
                "replicas: expected a list of DSNs or a {name: dsn} dict, got a string",
                option="replicas",
            )
        items = (
            list(replicas.items())
            if isinstance(replicas, Mapping)
            else [(f"replica-{i}", text) for i, text in enumerate(replicas, start=1)]
        )
        self._replicas: dict[str, Node] = {}
        for node_name, text in items:
            if node_name in self._replicas or node_name in self._candidates:
                raise ConfigurationError(
                    f"replicas: duplicate node name {node_name!r}", option="replicas"
                )
            self._replicas[node_name] = self._make_node(node_name, text, "replica", "replicas")

        self._weights = dict(weights or {})
        for node_name, weight in self._weights.items():
            if node_name not in self._replicas:
                raise ConfigurationError(
                    f"weights: {node_name!r} is not a replica (replicas: {sorted(self._replicas)})",
                    option="weights",
                )
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
                raise ConfigurationError(
                    f"weights: weight of {node_name!r} must be a number >= 0, got {weight!r}",
                    option="weights",
                )
            self._replicas[node_name].weight = float(weight)
        if isinstance(policy, str):
            if policy not in POLICIES:
                raise ConfigurationError(
                    f"policy: expected one of {sorted(POLICIES)} or a callable, got {policy!r}",
                    option="policy",
                )
            self._policy: Callable[[Sequence[Any]], Any] = POLICIES[policy]()
        elif callable(policy):
            self._policy = policy
        else:
            raise ConfigurationError(
                f"policy: expected a name or a callable, got {policy!r}", option="policy"
            )

        self._primary: Node | None = None
        self._lifecycle = _Lifecycle.NEW
        self._key = object()
        self._monitor: HealthMonitor | None = None
        self._callbacks: list[Callable[[NodeStatus, NodeStatus], Any]] = []
        self._sp_counter = itertools.count(1)
        self.fallback_reads = 0
        self.retried_reads = 0
        self.caught_up_reads = 0
        self._highest_lsn = 0
        self._warned: set[tuple[str, str]] = set()
        first = next(iter(self._candidates.values()))
        self.database: Any = routing_database_for(
            self, self._driver.name, first.dsn.params.get("dbname")
        )

    # ------------------------------------------------------------------ construction helpers

    def _make_node(
        self, name: str, text: str, role: Literal["primary", "replica"], option: str
    ) -> Node:
        parsed = dsn_mod.parse(text, option=f"{option}[{name}]")
        connect_timeout = self.health_timeout
        raw = parsed.params.get("connect_timeout")
        if raw is not None:
            try:
                connect_timeout = max(connect_timeout, float(raw))
            except ValueError:
                raise ConfigurationError(
                    f"{option}[{name}]: connect_timeout {raw!r} is not a number", option=option
                ) from None
        return Node(
            name,
            parsed,
            role=role,
            driver=self._driver,
            pool_size=self.pool_size,
            connect_timeout=connect_timeout,
        )

    @classmethod
    def from_env(cls, prefix: str = "AREPLICA_", **overrides: Any) -> ReplicaManager:
        """Build a manager from ``{prefix}PRIMARY``, ``{prefix}REPLICAS`` and option variables.

        ``PRIMARY`` and ``REPLICAS`` hold DSNs separated by ``;`` or newlines (commas belong to
        libpq multi-host URLs). Options are upper-cased: ``AREPLICA_POOL_SIZE=20``,
        ``AREPLICA_MAX_LAG=5``, ``AREPLICA_FALLBACK_TO_PRIMARY=false``, ``AREPLICA_MAX_LAG=none``.
        """
        env = os.environ
        primary_text = env.get(f"{prefix}PRIMARY", "")
        primaries = _split_dsns(primary_text)
        if not primaries:
            raise ConfigurationError(f"{prefix}PRIMARY is not set", option="primary")
        replicas = _split_dsns(env.get(f"{prefix}REPLICAS", ""))
        options: dict[str, Any] = {}
        defaults = cls.__init__.__kwdefaults__ or {}
        for option in _OPTION_NAMES:
            raw = env.get(f"{prefix}{option.upper()}")
            if raw is None or option == "weights":
                continue
            options[option] = _coerce_env(option, raw, defaults.get(option))
        raw_weights = env.get(f"{prefix}WEIGHTS")
        if raw_weights:
            try:
                options["weights"] = {
                    k.strip(): float(v)
                    for k, v in (p.split("=", 1) for p in raw_weights.split(","))
                }
            except ValueError:
                raise ConfigurationError(
                    f"{prefix}WEIGHTS: expected name=weight,name=weight", option="weights"
                ) from None
        options.update(overrides)
        return cls(primaries if len(primaries) > 1 else primaries[0], replicas, **options)

    def __repr__(self) -> str:
        nodes = ", ".join(f"{n.name}={n.state}" for n in self._all_nodes())
        return f"<ReplicaManager {self.name!r} {self._lifecycle.value} [{nodes}]>"

    # ------------------------------------------------------------------ lifecycle

    @property
    def is_open(self) -> bool:
        """True between ``connect()`` and ``close()``."""
        return self._lifecycle is _Lifecycle.OPEN

    async def __aenter__(self) -> ReplicaManager:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Probe every node once, verify roles, and start the health task.

        Raises ``NoPrimaryError`` when no primary candidate answers within
        ``health_timeout``, ``TopologyError`` when the roles are wrong. A replica that does
        not answer is not fatal: it starts ``down`` and the health task readmits it later.
        """
        if self._lifecycle is _Lifecycle.OPEN:
            return
        if self._lifecycle is _Lifecycle.CLOSED:
            raise ClosedError(f"manager {self.name!r} is closed; create a new one")
        nodes = self._all_nodes()
        results = await asyncio.gather(
            *(probe(node, self.health_timeout) for node in nodes), return_exceptions=True
        )
        outcome = dict(zip((n.name for n in nodes), results, strict=True))
        for node, result in zip(nodes, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result
                node.note_error(result)
                node.state = "down"
            else:
                node.in_recovery = result.in_recovery
                node.lsn = result.lsn
                node.latency_ms = result.latency_ms
        writable = [n for n in self._candidates.values() if n.in_recovery is False]
        reachable = [
            n for n in self._candidates.values() if not isinstance(outcome[n.name], BaseException)
        ]
        if not reachable:
            detail = "; ".join(f"{n.label}: {n.last_error}" for n in self._candidates.values())
            first = next(iter(self._candidates.values()))
            raise NoPrimaryError(
                f"{self.name}: no primary reachable within {self.health_timeout:g}s ({detail})",
                node=first.name,
            )
        if len(writable) > 1:
            raise TopologyError(
                f"{self.name}: more than one primary candidate is out of recovery "
                f"({', '.join(n.label for n in writable)}); refusing to guess",
                node=writable[0].name,
            )
        if not writable:
            node = reachable[0]
            raise TopologyError(
                f"{self.name}: primary {node.label} is a standby (pg_is_in_recovery() is true)",
                node=node.name,
            )
        for replica in self._replicas.values():
            if isinstance(outcome[replica.name], BaseException):
                logger.warning(
                    "%s: replica %s is unreachable at connect, starting down: %s",
                    self.name,
                    replica.label,
                    replica.last_error,
                )
            elif replica.in_recovery is False:
                raise TopologyError(
                    f"{self.name}: replica {replica.label} is not a standby "
                    "(pg_is_in_recovery() is false)",
                    node=replica.name,
                )
        self._primary = writable[0]
        self._primary.state = "up"
        self._primary.role = "primary"
        for candidate in self._candidates.values():
            if candidate is not self._primary and not isinstance(
                outcome[candidate.name], BaseException
            ):
                candidate.role = "replica"
        self._monitor = HealthMonitor(self)
        self._monitor.seed(outcome)
        self._lifecycle = _Lifecycle.OPEN
        self._monitor.start()
        logger.info("%s: connected: %s", self.name, ", ".join(f"{n.name}={n.state}" for n in nodes))

    async def close(self) -> None:
        """Stop the health task and close every pool. Idempotent."""
        if self._lifecycle is _Lifecycle.CLOSED:
            return
        self._lifecycle = _Lifecycle.CLOSED
        if self._monitor is not None:
            await self._monitor.stop()
        for node in self._all_nodes():
            await node.pool.close()

    def _require_open(self) -> None:
        if self._lifecycle is not _Lifecycle.OPEN:
            state = "closed" if self._lifecycle is _Lifecycle.CLOSED else "not connected"
            raise ClosedError(
                f"manager {self.name!r} is {state}: use `async with mgr:` or connect()"
            )

    # ------------------------------------------------------------------ topology

    def _all_nodes(self) -> list[Node]:
        nodes = list(self._candidates.values())
        nodes.extend(n for n in self._replicas.values() if n not in nodes)
        return nodes

    def _node(self, name: str) -> Node:
        node = self._replicas.get(name) or self._candidates.get(name)
        if node is None:
            raise ConfigurationError(
                f"no node named {name!r} (nodes: {[n.name for n in self._all_nodes()]})",
                option="on",
            )
        return node

    def _readers(self) -> list[Node]:
        """Every node that may serve replica reads: replicas and standby primary candidates."""
        readers = [n for n in self._replicas.values() if not n.retired]
        readers.extend(
            n for n in self._candidates.values() if n is not self._primary and n.role == "replica"
        )
        return readers

    def status(self) -> list[NodeStatus]:
        """Every node's status, without I/O."""
        return [node.status() for node in self._all_nodes()]

    async def check(self) -> list[NodeStatus]:
        """Probe every node now (one health round) and return their statuses."""
        self._require_open()
        assert self._monitor is not None
        await self._monitor.round()
        return self.status()

    def on_state_change(self, callback: Callable[[NodeStatus, NodeStatus], Any]) -> None:
        """Call ``callback(old, new)`` (sync or async) whenever a node changes state."""
        self._callbacks.append(callback)

    async def add_replica(self, dsn: str, name: str | None = None) -> NodeStatus:
        """Add a replica at run time; it takes reads once its probes are good."""
        self._require_open()
        assert self._monitor is not None
        node_name = name or f"replica-{len(self._replicas) + 1}"
        while name is None and node_name in self._replicas:
            node_name = f"{node_name}x"
        if node_name in self._replicas or node_name in self._candidates:
            raise ConfigurationError(f"add_replica: node {node_name!r} exists", option="name")
        node = self._make_node(node_name, dsn, "replica", "add_replica")
        self._replicas[node_name] = node
        await self._monitor.round(only=[node])
        return node.status()

    async def remove_replica(self, name: str, *, timeout: float = 30.0) -> None:
        """Stop routing reads to a replica, wait for its in-flight reads, close its pool."""
        node = self._replicas.get(name)
        if node is None:
            raise ConfigurationError(f"remove_replica: no replica named {name!r}", option="name")
        node.retired = True
        if node.in_flight:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(node.drained(), timeout)
        del self._replicas[name]
        if self._monitor is not None:
            await self._monitor.forget(node)
        await node.pool.close()

    # ------------------------------------------------------------------ scopes

    def _binding(self) -> _Binding | None:
        binding: _Binding | None = _BOUND.get().get(self._key)
        if binding is not None and binding.active:
            return binding
        return None

    def _route(self) -> _Route | None:
        route: _Route | None = _ROUTE.get().get(self._key)
        return route

    @contextlib.asynccontextmanager
    async def _scope(self, route: _Route) -> AsyncIterator[None]:
        token = _ROUTE.set(MappingProxyType({**_ROUTE.get(), self._key: route}))
        try:
            yield
        finally:
            _ROUTE.reset(token)

    def primary(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Reads inside the block go to the primary."""
        return self._scope(_Route("primary"))

    def replica(self, name: str | None = None) -> contextlib.AbstractAsyncContextManager[None]:
        """Reads inside go to replica ``name`` (or any eligible one); writes raise."""
        if name is not None and name not in self._replicas:
            raise ConfigurationError(
                f"replica: no replica named {name!r} (replicas: {sorted(self._replicas)})",
                option="name",
            )
        return self._scope(_Route("replica", name))

    def atomic(self) -> contextlib.AbstractAsyncContextManager[_Binding]:
        """A transaction on the primary; nested ``atomic()`` blocks are savepoints."""
        return self._transaction(savepoint=True)

    def transaction(self) -> contextlib.AbstractAsyncContextManager[_Binding]:
        """A transaction on the primary; nested inside another, it joins the outer one."""
        return self._transaction(savepoint=False)

    @contextlib.asynccontextmanager
    async def _transaction(self, *, savepoint: bool) -> AsyncIterator[_Binding]:
        self._require_open()
        outer = self._binding()
        if outer is not None and outer.transaction:
            if not savepoint:
                yield outer
                return
            name = f"areplica_sp_{next(self._sp_counter)}"
            await self._run_bound(outer, f"SAVEPOINT {name}", None, None)
            try:
                yield outer
            except BaseException:
                await asyncio.shield(
                    self._run_bound(outer, f"ROLLBACK TO SAVEPOINT {name}", None, None)
                )
                raise
            await self._run_bound(outer, f"RELEASE SAVEPOINT {name}", None, None)
            return
        route = self._route()
        if route is not None and route.target == "replica":
            raise ReadOnlyScopeError(
                f"{self.name}: a transaction cannot start inside replica() (it runs on the primary)"
            )
        if outer is not None:  # a pinned connection: run the transaction on it
            binding = outer
            binding.transaction = True
            token = None
        else:
            node = self._writable_primary()
            conn = await self._acquire_for_write(node)
            binding = _Binding(node, conn, transaction=True)
            token = _BOUND.set(MappingProxyType({**_BOUND.get(), self._key: binding}))
        try:
            await self._run_bound(binding, "BEGIN", None, None)
            try:
                yield binding
            except BaseException:
                await asyncio.shield(self._rollback(binding))
                raise
            await self._run_bound(binding, "COMMIT", None, None)
            if binding.wrote:
                await self._after_write_bound(binding)
        finally:
            if token is not None:
                binding.active = False
                _BOUND.reset(token)
                await binding.node.pool.release(binding.conn, discard=binding.broken)
            else:
                binding.transaction = False
                binding.wrote = False

    async def _rollback(self, binding: _Binding) -> None:
        try:
            await self._run_bound(binding, "ROLLBACK", None, None)
        except Exception:
            binding.broken = True
            logger.warning(
                "%s: rollback failed on %s; connection discarded", self.name, binding.node.name
            )

    @contextlib.asynccontextmanager
    async def _pinned_primary(self) -> AsyncIterator[Any]:
        """Pin one primary connection for the block (peewee-async's ``aio_connection``)."""
        self._require_open()
        outer = self._binding()
        if outer is not None:
            yield outer.conn
            return
        node = self._writable_primary()
        conn = await self._acquire_for_write(node)
        binding = _Binding(node, conn, transaction=False)
        token = _BOUND.set(MappingProxyType({**_BOUND.get(), self._key: binding}))
        try:
            yield conn
        finally:
            binding.active = False
            _BOUND.reset(token)
            await node.pool.release(conn, discard=binding.broken)

    # ------------------------------------------------------------------ consistency sessions

    def _session(self, create: bool = False) -> _Session | None:
        session: _Session | None = _SESSION.get().get(self._key)
        if session is None and create:
            session = _Session()
            _SESSION.set(MappingProxyType({**_SESSION.get(), self._key: session}))
        return session

    @property
    def token(self) -> str | None:
        """The current session's causal token (a WAL position), ``None`` before any write."""
        session = self._session()
        if session is None or session.lsn is None:
            return None
        return format_lsn(session.lsn)

    @contextlib.asynccontextmanager
    async def session(
        self, token: str | None = None, *, client: str | None = None
    ) -> AsyncIterator[_Session]:
        """A consistency session, optionally resumed from a token of an earlier one.

        Tokens from outside are untrusted: a malformed one is ignored (logged once per
        ``client``), and one beyond the primary's position is clamped to it (see README).
        """
        lsn = None
        if token:
            try:
                lsn = parse_lsn(token)
            except ValueError:
                self._warn_once(client or token, "ignoring a malformed causal token")
        session = _Session(lsn, external=lsn is not None)
        session.client = client
        reset = _SESSION.set(MappingProxyType({**_SESSION.get(), self._key: session}))
        try:
            yield session
        finally:
            _SESSION.reset(reset)

    def _warn_once(self, client: str, message: str) -> None:
        key = (client, message)
        if key in self._warned:
            return
        if len(self._warned) >= 4096:
            self._warned.clear()
        self._warned.add(key)
        logger.warning("%s: %s (client %.60s)", self.name, message, client)

    async def _vet_token(self, session: _Session) -> None:
        """Clamp an external token beyond the primary's position (a forged or absurd one).

        A token at or below the highest position this manager has seen (probes, own
        writes) is fine. One beyond it may be another process's write that the last probe
        missed, or garbage: the primary's current position, read now, decides. That read
        happens once per session, and only for such tokens, whose reads would otherwise go
        to the primary anyway.
        """
        session.external = False
        lsn = session.lsn
        primary = self._primary
        if lsn is None or primary is None:
            return
        if primary.lsn is not None and primary.lsn > self._highest_lsn:
            self._highest_lsn = primary.lsn
        if lsn <= self._highest_lsn:
            return
        try:
            row = await self._run_read(primary, _CURRENT_SQL, None, _fetchone_raw, count=False)
        except Exception:
            return  # cannot vet it now: routing treats it as any unreached token
        current = token_position(parse_lsn(row[0]))
        self._highest_lsn = max(self._highest_lsn, current)
        if lsn > current:
            self._warn_once(
                session.client or format_lsn(lsn),
                f"causal token {format_lsn(lsn)} is beyond the primary's position "
                f"{format_lsn(current)}; clamped",
            )
            session.lsn = current

    def _note_write(self, lsn: int | None) -> None:
        if self.consistency == "eventual":
            return
        session = self._session(create=True)
        assert session is not None
        session.last_write = time.monotonic()
        if lsn is not None:
            if session.lsn is None or lsn > session.lsn:
                session.lsn = lsn
            if lsn > self._highest_lsn:
                self._highest_lsn = lsn

    # ------------------------------------------------------------------ query execution

    def _compile(self, query: Any) -> tuple[str, Sequence[Any]]:
        sql, params = self.database.get_sql_context().sql(query).query()
        return sql, params

    async def _execute(
        self,
        query: Any,
        fetch_results: FetchResults | None = None,
        *,
        on: str | None = None,
        max_staleness: float | None = None,
    ) -> Any:
        self._require_open()
        sql, params = self._compile(query)
        kind = classify_query(query, sql)
        fetch: FetchResults | None
        if fetch_results is None and isinstance(query, peewee.RawQuery):
            fetch = _fetch_raw(query)  # a raw write has no rows: return its row count
        else:
            fetch = fetch_results or getattr(query, "fetch_results", None) or _default_fetch(query)
        return await self._dispatch(sql, params, fetch, kind, on, max_staleness)

    async def _execute_sql(
        self,
        sql: str,
        params: Sequence[Any] | None = None,
        fetch_results: FetchResults | None = None,
        *,
        on: str | None = None,
        max_staleness: float | None = None,
    ) -> Any:
        self._require_open()
        return await self._dispatch(
            sql, params or (), fetch_results, classify_sql(sql), on, max_staleness
        )

    async def _dispatch(
        self,
        sql: str,
        params: Sequence[Any] | None,
        fetch: FetchResults | None,
        kind: QueryKind,
        on: str | None,
        max_staleness: float | None,
    ) -> Any:
        binding = self._binding()
        route = self._route()
        if on is not None:
            route = _on_route(on, self)
        if kind is QueryKind.WRITE:
            if route is not None and route.target == "replica":
                where = f"replica {route.name!r}" if route.name else "a replica"
                raise ReadOnlyScopeError(
                    f"{self.name}: refusing to send a write to {where}: {sql[:80]!r}"
                )
            if binding is not None:
                binding.wrote = True
                return await self._run_bound(binding, sql, params, fetch)
            return await self._write(sql, params, fetch)
        if binding is not None:
            return await self._run_bound(binding, sql, params, fetch)
        return await self._read(sql, params, fetch, route, max_staleness)

    async def _run_bound(
        self, binding: _Binding, sql: str, params: Sequence[Any] | None, fetch: FetchResults | None
    ) -> Any:
        node = binding.node
        async with binding.lock:
            node.in_flight += 1
            try:
                with peewee.__exception_wrapper__:  # type: ignore[attr-defined]
                    async with binding.conn.cursor() as cursor:
                        await cursor.execute(sql, params or ())
                        return await fetch(self.database, cursor) if fetch else None
            except Exception as exc:
                if self._driver.is_disconnect(exc):
                    binding.broken = True
                    node.note_error(exc)
                    self._connection_failed(node, exc)
                raise
            finally:
                node.done()

    # -- writes

    def _writable_primary(self) -> Node:
        node = self._primary
        if self._monitor is not None and self._monitor.split_brain:
            raise NoPrimaryError(
                f"{self.name}: more than one node is out of recovery (split brain); "
                "refusing writes, the write was not sent",
                node=node.name if node else None,
            )
        if node is None or node.state != "up":
            reason = (
                "no primary is known" if node is None else f"primary {node.label} is {node.state}"
            )
            raise NoPrimaryError(
                f"{self.name}: {reason}; the write was not sent", node=node.name if node else None
            )
        return node

    async def _acquire_for_write(self, node: Node) -> Any:
        try:
            return await node.pool.acquire()
        except Exception as exc:
            if isinstance(exc, NodeUnavailableError) or self._driver.is_disconnect(exc):
                node.note_error(exc)
                self._connection_failed(node, exc)
                raise NoPrimaryError(
                    f"{self.name}: primary {node.label} is unreachable "
                    f"({type(exc).__name__}); the write was not sent",
                    node=node.name,
                ) from exc
            raise

    async def _write(
        self, sql: str, params: Sequence[Any] | None, fetch: FetchResults | None
    ) -> Any:
        node = self._writable_primary()
        conn = await self._acquire_for_write(node)
        discard = True
        node.in_flight += 1
        try:
            with peewee.__exception_wrapper__:  # type: ignore[attr-defined]
                lsn = None
                async with conn.cursor() as cursor:
                    await cursor.execute(sql, params or ())
                    result = await fetch(self.database, cursor) if fetch else None
                    if self.consistency == "causal":
                        # A second statement, after the write's own (autocommit) transaction
                        # ended: the position then covers its commit record. psycopg's
                        # pipeline mode could send both at once but was measured slower here
                        # (see benchmarks/README.md), so both drivers do this.
                        await cursor.execute(WAL_POSITION_SQL)
                        row = await cursor.fetchone()
                        lsn = token_position(parse_lsn(row[0]))
            discard = False
            node.writes += 1
            self._note_write(lsn)
            return result
        except Exception as exc:
            if self._driver.is_disconnect(exc):
                node.note_error(exc)
                self._connection_failed(node, exc)
                raise NoPrimaryError(
                    f"{self.name}: the connection to primary {node.label} failed during a write "
                    f"({type(exc).__name__}); it may or may not have been applied and is not "
                    "retried",
                    node=node.name,
                ) from exc
            discard = False
            raise
        finally:
            node.done()
            await node.pool.release(conn, discard=discard)

    async def _after_write_bound(self, binding: _Binding) -> None:
        if self.consistency != "causal":
            self._note_write(None)
            return
        lsn_row = await self._run_bound(binding, WAL_POSITION_SQL, None, _fetchone_raw)
        self._note_write(token_position(parse_lsn(lsn_row[0])))

    # -- reads

    def _eligible(
        self,
        exclude: Iterable[Node],
        max_staleness: float | None,
        min_lsn: int | None,
        *,
        with_primary: bool = True,
    ) -> list[Node]:
        out = []
        for node in self._readers():
            if node.state != "up" or node in exclude or node.weight <= 0:
                continue
            if max_staleness is not None and (
                node.lag_seconds is None or node.lag_seconds > max_staleness
            ):
                continue
            if min_lsn is not None and (node.lsn is None or node.lsn < min_lsn):
                continue
            out.append(node)
        primary = self._primary
        if (
            with_primary
            and self.primary_weight > 0
            and primary is not None
            and primary.state == "up"
            and primary not in exclude
        ):
            # The primary as one more reader (always caught up), at its own weight.
            primary.weight = self.primary_weight
            out.append(primary)
        return out

    def _read_target(
        self,
        route: _Route | None,
        exclude: set[Node],
        max_staleness: float | None,
        session: _Session | None = None,
    ) -> Node:
        """Pick the node for a read (rules 2, 4 and 5 of DESIGN.md)."""
        if route is not None and route.target == "primary":
            return self._readable_primary()
        if route is not None and route.name is not None:
            node = self._replicas.get(route.name)
            if node is None or node.retired or node.state == "down" or node in exclude:
                state = "removed" if node is None or node.retired else node.state
                raise NodeUnavailableError(
                    f"{self.name}: replica {route.name!r} is {state}", node=route.name
                )
            return node
        min_lsn = None
        if session is not None and self.consistency != "eventual":
            if self.consistency == "sticky":
                if (
                    session.last_write is not None
                    and time.monotonic() - session.last_write < self.sticky_for
                ):
                    if route is None:
                        return self._readable_primary()
            else:
                min_lsn = session.lsn
        eligible = self._eligible(exclude, max_staleness, min_lsn, with_primary=route is None)
        if eligible:
            return self._policy(eligible)  # type: ignore[no-any-return]
        if min_lsn is not None and self.causal_wait > 0:
            behind = self._eligible(exclude, max_staleness, None)
            if behind:
                raise _CatchUp(behind, min_lsn)
        return self._fallback(route)

    def _fallback(self, route: _Route | None) -> Node:
        if route is not None:  # replica(): never the primary
            raise NoReplicaAvailableError(
                f"{self.name}: no eligible replica for a read in replica()"
            )
        if not self.fallback_to_primary:
            raise NoReplicaAvailableError(
                f"{self.name}: no eligible replica and fallback_to_primary is off"
            )
        self.fallback_reads += 1
        return self._readable_primary()

    def _readable_primary(self) -> Node:
        node = self._primary
        if node is None or node.state != "up":
            reason = (
                "no primary is known" if node is None else f"primary {node.label} is {node.state}"
            )
            raise NoPrimaryError(f"{self.name}: {reason}", node=node.name if node else None)
        return node

    async def _read(
        self,
        sql: str,
        params: Sequence[Any] | None,
        fetch: FetchResults | None,
        route: _Route | None,
        max_staleness: float | None,
    ) -> Any:
        tried: set[Node] = set()
        attempt = 0
        session = self._session()
        if session is not None and session.external and self.consistency == "causal":
            await self._vet_token(session)
        while True:
            try:
                node = self._read_target(route, tried, max_staleness, session)
            except _CatchUp as wait:
                node = await self._catch_up(wait.nodes, wait.lsn) or self._fallback(route)
            try:
                return await self._run_read(node, sql, params, fetch)
            except Exception as exc:
                if node is not self._primary and self._driver.is_read_only_violation(exc):
                    logger.warning(
                        "%s: replica %s refused a query classified as a read (SQLSTATE 25006); "
                        "running it once on the primary: %.80r",
                        self.name,
                        node.name,
                        sql,
                    )
                    return await self._write(sql, params, fetch)
                retry = self._driver.is_disconnect(exc) or isinstance(exc, NodeUnavailableError)
                if retry:
                    node.note_error(exc)
                    self._connection_failed(node, exc)
                elif self._driver.is_recovery_conflict(exc) and node is not self._primary:
                    retry = True
                if not retry or attempt >= self.read_retries or (route is not None and route.name):
                    raise
                attempt += 1
                tried.add(node)
                self.retried_reads += 1
                logger.info(
                    "%s: read on %s failed (%s); retrying elsewhere",
                    self.name,
                    node.name,
                    type(exc).__name__,
                )

    async def _catch_up(self, nodes: list[Node], lsn: int) -> Node | None:
        """Poll the replicas' replay positions until one reaches ``lsn`` or ``causal_wait``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.causal_wait
        delay = 0.001  # replication on a LAN takes about a millisecond: look again soon
        while True:
            positions = await asyncio.gather(
                *(self._replay_position(node) for node in nodes), return_exceptions=True
            )
            ready = [
                node
                for node, position in zip(nodes, positions, strict=True)
                if isinstance(position, int) and position >= lsn and node.state == "up"
            ]
            if ready:
                self.caught_up_reads += 1
                return self._policy(ready)  # type: ignore[no-any-return]
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.1)

    async def _replay_position(self, node: Node) -> int:
        row = await self._run_read(node, _REPLAY_SQL, None, _fetchone_raw, count=False)
        position = parse_lsn(row[0])
        if node.lsn is None or position > node.lsn:
            node.lsn = position
        return position

    async def _run_read(
        self,
        node: Node,
        sql: str,
        params: Sequence[Any] | None,
        fetch: FetchResults | None,
        *,
        count: bool = True,
    ) -> Any:
        node.in_flight += 1
        conn = None
        pool = node.pool
        discard = True
        try:
            async with _timeout(self.read_timeout):
                conn = await pool.acquire()
                with peewee.__exception_wrapper__:  # type: ignore[attr-defined]
                    async with conn.cursor() as cursor:
                        await cursor.execute(sql, params or ())
                        result = await fetch(self.database, cursor) if fetch else None
            discard = False
            if count:
                node.reads += 1
            return result
        except Exception as exc:
            discard = self._driver.is_disconnect(exc)
            raise
        finally:
            node.done()
            if conn is not None:
                await pool.release(conn, discard=discard)

    def _connection_failed(self, node: Node, exc: BaseException) -> None:
        """Passive detection: a connection-level failure takes the node down at once."""
        if self._monitor is not None:
            self._monitor.connection_failed(node, exc)

    # ------------------------------------------------------------------ public query API

    async def execute(
        self, query: Any, *, on: str | None = None, max_staleness: float | None = None
    ) -> Any:
        """Execute any peewee query; returns what peewee-async's ``aio_execute`` returns."""
        return await self._execute(query, on=on, max_staleness=max_staleness)

    async def execute_sql(
        self,
        sql: str,
        params: Sequence[Any] | None = None,
        *,
        on: str | None = None,
        max_staleness: float | None = None,
    ) -> list[tuple[Any, ...]] | None:
        """Run raw SQL, routed by the classifier; returns the rows of a read."""
        rows: list[tuple[Any, ...]] | None = await self._execute_sql(
            sql, params, _fetchall_or_none, on=on, max_staleness=max_staleness
        )
        return rows

    async def get(
        self,
        source: Any,
        *args: Any,
        on: str | None = None,
        max_staleness: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """The one row matching, or the model's ``DoesNotExist``."""
        query, model = _select_of(source, args, kwargs)
        rows = await self._execute(query.limit(1), on=on, max_staleness=max_staleness)
        if not rows:
            sql, params = self._compile(query)
            raise model.DoesNotExist(
                f"{model.__name__} instance matching query does not exist:\n"
                f"SQL: {sql}\nParams: {params}"
            )
        return rows[0]

    async def get_or_none(
        self,
        source: Any,
        *args: Any,
        on: str | None = None,
        max_staleness: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """The one row matching, or ``None``."""
        query, model = _select_of(source, args, kwargs)
        try:
            return await self.get(query, on=on, max_staleness=max_staleness)
        except model.DoesNotExist:
            return None

    async def create(self, model: Any, **fields: Any) -> Any:
        """Insert a row on the primary and return the model instance."""
        instance = model(**fields)
        pk = await self._execute(model.insert(**dict(instance.__data__)))
        if instance._pk is None:
            instance._pk = pk
        return instance

    async def get_or_create(
        self, model: Any, defaults: Mapping[str, Any] | None = None, **eq: Any
    ) -> tuple[Any, bool]:
        """``(instance, created)``: read (routed), then create on the primary if missing."""
        try:
            return await self.get(model, **eq), False
        except model.DoesNotExist:
            pass
        data = dict(eq)
        data.update(defaults or {})
        try:
            async with self.atomic():
                return await self.create(model, **data), True
        except peewee.IntegrityError:
            # Another writer won the race; the row is on the primary even if no replica has it.
            try:
                return await self.get(model, on="primary", **eq), False
            except model.DoesNotExist:
                pass
            raise

    async def update(self, obj: Any, only: Iterable[Any] | None = None) -> int:
        """Save an instance's changed fields (or ``only`` those) on the primary."""
        field_dict = dict(obj.__data__)
        pk_field = obj._meta.primary_key
        if only is not None:
            field_dict = obj._prune_fields(field_dict, only)
        elif obj._meta.only_save_dirty:
            field_dict = obj._prune_fields(field_dict, obj.dirty_fields)
        if obj._meta.composite_key:
            for part in pk_field.field_names:
                field_dict.pop(part, None)
        else:
            field_dict.pop(pk_field.name, None)
        if not field_dict:
            return 0
        rows: int = await self._execute(type(obj).update(**field_dict).where(obj._pk_expr()))
        obj._dirty.clear()
        return rows

    async def delete(self, obj: Any, recursive: bool = False, delete_nullable: bool = False) -> int:
        """Delete an instance (and, with ``recursive``, its dependents) on the primary."""
        async with self.atomic():
            if recursive:
                for query, fk in reversed(list(obj.dependencies(delete_nullable))):
                    model = fk.model
                    if fk.null and not delete_nullable:
                        await self._execute(model.update(**{fk.name: None}).where(query))
                    else:
                        await self._execute(model.delete().where(query))
            rows: int = await self._execute(type(obj).delete().where(obj._pk_expr()))
        return rows

    async def scalar(
        self,
        query: Any,
        as_tuple: bool = False,
        *,
        on: str | None = None,
        max_staleness: float | None = None,
    ) -> Any:
        """The first column of the first row (or the row with ``as_tuple``)."""
        row = await self._execute(query, _fetchone_raw, on=on, max_staleness=max_staleness)
        if row is None:
            return None
        return tuple(row) if as_tuple else row[0]

    async def count(
        self,
        query: Any,
        clear_limit: bool = False,
        *,
        on: str | None = None,
        max_staleness: float | None = None,
    ) -> int:
        """``SELECT COUNT(1)`` over the query, as peewee's ``count()`` does."""
        clone = query.order_by().alias("_wrapped")
        if clear_limit:
            clone._limit = clone._offset = None
        if (
            getattr(clone, "_having", None) is None
            and getattr(clone, "_group_by", None) is None
            and getattr(clone, "_windows", None) is None
            and getattr(clone, "_distinct", None) is None
            and getattr(clone, "_simple_distinct", None) is not True
        ):
            clone = clone.select(peewee.SQL("1"))
        wrapped = peewee.Select([clone], [peewee.fn.COUNT(peewee.SQL("1"))])
        return int(await self.scalar(wrapped, on=on, max_staleness=max_staleness) or 0)

    async def exists(
        self, query: Any, *, on: str | None = None, max_staleness: float | None = None
    ) -> bool:
        """True when the query matches at least one row."""
        clone = query.columns(peewee.SQL("1"))
        clone._limit = 1
        clone._offset = None
        return bool(await self.scalar(clone, on=on, max_staleness=max_staleness))

    async def prefetch(
        self, query: Any, *subqueries: Any, prefetch_type: int = peewee.PREFETCH_TYPE.WHERE
    ) -> list[Any]:
        """peewee's ``prefetch()``: the query's rows with their related rows attached."""
        if not subqueries:
            return list(await self._execute(query))
        fixed = peewee.prefetch_add_subquery(query, subqueries, prefetch_type)  # type: ignore[attr-defined]
        deps: dict[Any, Any] = {}
        rel_map: dict[Any, list[Any]] = {}
        result: list[Any] = []
        for pq in reversed(fixed):
            query_model = pq.model
            if pq.fields:
                for rel_model in pq.rel_models:
                    rel_map.setdefault(rel_model, []).append(pq)
            deps[query_model] = {}
            id_map = deps[query_model]
            has_relations = bool(rel_map.get(query_model))
            result = list(await self._execute(pq.query))
            for instance in result:
                if pq.fields:
                    pq.store_instance(instance, id_map)
                if has_relations:
                    for rel in rel_map[query_model]:
                        rel.populate_instance(instance, deps[rel.model])
        return result

    async def create_tables(self, models: Iterable[Any], safe: bool = True, **options: Any) -> None:
        """Create the models' sequences, tables and indexes on the primary."""
        for model in peewee.sort_models(list(models)):  # type: ignore[attr-defined]
            schema = model._schema
            for fld in model._meta.sorted_fields:
                if fld.sequence and self.database.sequences:
                    await self._execute(
                        schema._create_context()
                        .literal("CREATE SEQUENCE IF NOT EXISTS ")
                        .sql(schema._sequence_for_field(fld))
                    )
            await self._execute(schema._create_table(safe=safe, **options))
            for index in schema._create_indexes(safe=safe):
                await self._execute(index)

    async def drop_tables(self, models: Iterable[Any], safe: bool = True, **options: Any) -> None:
        """Drop the models' tables on the primary."""
        for model in reversed(peewee.sort_models(list(models))):  # type: ignore[attr-defined]
            await self._execute(model._schema._drop_table(safe=safe, **options))


# ---------------------------------------------------------------------- helpers


def _split_dsns(text: str) -> list[str]:
    return [part.strip() for part in text.replace("\n", ";").split(";") if part.strip()]


def _coerce_env(option: str, raw: str, default: Any) -> Any:
    text = raw.strip()
    if text.lower() in ("none", "null", "") and option in (
        "max_lag",
        "max_lag_bytes",
        "read_timeout",
        "slow_factor",
    ):
        return None
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigurationError(f"{option}: expected true or false, got {raw!r}", option=option)
    if isinstance(default, int) and option not in ("max_lag",):
        try:
            return int(text)
        except ValueError:
            raise ConfigurationError(
                f"{option}: expected an integer, got {raw!r}", option=option
            ) from None
    if isinstance(default, float) or option in ("max_lag",):
        try:
            return float(text)
        except ValueError:
            raise ConfigurationError(
                f"{option}: expected a number, got {raw!r}", option=option
            ) from None
    return text


def _on_route(on: str, mgr: ReplicaManager) -> _Route:
    if on == "primary":
        return _Route("primary")
    if on == "replica":
        return _Route("replica")
    if on in mgr._replicas:
        return _Route("replica", on)
    if on in mgr._candidates:
        return _Route("primary")
    raise ConfigurationError(
        f"on: expected 'primary', 'replica' or a replica name {sorted(mgr._replicas)}, got {on!r}",
        option="on",
    )


def _select_of(source: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    if isinstance(source, peewee.Query):
        query, model = source, getattr(source, "model", None)
    else:
        query, model = source.select(), source
    conditions = list(args) + [getattr(model, k) == v for k, v in kwargs.items()]
    if conditions:
        query = query.where(*conditions)
    return query, model


async def _fetchone_raw(database: Any, cursor: Any) -> Any:
    return await cursor.fetchone()


async def _fetchall_or_none(database: Any, cursor: Any) -> list[tuple[Any, ...]] | None:
    if cursor.description is None:
        return None
    return [tuple(row) for row in await cursor.fetchall()]


def _fetch_raw(query: Any) -> FetchResults:
    async def fetch(database: Any, cursor: Any) -> Any:
        if cursor.description is None:
            return cursor.rowcount
        return await fetch_models(cursor, query)

    return fetch


def _default_fetch(query_: object) -> FetchResults | None:
    """Result handling for plain peewee queries (peewee-async's mixins do it for AioModel)."""
    query: Any = query_
    if isinstance(query_, peewee.Insert):

        async def fetch_insert(database: Any, cursor: Any) -> Any:
            if query._returning is None and database.returning_clause and query.table._primary_key:
                query._returning = (query.table._primary_key,)
                return await database.aio_last_insert_id(cursor, query)
            if getattr(query, "_return_cursor", False):
                return await fetch_models(cursor, query)
            if getattr(query, "_as_rowcount", False):
                return await database.aio_rows_affected(cursor)
            return await database.aio_last_insert_id(cursor, query)

        return fetch_insert
    if isinstance(query_, (peewee.Update, peewee.Delete)):

        async def fetch_write(database: Any, cursor: Any) -> Any:
            if getattr(query, "_return_cursor", False):
                return await fetch_models(cursor, query)
            return await database.aio_rows_affected(cursor)

        return fetch_write
    if isinstance(query_, (peewee.SelectBase, peewee.RawQuery)):

        async def fetch_rows(database: Any, cursor: Any) -> Any:
            return await fetch_models(cursor, query)

        return fetch_rows
    return None
