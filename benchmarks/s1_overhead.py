"""Scenario 1: what routing costs on top of peewee-async, and one routing decision alone.

Contenders, per driver: ``mgr.get(Item.select().where(Item.id == k))`` through a manager
with one replica and ``consistency="eventual"`` (every read goes to that replica), against
peewee-async's ``db.aio_execute()`` of the same query (with the ``LIMIT 1`` ``get`` adds) on
a plain database bound straight to the same replica. Same pool size on both sides.
"""

from __future__ import annotations

import random
import time
import timeit
from contextlib import AsyncExitStack
from typing import Any

from areplica import ReplicaManager
from areplica.routing import classify_query

from .common import (
    ROWS,
    Context,
    delta,
    item_model,
    lookup_op,
    median,
    node_reads,
    opened,
    opened_manager,
    plain_database,
    ratio,
    rnd,
    rotated,
    run_load,
    run_sequential,
)

DRIVERS = ("aiopg", "psycopg")


def _decision_costs(mgr1: ReplicaManager, mgr2: ReplicaManager, number: int) -> dict[str, Any]:
    """µs per call of the router's pick and of the (cached) classifier, by ``timeit``."""
    item = item_model(mgr2.database)
    query = item.select().where(item.id == 42).limit(1)
    sql, _params = mgr2.database.engine.compile(query)

    def per_call(stmt: str, env: dict[str, Any]) -> float:
        timer = timeit.Timer(stmt, globals=env)
        runs = timer.repeat(repeat=5, number=number)
        return median(runs) / number * 1e6

    empty: set[Any] = set()
    out: dict[str, Any] = {
        "pick_1_replica_eventual_us": per_call(
            "pick(None, ex, None)", {"pick": mgr1.database.engine.reads.target, "ex": empty}
        ),
        "pick_2_replicas_causal_us": per_call(
            "pick(None, ex, None)", {"pick": mgr2.database.engine.reads.target, "ex": empty}
        ),
        "classify_cached_us": per_call(
            "classify(q, s)", {"classify": classify_query, "q": query, "s": sql}
        ),
        "timeit_number": number,
    }
    # Compiling is ~50x slower than a pick: fewer calls keep the run short.
    compile_number = max(1000, number // 20)
    runs = timeit.Timer(
        "compile(q)", globals={"compile": mgr2.database.engine.compile, "q": query}
    ).repeat(repeat=5, number=compile_number)
    out["compile_us"] = median(runs) / compile_number * 1e6
    out["decision_us"] = out["pick_2_replicas_causal_us"] + out["classify_cached_us"]
    return {k: rnd(v, 3) if isinstance(v, float) else v for k, v in out.items()}


async def run(ctx: Context) -> dict[str, Any]:
    s = ctx.settings
    topo = ctx.topology
    replica = topo.dsn("replica-1")
    contenders: dict[str, Any] = {}
    result: dict[str, Any] = {
        "pool_size": s.s1_pool_size,
        "concurrency": s.s1_concurrency,
        "latency_queries_per_round": s.s1_latency_queries,
        "throughput_seconds_per_round": s.s1_throughput_seconds,
        "rounds": s.rounds,
        "query": "mgr.get(Item.select().where(Item.id == k)) vs "
        "db.aio_execute(Item.select().where(Item.id == k).limit(1))",
    }
    managers: dict[str, ReplicaManager] = {}
    async with AsyncExitStack() as stack:
        for driver in DRIVERS:
            mgr = await stack.enter_async_context(
                opened_manager(
                    topo.dsn("primary"),
                    {"replica-1": replica},
                    driver=driver,
                    pool_size=s.s1_pool_size,
                    consistency="eventual",
                )
            )
            managers[driver] = mgr
            db = await stack.enter_async_context(
                opened(plain_database(driver, replica, s.s1_pool_size))
            )
            r_item = item_model(mgr.database)
            p_item = item_model(db)

            def make_plain(d: Any = db, model: Any = p_item) -> Any:
                async def op(rng: random.Random, _: int) -> None:
                    k = rng.randint(1, ROWS)
                    rows = await d.aio_execute(model.select().where(model.id == k).limit(1))
                    if rows[0].id != k:
                        raise AssertionError("wrong row")

                return op

            contenders[f"areplica/{driver}"] = lookup_op(mgr, r_item)
            contenders[f"peewee-async/{driver}"] = make_plain()

        two = await stack.enter_async_context(
            opened_manager(
                topo.dsn("primary"),
                {"replica-1": replica, "replica-2": topo.dsn("replica-2")},
                pool_size=s.s1_pool_size,
            )
        )

        # Warm every pool up (connections opened, caches filled) before measuring.
        for op in contenders.values():
            await run_load(op, concurrency=s.s1_concurrency, duration=s.warmup_seconds)
        reads_before = {d: node_reads(m) for d, m in managers.items()}

        per_round: dict[str, dict[str, list[float]]] = {
            name: {"latency_p50_us": [], "throughput": [], "client_cpu_us": [], "errors": []}
            for name in contenders
        }
        names = list(contenders)
        for r in range(s.rounds):
            for name in rotated(names, r):
                op = contenders[name]
                lat = await run_sequential(op, s.s1_latency_queries, seed=r)
                cpu = time.process_time()
                load = await run_load(
                    op, concurrency=s.s1_concurrency, duration=s.s1_throughput_seconds, seed=r
                )
                cpu = time.process_time() - cpu
                per_round[name]["latency_p50_us"].append(median(lat))
                per_round[name]["throughput"].append(load.throughput)
                per_round[name]["client_cpu_us"].append(cpu / max(1, load.ok) * 1e6)
                per_round[name]["errors"].append(load.errors)
            ctx.log(
                f"  round {r + 1}/{s.rounds}: "
                + ", ".join(
                    f"{n} {per_round[n]['latency_p50_us'][-1]:.0f}µs "
                    f"{per_round[n]['throughput'][-1]:.0f}/s"
                    for n in names
                )
            )

        served = {d: delta(node_reads(m), reads_before[d]) for d, m in managers.items()}
        decision = _decision_costs(managers["aiopg"], two, s.s1_timeit_number)

    result["contenders"] = {
        name: {
            "latency_p50_us": rnd(median(v["latency_p50_us"]), 1),
            "throughput": rnd(median(v["throughput"]), 1),
            # This process's CPU time per query under the concurrent load (all of it:
            # the event loop, the driver, peewee, the pool, and areplica's routing).
            "client_cpu_us_per_query": rnd(median(v["client_cpu_us"]), 1),
            "errors": int(sum(v["errors"])),
            "rounds": {k: [rnd(x, 1) for x in vals] for k, vals in v.items()},
        }
        for name, v in per_round.items()
    }
    result["by_driver"] = {}
    for driver in DRIVERS:
        a = result["contenders"][f"areplica/{driver}"]
        b = result["contenders"][f"peewee-async/{driver}"]
        paired_lat = [
            ratio(x, y)
            for x, y in zip(
                per_round[f"areplica/{driver}"]["latency_p50_us"],
                per_round[f"peewee-async/{driver}"]["latency_p50_us"],
                strict=True,
            )
        ]
        paired_tput = [
            ratio(y, x)
            for x, y in zip(
                per_round[f"areplica/{driver}"]["throughput"],
                per_round[f"peewee-async/{driver}"]["throughput"],
                strict=True,
            )
        ]
        result["by_driver"][driver] = {
            # > 1 means areplica is slower: its latency over peewee-async's.
            "latency_ratio": rnd(ratio(a["latency_p50_us"], b["latency_p50_us"])),
            # > 1 means areplica is slower: peewee-async's throughput over areplica's.
            "throughput_ratio": rnd(ratio(b["throughput"], a["throughput"])),
            "latency_ratio_paired_median": rnd(median(paired_lat)),
            "throughput_ratio_paired_median": rnd(median(paired_tput)),
            "client_cpu_ratio": rnd(
                ratio(a["client_cpu_us_per_query"], b["client_cpu_us_per_query"])
            ),
            "reads_served": served[driver],
        }
    result["decision"] = decision
    return result
