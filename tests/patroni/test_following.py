"""areplica following a real Patroni cluster: switchover, failover, membership, tags.

30 readers and a writer run through every role change. Facts come from the servers
(``inet_server_port()``, rows on the new leader) and from Patroni's own timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from areplica import NoPrimaryError, ReplicaManager
from areplica.testing.patroni import PatroniTopology

pytestmark = pytest.mark.patroni

READERS = 30
TIMINGS = {"health_interval": 0.25, "health_timeout": 1.0, "read_timeout": 2.0}


def manager(topo: PatroniTopology, driver: str, **options: object) -> ReplicaManager:
    return ReplicaManager(
        patroni=topo.rest_urls, dsn=topo.dsn("n1"), driver=driver, **{**TIMINGS, **options}
    )


@dataclass
class Load:
    """30 readers and a writer; what the servers answered, and every failure."""

    mgr: ReplicaManager
    reads: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, server port)
    failed_reads: list[BaseException] = field(default_factory=list)
    writes: list[tuple[float, float, str]] = field(default_factory=list)  # (sent, acked, tag)
    failed_writes: list[tuple[float, BaseException]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def reader(self) -> None:
        while not self.stop.is_set():
            try:
                async with self.mgr.session():  # one client per reader, not the writer's
                    rows = await self.mgr.execute_sql("SELECT inet_server_port()")
                assert rows is not None
                self.reads.append((time.monotonic(), int(rows[0][0])))
            except Exception as exc:
                self.failed_reads.append(exc)
            await asyncio.sleep(0.005)

    async def writer(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            tag = f"w{n}-{time.monotonic_ns()}"
            sent = time.monotonic()
            try:
                await self.mgr.execute_sql("INSERT INTO follow (tag) VALUES (%s)", (tag,))
                self.writes.append((sent, time.monotonic(), tag))
            except Exception as exc:
                self.failed_writes.append((time.monotonic(), exc))
            await asyncio.sleep(0.02)

    def longest_write_gap(self, since: float) -> float:
        """The longest time without an acknowledged write after ``since``."""
        acked = sorted(a for _, a, _ in self.writes if a >= since)
        gaps = [b - a for a, b in zip([since, *acked], acked, strict=False)]
        return max(gaps, default=0.0)


@contextlib.asynccontextmanager
async def running(mgr: ReplicaManager) -> AsyncIterator[Load]:
    load = Load(mgr)
    tasks = [asyncio.ensure_future(load.reader()) for _ in range(READERS)]
    tasks.append(asyncio.ensure_future(load.writer()))
    try:
        await asyncio.sleep(1.0)
        yield load
    finally:
        load.stop.set()
        await asyncio.gather(*tasks)


def lost_writes(topo: PatroniTopology, load: Load) -> list[str]:
    leader = topo.wait_leader()
    present = {row[0] for row in topo.query(leader, "SELECT tag FROM follow")}
    return [tag for _, _, tag in load.writes if tag not in present]


@pytest.fixture
def follow(healthy_patroni: PatroniTopology) -> PatroniTopology:
    leader = healthy_patroni.leader()
    assert leader is not None
    healthy_patroni.query(
        leader, "CREATE TABLE IF NOT EXISTS follow (id bigserial PRIMARY KEY, tag text)"
    )
    healthy_patroni.query(leader, "TRUNCATE follow")
    healthy_patroni.wait_replicated()
    return healthy_patroni


async def test_planned_switchovers_fail_no_read(follow: PatroniTopology, driver: str) -> None:
    topo = follow
    async with manager(topo, driver) as mgr, running(mgr) as load:
        for _ in range(2):
            old = topo.wait_leader()
            began = time.monotonic()
            failed_before = len(load.failed_writes)
            evicted_before = {s.name: s.evictions for s in mgr.status()}
            done = await asyncio.to_thread(topo.switchover)
            await asyncio.sleep(3.0)  # the old leader rejoins; reads go on meanwhile
            gap = load.longest_write_gap(began)
            print(
                f"{driver} switchover {done.old_leader}->{done.new_leader}: patroni "
                f"{done.seconds:.2f}s, write gap {gap:.2f}s, reads {len(load.reads)}"
            )
            assert load.failed_reads == []
            assert gap <= done.seconds + 1.0, (gap, done)
            # Writes in flight when the old primary stopped fail with a clear error (their
            # outcome unknown, never retried); none fails outside the switchover.
            for at, exc in load.failed_writes[failed_before:]:
                assert isinstance(exc, NoPrimaryError), exc
                assert began <= at <= began + done.seconds + 1.0, (at - began, exc)
            # The old primary reads again, as a standby.
            settled = time.monotonic() + 10
            while time.monotonic() < settled:
                late = {port for at, port in load.reads if at > time.monotonic() - 1.0}
                if topo.port(old) in late:
                    break
                await asyncio.sleep(0.2)
            assert topo.port(old) in {port for at, port in load.reads if at > began}
            roles = {s.name: s.role for s in mgr.status()}
            assert roles[done.new_leader] == "primary" and roles[old] == "replica"
            # Standbys are never evicted; the old primary, restarted by Patroni as a
            # standby, may be seen down while it restarts.
            evicted = {s.name: s.evictions - evicted_before.get(s.name, 0) for s in mgr.status()}
            assert all(count == 0 for name, count in evicted.items() if name != old), evicted
    assert lost_writes(topo, load) == []


async def test_crash_failover_fails_no_read(follow: PatroniTopology, driver: str) -> None:
    topo = follow
    async with manager(topo, driver) as mgr, running(mgr) as load:
        old = topo.wait_leader()
        elected: dict[str, float] = {}

        def watch() -> None:  # Patroni's election time, seen from its REST API
            name = topo.wait_leader(timeout=120, exclude=[old])
            elected[name] = time.monotonic()

        topo.crash(old)
        crashed = time.monotonic()
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        await asyncio.to_thread(watcher.join, 150)
        ((new, at),) = elected.items()
        await asyncio.sleep(2.0)
        after = sorted(a for _, a, _ in load.writes if a > at)
        assert after, "no write succeeded after the election"
        back = after[0] - at
        print(
            f"{driver} failover {old}->{new}: elected {at - crashed:.1f}s after the crash, "
            f"writes back {back:.2f}s after the election"
        )
        assert back <= 1.0
        assert load.failed_reads == []
        await asyncio.to_thread(topo.restart, old)
        began = time.monotonic()
        while topo.port(old) not in {p for t, p in load.reads if t > began}:
            assert time.monotonic() - began < 30, "the restarted member never served a read"
            await asyncio.sleep(0.2)
        assert load.failed_reads == []
    assert lost_writes(topo, load) == []


async def test_members_and_tags_follow_patroni(follow: PatroniTopology, driver: str) -> None:
    topo = follow
    async with manager(topo, driver) as mgr:
        added = await asyncio.to_thread(topo.add_member, None, {"noloadbalance": True})
        try:
            # Tagged noloadbalance: a member, but no reads.
            deadline = time.monotonic() + 20
            while added not in {s.name for s in mgr.status()}:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            ports = set()
            for _ in range(200):
                rows = await mgr.execute_sql("SELECT inet_server_port()")
                assert rows is not None
                ports.add(rows[0][0])
            assert topo.port(added) not in ports
            # Tag removed: it takes reads, without a restart of the app.
            await asyncio.to_thread(topo.set_tags, added, {})
            deadline = time.monotonic() + 20
            while topo.port(added) not in ports:
                assert time.monotonic() < deadline, "the new member never served a read"
                rows = await mgr.execute_sql("SELECT inet_server_port()")
                assert rows is not None
                ports.add(rows[0][0])
        finally:
            await asyncio.to_thread(topo.remove_member, added)
        deadline = time.monotonic() + 20
        while added in {s.name for s in mgr.status()}:
            assert time.monotonic() < deadline, "the removed member is still listed"
            await asyncio.sleep(0.1)
