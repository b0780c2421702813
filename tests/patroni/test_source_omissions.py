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
            if int((time.monotonic() - began) / FLIP) % 2:
                members = data["members"]
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


@pytest.mark.parametrize("omit", ["leader", "everyone", "replicas"])
async def test_members_left_out_every_other_half_second_stay(
    healthy_patroni: PatroniTopology, omit: str
) -> None:
    topo = healthy_patroni
    leader = topo.wait_leader()
    topo.query(leader, "CREATE TABLE IF NOT EXISTS omissions (id bigserial PRIMARY KEY)")
    downs: list[tuple[str, str]] = []
    smallest = len(topo.members)
    acked: list[float] = []
    failed: list[BaseException] = []

    def changed(old: NodeStatus, new: NodeStatus) -> None:
        if new.state == "down":
            downs.append((new.name, new.last_error or ""))

    async with flapping_front(topo.rest_urls, omit) as url:
        mgr = ReplicaManager(patroni=[url], dsn=topo.dsn("n1"), **TIMINGS)
        mgr.on_state_change(changed)
        async with mgr:
            stop = time.monotonic() + RUN
            began = time.monotonic()
            while time.monotonic() < stop:
                try:
                    await mgr.execute_sql("INSERT INTO omissions DEFAULT VALUES")
                    acked.append(time.monotonic())
                except Exception as exc:
                    failed.append(exc)
                smallest = min(smallest, len(mgr.status()))
                await asyncio.sleep(0.02)
    gaps = [b - a for a, b in zip([began, *acked], acked, strict=False)]
    print(
        f"\nomitting {omit}: {len(acked)} writes, {len(failed)} failed, longest gap "
        f"{max(gaps, default=RUN):.2f}s, fewest members {smallest}, went down {downs}"
    )
    assert failed == []
    assert max(gaps, default=RUN) < 1.0
    assert smallest == len(topo.members)
    assert downs == []
