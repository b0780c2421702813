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
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any, Literal

import peewee
from peewee_async.result_wrappers import fetch_models

from . import dsn as dsn_mod
from ._compat import bounded, within
from .cluster import Cluster
from .consistency import WAL_POSITION_SQL, WarnOnce, format_lsn, parse_lsn, token_position
from .database import routing_database_for
from .drivers import QUERY_CANCELED, Driver, get_driver, sqlstate_of
from .errors import (
    ClosedError,
    ConfigurationError,
    NodeUnavailableError,
    NoPrimaryError,
    NoReplicaAvailableError,
    PoolTimeoutError,
    ReadOnlyScopeError,
    ReadTimeoutError,
    TopologyError,
)
from .health import HealthMonitor, HealthSettings, ProbeResult, probe
from .node import Node, NodePool, NodeStatus, take_slot
from .policies import POLICIES
from .routing import QueryKind, classify_query, classify_sql
from .sources import PatroniSource

__all__ = ["ReplicaManager"]

logger = logging.getLogger("areplica")

Consistency = Literal["causal", "sticky", "eventual"]
_CONSISTENCY = ("causal", "sticky", "eventual")
FetchResults = Callable[[Any, Any], Awaitable[Any]]


class _Lifecycle(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(frozen=True)
class _Route:
    """A routing scope: ``primary()`` or ``replica(name)``."""

    target: Literal["primary", "replica"]
    name: str | None = None


@dataclass
class _Binding:
    """A connection bound to one manager's scope: a transaction or a pinned connection.

    Child tasks spawned inside the scope share it. ``lock`` keeps their statements from
    using the connection at the same time. ``exclusive`` serializes savepoint blocks: while
    a task is inside a nested ``atomic()``, only that block (its task and the tasks it
    spawns, which inherit the block's id through ``_SAVEPOINTS``) may use the connection;
    other tasks wait for it to release or roll back, so one child's ``ROLLBACK TO
    SAVEPOINT`` can never undo a sibling's work. ``broken``: a statement was cancelled or
    the connection failed; nothing else may run on it, and it is discarded at the end.
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

    def allows(self) -> bool:
        """True when the current task may use the connection now."""
        return self.exclusive is None or self.exclusive in _SAVEPOINTS.get()

    def end_exclusive(self, previous: object | None) -> None:
        """A savepoint block ended: hand the connection back and wake the waiters."""
        self.exclusive = previous
        released, self.released = self.released, asyncio.Event()
        released.set()


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
# The savepoint blocks the current task is inside (ids, outermost first).
_SAVEPOINTS: ContextVar[tuple[object, ...]] = ContextVar("areplica_savepoints", default=())

_REPLAY_SQL = "SELECT pg_last_wal_replay_lsn()::text"
#: The primary's insert position (what a genuine token can be at most) and its flush
#: position (what standbys can have received: WAL is sent once flushed).
_CURRENT_SQL = "SELECT pg_current_wal_insert_lsn()::text, pg_current_wal_flush_lsn()::text"

_OPTION_NAMES = (
    "causal_wait",
    "dsn",
    "members",
    "patroni",
    "primary_wait",
    "close_timeout",
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
    "pool_timeout",
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
        primary: str | Sequence[str] | None = None,
        replicas: Sequence[str] | Mapping[str, str] = (),
        *,
        members: str | Sequence[str] | Mapping[str, str] | None = None,
        patroni: str | Sequence[str] | None = None,
        dsn: str | None = None,
        primary_wait: float | None = None,
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
        pool_timeout: float | None = 30.0,
        close_timeout: float = 5.0,
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
        self.pool_timeout: float | None = _positive("pool_timeout", pool_timeout, allow_none=True)
        if (
            isinstance(close_timeout, bool)
            or not isinstance(close_timeout, (int, float))
            or close_timeout < 0
        ):
            raise ConfigurationError(
                f"close_timeout: expected seconds >= 0, got {close_timeout!r}",
                option="close_timeout",
            )
        self.close_timeout = float(close_timeout)
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

        # Members: roles are discovered, never configured. ``primary`` and ``replicas``
        # name the first members ("primary", "replica-N"); ``members`` adds more; a libpq
        # multi-host DSN is one member per host; ``patroni`` adds and removes members
        # at run time (see sources.py).
        self._cluster = Cluster(name)
        entries: list[tuple[str, str, str]] = []  # (name, dsn, option)
        if primary is not None:
            candidates = [primary] if isinstance(primary, str) else list(primary)
            if not candidates:
                raise ConfigurationError(
                    "primary: expected a DSN or a list of DSNs", option="primary"
                )
            for index, text in enumerate(candidates, start=1):
                entries.append(
                    ("primary" if len(candidates) == 1 else f"primary-{index}", text, "primary")
                )
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
        entries.extend((node_name, text, "replicas") for node_name, text in items)
        if isinstance(members, str):
            members = [members]
        member_items = (
            list(members.items())
            if isinstance(members, Mapping)
            else [(f"member-{i}", text) for i, text in enumerate(members or (), start=1)]
        )
        entries.extend((node_name, text, "members") for node_name, text in member_items)
        self._template: dsn_mod.NodeDSN | None = None
        if dsn is not None:
            self._template = dsn_mod.parse(dsn, option="dsn")
        for node_name, text, option in entries:
            for member_name, parsed in dsn_mod.expand_hosts(
                node_name, dsn_mod.parse(text, option=f"{option}[{node_name}]")
            ):
                role: Literal["primary", "replica"] = (
                    "primary" if option == "primary" else "replica"
                )
                try:
                    self._cluster.add(self._make_node(member_name, parsed, role, option))
                except ConfigurationError as exc:
                    raise ConfigurationError(str(exc), option=option) from None
        self._source: PatroniSource | None = None
        if patroni is not None:
            urls = [patroni] if isinstance(patroni, str) else list(patroni)
            template = self._template or next((n.dsn for n in self._cluster), None)
            if not urls or template is None:
                raise ConfigurationError(
                    "patroni: expected REST URLs and a dsn= template (user, password, "
                    "dbname) for the members it discovers",
                    option="patroni",
                )
            self._source = PatroniSource(urls, name=name, timeout=health_timeout)
            self._template = template
        if not len(self._cluster) and self._source is None:
            raise ConfigurationError(
                "no members: give primary=/replicas=, members=, or patroni=", option="members"
            )

        self._weights = dict(weights or {})
        for node_name, weight in self._weights.items():
            member = self._cluster.get(node_name)
            if member is None:
                raise ConfigurationError(
                    f"weights: {node_name!r} is not a member (members: {self._cluster.names})",
                    option="weights",
                )
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
                raise ConfigurationError(
                    f"weights: weight of {node_name!r} must be a number >= 0, got {weight!r}",
                    option="weights",
                )
            member.read_weight = float(weight)
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

        self._lifecycle = _Lifecycle.NEW
        self._closed = asyncio.Event()
        self._connecting = asyncio.Lock()
        self._switching = False
        if primary_wait is None:
            primary_wait = 5.0 if self._source is not None else 0.0
        if (
            isinstance(primary_wait, bool)
            or not isinstance(primary_wait, (int, float))
            or primary_wait < 0
        ):
            raise ConfigurationError(
                f"primary_wait: expected seconds >= 0, got {primary_wait!r}",
                option="primary_wait",
            )
        #: How long a write waits for a primary while none is usable (a switchover).
        self.primary_wait = float(primary_wait)
        self._key = object()
        self._monitor: HealthMonitor | None = None
        self._callbacks: list[Callable[[NodeStatus, NodeStatus], Any]] = []
        self._sp_counter = itertools.count(1)
        self.fallback_reads = 0
        self.retried_reads = 0
        self.caught_up_reads = 0
        self._highest_lsn = 0
        self._warned = WarnOnce(maxsize=1024)
        first = self._template or next(iter(self._cluster)).dsn
        self.database: Any = routing_database_for(
            self, self._driver.name, first.params.get("dbname")
        )

    # ------------------------------------------------------------------ construction helpers

    def _make_node(
        self, name: str, parsed: dsn_mod.NodeDSN, role: Literal["primary", "replica"], option: str
    ) -> Node:
        connect_timeout = self.health_timeout
        raw = parsed.params.get("connect_timeout")
        if raw is not None:
            try:
                connect_timeout = max(connect_timeout, float(raw))
            except ValueError:
                raise ConfigurationError(
                    f"{option}[{name}]: connect_timeout {raw!r} is not a number", option=option
                ) from None
        node = Node(
            name,
            parsed,
            role=role,
            driver=self._driver,
            pool_size=self.pool_size,
            connect_timeout=connect_timeout,
            pool_timeout=self.pool_timeout,
        )
        node.primary_weight = self.primary_weight
        node.source = option

        async def cancel_backend(pid: int, timeout: float) -> None:
            if self._monitor is not None:
                await self._monitor.cancel_backend(node, pid, timeout)

        async def backend_gone(pid: int, timeout: float) -> None:
            if self._monitor is not None:
                await self._monitor.wait_backend_gone(node, pid, timeout)

        node.canceller = cancel_backend
        node.exit_waiter = backend_gone
        return node

    @classmethod
    def from_env(cls, prefix: str = "AREPLICA_", **overrides: Any) -> ReplicaManager:
        """Build a manager from ``{prefix}PRIMARY``, ``{prefix}REPLICAS`` and option variables.

        ``PRIMARY`` and ``REPLICAS`` hold DSNs separated by ``;`` or newlines (commas belong to
        libpq multi-host URLs). Options are upper-cased: ``AREPLICA_POOL_SIZE=20``,
        ``AREPLICA_MAX_LAG=5``, ``AREPLICA_FALLBACK_TO_PRIMARY=false``, ``AREPLICA_MAX_LAG=none``.
        """
        env = os.environ
        primary_text = env.get(f"{prefix}PRIMARY", "")
        primaries = dsn_mod.split_dsns(primary_text)
        if not primaries:
            raise ConfigurationError(f"{prefix}PRIMARY is not set", option="primary")
        replicas = dsn_mod.split_dsns(env.get(f"{prefix}REPLICAS", ""))
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
        """Probe every member once, discover roles, and start the health task.

        Raises ``NoPrimaryError`` when no member answers within ``health_timeout``,
        ``TopologyError`` when members answer but none is out of recovery (or two are, on
        one timeline). A standby that does not answer is not fatal: it starts ``down`` and
        the health task readmits it later. Concurrent callers share one connect; after
        ``close()`` it reopens the manager.
        """
        async with self._connecting:
            await self._connect()

    async def _connect(self) -> None:
        if self._lifecycle is _Lifecycle.OPEN:
            return
        if self._lifecycle is _Lifecycle.CLOSING:
            raise ClosedError(f"manager {self.name!r} is closing; connect() again after it")
        if self._lifecycle is _Lifecycle.CLOSED:
            # Reopen (peewee-async's aio_close() then aio_connect()): fresh pools, roles
            # discovered again, a new health task.
            for node in self._cluster:
                node.reset_pool()
                node.state = "down"
            self._cluster.reset()
        monitor = HealthMonitor(
            self._cluster,
            HealthSettings(
                name=self.name,
                interval=self.health_interval,
                timeout=self.health_timeout,
                fail_after=self.fail_after,
                recover_after=self.recover_after,
                max_lag=self.max_lag,
                max_lag_bytes=self.max_lag_bytes,
                slow_factor=self.slow_factor,
            ),
            self._callbacks,
            before_round=self._refresh_members if self._source is not None else None,
        )
        if self._source is not None:
            await self._refresh_members()
        nodes = list(self._cluster)
        results = await asyncio.gather(
            *(probe(node, self.health_timeout) for node in nodes), return_exceptions=True
        )
        outcome: dict[Node, ProbeResult | BaseException] = {}
        for node, result in zip(nodes, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result
            outcome[node] = result
            if isinstance(result, ProbeResult):
                node.latency_ms = result.latency_ms
            else:
                node.note_error(result)
                logger.warning(
                    "%s: %s is unreachable at connect, starting down: %s",
                    self.name,
                    node.label,
                    node.last_error,
                )
        monitor.seed(outcome)
        cluster = self._cluster
        if cluster.primary is None:
            reachable = [n for n in nodes if isinstance(outcome[n], ProbeResult)]
            detail = "; ".join(f"{n.label}: {n.last_error}" for n in nodes)
            first = nodes[0] if nodes else None
            if cluster.split_brain:
                raise TopologyError(
                    f"{self.name}: more than one member is out of recovery on the same "
                    "timeline; refusing to guess (split brain)",
                    node=first.name if first else None,
                )
            if reachable:
                raise TopologyError(
                    f"{self.name}: no member is out of recovery: "
                    f"{', '.join(n.label for n in reachable)} are all standbys "
                    "(pg_is_in_recovery() is true)",
                    node=reachable[0].name,
                )
            raise NoPrimaryError(
                f"{self.name}: no primary reachable within {self.health_timeout:g}s ({detail})",
                node=first.name if first else None,
            )
        self._monitor = monitor
        self._lifecycle = _Lifecycle.OPEN
        # The connecting task's work is one consistency session, shared by reference with
        # every task it spawns: a write in a child advances the token its parent and
        # later siblings read with (per-request sessions come from mgr.session() and the
        # framework middleware).
        if self._session() is None:
            _SESSION.set(MappingProxyType({**_SESSION.get(), self._key: _Session()}))
        self._monitor.start()
        logger.info("%s: connected: %s", self.name, ", ".join(f"{n.name}={n.state}" for n in nodes))

    async def close(self) -> None:
        """Drain and close: stop the health task, let queries finish, close every pool.

        New calls raise ``ClosedError`` at once. Queries in flight get ``close_timeout``
        seconds to finish; then they are cancelled on the server and raise ``ClosedError``.
        No node state changes are logged during shutdown. Idempotent; ``connect()`` may
        reopen the manager afterwards.
        """
        if self._lifecycle is _Lifecycle.CLOSING:
            await self._closed.wait()
            return
        if self._lifecycle is not _Lifecycle.OPEN:
            self._lifecycle = _Lifecycle.CLOSED
            return
        self._lifecycle = _Lifecycle.CLOSING
        self._closed = asyncio.Event()
        try:
            if self._monitor is not None:
                await self._monitor.halt()  # no more rounds, no state changes logged
            await asyncio.gather(*(node.pool.close(self.close_timeout) for node in self._cluster))
            if self._monitor is not None:
                await self._monitor.stop()  # probe connections last: cancels may use them
        finally:
            self._lifecycle = _Lifecycle.CLOSED
            self._closed.set()
        logger.info("%s: closed", self.name)

    def _require_open(self) -> None:
        if self._lifecycle is not _Lifecycle.OPEN:
            raise self._not_open()

    def _cut_by_close(self, exc: BaseException) -> bool:
        """True when ``exc`` is close() at work: a pool closed, or a query it cancelled."""
        if self.is_open:
            return False
        return (
            isinstance(exc, NodeUnavailableError)
            or self._driver.is_disconnect(exc)
            or sqlstate_of(exc) == QUERY_CANCELED
        )

    def _not_open(self) -> ClosedError:
        state = {
            _Lifecycle.NEW: "not connected",
            _Lifecycle.CLOSING: "closing",
            _Lifecycle.CLOSED: "closed",
        }.get(self._lifecycle, self._lifecycle.value)
        return ClosedError(f"manager {self.name!r} is {state}: use `async with mgr:` or connect()")

    # ------------------------------------------------------------------ topology

    @property
    def cluster(self) -> Cluster:
        """The members, their identity and discovered roles (read it; do not assign)."""
        return self._cluster

    @property
    def _primary(self) -> Node | None:
        return self._cluster.primary

    def _all_nodes(self) -> list[Node]:
        return list(self._cluster)

    def status(self) -> list[NodeStatus]:
        """Every member's status, without I/O."""
        return [node.status() for node in self._cluster]

    async def check(self) -> list[NodeStatus]:
        """Probe every member now (one health round) and return their statuses."""
        self._require_open()
        assert self._monitor is not None
        await self._monitor.round()
        return self.status()

    def on_state_change(self, callback: Callable[[NodeStatus, NodeStatus], Any]) -> None:
        """Call ``callback(old, new)`` (sync or async) whenever a node changes state."""
        self._callbacks.append(callback)

    async def add_member(self, dsn: str, name: str | None = None) -> NodeStatus:
        """Add a member at run time; its role is discovered by its first probe."""
        self._require_open()
        assert self._monitor is not None
        node_name = name or f"member-{len(self._cluster) + 1}"
        while name is None and node_name in self._cluster:
            node_name = f"{node_name}x"
        node = self._make_node(node_name, dsn_mod.parse(dsn, option="dsn"), "replica", "dsn")
        self._cluster.add(node)
        await self._monitor.round(only=[node])
        return node.status()

    async def add_replica(self, dsn: str, name: str | None = None) -> NodeStatus:
        """Add a member expected to be a standby (``add_member`` with a replica name)."""
        if name is None:
            name = f"replica-{len(self._cluster)}"
            while name in self._cluster:
                name = f"{name}x"
        return await self.add_member(dsn, name)

    async def remove_member(self, name: str, *, timeout: float = 30.0) -> None:
        """Stop routing to a member, wait for its in-flight queries, close its pool."""
        node = self._cluster.get(name)
        if node is None:
            raise ConfigurationError(f"remove_member: no member named {name!r}", option="name")
        node.retired = True
        if node.in_flight:
            await within(node.drained(), timeout)
        self._cluster.remove(name)
        if self._monitor is not None:
            await self._monitor.forget(node)
        await node.pool.close()

    remove_replica = remove_member

    async def _refresh_members(self) -> None:
        """Apply the member source's view (Patroni): members added, removed, tagged."""
        source = self._source
        template = self._template
        if source is None or template is None:
            return
        view = await source.fetch()
        if view is None:
            return
        for member in view.members:
            node = self._cluster.get(member.name)
            if node is None:
                parsed = template.with_address(member.host, member.port)
                clash = [n for n in self._cluster if n.dsn.address == parsed.address]
                if clash:  # a static entry for the same server: Patroni's name wins
                    node = clash[0]
                else:
                    node = self._make_node(member.name, parsed, "replica", "patroni")
                    self._cluster.add(node)
                    logger.info("%s: member %s added (Patroni)", self.name, node.label)
            node.read_weight = 0.0 if member.noloadbalance else self._weights.get(node.name, 1.0)
            node.paused = not member.serving
        names = {m.name for m in view.members}
        for node in list(self._cluster):
            if node.name not in names and node.source == "patroni" and not node.retired:
                logger.info("%s: member %s left the cluster (Patroni)", self.name, node.label)
                self._cluster.remove(node.name)
                if self._monitor is not None:
                    await self._monitor.forget(node)
                await node.pool.close()
        self._switching = view.switching

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
        """Reads inside go to standby ``name`` (or any eligible one); writes raise."""
        if name is not None and name not in self._cluster:
            raise ConfigurationError(
                f"replica: no member named {name!r} (members: {self._cluster.names})",
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
            async with self._savepoint(outer):
                yield outer
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
            node, conn = await self._primary_connection()
            binding = _Binding(node, conn, transaction=True)
            token = _BOUND.set(MappingProxyType({**_BOUND.get(), self._key: binding}))
        try:
            await self._run_bound(binding, "BEGIN", None, None)
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
            await self._run_bound(binding, "COMMIT", None, None)
            if binding.wrote:
                await self._after_write_bound(binding)
        finally:
            if token is not None:
                binding.active = False
                _BOUND.reset(token)
                binding.node.pool.release(binding.conn, discard=binding.broken)
            else:
                binding.transaction = False
                binding.wrote = False

    @contextlib.asynccontextmanager
    async def _savepoint(self, binding: _Binding) -> AsyncIterator[None]:
        """A nested ``atomic()``: a savepoint that owns the shared connection until it ends.

        Concurrent children each opening a nested ``atomic()`` run one after the other
        (see ``_Binding``); the block's statements, and those of tasks it spawns, pass.
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
            await self._run_bound(binding, f"SAVEPOINT {name}", None, None)
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
        self, binding: _Binding, name: str, previous: object | None, *, rollback: bool
    ) -> None:
        try:
            if not rollback:
                await self._run_bound(binding, f"RELEASE SAVEPOINT {name}", None, None)
            elif not binding.broken:
                await self._run_bound(binding, f"ROLLBACK TO SAVEPOINT {name}", None, None)
        finally:
            binding.end_exclusive(previous)

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
        node, conn = await self._primary_connection()
        binding = _Binding(node, conn, transaction=False)
        token = _BOUND.set(MappingProxyType({**_BOUND.get(), self._key: binding}))
        try:
            yield conn
        finally:
            binding.active = False
            _BOUND.reset(token)
            node.pool.release(conn, discard=binding.broken)

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
        ``client``, in bounded memory, without its text), and one beyond every position
        known is clamped (see README).
        """
        lsn = None
        if token:
            try:
                lsn = parse_lsn(token)  # refuses anything long before looking at it
            except ValueError:
                self._warn_once(
                    client,
                    "malformed",
                    f"ignoring a malformed causal token ({len(token)} characters)",
                )
        session = _Session(lsn, external=lsn is not None)
        session.client = client
        reset = _SESSION.set(MappingProxyType({**_SESSION.get(), self._key: session}))
        try:
            yield session
        finally:
            _SESSION.reset(reset)

    def _warn_once(self, client: str | None, kind: str, message: str) -> None:
        """Log ``message`` once per (client, kind); bounded memory, keyed by a hash."""
        if self._warned.should_warn(client, kind):
            shown = "unknown" if client is None else repr(client[:60])
            logger.warning("%s: %s (client %s)", self.name, message, shown)

    async def _vet_token(self, session: _Session) -> None:
        """Clamp an external token beyond every position known (a forged or absurd one).

        A token at or below the highest position any member has shown (probes, own
        writes) is fine. One beyond it may be another process's write that the last probe
        missed, or garbage: the primary's current position, read now, decides. When the
        primary cannot answer, the highest position known from any member does, so a
        forged token never makes a read fail while standbys answer. This happens once per
        session, and only for such tokens.
        """
        session.external = False
        lsn = session.lsn
        if lsn is None:
            return
        known = max((n.lsn or 0 for n in self._cluster), default=0)
        self._highest_lsn = max(self._highest_lsn, known)
        if lsn <= self._highest_lsn:
            return
        current = clamp = self._highest_lsn
        primary = self._usable_primary()
        if primary is not None:
            try:
                row = await self._run_read(primary, _CURRENT_SQL, None, _fetchone_raw, count=False)
                current = max(current, token_position(parse_lsn(row[0])))
                # A record inserted but not yet flushed (an asynchronous commit, a
                # background record) reaches no standby until the WAL writer flushes it
                # (up to wal_writer_delay): a clamp there would send the reads to the
                # primary. A forged token stands for no write of ours, so the clamp goes to
                # what standbys can have: the flush position.
                clamp = token_position(parse_lsn(row[1]))
            except Exception:
                pass  # the highest position known from any member decides
        self._highest_lsn = max(self._highest_lsn, current)
        if lsn > current:
            session.lsn = min(clamp, current)
            self._warn_once(
                session.client,
                "clamped",
                f"a causal token beyond every known WAL position ({format_lsn(current)}) "
                f"was clamped to {format_lsn(session.lsn)}",
            )

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

    async def _hold(self, binding: _Binding) -> None:
        """Take the binding's statement lock once this task may use the connection."""
        while True:
            while not binding.allows():
                await binding.released.wait()
            await binding.lock.acquire()
            if binding.allows():
                return
            binding.lock.release()

    async def _run_bound(
        self, binding: _Binding, sql: str, params: Sequence[Any] | None, fetch: FetchResults | None
    ) -> Any:
        node = binding.node
        await self._hold(binding)
        try:
            if binding.broken:
                raise NodeUnavailableError(
                    f"{self.name}: the connection of this transaction on {node.label} was lost "
                    "(a statement was cancelled or failed at the connection level); the "
                    "transaction is rolled back and nothing more runs on it",
                    node=node.name,
                )
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
                if self._cut_by_close(exc):
                    binding.broken = True
                    raise self._not_open() from exc
                raise
            except BaseException:
                # Cancelled mid-statement: the connection's state is unknown. It is
                # cancelled on the server and discarded when the scope ends.
                binding.broken = True
                raise
            finally:
                node.done()
        finally:
            binding.lock.release()

    # -- writes

    def _usable_primary(self) -> Node | None:
        node = self._cluster.primary
        if node is None or node.state != "up" or node.paused or self._cluster.split_brain:
            return None
        return node

    async def _primary_connection(self) -> tuple[Node, Any]:
        """The primary and a connection to it, for a write or a transaction.

        While there is no usable primary, or connecting to it fails (a switchover stops the
        old primary before the new one is known), wait up to ``primary_wait``. Nothing has
        been sent at that point, so trying again never sends a write twice.
        """
        if self.primary_wait <= 0:
            node = await self._writable_primary(None)
            return node, await self._acquire_for_write(node)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.primary_wait
        while True:
            node = await self._writable_primary(deadline)
            try:
                return node, await self._acquire_for_write(node)
            except NoPrimaryError:
                if loop.time() >= deadline:
                    raise
                await asyncio.sleep(0.05)

    async def _writable_primary(self, deadline: float | None) -> Node:
        """The primary for a write; while there is none, wait until ``deadline``."""
        node = self._usable_primary()
        if node is not None:
            return node
        if deadline is not None:
            loop = asyncio.get_running_loop()
            if self._monitor is not None:
                self._monitor.wake()
            while node is None and loop.time() < deadline:
                await asyncio.sleep(0.02)
                self._require_open()
                node = self._usable_primary()
            if node is not None:
                return node
        node = self._cluster.primary
        if self._cluster.split_brain:
            raise NoPrimaryError(
                f"{self.name}: more than one node is out of recovery (split brain); "
                "refusing writes, the write was not sent",
                node=node.name if node else None,
            )
        if node is None:
            reason = "no primary is known"
        elif node.paused:
            reason = f"primary {node.label} is stopping (per its HA manager)"
        else:
            reason = f"primary {node.label} is {node.state}"
        waited = f" after waiting {self.primary_wait:g}s" if self.primary_wait > 0 else ""
        raise NoPrimaryError(
            f"{self.name}: {reason}{waited}; the write was not sent",
            node=node.name if node else None,
        )

    async def _acquire_for_write(self, node: Node) -> Any:
        try:
            return await node.pool.acquire()
        except Exception as exc:
            if not self.is_open:
                raise self._not_open() from exc
            if isinstance(exc, PoolTimeoutError):
                raise  # load, not a dead primary
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
        node, conn = await self._primary_connection()
        discard = True
        node.in_flight += 1
        try:
            with peewee.__exception_wrapper__:  # type: ignore[attr-defined]
                async with conn.cursor() as cursor:
                    await cursor.execute(sql, params or ())
                    # The statement ran (autocommit: it committed). Whatever the result
                    # handling does next, the session's token must cover it.
                    fetch_error: Exception | None = None
                    result = None
                    if fetch is not None:
                        try:
                            result = await fetch(self.database, cursor)
                        except Exception as exc:
                            fetch_error = exc
                    lsn = None
                    if self.consistency == "causal":
                        # A second statement, after the write's own (autocommit) transaction
                        # ended: the position then covers its commit record. psycopg's
                        # pipeline mode could send both at once but was measured slower here
                        # (see benchmarks/README.md), so both drivers do this.
                        await cursor.execute(WAL_POSITION_SQL)
                        row = await cursor.fetchone()
                        lsn = token_position(parse_lsn(row[0]))
                node.writes += 1
                self._note_write(lsn)
                if fetch_error is not None:
                    raise fetch_error  # inside the wrapper: peewee's error types, as before
            discard = False
            return result
        except Exception as exc:
            if self._cut_by_close(exc):
                raise self._not_open() from exc
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
            node.pool.release(conn, discard=discard)

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
        spill: bool = True,
    ) -> list[Node]:
        out = []
        for node in self._cluster.readers():
            if node.state != "up" or node in exclude or node.weight <= 0 or node.paused:
                continue
            if max_staleness is not None and (
                node.lag_seconds is None or node.lag_seconds > max_staleness
            ):
                continue
            if min_lsn is not None and (node.lsn is None or node.lsn < min_lsn):
                continue
            out.append(node)
        primary = self._cluster.primary
        if (
            with_primary
            and self.primary_weight > 0
            and primary is not None
            and primary.state == "up"
            and not primary.paused
            and primary not in exclude
        ):
            out.append(primary)  # one more reader, always caught up, at primary_weight
        if spill and len(out) > 1 and any(node.pool.saturated for node in out):
            # A node whose every connection is taken (load, or queries stuck on a hung
            # server) makes a read wait; spill to one with room when there is one.
            free = [node for node in out if not node.pool.saturated]
            if free:
                return free
        return out

    def _read_target(
        self,
        route: _Route | None,
        exclude: set[Node],
        max_staleness: float | None,
        session: _Session | None = None,
    ) -> Node:
        """Pick the node for a read (rules 2, 4 and 5 of DESIGN.md)."""
        return self._pick(self._read_candidates(route, exclude, max_staleness, session))

    def _pick(self, nodes: list[Node]) -> Node:
        """The policy's choice among a read's candidates (no call for a single one)."""
        return nodes[0] if len(nodes) == 1 else self._policy(nodes)

    def _read_candidates(
        self,
        route: _Route | None,
        exclude: set[Node],
        max_staleness: float | None,
        session: _Session | None,
    ) -> list[Node]:
        """The nodes a read may go to now, those with a free connection first.

        More than one only for a choice of the policy: the eligible replicas, and only the
        ones with room when some have (``_eligible``). Raises ``_CatchUp`` when the
        session's replicas must be waited for.
        """
        if route is not None and route.target == "primary":
            return [self._readable_primary()]
        if route is not None and route.name is not None:
            node = self._cluster.get(route.name)
            if node is None or node.retired or node.state == "down" or node in exclude:
                state = "removed" if node is None or node.retired else node.state
                raise NodeUnavailableError(
                    f"{self.name}: replica {route.name!r} is {state}", node=route.name
                )
            return [node]
        if (
            route is None
            and session is not None
            and self.consistency == "sticky"
            and session.last_write is not None
            and time.monotonic() - session.last_write < self.sticky_for
        ):
            return [self._readable_primary()]
        min_lsn = self._min_lsn(session)
        eligible = self._eligible(exclude, max_staleness, min_lsn, with_primary=route is None)
        if eligible:
            return eligible
        if min_lsn is not None and self.causal_wait > 0:
            behind = self._eligible(exclude, max_staleness, None)
            if behind:
                raise _CatchUp(behind, min_lsn)
        return [self._fallback(route)]

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
        node = self._cluster.primary
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
        deadline: float | None = None
        while True:
            try:
                nodes = self._read_candidates(route, tried, max_staleness, session)
                node = self._pick(nodes)
            except _CatchUp as wait:
                node = await self._catch_up(wait.nodes, wait.lsn) or self._fallback(route)
                nodes = [node]
            held: NodePool | None = None
            try:
                if node.pool.saturated and len(nodes) > 1:
                    # Every candidate is busy (the choice prefers one with room): take the
                    # first slot freed on any of them, rather than queue behind one node
                    # whose queries may be stuck on a hung server.
                    if deadline is None and self.pool_timeout is not None:
                        deadline = asyncio.get_running_loop().time() + self.pool_timeout
                    held, node = await self._slot_on_any(nodes, deadline)
                    if held.closed or not self._still_eligible(
                        node, route, tried, max_staleness, session
                    ):
                        # Evicted, paused, lagging or closed while we waited: choose again.
                        held.free_slot()
                        self._require_open()
                        continue
                return await self._run_read(node, sql, params, fetch, held=held)
            except Exception as exc:
                if self._cut_by_close(exc):
                    raise self._not_open() from exc
                if node is not self._primary and self._driver.is_read_only_violation(exc):
                    logger.warning(
                        "%s: replica %s refused a query classified as a read (SQLSTATE 25006); "
                        "running it once on the primary: %.80r",
                        self.name,
                        node.name,
                        sql,
                    )
                    return await self._write(sql, params, fetch)
                if isinstance(exc, (ReadTimeoutError, PoolTimeoutError)):
                    # A slow query or a busy pool: try elsewhere, but the node is not down.
                    retry = True
                elif self._driver.is_disconnect(exc) or isinstance(exc, NodeUnavailableError):
                    retry = True
                    node.note_error(exc)
                    self._connection_failed(node, exc)
                else:
                    retry = self._driver.is_recovery_conflict(exc) and node is not self._primary
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

    def _still_eligible(
        self,
        node: Node,
        route: _Route | None,
        tried: set[Node],
        max_staleness: float | None,
        session: _Session | None,
    ) -> bool:
        """Whether ``node``, chosen before a wait for a slot, may still serve the read."""
        eligible = self._eligible(
            tried, max_staleness, self._min_lsn(session), with_primary=route is None, spill=False
        )
        return node in eligible

    def _min_lsn(self, session: _Session | None) -> int | None:
        """The WAL position a read of ``session`` needs a replica to have replayed."""
        return session.lsn if session is not None and self.consistency == "causal" else None

    async def _slot_on_any(
        self, nodes: Sequence[Node], deadline: float | None
    ) -> tuple[NodePool, Node]:
        """A connection slot on the first of ``nodes`` to free one, held by the caller.

        Raises ``PoolTimeoutError`` once ``deadline`` (``pool_timeout``) has passed.
        """
        pools = {node.pool: node for node in nodes}
        remaining = None
        if deadline is not None:
            remaining = max(0.0, deadline - asyncio.get_running_loop().time())
        held = await take_slot(tuple(pools), remaining)
        if held is None:
            names = ", ".join(repr(node.name) for node in nodes)
            raise PoolTimeoutError(
                f"{self.name}: every connection of {names} stayed busy for "
                f"{self.pool_timeout:g}s (pool_timeout); nothing was sent",
                node=nodes[0].name,
                timeout=self.pool_timeout,
            )
        return held, pools[held]

    async def _catch_up(self, nodes: list[Node], lsn: int) -> Node | None:
        """Poll the replicas' replay positions until one reaches ``lsn`` or ``causal_wait``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.causal_wait
        delay = 0.001  # replication on a LAN takes about a millisecond: look again soon
        while True:
            # Bounded by causal_wait: a hung replica must not hold the read longer.
            answered, positions = await within(
                asyncio.gather(
                    *(self._replay_position(node) for node in nodes), return_exceptions=True
                ),
                max(deadline - loop.time(), 0.001),
            )
            if not answered or positions is None:
                return None
            ready = [
                node
                for node, position in zip(nodes, positions, strict=True)
                if isinstance(position, int) and position >= lsn and node.state == "up"
            ]
            if ready:
                self.caught_up_reads += 1
                return self._pick(ready)
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
        held: NodePool | None = None,
    ) -> Any:
        """Run a read on ``node``; ``held``: a slot of its pool the caller already took."""
        node.in_flight += 1
        conn = None
        pool = node.pool if held is None else held
        # Only a broken connection is discarded. After a cancellation or a timeout the pool
        # looks at it: one still running is cancelled on the server and closed; one the
        # driver already cancelled and drained (psycopg) is idle and simply reused.
        discard = False
        try:
            # The pool wait has its own bound (pool_timeout); read_timeout bounds the query.
            conn = await pool.acquire(slot_taken=held is not None)
            try:
                result = await bounded(self._query(conn, sql, params, fetch), self.read_timeout)
            except asyncio.TimeoutError as exc:
                raise ReadTimeoutError(
                    f"{self.name}: a read on {node.label} ran longer than read_timeout "
                    f"({self.read_timeout:g}s); cancelled on the server",
                    node=node.name,
                    timeout=self.read_timeout,
                ) from exc
            if count:
                node.reads += 1
            return result
        except Exception as exc:
            discard = self._driver.is_disconnect(exc)
            raise
        finally:
            node.done()
            if conn is not None:
                pool.release(conn, discard=discard)

    async def _query(
        self, conn: Any, sql: str, params: Sequence[Any] | None, fetch: FetchResults | None
    ) -> Any:
        with peewee.__exception_wrapper__:  # type: ignore[attr-defined]
            async with conn.cursor() as cursor:
                await cursor.execute(sql, params or ())
                return await fetch(self.database, cursor) if fetch else None

    def _connection_failed(self, node: Node, exc: BaseException) -> None:
        """Passive detection: a connection-level failure takes the node down at once."""
        if self._monitor is not None and self.is_open:
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


def _coerce_env(option: str, raw: str, default: Any) -> Any:
    text = raw.strip()
    if text.lower() in ("none", "null", "") and option in (
        "max_lag",
        "max_lag_bytes",
        "read_timeout",
        "pool_timeout",
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
    node = mgr.cluster.get(on)
    if node is not None:
        return _Route("primary") if node is mgr.cluster.primary else _Route("replica", on)
    raise ConfigurationError(
        f"on: expected 'primary', 'replica' or a member name {mgr.cluster.names}, got {on!r}",
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
