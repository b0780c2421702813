"""One server known to a manager: its role, health state, counters and pool.

The pool itself is ``pool.NodePool``; which server the member's address leads to is
``servers.ServerWatch``. ``NodeStatus`` is the snapshot ``mgr.status()`` returns.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from dataclasses import dataclass
from typing import Literal

from .consistency import format_lsn
from .drivers import Driver
from .dsn import MASK, NodeDSN, mask_dsn
from .pool import Canceller, NodePool
from .servers import ServerWatch

__all__ = ["Node", "NodeStatus", "Role", "State"]

Role = Literal["primary", "replica"]
State = Literal["up", "lagging", "down", "diverged"]


@dataclass(frozen=True)
class NodeStatus:
    """A snapshot of one node, as ``mgr.status()`` and ``mgr.check()`` return it."""

    name: str
    role: Role
    state: State
    dsn: str
    lag_bytes: int | None = None
    lag_seconds: float | None = None
    replay_lsn: str | None = None
    latency_ms: float | None = None
    in_flight: int = 0
    reads: int = 0
    writes: int = 0
    errors: int = 0
    evictions: int = 0
    pool_in_use: int = 0
    pool_size: int = 0
    last_error: str | None = None

    @property
    def healthy(self) -> bool:
        """True when the node can serve its role now."""
        return self.state == "up"


class Node:
    """One PostgreSQL server known to a manager."""

    def __init__(
        self,
        name: str,
        dsn: NodeDSN,
        *,
        role: Role,
        driver: Driver,
        pool_size: int,
        connect_timeout: float,
        pool_timeout: float | None = None,
        weight: float = 1.0,
        max_lifetime: float | None = None,
        max_idle: float | None = None,
    ) -> None:
        self.name = name
        self.dsn = dsn
        self.role: Role = role
        self.driver = driver
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.pool_timeout = pool_timeout
        self.max_lifetime = max_lifetime
        self.max_idle = max_idle
        #: Which server the member's address leads to (every connection says when it opens).
        self.servers = ServerWatch(f"member {name!r} ({dsn.masked})")
        #: Read weight as a standby (``weights``); 0 takes no reads (``noloadbalance``).
        self.read_weight = weight
        #: Read weight while it is the primary (``primary_weight``; 0: no reads).
        self.primary_weight = 0.0
        self.state: State = "down"
        self.pool = self._new_pool()
        # Observed by probes.
        self.in_recovery: bool | None = None
        self.system_id: int | None = None
        self.timeline: int | None = None
        self.server: tuple[int, float, int] | None = None
        self.lsn: int | None = None
        self.lag_bytes: int | None = None
        self.lag_seconds: float | None = None
        self.latency_ms: float | None = None
        self.last_error: str | None = None
        self.last_probe: float | None = None
        # Counters.
        self.in_flight = 0
        self.reads = 0
        self.writes = 0
        self.errors = 0
        self.evictions = 0
        self.retired = False
        #: How the pool cancels a query when the driver has no safe cancel of its own.
        self.canceller: Canceller | None = None
        #: Waits until a backend of this node has exited (set by the manager).
        self.exit_waiter: Canceller | None = None
        #: An HA manager says it is stopping or demoting: it takes no new queries.
        self.paused = False
        #: Where the member came from: "primary"/"replicas"/"members"/"dsn"/"patroni".
        self.source = "members"
        self._drained: asyncio.Event | None = None

    def __repr__(self) -> str:
        return f"<Node {self.name} {self.role} {self.state} {self.dsn.masked!r}>"

    @property
    def weight(self) -> float:
        """The node's weight for the load-balancing policy in its current role."""
        return self.primary_weight if self.role == "primary" else self.read_weight

    @property
    def label(self) -> str:
        """The node's name and masked DSN, for messages."""
        return f"{self.name!r} ({self.dsn.masked})"

    def done(self) -> None:
        """One query finished (``in_flight`` is incremented inline on the hot path)."""
        self.in_flight -= 1
        if self.in_flight == 0 and self._drained is not None:
            self._drained.set()

    async def drained(self) -> None:
        """Wait until no query is in flight on this node."""
        if self.in_flight == 0:
            return
        self._drained = asyncio.Event()
        await self._drained.wait()

    def _new_pool(self) -> NodePool:
        pool = NodePool(
            self.name,
            self.driver,
            self.dsn.conninfo,
            size=self.pool_size,
            timeout=self.connect_timeout,
            wait_timeout=self.pool_timeout,
            # A cancel request is a control round trip: bounded like a probe.
            cancel_timeout=self.connect_timeout,
            canceller=self._cancel_backend,
            max_lifetime=self.max_lifetime,
            max_idle=self.max_idle,
            servers=self.servers,
        )
        pool.exit_waiter = self._backend_gone
        return pool

    async def _backend_gone(self, pid: int, timeout: float) -> None:
        if self.exit_waiter is not None:
            await self.exit_waiter(pid, timeout)

    async def _cancel_backend(self, pid: int, timeout: float) -> None:
        if self.canceller is not None:
            await self.canceller(pid, timeout)

    def reset_pool(self) -> NodePool:
        """Swap in a fresh pool (eviction, reopen); the caller closes the old one."""
        old = self.pool
        self.pool = self._new_pool()
        return old

    def status(self) -> NodeStatus:
        """A snapshot, without I/O."""
        return NodeStatus(
            name=self.name,
            role=self.role,
            state=self.state,
            dsn=self.dsn.masked,
            lag_bytes=self.lag_bytes,
            lag_seconds=self.lag_seconds,
            replay_lsn=format_lsn(self.lsn) if self.lsn is not None else None,
            latency_ms=self.latency_ms,
            in_flight=self.in_flight,
            reads=self.reads,
            writes=self.writes,
            errors=self.errors,
            evictions=self.evictions,
            pool_in_use=self.pool.in_use,
            pool_size=self.pool_size,
            last_error=self.last_error,
        )

    def note_error(self, exc: BaseException) -> None:
        """Remember the last error (its text never carries a password: DSNs are masked)."""
        self.errors += 1
        text = f"{type(exc).__name__}: {exc}".strip()[:2000]
        password = self.dsn.password
        if password:  # the password itself first, in the forms a driver may echo it
            for form in {password, urllib.parse.quote(password, safe=""), repr(password)[1:-1]}:
                text = text.replace(form, MASK)
        self.last_error = mask_dsn(text)[:300]
