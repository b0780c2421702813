"""The pytest plugin's fixtures, as a user's test suite gets them."""

from __future__ import annotations

import pytest

from areplica import ReplicaManager
from areplica.testing import LocalTopology

pytestmark = pytest.mark.integration


async def test_plugin_fixtures(
    areplica_topology: LocalTopology, areplica_manager: ReplicaManager
) -> None:
    assert areplica_manager.is_open
    assert [s.name for s in areplica_manager.status()] == areplica_topology.nodes
    rows = await areplica_manager.execute_sql("SELECT pg_is_in_recovery(), inet_server_port()")
    assert rows is not None and rows[0][0] is True
    assert rows[0][1] in {areplica_topology.port(n) for n in areplica_topology.nodes[1:]}
