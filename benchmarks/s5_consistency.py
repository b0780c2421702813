"""Scenario 5: what read-your-writes costs, for both drivers.

Contenders: managers (primary + 2 replicas, pool 8 per node) in ``eventual`` mode, in
``causal`` mode with ``causal_wait=0`` (a read that no replica can serve yet goes to the
primary) and in ``causal`` mode with ``causal_wait=0.05`` (it first waits up to 50 ms for a
replica to catch up), each with the aiopg and the psycopg driver: six contenders, rotated
round by round.

* Write throughput: 16 tasks updating single rows (each task its own rows, so no lock
  waits). A causal write also reads the primary's WAL position for the session's token.
* Mixed: 16 tasks, each inside its own ``async with mgr.session():`` for its whole loop
  (one user's session). 30% of its requests write a fresh value to one of its rows and at
  once read that row back (write-then-read); the others read a random row. Measured: the
  share of reads served by replicas, reads that missed their own write (stale), requests/s.
"""

from __future__ import annotations

import itertools
import random
from contextlib import AsyncExitStack
from typing import Any

from areplica import ReplicaManager

from .common import (
    ROWS,
    Context,
    item_model,
    median,
    opened_manager,
    ratio,
    rnd,
    rotated,
    run_load,
)

DRIVERS = ("aiopg", "psycopg")
MODES: dict[str, dict[str, Any]] = {
    "eventual": {"consistency": "eventual"},
    "causal": {"consistency": "causal", "causal_wait": 0.0},
    "causal+wait50ms": {"consistency": "causal", "causal_wait": 0.05},
}


def _counters(mgr: ReplicaManager) -> dict[str, int]:
    reads = {st.name: st.reads for st in mgr.status()}
    return {
        "replica_reads": sum(v for k, v in reads.items() if k != "primary"),
        "primary_reads": reads.get("primary", 0),
        "fallback_reads": mgr.fallback_reads,
        "caught_up_reads": mgr.caught_up_reads,
    }


class _Mixed:
    """The write-then-read workload of one contender, with its staleness tally."""

    def __init__(self, mgr: ReplicaManager, model: Any, concurrency: int, share: float) -> None:
        self.mgr = mgr
        self.model = model
        self.share = share
        self.block = ROWS // concurrency
        self.values = itertools.count(ROWS * 10)
        self.writes = 0
        self.stale = 0

    async def op(self, rng: random.Random, worker: int) -> None:
        mgr, model = self.mgr, self.model
        if rng.random() < self.share:
            k = worker * self.block + 1 + rng.randrange(self.block)
            value = next(self.values)
            await mgr.execute(model.update(val=value).where(model.id == k))
            row = await mgr.get(model.select().where(model.id == k))
            self.writes += 1
            if row.val != value:
                self.stale += 1
            return
        k = rng.randint(1, ROWS)
        row = await mgr.get(model.select().where(model.id == k))
        if row.id != k:
            raise AssertionError("wrong row")


async def run(ctx: Context) -> dict[str, Any]:
    s = ctx.settings
    topo = ctx.topology
    replicas = {f"replica-{i}": topo.dsn(f"replica-{i}") for i in (1, 2)}
    out: dict[str, Any] = {
        "pool_size": s.s5_pool_size,
        "concurrency": s.s5_concurrency,
        "write_seconds_per_round": s.s5_write_seconds,
        "mixed_seconds_per_round": s.s5_mixed_seconds,
        "write_share": s.s5_write_share,
        "rounds": s.s5_rounds,
        "modes": MODES,
        "default_causal_wait": (ReplicaManager.__init__.__kwdefaults__ or {}).get("causal_wait"),
    }
    async with AsyncExitStack() as stack:
        managers: dict[str, ReplicaManager] = {}
        for driver in DRIVERS:
            for mode, options in MODES.items():
                managers[f"{mode}/{driver}"] = await stack.enter_async_context(
                    opened_manager(
                        topo.dsn("primary"),
                        replicas,
                        driver=driver,
                        pool_size=s.s5_pool_size,
                        **options,
                    )
                )
        block = ROWS // s.s5_concurrency
        write_ops: dict[str, Any] = {}
        mixed: dict[str, _Mixed] = {}
        for name, mgr in managers.items():
            model = item_model(mgr.database)

            def make(m: ReplicaManager = mgr, item: Any = model) -> Any:
                async def write(rng: random.Random, worker: int) -> None:
                    k = worker * block + 1 + rng.randrange(block)
                    await m.execute(item.update(val=item.val + 1).where(item.id == k))

                return write

            write_ops[name] = make()
            mixed[name] = _Mixed(mgr, model, s.s5_concurrency, s.s5_write_share)

        for name in managers:
            await run_load(write_ops[name], concurrency=s.s5_concurrency, duration=s.warmup_seconds)
            await run_load(
                mixed[name].op,
                concurrency=s.s5_concurrency,
                duration=s.warmup_seconds,
                scope=managers[name].session,
            )
        names = list(managers)
        rounds: dict[str, dict[str, list[float]]] = {
            n: {
                "write_throughput": [],
                "mixed_throughput": [],
                "mixed_p99_us": [],
                "replica_share": [],
                "stale_share": [],
                "errors": [],
            }
            for n in names
        }
        totals: dict[str, dict[str, int]] = {
            n: dict.fromkeys(
                ("replica_reads", "primary_reads", "fallback_reads", "caught_up_reads", "stale"),
                0,
            )
            for n in names
        }
        for r in range(s.s5_rounds):
            for name in rotated(names, r):
                mgr = managers[name]
                load = await run_load(
                    write_ops[name],
                    concurrency=s.s5_concurrency,
                    duration=s.s5_write_seconds,
                    seed=r,
                )
                rounds[name]["write_throughput"].append(load.throughput)
                errors = load.errors
                work = mixed[name]
                before = _counters(mgr)
                writes0, stale0 = work.writes, work.stale
                load = await run_load(
                    work.op,
                    concurrency=s.s5_concurrency,
                    duration=s.s5_mixed_seconds,
                    seed=r,
                    scope=mgr.session,
                )
                after = _counters(mgr)
                diff = {k: after[k] - before[k] for k in after}
                for k, v in diff.items():
                    totals[name][k] += v
                totals[name]["stale"] += work.stale - stale0
                reads = diff["replica_reads"] + diff["primary_reads"]
                rounds[name]["mixed_throughput"].append(load.throughput)
                rounds[name]["mixed_p99_us"].append(load.p(99))
                rounds[name]["replica_share"].append(ratio(diff["replica_reads"], reads))
                rounds[name]["stale_share"].append(
                    ratio(work.stale - stale0, max(1, work.writes - writes0))
                )
                rounds[name]["errors"].append(errors + load.errors)
            ctx.log(
                f"  round {r + 1}/{s.s5_rounds}: "
                + ", ".join(
                    f"{n} w{rounds[n]['write_throughput'][-1]:.0f}/s "
                    f"rep{100 * rounds[n]['replica_share'][-1]:.0f}%"
                    for n in names
                )
            )

    out["contenders"] = {}
    for name in names:
        v = rounds[name]
        out["contenders"][name] = {
            "write_throughput": rnd(median(v["write_throughput"]), 1),
            "mixed_throughput": rnd(median(v["mixed_throughput"]), 1),
            "mixed_p99_us": rnd(median(v["mixed_p99_us"]), 1),
            "replica_read_share": rnd(median(v["replica_share"]), 4),
            "stale_read_share": rnd(median(v["stale_share"]), 4),
            "errors": int(sum(v["errors"])),
            "totals": totals[name],
            "rounds": {k: [rnd(x, 4) for x in vals] for k, vals in v.items()},
        }
    out["by_driver"] = {}
    for driver in DRIVERS:
        ev = out["contenders"][f"eventual/{driver}"]
        out["by_driver"][driver] = {
            mode: {
                "write_throughput_vs_eventual": rnd(
                    ratio(
                        out["contenders"][f"{mode}/{driver}"]["write_throughput"],
                        ev["write_throughput"],
                    )
                ),
                "mixed_throughput_vs_eventual": rnd(
                    ratio(
                        out["contenders"][f"{mode}/{driver}"]["mixed_throughput"],
                        ev["mixed_throughput"],
                    )
                ),
            }
            for mode in MODES
            if mode != "eventual"
        }
    return out
