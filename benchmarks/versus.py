"""``python -m benchmarks.versus --base REV``: this checkout against another commit, side by side.

Both libraries run in one process against one topology: the other commit's ``src/areplica`` is
extracted with ``git archive`` into a temporary folder and imported under another package name
(``areplica_base``; the library imports itself only relatively, so the two copies share
nothing but peewee and the drivers). Every round runs each contender once, in an order
rotated per round, so a noisy minute touches both. Reported per measure: the median of each
contender, the median of the per-round ratios (this / base) and their spread.

Measures (the shapes of scenarios 1 and 2 and the decision cost):
- ``s1_latency_p50_us`` (per driver): ``mgr.get(Item.select().where(Item.id == k))`` one after
  the other, eventual consistency, one replica; p50 of ``--s1-queries`` lookups.
- ``s1_throughput`` (per driver): the same lookup, 16 tasks, ``--s1-seconds``.
- ``s2_throughput``: 64 tasks, pool 4 per node, 2 replicas, 2 ms server-side reads.
- ``decision_us``: one routing decision (two replicas, causal), by ``timeit``.
- with ``--causal``: ``s5_mixed_throughput`` and ``s5_mixed_p99_us``: 16 tasks, 30% of them
  write a row and read it back (each task its own session), the rest read, default options.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import io
import json
import logging
import random
import subprocess
import sys
import tarfile
import tempfile
import timeit
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from areplica.testing import LocalTopology

from .common import (
    ROWS,
    create_schema,
    item_model,
    lookup_op,
    median,
    percentile,
    ratio,
    rnd,
    rotated,
    run_load,
    run_sequential,
)
from .s2_scaling import sleepy_op

ROOT = Path(__file__).resolve().parent.parent
Measure = Callable[[], Awaitable[float]]


@contextlib.contextmanager
def base_package(rev: str) -> Iterator[ModuleType]:
    """The library at ``rev``, imported as ``areplica_base`` (removed afterwards)."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", rev, "src/areplica"],
        capture_output=True,
        check=True,
    ).stdout
    with tempfile.TemporaryDirectory(prefix="areplica-base-") as folder:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(folder, filter="data")
            else:  # pragma: no cover - Python < 3.11.4: our own archive, trusted
                tar.extractall(folder)
        (Path(folder) / "src" / "areplica").rename(Path(folder) / "areplica_base")
        sys.path.insert(0, folder)
        try:
            yield importlib.import_module("areplica_base")
        finally:
            sys.path.remove(folder)
            for name in [m for m in sys.modules if m.split(".")[0] == "areplica_base"]:
                del sys.modules[name]


def decision(mgr: Any) -> Callable[[], Any]:
    """One routing decision of ``mgr``, whatever the version calls it."""
    engine = getattr(mgr.database, "engine", None)
    if engine is not None:
        target = engine.reads.target
    else:
        target = mgr._read_target
    empty: set[Any] = set()
    return lambda: target(None, empty, None)


@contextlib.asynccontextmanager
async def opened(cls: Any, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
    mgr = cls(*args, **kwargs)
    async with mgr:
        yield mgr


def write_then_read(mgr: Any) -> Callable[[random.Random, int], Awaitable[None]]:
    model = item_model(mgr.database)

    async def op(rng: random.Random, index: int) -> None:
        if rng.random() < 0.3:
            async with mgr.session():
                row = await mgr.create(model, val=index, payload="versus")
                got = await mgr.get_or_none(model.select().where(model.id == row.id))
                if got is None:
                    raise AssertionError("stale read of our own write")
        else:
            async with mgr.session():
                k = rng.randint(1, ROWS)
                await mgr.get(model.select().where(model.id == k))

    return op


async def measures(
    stack: contextlib.AsyncExitStack, label: str, cls: Any, topo: LocalTopology, args: Any
) -> dict[str, Measure]:
    """The measures of one library version, managers opened on ``stack``."""
    out: dict[str, Measure] = {}
    primary, r1, r2 = (topo.dsn(n) for n in ("primary", "replica-1", "replica-2"))
    for driver in ("aiopg", "psycopg"):
        mgr = await stack.enter_async_context(
            opened(
                cls, primary, {"replica-1": r1}, driver=driver, pool_size=8, consistency="eventual"
            )
        )
        op = lookup_op(mgr, item_model(mgr.database))

        async def latency(op: Any = op) -> float:
            return median(await run_sequential(op, args.s1_queries))

        async def throughput(op: Any = op) -> float:
            return (await run_load(op, concurrency=16, duration=args.s1_seconds)).throughput

        out[f"s1_latency_p50_us/{driver}"] = latency
        out[f"s1_throughput/{driver}"] = throughput
    two = await stack.enter_async_context(
        opened(cls, primary, {"replica-1": r1, "replica-2": r2}, pool_size=4)
    )
    sleepy = sleepy_op(two)

    async def scaling() -> float:
        return (await run_load(sleepy, concurrency=64, duration=args.s2_seconds)).throughput

    out["s2_throughput"] = scaling
    pick = decision(two)

    async def decision_us() -> float:
        runs = timeit.Timer(pick).repeat(repeat=5, number=args.timeit_number)
        return median(runs) / args.timeit_number * 1e6

    out["decision_us"] = decision_us
    if args.causal:
        for driver in ("aiopg", "psycopg"):
            causal = await stack.enter_async_context(
                opened(cls, primary, {"replica-1": r1, "replica-2": r2}, driver=driver, pool_size=8)
            )
            mixed = write_then_read(causal)
            loads: dict[str, Any] = {}

            async def mixed_tput(op: Any = mixed, loads: dict[str, Any] = loads) -> float:
                loads["last"] = await run_load(op, concurrency=16, duration=args.s5_seconds)
                return float(loads["last"].throughput)

            async def mixed_p99(loads: dict[str, Any] = loads) -> float:
                return float(percentile(loads["last"].latencies_us, 99))

            out[f"s5_mixed_throughput/{driver}"] = mixed_tput
            out[f"s5_mixed_p99_us/{driver}"] = mixed_p99
    return out


async def run(args: Any) -> dict[str, Any]:
    with base_package(args.base) as base, LocalTopology(replicas=2) as topo:
        await asyncio.to_thread(create_schema, topo)
        import areplica

        contenders = {"this": areplica.ReplicaManager, "base": base.ReplicaManager}
        async with contextlib.AsyncExitStack() as stack:
            table = {
                name: await measures(stack, name, cls, topo, args)
                for name, cls in contenders.items()
            }
            for ms in table.values():  # warm up every pool and cache
                for measure in ms.values():
                    await measure()
            names = list(contenders)
            rounds: dict[str, dict[str, list[float]]] = {n: {} for n in names}
            for r in range(args.rounds):
                for name in rotated(names, r):
                    for key, measure in table[name].items():
                        rounds[name].setdefault(key, []).append(await measure())
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    return summarize(rounds, args)


def summarize(rounds: dict[str, dict[str, list[float]]], args: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"base": args.base, "rounds": args.rounds, "measures": {}}
    for key in rounds["this"]:
        this, base = rounds["this"][key], rounds["base"][key]
        per_round = [ratio(a, b) for a, b in zip(this, base, strict=True)]
        out["measures"][key] = {
            "this_median": rnd(median(this), 2),
            "base_median": rnd(median(base), 2),
            "ratio_of_medians": rnd(ratio(median(this), median(base))),
            "paired_ratio_median": rnd(median(per_round)),
            "paired_ratio_min": rnd(min(per_round)),
            "paired_ratio_max": rnd(max(per_round)),
            "this_rounds": [rnd(x, 2) for x in this],
            "base_rounds": [rnd(x, 2) for x in base],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.versus", description=__doc__)
    parser.add_argument("--base", default="main", help="the commit to compare with")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--s1-queries", type=int, default=1000)
    parser.add_argument("--s1-seconds", type=float, default=1.0)
    parser.add_argument("--s2-seconds", type=float, default=1.5)
    parser.add_argument("--s5-seconds", type=float, default=2.0)
    parser.add_argument("--timeit-number", type=int, default=50_000)
    parser.add_argument("--causal", action="store_true", help="also the causal mixed workload")
    parser.add_argument("--out", type=Path, help="write the JSON summary here too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("areplica").setLevel(logging.CRITICAL)
    warnings.simplefilter("ignore")
    summary = asyncio.run(run(args))
    text = json.dumps(summary, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
