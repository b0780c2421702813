"""``Core``: the state every query path of one manager shares.

The options, the driver, the cluster of members, the lifecycle state (new, open, closing,
closed), the health monitor once connected, the result-handling database object and the
manager-wide counters. The read, write, transaction and session modules each take the core
and own nothing of each other's; the manager (``manager.py``) builds it and moves its
lifecycle.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from .cluster import Cluster
from .drivers import QUERY_CANCELED, Driver, sqlstate_of
from .errors import ClosedError, NodeUnavailableError
from .health import HealthMonitor
from .node import Node
from .options import Options

__all__ = ["Core", "Counters", "Lifecycle", "Timings"]


class Lifecycle(enum.Enum):
    """new -> open -> closing -> closed (-> open again: ``connect()`` reopens)."""

    NEW = "new"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass
class Counters:
    """Manager-wide counters (the metrics module reads them)."""

    #: Reads retried on another node after a failure.
    retried_reads: int = 0
    #: Reads the primary served because no replica could.
    fallback_reads: int = 0
    #: Reads that waited for a replica to reach their causal position, and got one.
    caught_up_reads: int = 0
    #: Tokens from outside that the primary showed beyond anything written (forged).
    clamped_tokens: int = 0
    #: Tokens whose write a failover lost (past the branch point of their timeline).
    lost_tokens: int = 0
    #: Writes acknowledged although the WAL position after them could not be read.
    unknown_positions: int = 0


@dataclass
class Timings:
    """Where the time of queries went, cumulative since the manager was built.

    Seconds: waiting for a connection slot (reads and writes), for a replica to catch up
    with a read's causal position, running reads (the query and its rows), running writes
    (the statement and its rows), and waiting for the WAL position of writes (``causal``:
    a read whose session wrote under contention waits for the shared position read that
    covers the write, unless its answer is in). Counts: reads and writes that ran, the
    position reads that covered those writes (one covers every write committed before it
    started), and the writes whose position came back in their own round trip (psycopg)
    (``mgr.timings()``).
    """

    slot_wait_s: float = 0.0
    catch_up_s: float = 0.0
    query_s: float = 0.0
    write_s: float = 0.0
    write_position_s: float = 0.0
    reads: int = 0
    writes: int = 0
    position_reads: int = 0
    positions_in_band: int = 0


class Core:
    """What the query paths of one manager share (see the module docstring)."""

    def __init__(self, options: Options, driver: Driver, cluster: Cluster) -> None:
        self.options = options
        self.name = options.name
        self.driver = driver
        self.cluster = cluster
        self.lifecycle = Lifecycle.NEW
        self.monitor: HealthMonitor | None = None
        self.counters = Counters()
        self.timings = Timings()
        #: The peewee-async database object: compiles SQL and is handed to result fetches.
        self.database: Any = None
        #: How long a write waits for a primary while none is usable.
        self.primary_wait = 0.0

    def __repr__(self) -> str:
        return f"<Core {self.name!r} {self.lifecycle.value}>"

    @property
    def is_open(self) -> bool:
        return self.lifecycle is Lifecycle.OPEN

    def require_open(self) -> None:
        """Raise ``ClosedError`` unless the manager is open."""
        if self.lifecycle is not Lifecycle.OPEN:
            raise self.not_open()

    def not_open(self) -> ClosedError:
        """The error for a call while the manager is not open, saying why."""
        state = {
            Lifecycle.NEW: "not connected",
            Lifecycle.CLOSING: "closing",
            Lifecycle.CLOSED: "closed",
        }.get(self.lifecycle, self.lifecycle.value)
        return ClosedError(f"manager {self.name!r} is {state}: use `async with mgr:` or connect()")

    def cut_by_close(self, exc: BaseException) -> bool:
        """True when ``exc`` is close() at work: a pool closed, or a query it cancelled."""
        if self.is_open:
            return False
        return (
            isinstance(exc, NodeUnavailableError)
            or self.driver.is_disconnect(exc)
            or sqlstate_of(exc) == QUERY_CANCELED
        )

    def connection_failed(self, node: Node, exc: BaseException) -> None:
        """Passive detection: a connection-level failure takes the node down at once."""
        if self.monitor is not None and self.is_open:
            self.monitor.connection_failed(node, exc)

    def usable_primary(self) -> Node | None:
        """The primary, when it may take a query now (up, not stopping, no split brain)."""
        node = self.cluster.primary
        if node is None or node.state != "up" or node.paused or self.cluster.split_brain:
            return None
        return node
