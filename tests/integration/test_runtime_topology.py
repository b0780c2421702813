"""Topology changes at run time, and primary discovery from a list of candidates."""

from __future__ import annotations

import asyncio
import collections

import pytest

from areplica import ConfigurationError, ReplicaManager
from areplica.testing.topology import LocalTopology
from tests.conftest import wait_for

pytestmark = pytest.mark.integration


async def ports_of(mgr: ReplicaManager, n: int) -> collections.Counter[int]:
    seen: collections.Counter[int] = collections.Counter()
    for _ in range(n):
        rows = await mgr.execute_sql("SELECT inet_server_port()")
        assert rows is not None
        seen[rows[0][0]] += 1
    return seen


async def test_add_and_remove_replica(topology: LocalTopology, ports: dict[str, int]) -> None:
    mgr = ReplicaManager(
        topology.dsn("primary"), {"r1": topology.dsn("replica-1")}, health_interval=0.2
    )
    async with mgr:
        assert set(await ports_of(mgr, 20)) == {ports["replica-1"]}
        status = await mgr.add_replica(topology.dsn("replica-2"), name="r2")
        assert status.name == "r2"
        await wait_for(lambda: {s.name: s.state for s in mgr.status()}.get("r2") == "up")
        assert set(await ports_of(mgr, 40)) == {ports["replica-1"], ports["replica-2"]}
        with pytest.raises(ConfigurationError):
            await mgr.add_replica(topology.dsn("replica-2"), name="r2")
        # A long read in flight on r1 finishes before r1 goes away; no new read reaches it.
        slow = asyncio.create_task(
            mgr.execute_sql("SELECT inet_server_port(), pg_sleep(1)", on="r1")
        )
        await asyncio.sleep(0.2)
        removing = asyncio.create_task(mgr.remove_replica("r1"))
        await asyncio.sleep(0.1)
        assert not removing.done()  # draining
        assert set(await ports_of(mgr, 20)) == {ports["replica-2"]}
        rows = await slow
        await removing
        assert rows is not None and rows[0][0] == ports["replica-1"]
        assert [s.name for s in mgr.status()] == ["primary", "r2"]
        assert set(await ports_of(mgr, 10)) == {ports["replica-2"]}
        with pytest.raises(ConfigurationError):
            await mgr.remove_replica("r1")


async def test_primary_from_a_list_of_candidates(
    topology: LocalTopology, ports: dict[str, int]
) -> None:
    mgr = ReplicaManager(
        [topology.dsn("replica-1"), topology.dsn("primary")],
        [topology.dsn("replica-2")],
        health_interval=0.2,
    )
    async with mgr:
        roles = {s.name: s.role for s in mgr.status()}
        assert roles == {"primary-1": "replica", "primary-2": "primary", "replica-1": "replica"}
        rows = await mgr.execute_sql("SELECT inet_server_port(), pg_is_in_recovery()", on="primary")
        assert rows == [(ports["primary"], False)]
        # The standby candidate serves reads like any replica.
        seen = await ports_of(mgr, 40)
        assert set(seen) == {ports["replica-1"], ports["replica-2"]}
