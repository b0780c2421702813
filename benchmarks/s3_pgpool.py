"""Scenario 3: areplica straight to the nodes against Pgpool-II in front of them.

Pgpool-II 4.3 runs in streaming-replication mode with statement-level load balancing over
the two standbys (primary weight 0), configured as ``/work/shared/notes/pgpool.md`` says.
Its contender is a plain peewee-async database (aiopg) pointed at pgpool's port; areplica's
is a manager with the two replicas and default options (causal consistency: a task's reads
after its own write wait for, or skip, replicas that have not replayed it). Pgpool-II gives
no such guarantee, so on the mixed workload areplica also runs in ``eventual`` mode, the
like-for-like peer. Same pool size everywhere. Workloads: primary-key lookups, and 90%
lookups / 10% single-row updates.

Per workload and contender: medians over rounds, and the per-round ratios against
Pgpool-II (contenders of a round run back to back). Where the time goes: the time of
requests split by ``mgr.timings()`` (waiting for a connection slot, for a replica to catch
up, running reads, running writes and reading their WAL position) when the library has it,
and always the benchmark's own timing of read and write calls.

With a link (``--link-delay-ms``) clients reach Pgpool-II through a delaying proxy, and
Pgpool-II reaches its backends through the nodes' delaying proxies, as areplica does: a
query through Pgpool-II crosses two links, one through areplica.
"""

from __future__ import annotations

import asyncio
import random
import time
from contextlib import AsyncExitStack
from typing import Any

from areplica import ReplicaManager

from . import link
from .common import (
    ROWS,
    Calls,
    Context,
    TimeSplit,
    delta,
    item_model,
    library_timings,
    median,
    node_reads,
    opened,
    opened_manager,
    paired,
    plain_database,
    ratio,
    rnd,
    rotated,
    run_load,
)
from .pgpool import Pgpool, PgpoolUnavailable, ensure_installed, version

WORKLOADS = ("pk_lookup", "mixed_90_10")
WRITE_SHARE = 0.1
# Pgpool-II gives no read-your-writes: areplica in eventual mode is the like-for-like peer.
EVENTUAL = "areplica (eventual)"


def _op(workload: str, database_call: Any, model: Any, calls: Calls) -> Any:
    """The workload's operation, with ``database_call(kind, query)`` running a query."""
    clock = time.perf_counter

    async def op(rng: random.Random, _: int) -> None:
        k = rng.randint(1, ROWS)
        began = clock()
        if workload == "mixed_90_10" and rng.random() < WRITE_SHARE:
            await database_call("write", model.update(val=model.val + 1).where(model.id == k))
            calls.add("write", clock() - began)
            return
        row = await database_call("read", model.select().where(model.id == k))
        calls.add("read", clock() - began)
        if row.id != k:
            raise AssertionError("wrong row")

    return op


def _areplica_call(mgr: ReplicaManager) -> Any:
    async def call(kind: str, query: Any) -> Any:
        if kind == "write":
            return await mgr.execute(query)
        return await mgr.get(query)

    return call


def _plain_call(db: Any) -> Any:
    async def call(kind: str, query: Any) -> Any:
        if kind == "write":
            return await db.aio_execute(query)
        rows = await db.aio_execute(query.limit(1))
        return rows[0]

    return call


async def run(ctx: Context) -> dict[str, Any]:
    s = ctx.settings
    out: dict[str, Any] = {
        "pool_size": s.s3_pool_size,
        "concurrency": s.s3_concurrency,
        "seconds_per_round": s.s3_seconds,
        "rounds": s.s3_rounds,
        "driver": "aiopg",
    }
    try:
        executable = await asyncio.to_thread(ensure_installed, ctx.log)
    except PgpoolUnavailable as exc:
        out["skipped"] = str(exc)
        return out
    out["pgpool_version"] = await asyncio.to_thread(version, executable)
    backends = [("127.0.0.1", ctx.backend_port("primary"), 0.0)] + [
        ("127.0.0.1", ctx.backend_port(f"replica-{i}"), 1.0) for i in (1, 2)
    ]
    pgpool = Pgpool(executable, backends, num_init_children=max(32, 2 * s.s3_pool_size))
    try:
        try:
            await asyncio.to_thread(pgpool.start)
        except (PgpoolUnavailable, OSError) as exc:
            out["skipped"] = f"pgpool did not start: {exc}"
            return out
        out["pgpool_settings"] = dict(pgpool.settings)
        ctx.log(f"  pgpool {out['pgpool_version']} on port {pgpool.port} (pid {pgpool.pid})")
        await _measure(ctx, pgpool, out)
    finally:
        pgpool.close()  # blocking on purpose: it must run even when the task was cancelled
    return out


async def _measure(ctx: Context, pgpool: Pgpool, out: dict[str, Any]) -> None:
    s = ctx.settings
    topo = ctx.topology
    port_names = {str(ctx.backend_port(n)): n for n in topo.nodes}
    front = await asyncio.to_thread(ctx.front, "pgpool", pgpool.port)
    if front != pgpool.port:
        out["pgpool_front_port"] = front
    pgpool_dsn = f"postgresql://postgres@127.0.0.1:{front}/postgres"
    async with AsyncExitStack() as stack:
        mgr = await stack.enter_async_context(
            opened_manager(
                topo.dsn("primary"),
                {f"replica-{i}": topo.dsn(f"replica-{i}") for i in (1, 2)},
                pool_size=s.s3_pool_size,
            )
        )
        eventual = await stack.enter_async_context(
            opened_manager(
                topo.dsn("primary"),
                {f"replica-{i}": topo.dsn(f"replica-{i}") for i in (1, 2)},
                pool_size=s.s3_pool_size,
                consistency="eventual",
            )
        )
        db = await stack.enter_async_context(
            opened(plain_database("aiopg", pgpool_dsn, s.s3_pool_size))
        )
        contenders = {
            "areplica": (_areplica_call(mgr), item_model(mgr.database)),
            EVENTUAL: (_areplica_call(eventual), item_model(eventual.database)),
            "pgpool": (_plain_call(db), item_model(db)),
        }
        managers: dict[str, Any] = {"areplica": mgr, EVENTUAL: eventual, "pgpool": None}
        out["default_causal_wait"] = mgr.options.causal_wait
        out["workloads"] = {}
        for workload in WORKLOADS:
            calls = {name: Calls() for name in contenders}
            ops = {
                name: _op(workload, call, model, calls[name])
                for name, (call, model) in contenders.items()
                # Without writes, eventual and causal routing are the same thing.
                if name != EVENTUAL or workload != "pk_lookup"
            }
            splits = {name: TimeSplit() for name in ops}
            for op in ops.values():
                await run_load(op, concurrency=s.s3_concurrency, duration=s.warmup_seconds)
            pool_before = await asyncio.to_thread(pgpool.select_counts)
            reads_before = {"areplica": node_reads(mgr), EVENTUAL: node_reads(eventual)}
            rounds: dict[str, dict[str, list[float]]] = {
                n: {"throughput": [], "p50_us": [], "p99_us": [], "errors": []} for n in ops
            }
            for r in range(s.s3_rounds):
                for name in rotated(list(ops), r):
                    manager = managers[name]
                    before = library_timings(manager) if manager is not None else None
                    calls_before = calls[name].snapshot()
                    load = await run_load(
                        ops[name], concurrency=s.s3_concurrency, duration=s.s3_seconds, seed=r
                    )
                    after = library_timings(manager) if manager is not None else None
                    splits[name].add(load, before, after, calls_before, calls[name].snapshot())
                    rounds[name]["throughput"].append(load.throughput)
                    rounds[name]["p50_us"].append(load.p(50))
                    rounds[name]["p99_us"].append(load.p(99))
                    rounds[name]["errors"].append(load.errors)
                ctx.log(
                    f"  {workload} round {r + 1}/{s.s3_rounds}: "
                    + ", ".join(
                        f"{n} {rounds[n]['throughput'][-1]:.0f}/s "
                        f"p99 {rounds[n]['p99_us'][-1]:.0f}µs"
                        for n in ops
                    )
                )
            pool_after = await asyncio.to_thread(pgpool.select_counts)
            balance = {
                port_names.get(port, port): count - pool_before.get(port, 0)
                for port, count in pool_after.items()
            }
            result: dict[str, Any] = {"contenders": {}}
            for name, values in rounds.items():
                result["contenders"][name] = {
                    "throughput": rnd(median(values["throughput"]), 1),
                    "p50_us": rnd(median(values["p50_us"]), 1),
                    "p99_us": rnd(median(values["p99_us"]), 1),
                    "errors": int(sum(values["errors"])),
                    "rounds": {k: [rnd(x, 1) for x in v] for k, v in values.items()},
                    "time_split": splits[name].summary(),
                }
            for name in ops:
                if name != "pgpool":
                    # Paired per round: contenders of a round ran back to back.
                    result["contenders"][name]["p99_lower_rounds"] = sum(
                        1
                        for x, y in zip(
                            rounds[name]["p99_us"], rounds["pgpool"]["p99_us"], strict=True
                        )
                        if x < y
                    )
                    result["contenders"][name]["throughput_higher_rounds"] = sum(
                        1
                        for x, y in zip(
                            rounds[name]["throughput"],
                            rounds["pgpool"]["throughput"],
                            strict=True,
                        )
                        if x > y
                    )
                    result["contenders"][name]["vs_pgpool"] = {
                        "throughput": paired(
                            rounds[name]["throughput"], rounds["pgpool"]["throughput"]
                        ),
                        "p99": paired(rounds[name]["p99_us"], rounds["pgpool"]["p99_us"]),
                    }
            if EVENTUAL in ops:
                # Causal against eventual areplica, paired per round (and on a link, against
                # eventual's p99 + one link round trip + replication's delivery, x 1.2).
                c, e = rounds["areplica"], rounds[EVENTUAL]
                result["causal_vs_eventual"] = {
                    "throughput": paired(c["throughput"], e["throughput"]),
                    "p99": paired(c["p99_us"], e["p99_us"]),
                }
                if ctx.link is not None:
                    bounds = [link.p99_bound_us(x, ctx.link) for x in e["p99_us"]]
                    result["causal_vs_eventual"]["p99_vs_link_bound"] = paired(c["p99_us"], bounds)
            a = result["contenders"]["areplica"]
            p = result["contenders"]["pgpool"]
            result["throughput_ratio"] = rnd(ratio(a["throughput"], p["throughput"]))
            result["p99_ratio"] = rnd(ratio(a["p99_us"], p["p99_us"]))
            if EVENTUAL in result["contenders"]:
                e = result["contenders"][EVENTUAL]
                result["eventual_throughput_ratio"] = rnd(ratio(e["throughput"], p["throughput"]))
                result["eventual_p99_ratio"] = rnd(ratio(e["p99_us"], p["p99_us"]))
            result["pgpool_select_counts"] = balance
            result["areplica_reads_served"] = {
                name: delta(node_reads(m), reads_before[name])
                for name, m in (("areplica", mgr), (EVENTUAL, eventual))
                if name in ops
            }
            replica_selects = sum(v for k, v in balance.items() if k != "primary")
            result["pgpool_balanced"] = bool(
                replica_selects > 0
                and all(balance.get(f"replica-{i}", 0) > 0.3 * replica_selects / 2 for i in (1, 2))
            )
            out["workloads"][workload] = result
