"""Test helpers: a real local PostgreSQL topology (``LocalTopology``), a real Patroni cluster
(``PatroniTopology``), PgBouncer (``PgBouncer``) and HAProxy (``HAProxy``, ``LoadBalancer``) in
front of their nodes, a fault-injecting TCP proxy (``areplica.testing.proxy``), a rolled-back
test transaction (``TransactionTestCase``) and pytest fixtures (``areplica.testing.plugin``).
What they start is owned by ``areplica.testing.processes`` (``ProcessOwner``)."""

from .docker import DockerTopology
from .haproxy import HAProxy, LoadBalancer
from .patroni import PatroniTopology, PatroniUnavailable, Switchover
from .pgbouncer import PgBouncer
from .topology import LocalTopology
from .transaction import TransactionTestCase

__all__ = [
    "DockerTopology",
    "HAProxy",
    "LoadBalancer",
    "LocalTopology",
    "PatroniTopology",
    "PatroniUnavailable",
    "PgBouncer",
    "Switchover",
    "TransactionTestCase",
]
