"""A FastAPI app under ``uvicorn --workers 4`` on a real Patroni cluster (issue 17).

50 HTTP clients each write a row and read it back, each request on a new connection (so the
read often lands on another worker than the write: the token travels in the cookie), through
three planned switchovers and a crash failover. Every worker learns of the new primary on its
own: a token written on a primary a worker has not probed yet must make it learn the cluster,
never clamp the token and read stale. Facts: the rows the servers hold.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from areplica.testing.patroni import PatroniTopology
from areplica.testing.processes import free_port

pytestmark = pytest.mark.patroni

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = 50


@dataclass
class Tally:
    acked: list[str] = field(default_factory=list)
    refused_writes: int = 0
    reads: int = 0
    stale: list[str] = field(default_factory=list)
    failed_reads: list[str] = field(default_factory=list)
    other_worker: int = 0
    pids: collections.Counter[int] = field(default_factory=collections.Counter)


async def client(base: str, index: int, tally: Tally, stop: asyncio.Event) -> None:
    limits = httpx.Limits(max_keepalive_connections=0)  # a new connection, any worker
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as http:
        n = 0
        while not stop.is_set():
            n += 1
            tag = f"c{index}-{n}"
            try:
                wrote = await http.post(f"/rows/{tag}")
            except httpx.HTTPError:
                tally.refused_writes += 1
                await asyncio.sleep(0.1)
                continue
            if wrote.status_code != 200:
                tally.refused_writes += 1  # never acknowledged: not a lost write
                await asyncio.sleep(0.1)
                continue
            tally.acked.append(tag)
            try:
                read = await http.get(f"/rows/{tag}")  # the cookie carries the token
            except httpx.HTTPError as exc:
                tally.failed_reads.append(f"{tag}: {exc!r}")
                continue
            if read.status_code != 200:
                tally.failed_reads.append(f"{tag}: HTTP {read.status_code} {read.text[:80]}")
                continue
            answer = read.json()
            tally.reads += 1
            tally.pids[answer["pid"]] += 1
            tally.other_worker += answer["pid"] != wrote.json()["pid"]
            if not answer["found"]:
                tally.stale.append(tag)
            await asyncio.sleep(0.02)


def serve(topo: PatroniTopology, port: int, driver: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "WORKERS_DRIVER": driver,
        "WORKERS_PATRONI": ";".join(topo.rest_urls),
        "WORKERS_DSN": topo.dsn("n1"),
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "tests.patroni.workers_app:create",
            "--workers",
            "4",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )


async def wait_serving(base: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(base_url=base) as http:
        while True:
            assert proc.poll() is None, "uvicorn exited"
            try:
                if (await http.get("/rows/none")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the app never answered"
            await asyncio.sleep(0.2)


async def test_workers_read_their_writes_through_switchovers_and_a_failover(
    healthy_patroni: PatroniTopology, driver: str
) -> None:
    topo = healthy_patroni
    # A table of this run only: tags repeat from run to run, and a read counts one row.
    topo.query(topo.wait_leader(), "DROP TABLE IF EXISTS workers_log")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = serve(topo, port, driver)
    tally = Tally()
    stop = asyncio.Event()
    try:
        await wait_serving(base, proc)
        tasks = [asyncio.create_task(client(base, i, tally, stop)) for i in range(CLIENTS)]
        await asyncio.sleep(2.0)
        for _ in range(3):
            done = await asyncio.to_thread(topo.switchover)
            print(f"\nswitchover {done.old_leader} -> {done.new_leader} in {done.seconds:.2f}s")
            await asyncio.sleep(4.0)
        leader = await asyncio.to_thread(topo.wait_leader)
        await asyncio.to_thread(topo.crash, leader)
        new = await asyncio.to_thread(topo.wait_leader, 90.0, [leader])
        print(f"crash failover {leader} -> {new}")
        await asyncio.sleep(3.0)
        await asyncio.to_thread(topo.restart, leader)
        await asyncio.sleep(2.0)
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the uvicorn we started, and its workers
        proc.wait(30)
    leader = topo.wait_leader()
    present = {row[0] for row in topo.query(leader, "SELECT tag FROM workers_log")}
    lost = [tag for tag in tally.acked if tag not in present]
    print(
        f"[{driver}] acked writes {len(tally.acked)}, refused {tally.refused_writes}, "
        f"reads {tally.reads} "
        f"({tally.other_worker} on another worker), workers {dict(tally.pids)}, "
        f"stale {len(tally.stale)}, failed reads {len(tally.failed_reads)}, lost {len(lost)}"
    )
    assert len(tally.pids) == 4 and tally.other_worker > tally.reads // 2
    assert tally.stale == [], tally.stale[:10]
    assert tally.failed_reads == [], tally.failed_reads[:10]
    assert lost == [], lost[:10]
