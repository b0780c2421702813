"""Fault-injection support: a topology behind proxies and a background read/write load."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from areplica import ReplicaManager
from areplica.testing.topology import LocalTopology
from tests.conftest import client_backends, sql_on, wait_for

# Timings of the managers under fault: short, so that tests wait seconds, not minutes. The
# driver: aiopg, or AREPLICA_FAULT_DRIVER's (the suite runs once in CI; a run with psycopg
# repeats every fault through the other driver's write and read paths).
TIMINGS: dict[str, Any] = {
    "driver": os.environ.get("AREPLICA_FAULT_DRIVER", "aiopg"),
    "health_interval": 0.25,
    "health_timeout": 0.75,
    "fail_after": 2,
    "recover_after": 2,
    "read_timeout": 1.0,
    "read_retries": 3,
    "max_lag": 1.0,
    "pool_size": 12,
}
SLACK = 2.5  # seconds allowed on top of a bound, for a loaded 2-core machine


@pytest.fixture(scope="module")
def ftopo() -> Iterator[LocalTopology]:
    """A private topology behind TCP proxies: faults here never touch other tests."""
    with LocalTopology(replicas=2, proxies=True) as topology:
        sql_on(
            topology,
            "primary",
            "CREATE TABLE IF NOT EXISTS fault_log (id bigserial PRIMARY KEY, tag text NOT NULL)",
        )
        topology.wait_replicated()
        yield topology


_made: list[ReplicaManager] = []  # every manager a fault test made, closed at its teardown


def fault_manager(topology: LocalTopology, **options: Any) -> ReplicaManager:
    merged = {**TIMINGS, **options}
    replicas = {name: topology.dsn(name) for name in topology.nodes if name != "primary"}
    mgr = ReplicaManager(topology.dsn("primary"), replicas, **merged)
    _made.append(mgr)
    return mgr


@pytest.fixture(autouse=True)
async def _close_fault_managers() -> AsyncIterator[None]:
    """A test that fails before its own close() leaves no pool or task to the next tests.

    (Their ``assert_clean_after_close`` counts this loop's areplica tasks and the servers'
    connections: one failed test's open manager would fail every later one.)
    """
    yield
    made = list(_made)
    _made.clear()
    for mgr in made:
        await mgr.close()  # idempotent: a no-op for the managers their test closed


@dataclass
class Load:
    """50+ concurrent readers and a writer, recording what the servers answered."""

    mgr: ReplicaManager
    topology: LocalTopology
    readers: int = 50
    reads: list[tuple[float, int]] = field(default_factory=list)  # (started at, server port)
    slowest: float = 0.0
    failed_reads: list[BaseException] = field(default_factory=list)
    acknowledged: list[str] = field(default_factory=list)
    failed_writes: list[BaseException] = field(default_factory=list)
    write_pause: float = 0.02
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    tag: str = "load"

    async def _reader(self) -> None:
        # Each reader is its own client (a request handler would be): its own session, not
        # the writer's (tasks spawned from the connecting task share its session).
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                async with self.mgr.session():
                    rows = await self.mgr.execute_sql("SELECT inet_server_port()")
                assert rows is not None
                self.reads.append((started, int(rows[0][0])))
            except Exception as exc:
                self.failed_reads.append(exc)
            self.slowest = max(self.slowest, time.monotonic() - started)
            await asyncio.sleep(0.005)

    async def _writer(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            tag = f"{self.tag}-{n}"
            try:
                await self.mgr.execute_sql("INSERT INTO fault_log (tag) VALUES (%s)", [tag])
                self.acknowledged.append(tag)
            except Exception as exc:
                self.failed_writes.append(exc)
            await asyncio.sleep(self.write_pause)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._reader()) for _ in range(self.readers)]
        self._tasks.append(asyncio.create_task(self._writer()))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def reads_on(self, port: int, since: float = 0.0, until: float = float("inf")) -> int:
        """Reads served by ``port`` that *started* between ``since`` and ``until``."""
        return sum(1 for at, p in self.reads if p == port and since <= at <= until)

    def check_writes_on_primary(self, node: str = "primary") -> None:
        tags = {r[0] for r in sql_on(self.topology, node, "SELECT tag FROM fault_log")}
        missing = [t for t in self.acknowledged if t not in tags]
        assert missing == [], f"{len(missing)} acknowledged writes missing on {node}"


@contextlib.asynccontextmanager
async def under_load(
    mgr: ReplicaManager, topology: LocalTopology, **kw: Any
) -> AsyncIterator[Load]:
    load = Load(mgr, topology, **kw)
    load.start()
    try:
        yield load
    finally:
        await load.stop()


def baseline(topology: LocalTopology) -> dict[str, int]:
    return {name: client_backends(topology, name) for name in topology.nodes}


async def assert_clean_after_close(
    mgr: ReplicaManager,
    topology: LocalTopology,
    before: dict[str, int],
    nodes: list[str] | None = None,
) -> None:
    """After close(): no areplica task left, every server back to its connection baseline."""
    await mgr.close()
    leftover = [
        t for t in asyncio.all_tasks() if not t.done() and t.get_name().startswith(mgr.name)
    ]
    assert leftover == []

    def settled() -> bool:
        return all(client_backends(topology, n) == before[n] for n in (nodes or list(before)))

    await wait_for(settled, timeout=10)
