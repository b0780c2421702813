"""A new, empty database on every node of a topology, for tests of what a user does first."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

from areplica import ReplicaManager
from areplica.testing._support import run_sql
from areplica.testing.topology import LocalTopology

__all__ = ["FreshDatabase", "fresh_database"]


class FreshDatabase:
    """A new, empty database on every node of the topology; DSNs that point at it."""

    def __init__(self, topology: LocalTopology, name: str) -> None:
        self.topology = topology
        self.name = name

    def dsn(self, node: str) -> str:
        return self.topology.dsn(node).rsplit("/", 1)[0] + "/" + self.name

    def direct_dsn(self, node: str) -> str:
        return self.topology.direct_dsn(node).rsplit("/", 1)[0] + "/" + self.name

    @property
    def replicas(self) -> list[str]:
        return [self.dsn(n) for n in self.topology.nodes if n != "primary"]

    def on_primary(self, sql: str) -> list[tuple[object, ...]]:
        return run_sql(self.direct_dsn("primary"), sql)

    def manager(self) -> ReplicaManager:
        return ReplicaManager(
            self.dsn("primary"), self.replicas, health_interval=0.2, health_timeout=1.0
        )

    def env(self) -> dict[str, str]:
        """What the README tells a user to export."""
        return {
            **os.environ,
            "AREPLICA_PRIMARY": self.dsn("primary"),
            "AREPLICA_REPLICAS": ";".join(self.replicas),
        }


@contextmanager
def fresh_database(topology: LocalTopology, prefix: str) -> Iterator[FreshDatabase]:
    """Create the database on the primary (every replica replays it), drop it afterwards."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    run_sql(topology.direct_dsn("primary"), f'CREATE DATABASE "{name}"')
    topology.wait_replicated()
    try:
        yield FreshDatabase(topology, name)
    finally:
        run_sql(topology.direct_dsn("primary"), f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        topology.wait_replicated()
