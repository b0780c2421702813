"""Scenario 2: I/O-bound read throughput with 0, 1 and 2 replicas.

Every read is a primary-key lookup that also sleeps 2 ms on the server, so a connection,
not the CPU, is the scarce resource: 4 connections per node, 64 concurrent tasks. With 0
replicas the reads run on the primary through a plain peewee-async database (4
connections); with 1 and 2 replicas through areplica (4 connections per node; reads go to
the replicas only, the primary keeps its pool for writes); and with 2 replicas plus the
primary as a reader (``primary_weight=1``), 3 nodes x 4 connections.
"""

from __future__ import annotations

import random
from contextlib import AsyncExitStack
from typing import Any

from peewee_async.databases import fetchall

from areplica import ReplicaManager

from .common import (
    ROWS,
    TABLE,
    Context,
    Op,
    delta,
    median,
    node_reads,
    opened,
    opened_manager,
    plain_database,
    ratio,
    rnd,
    rotated,
    run_load,
)

SLEEP_MS = 2
SQL = f"SELECT id FROM {TABLE} WHERE id = %s AND pg_sleep({SLEEP_MS / 1000}) IS NOT NULL"


def sleepy_op(mgr: ReplicaManager) -> Op:
    """One 2 ms primary-key read through ``mgr``, checked."""

    async def op(rng: random.Random, _: int) -> None:
        k = rng.randint(1, ROWS)
        rows = await mgr.execute_sql(SQL, (k,))
        if not rows or rows[0][0] != k:
            raise AssertionError("wrong row")

    return op


async def run(ctx: Context) -> dict[str, Any]:
    s = ctx.settings
    topo = ctx.topology
    contenders: dict[str, Any] = {}
    managers: dict[str, ReplicaManager] = {}
    async with AsyncExitStack() as stack:
        db = await stack.enter_async_context(
            opened(plain_database("aiopg", topo.dsn("primary"), s.s2_pool_size))
        )

        async def plain_op(rng: random.Random, _: int) -> None:
            k = rng.randint(1, ROWS)
            rows = await db.aio_execute_sql(SQL, (k,), fetch_results=fetchall)
            if rows[0][0] != k:
                raise AssertionError("wrong row")

        contenders["0 replicas (peewee-async on the primary)"] = plain_op
        # (replicas, primary_weight): the last one lets the primary take reads too.
        for count, primary_weight in ((1, 0.0), (2, 0.0), (2, 1.0)):
            replicas = {f"replica-{i}": topo.dsn(f"replica-{i}") for i in range(1, count + 1)}
            mgr = await stack.enter_async_context(
                opened_manager(
                    topo.dsn("primary"),
                    replicas,
                    pool_size=s.s2_pool_size,
                    primary_weight=primary_weight,
                )
            )
            name = f"{count} replica{'s' if count > 1 else ''} (areplica)"
            if primary_weight:
                name = f"{count} replicas + primary reads (areplica, primary_weight=1)"
            managers[name] = mgr

            contenders[name] = sleepy_op(mgr)

        for op in contenders.values():
            await run_load(op, concurrency=s.s2_concurrency, duration=s.warmup_seconds)
        before = {n: node_reads(m) for n, m in managers.items()}
        names = list(contenders)
        per_round: dict[str, list[float]] = {n: [] for n in names}
        errors: dict[str, int] = dict.fromkeys(names, 0)
        for r in range(s.rounds):
            for name in rotated(names, r):
                load = await run_load(
                    contenders[name], concurrency=s.s2_concurrency, duration=s.s2_seconds, seed=r
                )
                per_round[name].append(load.throughput)
                errors[name] += load.errors
            ctx.log(
                f"  round {r + 1}/{s.rounds}: "
                + ", ".join(f"{n.split(' (')[0]} {per_round[n][-1]:.0f}/s" for n in names)
            )
        served = {n: delta(node_reads(m), before[n]) for n, m in managers.items()}

    base = median(per_round[names[0]])
    out: dict[str, Any] = {
        "sql": SQL,
        "pool_size_per_node": s.s2_pool_size,
        "concurrency": s.s2_concurrency,
        "seconds_per_round": s.s2_seconds,
        "rounds": s.rounds,
        # The most this shape can give: reads only ever run on replicas, so N replicas
        # hold N x pool_size read connections against the baseline's pool_size.
        "ideal_speedup": {"1": 1.0, "2": 2.0, "2+primary": 3.0},
        "ceiling_per_node": rnd(s.s2_pool_size / (SLEEP_MS / 1000), 1),
        "contenders": {},
    }
    for name in names:
        tput = median(per_round[name])
        out["contenders"][name] = {
            "throughput": rnd(tput, 1),
            "speedup": rnd(ratio(tput, base)),
            "errors": errors[name],
            "rounds": [rnd(x, 1) for x in per_round[name]],
        }
        if name in served:
            out["contenders"][name]["reads_served"] = served[name]
    return out
