"""Load balancing measured by the servers: which port answered each read."""

from __future__ import annotations

import asyncio
import collections

import peewee
import pytest
from peewee import fn

from areplica.testing.topology import LocalTopology
from tests.conftest import caught_up, make_manager, proxy

pytestmark = pytest.mark.integration

# A SELECT with no FROM: the answer does not depend on any table's rows.
QUERY = peewee.Select(columns=[fn.inet_server_port()])


async def spread(topology: LocalTopology, n: int, **options: object) -> collections.Counter[int]:
    mgr = make_manager(topology, **options)
    async with mgr:
        proxy.initialize(mgr.database)
        await caught_up(mgr, topology)
        seen: collections.Counter[int] = collections.Counter()
        for _ in range(n):
            seen[await mgr.scalar(QUERY)] += 1
        return seen


async def test_round_robin_spreads_evenly(
    topology: LocalTopology, schema: None, ports: dict[str, int]
) -> None:
    seen = await spread(topology, 400, policy="round_robin")
    for name in ("replica-1", "replica-2"):
        assert 170 <= seen[ports[name]] <= 230, seen
    assert seen[ports["primary"]] == 0


async def test_random_spreads_roughly_evenly(
    topology: LocalTopology, schema: None, ports: dict[str, int]
) -> None:
    seen = await spread(topology, 400, policy="random")
    for name in ("replica-1", "replica-2"):
        assert 140 <= seen[ports[name]] <= 260, seen


async def test_weights_split_reads_in_proportion(
    topology: LocalTopology, schema: None, ports: dict[str, int]
) -> None:
    seen = await spread(topology, 400, weights={"replica-1": 3, "replica-2": 1})
    assert 285 <= seen[ports["replica-1"]] <= 315, seen
    assert 85 <= seen[ports["replica-2"]] <= 115, seen
    seen = await spread(topology, 200, policy="random", weights={"replica-1": 1, "replica-2": 0})
    assert seen[ports["replica-1"]] == 200, seen


async def test_least_busy_avoids_the_busy_replica(
    topology: LocalTopology, schema: None, ports: dict[str, int]
) -> None:
    mgr = make_manager(topology, policy="least_busy")
    async with mgr:
        proxy.initialize(mgr.database)
        await caught_up(mgr, topology)
        slow = [
            asyncio.create_task(mgr.execute_sql("SELECT pg_sleep(1.5)", on="replica-1"))
            for _ in range(2)
        ]
        await asyncio.sleep(0.2)
        seen = collections.Counter([await mgr.scalar(QUERY) for _ in range(30)])
        await asyncio.gather(*slow)
        assert seen == {ports["replica-2"]: 30}
        # Under a concurrent burst, in-flight counts even out across both replicas.
        burst = await asyncio.gather(
            *(mgr.execute_sql("SELECT inet_server_port(), pg_sleep(0.05)") for _ in range(40))
        )
        seen = collections.Counter(rows[0][0] for rows in burst if rows)
        assert 15 <= seen[ports["replica-1"]] <= 25 and 15 <= seen[ports["replica-2"]] <= 25, seen


async def test_primary_weight_makes_the_primary_a_reader(
    topology: LocalTopology, schema: None, ports: dict[str, int]
) -> None:
    seen = await spread(topology, 300, primary_weight=1.0)
    for name in ("primary", "replica-1", "replica-2"):
        assert 85 <= seen[ports[name]] <= 115, seen
    # Not inside replica(): that scope never reads from the primary.
    mgr = make_manager(topology, primary_weight=5.0)
    async with mgr:
        async with mgr.replica():
            for _ in range(20):
                rows = await mgr.execute_sql("SELECT inet_server_port()")
                assert rows is not None and rows[0][0] != ports["primary"]
