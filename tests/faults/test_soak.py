"""Chaos soak (`nox -s soak`, not in CI): minutes of random replica faults under load.

Invariants checked all along: no read fails, no reader misses its own write, every
acknowledged write is on the primary at the end, and after close() no task and no server
connection of the manager is left. Figures are printed at the end.
"""

from __future__ import annotations

import asyncio
import os
import random
import time

import pytest

from areplica.testing.topology import LocalTopology
from tests.conftest import sql_on
from tests.faults.conftest import assert_clean_after_close, baseline, fault_manager, under_load

pytestmark = [
    pytest.mark.soak,
    pytest.mark.skipif(not os.environ.get("AREPLICA_SOAK"), reason="set AREPLICA_SOAK=1"),
]

FAULTS = ("kill", "hang", "blackhole", "delay", "lag")


async def test_chaos_soak(ftopo: LocalTopology) -> None:
    seconds = float(os.environ.get("AREPLICA_SOAK_SECONDS", "180"))
    rng = random.Random(int(os.environ.get("AREPLICA_SOAK_SEED", "2026")))
    before = baseline(ftopo)
    mgr = fault_manager(ftopo, read_timeout=1.0)
    await mgr.connect()
    stale = 0
    checked = 0
    stop = asyncio.Event()

    async def read_your_writes() -> None:
        nonlocal stale, checked
        n = 0
        while not stop.is_set():
            n += 1
            async with mgr.session():
                rows = await mgr.execute_sql(
                    "INSERT INTO fault_log (tag) VALUES (%s) RETURNING id", [f"ryw-{id(stop)}-{n}"]
                )
                assert rows is not None
                seen = await mgr.execute_sql("SELECT 1 FROM fault_log WHERE id = %s", [rows[0][0]])
                checked += 1
                stale += not seen
            await asyncio.sleep(0.01)

    injected: list[str] = []
    started = time.monotonic()
    async with under_load(mgr, ftopo, readers=50, tag="soak") as load:
        ryw = [asyncio.create_task(read_your_writes()) for _ in range(4)]
        while time.monotonic() - started < seconds:
            node = rng.choice(["replica-1", "replica-2"])
            fault = rng.choice(FAULTS)
            hold = rng.uniform(1.0, 5.0)
            injected.append(f"{time.monotonic() - started:6.1f}s {fault} {node} {hold:.1f}s")
            if fault == "kill":
                ftopo.kill(node)
                await asyncio.sleep(hold)
                await asyncio.to_thread(ftopo.start_node, node)
            elif fault == "hang":
                ftopo.hang(node)
                await asyncio.sleep(hold)
                ftopo.resume(node)
            elif fault == "blackhole":
                ftopo.blackhole(node)
                await asyncio.sleep(hold)
                ftopo.heal(node)
            elif fault == "delay":
                ftopo.delay(node, rng.choice([50, 150, 400]))
                await asyncio.sleep(hold)
                ftopo.heal(node)
            else:
                await asyncio.to_thread(ftopo.set_apply_delay, node, 2500)
                await asyncio.sleep(hold)
                await asyncio.to_thread(ftopo.set_apply_delay, node, 0)
            assert load.failed_reads == [], load.failed_reads[:3]
            assert stale == 0
            await asyncio.sleep(rng.uniform(0.5, 2.0))
        stop.set()
        await asyncio.gather(*ryw)
    statuses = mgr.status()
    print(f"\nsoak {seconds:.0f}s, {len(injected)} faults:")
    for line in injected:
        print("  " + line)
    print(
        f"reads {len(load.reads)} failed {len(load.failed_reads)} slowest {load.slowest:.2f}s "
        f"retried {mgr.retried_reads} fallback {mgr.fallback_reads}; writes "
        f"{len(load.acknowledged)} failed {len(load.failed_writes)}; read-your-writes checked "
        f"{checked} stale {stale}; evictions "
        f"{ {s.name: s.evictions for s in statuses} }"
    )
    assert load.failed_reads == [] and stale == 0 and load.failed_writes == []
    load.check_writes_on_primary()
    assert sql_on(ftopo, "primary", "SELECT count(*) FROM fault_log")[0][0] >= len(
        load.acknowledged
    )
    await asyncio.to_thread(ftopo.wait_replicated)
    await assert_clean_after_close(mgr, ftopo, before)
