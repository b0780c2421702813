"""Scenario 5: what read-your-writes costs, for both drivers.

Contenders: managers (primary + 2 replicas, pool 8 per node) in ``eventual`` mode, in
``causal`` mode with the default ``causal_wait`` (the mode the goals judge), with
``causal_wait=0`` (a read that no replica can serve yet goes to the primary) and with
``causal_wait=0.05`` (it first waits up to 50 ms for a replica to catch up), each with the
aiopg and the psycopg driver, rotated round by round. A mode whose options are the
default's (``causal_wait=0.05`` today) is not run twice: it reports the default's figures
(``same_as``).

* Write throughput: 16 tasks updating single rows (each task its own rows, so no lock
  waits). A causal write also needs the primary's WAL position for the session's token.
* Mixed: 16 tasks, each inside its own ``async with mgr.session():`` for its whole loop
  (one user's session). 30% of its requests write a fresh value to one of its rows and at
  once read that row back (write-then-read); the others read a random row. Measured: the
  share of reads served by replicas, reads that missed their own write (stale), requests/s.

Per-round ratios against eventual (same driver, same round) with their median and spread;
where the time goes (``mgr.timings()`` when the library has it, and always the benchmark's
own timing of the write, the read after it and the other reads).
"""

from __future__ import annotations

import itertools
import random
import time
from contextlib import AsyncExitStack
from typing import Any

from areplica import ReplicaManager
from areplica.options import Options

from . import link
from .common import (
    ROWS,
    Calls,
    Context,
    TimeSplit,
    item_model,
    library_timings,
    median,
    opened_manager,
    paired,
    ratio,
    rnd,
    rotated,
    run_load,
)

DRIVERS = ("aiopg", "psycopg")
#: The mode the goals judge: causal with every option at its default.
DEFAULT = "causal"
MODES: dict[str, dict[str, Any]] = {
    "eventual": {"consistency": "eventual"},
    DEFAULT: {"consistency": "causal"},
    "causal+wait0": {"consistency": "causal", "causal_wait": 0.0},
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
        self.calls = Calls()

    async def op(self, rng: random.Random, worker: int) -> None:
        mgr, model, calls = self.mgr, self.model, self.calls
        clock = time.perf_counter
        if rng.random() < self.share:
            k = worker * self.block + 1 + rng.randrange(self.block)
            value = next(self.values)
            began = clock()
            await mgr.execute(model.update(val=value).where(model.id == k))
            wrote = clock()
            row = await mgr.get(model.select().where(model.id == k))
            calls.add("write", wrote - began)
            calls.add("read_after_write", clock() - wrote)
            self.writes += 1
            if row.val != value:
                self.stale += 1
            return
        k = rng.randint(1, ROWS)
        began = clock()
        row = await mgr.get(model.select().where(model.id == k))
        calls.add("read", clock() - began)
        if row.id != k:
            raise AssertionError("wrong row")


def _resolved(options: dict[str, Any]) -> Options:
    return Options.build(options)


async def run(ctx: Context) -> dict[str, Any]:
    s = ctx.settings
    topo = ctx.topology
    replicas = {f"replica-{i}": topo.dsn(f"replica-{i}") for i in (1, 2)}
    default_options = _resolved(MODES[DEFAULT])
    # A mode identical to the default is not run again: it reports the default's figures.
    same_as = {
        mode: DEFAULT
        for mode, options in MODES.items()
        if mode not in (DEFAULT, "eventual") and _resolved(options) == default_options
    }
    run_modes = [mode for mode in MODES if mode not in same_as]
    out: dict[str, Any] = {
        "format": 2,
        "pool_size": s.s5_pool_size,
        "concurrency": s.s5_concurrency,
        "write_seconds_per_round": s.s5_write_seconds,
        "mixed_seconds_per_round": s.s5_mixed_seconds,
        "write_share": s.s5_write_share,
        "rounds": s.s5_rounds,
        "modes": MODES,
        "default_mode": DEFAULT,
        "default_causal_wait": default_options.causal_wait,
        "same_as": same_as,
        "timings_available": None,
    }
    async with AsyncExitStack() as stack:
        managers: dict[str, ReplicaManager] = {}
        for driver in DRIVERS:
            for mode in run_modes:
                managers[f"{mode}/{driver}"] = await stack.enter_async_context(
                    opened_manager(
                        topo.dsn("primary"),
                        replicas,
                        driver=driver,
                        pool_size=s.s5_pool_size,
                        **MODES[mode],
                    )
                )
        out["timings_available"] = library_timings(next(iter(managers.values()))) is not None
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
                "write_p99_us": [],
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
                (
                    "replica_reads",
                    "primary_reads",
                    "fallback_reads",
                    "caught_up_reads",
                    "stale",
                    "writes_read_back",
                ),
                0,
            )
            for n in names
        }
        splits = {n: {"write": TimeSplit(), "mixed": TimeSplit()} for n in names}
        for r in range(s.s5_rounds):
            for name in rotated(names, r):
                mgr = managers[name]
                timings = library_timings(mgr)
                load = await run_load(
                    write_ops[name],
                    concurrency=s.s5_concurrency,
                    duration=s.s5_write_seconds,
                    seed=r,
                )
                after = library_timings(mgr)
                splits[name]["write"].add(load, timings, after)
                rounds[name]["write_throughput"].append(load.throughput)
                rounds[name]["write_p99_us"].append(load.p(99))
                errors = load.errors
                work = mixed[name]
                before = _counters(mgr)
                writes0, stale0 = work.writes, work.stale
                timings, calls = library_timings(mgr), work.calls.snapshot()
                load = await run_load(
                    work.op,
                    concurrency=s.s5_concurrency,
                    duration=s.s5_mixed_seconds,
                    seed=r,
                    scope=mgr.session,
                )
                splits[name]["mixed"].add(
                    load, timings, library_timings(mgr), calls, work.calls.snapshot()
                )
                after_counters = _counters(mgr)
                diff = {k: after_counters[k] - before[k] for k in after_counters}
                for k, v in diff.items():
                    totals[name][k] += v
                totals[name]["stale"] += work.stale - stale0
                totals[name]["writes_read_back"] += work.writes - writes0
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
                    f"m{rounds[n]['mixed_throughput'][-1]:.0f}/s "
                    f"p99 {rounds[n]['mixed_p99_us'][-1] / 1000:.1f}ms "
                    f"rep{100 * rounds[n]['replica_share'][-1]:.0f}%"
                    for n in names
                )
            )

    out["contenders"] = {}
    for name in names:
        v = rounds[name]
        out["contenders"][name] = {
            "write_throughput": rnd(median(v["write_throughput"]), 1),
            "write_p99_us": rnd(median(v["write_p99_us"]), 1),
            "mixed_throughput": rnd(median(v["mixed_throughput"]), 1),
            "mixed_p99_us": rnd(median(v["mixed_p99_us"]), 1),
            "replica_read_share": rnd(median(v["replica_share"]), 4),
            "replica_read_share_min": rnd(
                min((x for x in v["replica_share"] if x == x), default=float("nan")), 4
            ),
            "stale_read_share": rnd(median(v["stale_share"]), 4),
            "errors": int(sum(v["errors"])),
            "totals": totals[name],
            "rounds": {k: [rnd(x, 4) for x in vals] for k, vals in v.items()},
            "time_split": {kind: split.summary() for kind, split in splits[name].items()},
        }
    measured = out["contenders"]
    out["contenders"] = {}
    for driver in DRIVERS:  # in the order of MODES, a mode like the default included
        for mode in MODES:
            if mode in same_as:
                original = f"{same_as[mode]}/{driver}"
                out["contenders"][f"{mode}/{driver}"] = {**measured[original], "same_as": original}
            else:
                out["contenders"][f"{mode}/{driver}"] = measured[f"{mode}/{driver}"]
    out["by_driver"] = {}
    for driver in DRIVERS:
        ev = rounds[f"eventual/{driver}"]
        by_mode: dict[str, Any] = {}
        for mode in MODES:
            if mode == "eventual":
                continue
            c = rounds[f"{same_as.get(mode, mode)}/{driver}"]
            entry: dict[str, Any] = {
                "write_throughput_vs_eventual": paired(
                    c["write_throughput"], ev["write_throughput"]
                ),
                "mixed_throughput_vs_eventual": paired(
                    c["mixed_throughput"], ev["mixed_throughput"]
                ),
                "mixed_p99_vs_eventual": paired(c["mixed_p99_us"], ev["mixed_p99_us"]),
            }
            if ctx.link is not None:
                bounds = [link.p99_bound_us(x, ctx.link) for x in ev["mixed_p99_us"]]
                entry["mixed_p99_vs_link_bound"] = paired(c["mixed_p99_us"], bounds)
            if mode in same_as:
                entry["same_as"] = same_as[mode]
            by_mode[mode] = entry
        out["by_driver"][driver] = by_mode
    return out
