"""A Patroni answer that leaves members out must not drop them (issue 17).

A small REST front in the test passes the real Patroni's ``/cluster`` on, but every other
0.5 s it leaves out the leader, or every member, or the replicas. The members answer every
probe all along: writes must go on without a gap, and no member may leave or go down.

Before the manager applied ``areplica.membership.MemberTracker`` to each answer these tests
failed (the primary was dropped, writes stalled behind ``primary_wait``, re-added replicas
waited ``recover_after``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from areplica import ReplicaManager
from areplica.node import NodeStatus
from areplica.testing.patroni import PatroniTopology

pytestmark = pytest.mark.patroni

FLIP = 0.5  # seconds between a full answer and one that leaves members out
RUN = 6.0
TIMINGS = {"health_interval": 0.25, "health_timeout": 1.0, "read_timeout": 2.0}


def upstream(urls: list[str]) -> dict[str, Any]:
    for url in urls:
        with (
            contextlib.suppress(Exception),
            urllib.request.urlopen(url + "/cluster", timeout=2.0) as answer,
        ):
            data: dict[str, Any] = json.loads(answer.read())
            return data
    raise ConnectionError("no Patroni endpoint answered the front")


@contextlib.asynccontextmanager
async def flapping_front(urls: list[str], omit: str) -> AsyncIterator[str]:
    """A REST endpoint answering like Patroni, leaving ``omit`` out every other FLIP s."""
    began = time.monotonic()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            data = await asyncio.to_thread(upstream, urls)
            members = data["members"]
            if omit == "twice":  # the leader listed again under another name, then not
                if time.monotonic() - began < 2.0:
                    leader = next(m for m in members if m.get("role") == "leader")
                    data["members"] = [*members, {**leader, "name": "alias-of-leader"}]
            elif omit != "none" and int((time.monotonic() - began) / FLIP) % 2:
                if omit == "leader":
                    data["members"] = [m for m in members if m.get("role") != "leader"]
                elif omit == "replicas":
                    data["members"] = [m for m in members if m.get("role") == "leader"]
                else:
                    data["members"] = []
            body = json.dumps(data).encode()
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n")
            await writer.drain()
            writer.write(body)  # headers and body apart, as Patroni writes them
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


@dataclass
class Run:
    """What one run through a front saw: writes, reads, failures, members."""

    acked: list[float] = field(default_factory=list)
    failed: list[BaseException] = field(default_factory=list)
    reads: int = 0
    failed_reads: list[BaseException] = field(default_factory=list)
    downs: list[tuple[str, str]] = field(default_factory=list)
    smallest: int = 1_000

    def longest_gap(self, began: float) -> float:
        gaps = [b - a for a, b in zip([began, *self.acked], self.acked, strict=False)]
        return max(gaps, default=RUN)


async def run_through(topo: PatroniTopology, omit: str) -> tuple[Run, float]:
    """A writer and 5 readers for RUN seconds, the manager reading members from a front."""
    run = Run(smallest=len(topo.members))

    def changed(old: NodeStatus, new: NodeStatus) -> None:
        if new.state == "down":
            run.downs.append((new.name, new.last_error or ""))

    async def reader(stop: float) -> None:
        while time.monotonic() < stop:
            try:
                async with mgr.session():
                    await mgr.execute_sql("SELECT count(*) FROM omissions")
                run.reads += 1
            except Exception as exc:
                run.failed_reads.append(exc)
            await asyncio.sleep(0.01)

    async with flapping_front(topo.rest_urls, omit) as url:
        mgr = ReplicaManager(patroni=[url], dsn=topo.dsn("n1"), **TIMINGS)
        mgr.on_state_change(changed)
        async with mgr:
            began = time.monotonic()
            stop = began + RUN
            readers = [asyncio.create_task(reader(stop)) for _ in range(5)]
            while time.monotonic() < stop:
                try:
                    await mgr.execute_sql("INSERT INTO omissions DEFAULT VALUES")
                    run.acked.append(time.monotonic())
                except Exception as exc:
                    run.failed.append(exc)
                run.smallest = min(run.smallest, len(mgr.status()))
                await asyncio.sleep(0.02)
            await asyncio.gather(*readers)
    return run, began


@pytest.mark.parametrize("omit", ["leader", "everyone", "replicas", "twice"])
async def test_members_left_out_every_other_half_second_stay(
    healthy_patroni: PatroniTopology, omit: str
) -> None:
    topo = healthy_patroni
    leader = topo.wait_leader()
    topo.query(leader, "CREATE TABLE IF NOT EXISTS omissions (id bigserial PRIMARY KEY)")
    steady, _ = await run_through(topo, "none")
    run, began = await run_through(topo, omit)
    print(
        f"\nomitting {omit}: {len(run.acked)} writes (steady {len(steady.acked)}), "
        f"{len(run.failed)} failed, reads {run.reads} ({len(run.failed_reads)} failed), "
        f"longest gap {run.longest_gap(began):.2f}s, fewest members {run.smallest}, "
        f"went down {run.downs}"
    )
    assert run.failed == [] and run.failed_reads == []
    assert run.longest_gap(began) < 1.0
    assert run.smallest == len(topo.members)
    assert run.downs == []
    assert len(run.acked) >= 0.8 * len(steady.acked)
