"""Prometheus metrics for areplica managers (needs ``pip install 'areplica[prometheus]'``).

:class:`AreplicaCollector` is a custom collector: each scrape reads ``mgr.status()`` (no I/O)
and the manager's counters and turns them into metric families; nothing runs between
scrapes. No label ever holds a DSN, a host or a password: the labels are the manager's
``name``, the node's name, its role and, for ``areplica_node_state``, a state.

Usage::

    from prometheus_client import start_http_server
    from areplica import ReplicaManager
    from areplica.metrics import register

    mgr = ReplicaManager(PRIMARY_DSN, {"replica-1": REPLICA_DSN}, name="orders")
    register(mgr)  # into prometheus_client's default REGISTRY
    start_http_server(9100)  # or mount prometheus_client.make_asgi_app() in the web app

Several managers may share a registry (give each its own ``name``): :func:`register` adds
them to the registry's one areplica collector, so each metric family is exposed once.

Per node, labels ``manager``, ``node`` and ``role``:

- ``areplica_node_up`` (gauge): 1 when the node's state is ``up``, else 0.
- ``areplica_node_state`` (gauge, extra label ``state``): 1 for the node's current state
  among ``up``, ``lagging`` and ``down``, 0 for the other two.
- ``areplica_node_lag_bytes``, ``areplica_node_lag_seconds`` (gauges): replay lag behind
  the primary, for replicas once probed.
- ``areplica_node_probe_latency_seconds`` (gauge): duration of the last health probe.
- ``areplica_node_in_flight`` (gauge): queries running on the node now.
- ``areplica_node_pool_in_use``, ``areplica_node_pool_size`` (gauges): pool connections
  checked out now, and the pool's maximum size.
- ``areplica_reads_total``, ``areplica_writes_total``, ``areplica_errors_total``,
  ``areplica_evictions_total`` (counters): reads and writes the node served, errors seen
  on it, times it was taken out of rotation.

Per manager, label ``manager``: ``areplica_retried_reads_total`` (reads retried on another
node), ``areplica_fallback_reads_total`` (reads the primary served because no replica
could), ``areplica_caught_up_reads_total`` (reads a replica served once seen at their causal
token: waited for, or checked in the read's own round trip),
``areplica_clamped_tokens_total`` and ``areplica_lost_tokens_total`` (tokens from outside
clamped as forged, or positions whose write a failover lost), and
``areplica_unknown_positions_total`` (writes acknowledged whose WAL position could not be
read).

A gauge whose value is unknown (lag before the first probe, lag of the primary) has no
sample. The ``role`` label follows the node: after a promotion its series change labels.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError

if TYPE_CHECKING:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.registry import CollectorRegistry

    from .manager import ReplicaManager
    from .node import NodeStatus

    Family = CounterMetricFamily | GaugeMetricFamily

__all__ = ["AreplicaCollector", "register", "unregister"]

_STATES = ("up", "lagging", "down", "diverged")
_LABELS = ("manager", "node", "role")

# Per-node gauges read from a NodeStatus: (name, help, field, scale).
_NODE_GAUGES: tuple[tuple[str, str, str, float], ...] = (
    ("areplica_node_lag_bytes", "Replay lag behind the primary, in bytes.", "lag_bytes", 1.0),
    ("areplica_node_lag_seconds", "Replay lag behind the primary, in seconds.", "lag_seconds", 1.0),
    (
        "areplica_node_probe_latency_seconds",
        "Duration of the node's last health probe, in seconds.",
        "latency_ms",
        0.001,
    ),
    ("areplica_node_in_flight", "Queries running on the node now.", "in_flight", 1.0),
    ("areplica_node_pool_in_use", "Pool connections checked out now.", "pool_in_use", 1.0),
    ("areplica_node_pool_size", "Maximum size of the node's connection pool.", "pool_size", 1.0),
)
# Counters (the exposed names end in _total): (name, help, field).
_NODE_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("areplica_reads", "Reads the node served.", "reads"),
    ("areplica_writes", "Writes the node served.", "writes"),
    ("areplica_errors", "Errors seen on the node (queries, connections, probes).", "errors"),
    ("areplica_evictions", "Times the node was taken out of read rotation.", "evictions"),
)
_MANAGER_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("areplica_retried_reads", "Reads retried on another node after a failure.", "retried_reads"),
    ("areplica_fallback_reads", "Reads the primary served as no replica could.", "fallback_reads"),
    (
        "areplica_caught_up_reads",
        "Reads that waited for a replica to reach the session's causal token.",
        "caught_up_reads",
    ),
    (
        "areplica_clamped_tokens",
        "Tokens from outside the primary showed beyond anything written (clamped).",
        "clamped_tokens",
    ),
    (
        "areplica_lost_tokens",
        "Causal positions (tokens or own writes) a failover lost (past their branch point).",
        "lost_tokens",
    ),
    (
        "areplica_unknown_positions",
        "Writes acknowledged whose WAL position could not be read (the session reads after "
        "the primary's current one).",
        "unknown_positions",
    ),
)


def _prometheus() -> Any:
    """The ``prometheus_client.core`` module, or a ConfigurationError telling how to get it."""
    try:
        from prometheus_client import core
    except ImportError:
        raise ConfigurationError(
            "areplica.metrics needs the prometheus-client package: "
            "pip install 'areplica[prometheus]'",
            option="prometheus",
        ) from None
    return core


class AreplicaCollector:
    """A Prometheus collector for one or more managers (see the module docstring).

    Register it in a ``CollectorRegistry`` yourself, or use :func:`register`. Managers must
    have distinct names: the name is the ``manager`` label.
    """

    def __init__(self, manager: ReplicaManager, *more: ReplicaManager) -> None:
        core = _prometheus()
        self._gauge: type[GaugeMetricFamily] = core.GaugeMetricFamily
        self._counter: type[CounterMetricFamily] = core.CounterMetricFamily
        self._lock = threading.Lock()
        self._managers: list[ReplicaManager] = []
        for mgr in (manager, *more):
            self.add(mgr)

    def __repr__(self) -> str:
        return f"<AreplicaCollector managers={[m.name for m in self.managers]}>"

    @property
    def managers(self) -> list[ReplicaManager]:
        """The managers reported on."""
        with self._lock:
            return list(self._managers)

    def add(self, manager: ReplicaManager) -> None:
        """Report on ``manager`` too (nothing if it is reported on already)."""
        with self._lock:
            if any(m is manager for m in self._managers):
                return
            if any(m.name == manager.name for m in self._managers):
                raise ConfigurationError(
                    f"metrics: a manager named {manager.name!r} is reported on already; "
                    "give each manager its own name",
                    option="name",
                )
            self._managers.append(manager)

    def remove(self, manager: ReplicaManager) -> None:
        """Stop reporting on ``manager`` (nothing if it was not reported on)."""
        with self._lock:
            self._managers = [m for m in self._managers if m is not manager]

    def describe(self) -> list[Family]:
        """The metric families without samples: what the registry checks names against."""
        return list(self._families().values())

    def collect(self) -> Iterator[Family]:
        """The metric families, filled from every manager's ``status()`` now."""
        families = self._families()
        for mgr in self.managers:
            for status in _statuses(mgr):
                labels = [mgr.name, status.name, status.role]
                up = 1.0 if status.state == "up" else 0.0
                families["areplica_node_up"].add_metric(labels, up)
                for state in _STATES:
                    families["areplica_node_state"].add_metric(
                        [*labels, state], 1.0 if status.state == state else 0.0
                    )
                for name, _help, field, scale in _NODE_GAUGES:
                    value = getattr(status, field)
                    if value is not None:
                        families[name].add_metric(labels, float(value) * scale)
                for name, _help, field in _NODE_COUNTERS:
                    families[name].add_metric(labels, float(getattr(status, field)))
            for name, _help, field in _MANAGER_COUNTERS:
                families[name].add_metric([mgr.name], float(getattr(mgr, field)))
        yield from families.values()

    def _families(self) -> dict[str, Family]:
        labels = list(_LABELS)
        families: dict[str, Family] = {
            "areplica_node_up": self._gauge(
                "areplica_node_up",
                "1 when the node is up (serving its role), else 0.",
                labels=labels,
            ),
            "areplica_node_state": self._gauge(
                "areplica_node_state",
                "1 for the node's current state (up, lagging, down or diverged), 0 for the others.",
                labels=[*labels, "state"],
            ),
        }
        for name, help_text, _field, _scale in _NODE_GAUGES:
            families[name] = self._gauge(name, help_text, labels=labels)
        for name, help_text, _field in _NODE_COUNTERS:
            families[name] = self._counter(name, help_text, labels=labels)
        for name, help_text, _field in _MANAGER_COUNTERS:
            families[name] = self._counter(name, help_text, labels=["manager"])
        return families


def _statuses(mgr: ReplicaManager) -> list[NodeStatus]:
    """``mgr.status()``, from whatever thread scrapes (``start_http_server`` uses its own).

    ``status()`` only reads attributes; a replica added or removed by the event loop during
    the read changes a dict being iterated, so the read is retried then.
    """
    for _ in range(3):
        try:
            return mgr.status()
        except RuntimeError:
            continue
    return mgr.status()


# The areplica collector registered in each registry by register().
_REGISTERED: weakref.WeakKeyDictionary[Any, AreplicaCollector] = weakref.WeakKeyDictionary()
_REGISTERED_LOCK = threading.Lock()


def register(
    manager: ReplicaManager, registry: CollectorRegistry | None = None
) -> AreplicaCollector:
    """Expose ``manager``'s metrics in ``registry`` (by default prometheus_client's REGISTRY).

    Returns the registry's areplica collector: a new one, or the one an earlier call
    registered there, which then reports on this manager too.
    """
    target = _prometheus().REGISTRY if registry is None else registry
    with _REGISTERED_LOCK:
        collector = _REGISTERED.get(target)
        if collector is not None:
            collector.add(manager)
            return collector
        collector = AreplicaCollector(manager)
        target.register(collector)
        _REGISTERED[target] = collector
        return collector


def unregister(manager: ReplicaManager, registry: CollectorRegistry | None = None) -> None:
    """Stop exposing ``manager`` in ``registry``; the collector leaves once it has no manager."""
    target = _prometheus().REGISTRY if registry is None else registry
    with _REGISTERED_LOCK:
        collector = _REGISTERED.get(target)
        if collector is None:
            return
        collector.remove(manager)
        if not collector.managers:
            target.unregister(collector)
            del _REGISTERED[target]
