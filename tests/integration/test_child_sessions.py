"""The causal token follows the work into child tasks, and only there."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from areplica.testing.topology import LocalTopology
from tests.conftest import Counter, make_manager, proxy, sql_on

pytestmark = pytest.mark.integration


@pytest.fixture
def lagging(topology: LocalTopology, schema: None) -> Iterator[LocalTopology]:
    """replica-1 replays 200 ms late (the issue's setup)."""
    sql_on(topology, "primary", "TRUNCATE counter RESTART IDENTITY")
    topology.wait_replicated()
    topology.set_apply_delay("replica-1", 200)
    try:
        yield topology
    finally:
        topology.set_apply_delay("replica-1", 0)
        topology.wait_replicated()


async def test_writes_in_child_tasks_are_read_back(lagging: LocalTopology, driver: str) -> None:
    """1,000 write-in-a-child then read-in-the-parent runs: 0 stale reads."""
    replicas = {lagging.port("replica-1"), lagging.port("replica-2")}
    async with make_manager(lagging, driver=driver) as mgr:
        proxy.initialize(mgr.database)
        stale = []
        for i in range(1000):

            async def write(i: int = i) -> None:
                await Counter.aio_create(label=f"c{i}")

            if i % 2:
                await asyncio.gather(write())
            else:
                await asyncio.create_task(write())
            assert mgr.token is not None
            row = await Counter.aio_get_or_none(Counter.label == f"c{i}")
            if row is None:
                stale.append(i)
        assert stale == []
        # Unrelated sessions (a request each) do not inherit this work's token: they read
        # from replicas, the lagging one included.
        ports: list[int] = []

        async def unrelated() -> None:
            async with mgr.session():
                assert mgr.token is None
                for _ in range(20):
                    rows = await mgr.execute_sql("SELECT inet_server_port()")
                    assert rows is not None
                    ports.append(rows[0][0])

        await asyncio.gather(*(unrelated() for _ in range(10)))
        assert set(ports) == replicas


async def test_a_grandchild_write_reaches_the_parent(lagging: LocalTopology, driver: str) -> None:
    async with make_manager(lagging, driver=driver) as mgr:
        proxy.initialize(mgr.database)

        async def grandchild() -> None:
            await Counter.aio_create(label="deep")

        async def child() -> None:
            await asyncio.gather(grandchild())

        await asyncio.create_task(child())
        assert await Counter.aio_get_or_none(Counter.label == "deep") is not None
