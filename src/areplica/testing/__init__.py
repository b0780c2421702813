"""Test helpers: a real local PostgreSQL topology (``LocalTopology``), a real Patroni cluster
(``PatroniTopology``), a fault-injecting TCP proxy (``areplica.testing.proxy``), a rolled-back
test transaction (``TransactionTestCase``) and pytest fixtures (``areplica.testing.plugin``)."""

from .docker import DockerTopology
from .patroni import PatroniTopology, PatroniUnavailable, Switchover
from .topology import LocalTopology
from .transaction import TransactionTestCase

__all__ = [
    "DockerTopology",
    "LocalTopology",
    "PatroniTopology",
    "PatroniUnavailable",
    "Switchover",
    "TransactionTestCase",
]
