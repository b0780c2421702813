"""Scenario 4: a replica SIGKILLed in the middle of a read load, then started again.

On a topology of its own (primary + 2 replicas). Contenders, each in a phase of its own
with fresh pools: areplica (two replicas, default options) and the naive router most
tutorials show: a fixed list of per-replica peewee-async databases, one picked at random
per query, no health checks, no retry. In every phase ``replica-1`` is SIGKILLed at
``kill_at`` seconds and started again at ``restart_at``; the load runs to the end of the
phase. Failed reads and latency of the successful ones are counted per phase.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from typing import Any

from areplica.testing import LocalTopology

from .common import (
    ROWS,
    Context,
    Op,
    create_schema,
    delta,
    item_model,
    lookup_op,
    median,
    node_reads,
    opened,
    opened_manager,
    plain_database,
    rnd,
    rotated,
    run_load,
    wait_all_up,
)

CONTENDERS = ("areplica", "naive random router")
VICTIM = "replica-1"


@contextlib.asynccontextmanager
async def _contender(
    name: str, topo: LocalTopology, pool_size: int, info: dict[str, Any]
) -> AsyncIterator[Op]:
    replicas = {n: topo.dsn(n) for n in ("replica-1", "replica-2")}
    if name == "areplica":
        async with opened_manager(topo.dsn("primary"), replicas, pool_size=pool_size) as mgr:
            op = lookup_op(mgr, item_model(mgr.database))
            before = node_reads(mgr)
            try:
                yield op
            finally:
                info["reads_served"] = delta(node_reads(mgr), before)
                info["retried_reads"] = mgr.retried_reads
                info["fallback_reads"] = mgr.fallback_reads
                info["end_states"] = {st.name: st.state for st in mgr.status()}
        return
    async with contextlib.AsyncExitStack() as stack:
        dbs = [
            await stack.enter_async_context(opened(plain_database("aiopg", dsn, pool_size)))
            for dsn in replicas.values()
        ]
        models = [item_model(db) for db in dbs]

        async def naive(rng: random.Random, _: int) -> None:
            k = rng.randint(1, ROWS)
            i = rng.randrange(len(dbs))
            model = models[i]
            rows = await dbs[i].aio_execute(model.select().where(model.id == k).limit(1))
            if rows[0].id != k:
                raise AssertionError("wrong row")

        yield naive


async def _phase(ctx: Context, topo: LocalTopology, name: str, seed: int) -> dict[str, Any]:
    s = ctx.settings
    info: dict[str, Any] = {}
    timeline: dict[str, float] = {}
    async with _contender(name, topo, s.s4_pool_size, info) as op:
        await run_load(op, concurrency=s.s4_concurrency, duration=s.warmup_seconds)
        began = time.perf_counter()

        async def inject() -> None:
            await asyncio.sleep(s.s4_kill_at)
            timeline["kill"] = time.perf_counter() - began
            await asyncio.to_thread(topo.kill, VICTIM)
            await asyncio.sleep(max(0.0, s.s4_restart_at - (time.perf_counter() - began)))
            timeline["restart"] = time.perf_counter() - began
            await asyncio.to_thread(topo.start_node, VICTIM)
            timeline["restarted"] = time.perf_counter() - began

        injector = asyncio.create_task(inject())
        try:
            load = await run_load(
                op, concurrency=s.s4_concurrency, duration=s.s4_phase_seconds, seed=seed
            )
        finally:
            await injector
    await asyncio.to_thread(topo.wait_replicated, 60)
    restart = timeline.get("restarted", s.s4_phase_seconds)
    summary = load.summary()
    summary.update(info)
    summary["timeline_s"] = {k: rnd(v, 2) for k, v in timeline.items()}
    summary["failed_reads"] = load.errors
    summary["failed_share"] = rnd(load.errors / max(1, load.errors + load.ok), 4)
    summary["failed_after_restart"] = sum(1 for t in load.error_times if t > restart)
    return summary


async def run(ctx: Context) -> dict[str, Any]:
    s = ctx.settings
    out: dict[str, Any] = {
        "pool_size": s.s4_pool_size,
        "concurrency": s.s4_concurrency,
        "phase_seconds": s.s4_phase_seconds,
        "kill_at": s.s4_kill_at,
        "restart_at": s.s4_restart_at,
        "rounds": s.s4_rounds,
        "victim": VICTIM,
        "driver": "aiopg",
    }
    topo = LocalTopology(replicas=2)
    try:
        await asyncio.to_thread(topo.start)
        await asyncio.to_thread(create_schema, topo)
        phases: dict[str, list[dict[str, Any]]] = {n: [] for n in CONTENDERS}
        for r in range(s.s4_rounds):
            for name in rotated(list(CONTENDERS), r):
                phase = await _phase(ctx, topo, name, seed=r)
                phases[name].append(phase)
                ctx.log(
                    f"  round {r + 1}/{s.s4_rounds} {name}: {phase['ok']} ok, "
                    f"{phase['failed_reads']} failed, p99 {phase['p99_us']:.0f}µs"
                )
            # Every node up for the next round (the last restart may still be recovering).
            async with opened_manager(
                topo.dsn("primary"), {n: topo.dsn(n) for n in ("replica-1", "replica-2")}
            ) as mgr:
                await wait_all_up(mgr)
    finally:
        topo.close()  # blocking on purpose: it must run even when the task was cancelled
    out["contenders"] = {}
    for name, runs in phases.items():
        out["contenders"][name] = {
            "failed_reads": sum(p["failed_reads"] for p in runs),
            "ok_reads": sum(p["ok"] for p in runs),
            "failed_share": rnd(
                sum(p["failed_reads"] for p in runs)
                / max(1, sum(p["failed_reads"] + p["ok"] for p in runs)),
                4,
            ),
            "throughput": rnd(median([p["throughput"] for p in runs]), 1),
            "p50_us": rnd(median([p["p50_us"] for p in runs]), 1),
            "p99_us": rnd(median([p["p99_us"] for p in runs]), 1),
            "max_us": rnd(max(p["max_us"] or 0.0 for p in runs), 1),
            "phases": runs,
        }
    return out
