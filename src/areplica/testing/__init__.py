"""Test helpers: a real local PostgreSQL topology (``LocalTopology``), a fault-injecting TCP
proxy (``areplica.testing.proxy``) and pytest fixtures (``areplica.testing.plugin``)."""

from .docker import DockerTopology
from .topology import LocalTopology

__all__ = ["DockerTopology", "LocalTopology"]
