"""``ReplicaManager``: the facade users hold.

It builds the pieces (options, members, the engine and the routing database), moves the
lifecycle (``connect``/``close``), keeps the membership (static members, runtime additions
and removals, a Patroni source), and offers the public API: scopes (``atomic()``,
``transaction()``, ``primary()``, ``replica()``, ``session()``), ``token``, status, and the
peewee-async 0.x query methods (``queries.py``). Routing itself lives in the engine's
modules: ``reads.py``, ``writes.py``, ``transactions.py``, ``sessions.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal

from . import dsn as dsn_mod
from ._compat import within
from .cluster import Cluster
from .core import Core, Lifecycle
from .database import bind_routing_database, not_initialised, routing_database_for
from .drivers import get_driver
from .engine import Engine
from .errors import ClosedError, ConfigurationError, NoPrimaryError, TopologyError
from .health import HealthMonitor, HealthSettings
from .membership import MemberTracker
from .node import Node, NodeStatus
from .options import Options
from .policies import POLICIES
from .probe import ProbeResult
from .queries import QueryAPI
from .sessions import UNKNOWN_LSN, Route, Session
from .sources import PatroniSource, PatroniView
from .transactions import Binding

__all__ = ["ReplicaManager"]

logger = logging.getLogger("areplica")

#: (member name, DSN text, the option it came from)
_Entry = tuple[str, str, str]


class ReplicaManager(QueryAPI):
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
        patroni: str | Sequence[str] | PatroniSource | None = None,
        dsn: str | None = None,
        **options: Any,
    ) -> None:
        self._connecting = asyncio.Lock()
        self._closed = asyncio.Event()
        self._callbacks: list[Callable[[NodeStatus, NodeStatus], Any]] = []
        self._option_args: dict[str, Any] = {}
        self.driver_name: str = ""
        self.database: Any = None
        # Without members the manager is deferred (peewee's Database(None)): init() later.
        self._configure(primary, replicas, members, patroni, dsn, options)

    def init(
        self,
        primary: str | Sequence[str] | None = None,
        replicas: Sequence[str] | Mapping[str, str] = (),
        *,
        members: str | Sequence[str] | Mapping[str, str] | None = None,
        patroni: str | Sequence[str] | PatroniSource | None = None,
        dsn: str | None = None,
        **options: Any,
    ) -> None:
        """Give the manager its members (and options): peewee's deferred initialisation.

        ``ReplicaManager()`` without members is *deferred*: models may already be bound to
        ``mgr.database`` (or to a ``peewee.DatabaseProxy`` pointed at it), and any use
        raises until ``init(primary=..., replicas=..., **options)`` (same arguments as the
        constructor) gives the members. Options accumulate: those given to the constructor
        or an earlier ``init()`` stay unless given again. Allowed while the manager is new
        or closed (it starts afresh: roles, sessions and counters are forgotten), else
        ``ConfigurationError``; ``mgr.database`` stays the same object, with the dialect of
        the constructor's ``driver``. A failed ``init()`` changes nothing.
        """
        core = self._core
        if self._connecting.locked() or core.lifecycle not in (Lifecycle.NEW, Lifecycle.CLOSED):
            state = "connecting" if self._connecting.locked() else core.lifecycle.value
            raise ConfigurationError(
                f"init: manager {self.name!r} is {state}; init() is allowed only while it is "
                "new or closed (await mgr.close() first)",
                option="init",
            )
        if primary is None and not replicas and members is None and patroni is None:
            raise ConfigurationError(
                "init: no members: give primary=/replicas=, members=, or patroni=",
                option="members",
            )
        saved = dict(self.__dict__)
        try:
            self._configure(primary, replicas, members, patroni, dsn, options)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise

    @property
    def deferred(self) -> bool:
        """True while the manager has no members: created without them, before ``init()``."""
        return self._deferred

    def _configure(
        self,
        primary: str | Sequence[str] | None,
        replicas: Sequence[str] | Mapping[str, str],
        members: str | Sequence[str] | Mapping[str, str] | None,
        patroni: str | Sequence[str] | PatroniSource | None,
        dsn: str | None,
        options: Mapping[str, Any],
    ) -> None:
        """Build options, members, engine; (re)bind ``mgr.database`` to them. No I/O."""
        arguments = {**self._option_args, **options}
        self.options = Options.build(arguments)
        self._option_args = arguments
        self.name = self.options.name
        driver = get_driver(self.options.driver)
        if self.database is not None and driver.name != self.driver_name:
            raise ConfigurationError(
                f"driver: mgr.database was created for {self.driver_name!r} (its SQL dialect); "
                f"pass driver={driver.name!r} to ReplicaManager() instead of init()",
                option="driver",
            )
        self.driver_name = driver.name
        self._cluster = Cluster(self.name)
        self._core = Core(self.options, driver, self._cluster)
        self._template = dsn_mod.parse(dsn, option="dsn") if dsn is not None else None
        for entry in _member_entries(primary, replicas, members):
            self._add_entry(*entry)
        self._source = self._patroni_source(patroni)
        self._tracker = MemberTracker(self.name, interval=self.options.health_interval)
        self._deferred = not len(self._cluster) and self._source is None
        self._weights = dict(self.options.weights or {})
        if not self._deferred:  # weights name members: checked once there are some
            self._apply_weights()
        self._core.primary_wait = self.options.resolved_primary_wait(
            with_source=self._source is not None
        )
        self._engine = Engine(self._core, _policy(self.options.policy))
        first = self._template or next((n.dsn for n in self._cluster), None)
        if self.database is None:
            self.database = routing_database_for(driver.name)
        dbname = first.params.get("dbname") if first is not None else None
        bind_routing_database(self.database, self._engine, self, dbname, deferred=self._deferred)

    # ------------------------------------------------------------------ construction helpers

    def _add_entry(self, name: str, text: str, option: str) -> None:
        role: Literal["primary", "replica"] = "primary" if option == "primary" else "replica"
        parsed = dsn_mod.parse(text, option=f"{option}[{name}]")
        for member_name, member_dsn in dsn_mod.expand_hosts(name, parsed):
            try:
                self._cluster.add(self._make_node(member_name, member_dsn, role, option))
            except ConfigurationError as exc:
                raise ConfigurationError(str(exc), option=option) from None

    def _patroni_source(
        self, patroni: str | Sequence[str] | PatroniSource | None
    ) -> PatroniSource | None:
        if patroni is None:
            return None
        template = self._template or next((n.dsn for n in self._cluster), None)
        if isinstance(patroni, PatroniSource):  # built by the caller (TLS, credentials)
            if template is None:
                raise ConfigurationError(
                    "patroni: a dsn= template (user, password, dbname) is needed for the "
                    "members it discovers",
                    option="patroni",
                )
            self._template = template
            return patroni
        urls = [patroni] if isinstance(patroni, str) else list(patroni)
        if not urls or template is None:
            raise ConfigurationError(
                "patroni: expected REST URLs and a dsn= template (user, password, "
                "dbname) for the members it discovers",
                option="patroni",
            )
        self._template = template
        return PatroniSource(urls, name=self.name, timeout=self.options.health_timeout)

    def _apply_weights(self) -> None:
        for node_name, weight in self._weights.items():
            member = self._cluster.get(node_name)
            if member is None:
                raise ConfigurationError(
                    f"weights: {node_name!r} is not a member (members: {self._cluster.names})",
                    option="weights",
                )
            member.read_weight = float(weight)

    def _make_node(
        self, name: str, parsed: dsn_mod.NodeDSN, role: Literal["primary", "replica"], option: str
    ) -> Node:
        options = self.options
        node = Node(
            name,
            parsed,
            role=role,
            driver=self._core.driver,
            pool_size=options.pool_size,
            connect_timeout=_connect_timeout(parsed, options.health_timeout, name, option),
            pool_timeout=options.pool_timeout,
            max_lifetime=options.max_lifetime,
            max_idle=options.max_idle,
        )
        node.primary_weight = options.primary_weight
        node.source = option
        core = self._core

        async def cancel_backend(pid: int, timeout: float) -> None:
            if core.monitor is not None:
                await core.monitor.cancel_backend(node, pid, timeout)

        async def backend_gone(pid: int, timeout: float) -> None:
            if core.monitor is not None:
                await core.monitor.wait_backend_gone(node, pid, timeout)

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
        primaries = dsn_mod.split_dsns(env.get(f"{prefix}PRIMARY", ""))
        if not primaries:
            raise ConfigurationError(f"{prefix}PRIMARY is not set", option="primary")
        replicas = dsn_mod.split_dsns(env.get(f"{prefix}REPLICAS", ""))
        options = {**Options.from_env(prefix, env), **overrides}
        return cls(primaries if len(primaries) > 1 else primaries[0], replicas, **options)

    def __repr__(self) -> str:
        nodes = ", ".join(f"{n.name}={n.state}" for n in self._cluster)
        return f"<ReplicaManager {self.name!r} {self._core.lifecycle.value} [{nodes}]>"

    # ------------------------------------------------------------------ lifecycle

    @property
    def is_open(self) -> bool:
        """True between ``connect()`` and ``close()``."""
        return self._core.is_open

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
        ``close()`` it reopens the manager. A deferred manager raises ``ConfigurationError``.
        """
        if self._deferred:
            raise not_initialised(self.name)
        async with self._connecting:
            await self._connect()

    async def _connect(self) -> None:
        core = self._core
        if core.lifecycle is Lifecycle.OPEN:
            return
        if core.lifecycle is Lifecycle.CLOSING:
            raise ClosedError(f"manager {self.name!r} is closing; connect() again after it")
        if core.lifecycle is Lifecycle.CLOSED:
            self._forget_roles()
            self._tracker.reset()
        monitor = self._new_monitor()
        if self._source is not None:
            await self._refresh_members()
        try:
            outcome = await self._first_probes(monitor)
            await monitor.seed(outcome)
            if self._cluster.primary is None:
                raise self._no_primary_at_connect(outcome)
        except BaseException:
            # Not open: the probe connections and the pooled ones opened at connect go.
            await monitor.stop()
            await asyncio.gather(*(node.reset_pool().close() for node in self._cluster))
            raise
        core.monitor = monitor
        core.lifecycle = Lifecycle.OPEN
        monitor.start()
        states = ", ".join(f"{n.name}={n.state}" for n in outcome)
        logger.info("%s: connected: %s", self.name, states)

    def _forget_roles(self) -> None:
        """Reopen (peewee-async's aio_close() then aio_connect()): fresh pools, new roles."""
        for node in self._cluster:
            node.reset_pool()
            node.state = "down"
        self._cluster.reset()

    def _new_monitor(self) -> HealthMonitor:
        return HealthMonitor(
            self._cluster,
            HealthSettings.of(self.options),
            self._callbacks,
            before_round=self._refresh_members if self._source is not None else None,
        )

    async def _first_probes(
        self, monitor: HealthMonitor
    ) -> dict[Node, ProbeResult | BaseException]:
        """One probe of every member; an unreachable one starts ``down`` (logged).

        On the monitor's own probe connections, kept from here on: behind a session-mode
        pooler smaller than the pool, the probe holds its server connection before the
        pool's first connections take the others.
        """
        nodes = list(self._cluster)
        timeout = self.options.health_timeout
        results = await asyncio.gather(
            *(monitor.first_probe(node, timeout) for node in nodes), return_exceptions=True
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
        return outcome

    def _no_primary_at_connect(
        self, outcome: Mapping[Node, ProbeResult | BaseException]
    ) -> TopologyError:
        nodes = list(outcome)
        first = nodes[0].name if nodes else None
        if self._cluster.split_brain:
            return TopologyError(
                f"{self.name}: more than one member is out of recovery on the same "
                "timeline; refusing to guess (split brain)",
                node=first,
            )
        standbys = [n for n in nodes if isinstance(outcome[n], ProbeResult)]
        silent = [n for n in nodes if n not in standbys]
        if standbys and not silent and self._source is None:
            # Every member answered as a standby and nothing can add one: the list names
            # no primary at all.
            return TopologyError(
                f"{self.name}: no member is out of recovery: "
                f"{', '.join(n.label for n in standbys)} are all standbys "
                "(pg_is_in_recovery() is true)",
                node=standbys[0].name,
            )
        # The primary may be among the members that did not answer (restarting), or about
        # to be promoted (a member source): no primary *now*.
        detail = "; ".join(f"{n.label}: {n.last_error}" for n in silent)
        seen = f"; {', '.join(n.name for n in standbys)} answered as standbys" if standbys else ""
        return NoPrimaryError(
            f"{self.name}: no primary reachable within {self.options.health_timeout:g}s "
            f"({detail or 'no member answered as the primary'}){seen}",
            node=first,
        )

    async def close(self) -> None:
        """Drain and close: stop the health task, let queries finish, close every pool.

        New calls raise ``ClosedError`` at once. Queries in flight get ``close_timeout``
        seconds to finish; then they are cancelled on the server and raise ``ClosedError``.
        No node state changes are logged during shutdown. Idempotent; ``connect()`` may
        reopen the manager afterwards.
        """
        core = self._core
        if self._source is not None:
            await self._source.close()  # also after a failed connect(): its HTTP client
        if core.lifecycle is Lifecycle.CLOSING:
            await self._closed.wait()
            return
        if core.lifecycle is not Lifecycle.OPEN:
            core.lifecycle = Lifecycle.CLOSED
            return
        core.lifecycle = Lifecycle.CLOSING
        self._closed = asyncio.Event()
        monitor = core.monitor
        try:
            if monitor is not None:
                await monitor.halt()  # no more rounds, no state changes logged
            await self._engine.reads.close()  # replay pollers: they hold pooled connections
            grace = self.options.close_timeout
            await asyncio.gather(*(node.pool.close(grace) for node in self._cluster))
            await self._engine.writes.close()  # write-position readers, after the drain
            if monitor is not None:
                await monitor.stop()  # probe connections last: cancels may use them
        finally:
            core.lifecycle = Lifecycle.CLOSED
            self._closed.set()
        logger.info("%s: closed", self.name)

    # ------------------------------------------------------------------ topology

    @property
    def cluster(self) -> Cluster:
        """The members, their identity and discovered roles (read it; do not assign)."""
        return self._cluster

    def status(self) -> list[NodeStatus]:
        """Every member's status, without I/O."""
        return [node.status() for node in self._cluster]

    async def check(self) -> list[NodeStatus]:
        """Probe every member now (one health round) and return their statuses."""
        monitor = self._open_monitor()
        await monitor.round()
        return self.status()

    def _open_monitor(self) -> HealthMonitor:
        self._core.require_open()
        monitor = self._core.monitor
        if monitor is None:  # pragma: no cover - open implies a monitor
            raise self._core.not_open()
        return monitor

    def on_state_change(self, callback: Callable[[NodeStatus, NodeStatus], Any]) -> None:
        """Call ``callback(old, new)`` (sync or async) whenever a node changes state."""
        self._callbacks.append(callback)

    async def add_member(self, dsn: str, name: str | None = None) -> NodeStatus:
        """Add a member at run time; its role is discovered by its first probe."""
        monitor = self._open_monitor()
        node_name = name or _free_name(self._cluster, f"member-{len(self._cluster) + 1}")
        node = self._make_node(node_name, dsn_mod.parse(dsn, option="dsn"), "replica", "dsn")
        self._cluster.add(node)
        await monitor.round(only=[node])
        return node.status()

    async def add_replica(self, dsn: str, name: str | None = None) -> NodeStatus:
        """Add a member expected to be a standby (``add_member`` with a replica name)."""
        if name is None:
            name = _free_name(self._cluster, f"replica-{len(self._cluster)}")
        return await self.add_member(dsn, name)

    async def remove_member(self, name: str, *, timeout: float = 30.0) -> None:
        """Stop routing to a member, wait for its in-flight queries, close its pool."""
        node = self._cluster.get(name)
        if node is None:
            raise ConfigurationError(f"remove_member: no member named {name!r}", option="name")
        node.retired = True
        if node.in_flight:
            await within(node.drained(), timeout)
        await self._drop(node)

    remove_replica = remove_member

    async def _drop(self, node: Node) -> None:
        self._cluster.remove(node.name)
        if self._core.monitor is not None:
            await self._core.monitor.forget(node)
        await node.pool.close()

    async def _refresh_members(self) -> None:
        """Apply the member source's view (Patroni), by the rules of ``MemberTracker``.

        Listed members are added and flagged (stopping, demoting, ``noloadbalance``) at
        once; one that is not listed leaves only after several answers without it or when
        its probes fail, and the reachable primary never leaves on the source's word alone.
        """
        source, template = self._source, self._template
        if source is None or template is None:
            return
        view = await source.fetch()
        if view is None:
            return  # no answer is no evidence: nothing changes
        by_name = self._source_members(view, template)
        update = self._tracker.update(
            view.members,
            present=list(by_name),
            answering=[name for name, node in by_name.items() if node.state != "down"],
            primary=self._reachable_primary(by_name),
            now=time.monotonic(),
            paused=view.paused,
        )
        listed = {m.name: m for m in view.members}
        for name in update.add:
            member = listed[name]
            by_name[name] = self._member_for(name, template.with_address(member.host, member.port))
        for name, flags in update.flags.items():
            node = by_name[name]
            node.read_weight = 0.0 if flags.no_reads else self._weights.get(node.name, 1.0)
            node.paused = flags.paused
        for name in update.remove:
            node = by_name[name]
            # Only a member the source itself added under that name: never a static entry,
            # nor a server the source also lists (or listed) under another name.
            if node.source == "patroni" and node.name == name and not node.retired:
                logger.info(
                    "%s: member %s left the cluster (Patroni: %s)",
                    self.name,
                    node.label,
                    update.why[name],
                )
                await self._drop(node)

    def _source_members(self, view: PatroniView, template: dsn_mod.NodeDSN) -> dict[str, Node]:
        """The members the source manages, by the source's names (static entries included)."""
        by_name = {n.name: n for n in self._cluster if n.source == "patroni"}
        for member in view.members:
            if member.name in by_name:
                continue
            address = template.with_address(member.host, member.port).address
            clash = next((n for n in self._cluster if n.dsn.address == address), None)
            if clash is not None:  # a static entry for the same server
                by_name[member.name] = clash
        return by_name

    def _reachable_primary(self, by_name: Mapping[str, Node]) -> str | None:
        """The source's name of the primary, when it is reachable and alone."""
        primary = self._cluster.primary
        if primary is None or primary.state == "down" or self._cluster.split_brain:
            return None
        return next((name for name, node in by_name.items() if node is primary), None)

    def _member_for(self, name: str, parsed: dsn_mod.NodeDSN) -> Node:
        """The node for a member a source reports: a static entry for it, or a new one."""
        clash = [n for n in self._cluster if n.dsn.address == parsed.address]
        if clash:  # a static entry for the same server: Patroni's name wins
            return clash[0]
        node = self._make_node(name, parsed, "replica", "patroni")
        self._cluster.add(node)
        logger.info("%s: member %s added (Patroni)", self.name, node.label)
        return node

    # ------------------------------------------------------------------ scopes and sessions

    def primary(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Reads inside the block go to the primary."""
        return self._engine.sessions.scope(Route("primary"))

    def replica(self, name: str | None = None) -> contextlib.AbstractAsyncContextManager[None]:
        """Reads inside go to standby ``name`` (or any eligible one); writes raise."""
        if name is not None and name not in self._cluster:
            raise ConfigurationError(
                f"replica: no member named {name!r} (members: {self._cluster.names})",
                option="name",
            )
        return self._engine.sessions.scope(Route("replica", name))

    def atomic(self) -> contextlib.AbstractAsyncContextManager[Binding]:
        """A transaction on the primary; nested ``atomic()`` blocks are savepoints."""
        return self._engine.transactions.atomic()

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Binding]:
        """A transaction on the primary; nested inside another, it joins the outer one."""
        return self._engine.transactions.transaction()

    def session(
        self, token: str | None = None, *, client: str | None = None
    ) -> contextlib.AbstractAsyncContextManager[Session]:
        """A consistency session, optionally resumed from a token of an earlier one.

        Tokens from outside are untrusted: a malformed one is ignored (logged once per
        ``client``, in bounded memory, without its text), and one beyond every position
        known is clamped (see README).
        """
        return self._session(token, client)

    @contextlib.asynccontextmanager
    async def _session(self, token: str | None, client: str | None) -> AsyncIterator[Session]:
        async with self._engine.sessions.open(token, client=client) as session:
            yield session

    async def wait_replicated(self, timeout: float = 30.0) -> list[str]:
        """Wait until every standby that is up has what the current task's reads require.

        That is its own writes and those it awaited (see the README's table), or, when it
        requires nothing, everything the primary has written now. For start-up DDL, say,
        before requests that carry no token arrive. Returns the names of the standbys still
        behind after ``timeout`` seconds (empty when all caught up).
        """
        self._core.require_open()
        reads = self._engine.reads
        cell = self._engine.sessions.current()
        if cell is not None and cell.unknown:
            await reads.settle_unknown(cell, None)  # else the primary's position, below
        required = self._engine.sessions.required(cell)
        if required is None or required == UNKNOWN_LSN:
            positions = await reads.current_positions()
            if positions is None:
                return [n.name for n in self._cluster.readers() if n.state == "up"]
            required = positions[0]
        return [node.name for node in await reads.wait_replayed(required, timeout)]

    @property
    def token(self) -> str | None:
        """The current session's causal token (a WAL position), ``None`` before any write.

        Right after a write under contention its position may not be read yet (the
        session's next read settles it): the token is then the "unknown" one,
        ``FFFFFFFF/FFFFFFFF/FFFFFFFF``, which makes the session that resumes it read the
        primary's position first. ``await settled_token()`` waits for the position.
        """
        return self._engine.sessions.token

    async def settled_token(self) -> str | None:
        """``token``, once the position of every write of the session is read.

        For a token sent to a client or another service right after a write (the
        middlewares use it). Waits at most ``max(causal_wait, health_timeout)`` for the
        shared read of the primary's position; past that (no primary answers), the
        "unknown" token.
        """
        sessions = self._engine.sessions
        cell = sessions.current()
        if cell is not None and cell.unknown and not sessions.settle_cached(cell):
            options = self._core.options
            bound = max(options.causal_wait, options.health_timeout)
            until = asyncio.get_running_loop().time() + bound
            with contextlib.suppress(ClosedError):  # closing: the "unknown" token
                await self._engine.reads.settle_unknown(cell, until)
        return sessions.token

    # ------------------------------------------------------------------ counters

    @property
    def retried_reads(self) -> int:
        """Reads retried on another node after a failure."""
        return self._core.counters.retried_reads

    @property
    def fallback_reads(self) -> int:
        """Reads the primary served because no replica could."""
        return self._core.counters.fallback_reads

    @property
    def caught_up_reads(self) -> int:
        """Reads a replica served once seen at their causal position (waited for, or checked in
        the read's own round trip with aiopg), rather than the primary."""
        return self._core.counters.caught_up_reads

    @property
    def clamped_tokens(self) -> int:
        """Tokens from outside the primary showed beyond anything written (forged)."""
        return self._core.counters.clamped_tokens

    @property
    def lost_tokens(self) -> int:
        """Causal positions (tokens, or a session's own writes) a failover lost.

        Past their timeline's branch point: the write went to a primary that was replaced
        (a fork: it went on acknowledging writes); the reads require what survived.
        """
        return self._core.counters.lost_tokens

    def timings(self) -> dict[str, float]:
        """Where the time of this manager's queries went, cumulative since it was built.

        Seconds: ``slot_wait_s`` (waiting for a pool connection), ``catch_up_s`` (reads
        waiting for a replica to reach their causal position), ``query_s`` (reads running),
        ``write_s`` (writes running), ``write_position_s`` (writes waiting for the WAL
        position that covers their commit, ``causal``); counts: ``reads``, ``writes``,
        ``position_reads`` (one covers every write committed before it started),
        ``positions_in_band`` (writes whose position came back in the write's own round
        trip: psycopg, one INSERT/UPDATE/DELETE/MERGE/WITH statement). Take two snapshots
        and subtract to profile a load.
        """
        return dict(vars(self._core.timings))

    @property
    def unknown_positions(self) -> int:
        """Writes acknowledged although the WAL position after them could not be read."""
        return self._core.counters.unknown_positions


# ---------------------------------------------------------------------- helpers


def _member_entries(
    primary: str | Sequence[str] | None,
    replicas: Sequence[str] | Mapping[str, str],
    members: str | Sequence[str] | Mapping[str, str] | None,
) -> list[_Entry]:
    """Name every member given: "primary"/"primary-N", "replica-N", "member-N" or a dict key."""
    entries: list[_Entry] = []
    if primary is not None:
        candidates = [primary] if isinstance(primary, str) else list(primary)
        if not candidates:
            raise ConfigurationError("primary: expected a DSN or a list of DSNs", option="primary")
        for index, text in enumerate(candidates, start=1):
            name = "primary" if len(candidates) == 1 else f"primary-{index}"
            entries.append((name, text, "primary"))
    if isinstance(replicas, str):
        raise ConfigurationError(
            "replicas: expected a list of DSNs or a {name: dsn} dict, got a string",
            option="replicas",
        )
    entries.extend((name, text, "replicas") for name, text in _named(replicas, "replica"))
    if isinstance(members, str):
        members = [members]
    entries.extend((name, text, "members") for name, text in _named(members or (), "member"))
    return entries


def _named(items: Sequence[str] | Mapping[str, str], prefix: str) -> list[tuple[str, str]]:
    if isinstance(items, Mapping):
        return list(items.items())
    return [(f"{prefix}-{i}", text) for i, text in enumerate(items, start=1)]


def _free_name(cluster: Cluster, name: str) -> str:
    while name in cluster:
        name = f"{name}x"
    return name


def _connect_timeout(parsed: dsn_mod.NodeDSN, default: float, name: str, option: str) -> float:
    """The node's connect timeout: ``health_timeout``, or the DSN's longer one."""
    raw = parsed.params.get("connect_timeout")
    if raw is None:
        return default
    try:
        return max(default, float(raw))
    except ValueError:
        raise ConfigurationError(
            f"{option}[{name}]: connect_timeout {raw!r} is not a number", option=option
        ) from None


def _policy(policy: str | Callable[[Sequence[Any]], Any]) -> Callable[[Sequence[Any]], Any]:
    return POLICIES[policy]() if isinstance(policy, str) else policy
