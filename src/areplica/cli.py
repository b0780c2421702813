"""The ``areplica`` command: ``demo`` (a local topology under load) and ``status``."""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="areplica", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="start a local primary + replicas and show routing")
    demo.add_argument("--replicas", type=int, default=2)
    demo.add_argument("--driver", choices=("aiopg", "psycopg"), default="aiopg")
    demo.add_argument("--pg-bin", default=None, help="folder of PostgreSQL binaries")
    demo.add_argument("-v", "--verbose", action="store_true")
    status = sub.add_parser("status", help="probe a topology: role, state, lag, latency")
    status.add_argument("dsns", nargs="*", help="primary DSN first, then replicas")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--timeout", type=float, default=3.0)
    status.add_argument("--max-lag", type=float, default=30.0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``areplica`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "demo":
            return asyncio.run(_demo(args))
        return asyncio.run(_status(args))
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        return 130


async def _demo(args: argparse.Namespace) -> int:
    import peewee
    import peewee_async
    from peewee import fn

    from .manager import ReplicaManager
    from .testing.topology import LocalTopology

    out = sys.stdout
    print(f"starting a primary and {args.replicas} streaming replicas ...", file=out, flush=True)
    async with LocalTopology(replicas=args.replicas, pg_bin=args.pg_bin) as topo:
        print(f"PostgreSQL {topo.pg_version} from {topo.bin_dir}", file=out)
        port_names = {topo.port(name): name for name in topo.nodes}
        replicas = {name: topo.dsn(name) for name in topo.nodes if name != "primary"}
        mgr = ReplicaManager(
            topo.dsn("primary"), replicas, driver=args.driver, health_interval=0.25
        )

        class Note(peewee_async.AioModel):
            text = peewee.CharField()

            class Meta:
                database = mgr.database

        served: collections.Counter[str] = collections.Counter()
        async with mgr:
            await mgr.create_tables([Note])
            for i in range(5):
                await mgr.create(Note, text=f"note {i}")
            print("wrote 5 rows on the primary", file=out)
            where = Note.select(fn.inet_server_port()).limit(1)
            for _ in range(20):
                served[port_names.get(await mgr.scalar(where), "?")] += 1
            print(f"20 reads right after the writes (causal): {dict(sorted(served.items()))}")
            await asyncio.to_thread(topo.wait_replicated)
            await mgr.check()
            served.clear()
            for _ in range(20):
                served[port_names.get(await mgr.scalar(where), "?")] += 1
            print(f"20 reads once replicas caught up: {dict(sorted(served.items()))}", file=out)
            async with mgr.atomic():
                await mgr.create(Note, text="in a transaction")
                port = await mgr.scalar(where)
                print(f"read inside atomic(): served by {port_names.get(port)}", file=out)
            rows = await mgr.count(Note.select())
            print(f"{rows} rows; node status:", file=out)
            for status in mgr.status():
                print(
                    f"  {status.name:<10} {status.role:<8} {status.state:<8} "
                    f"reads={status.reads:<4} writes={status.writes:<4} "
                    f"lag={status.lag_bytes}B",
                    file=out,
                )
            await mgr.drop_tables([Note])
    print("topology stopped and removed", file=out)
    return 0


async def _status(args: argparse.Namespace) -> int:
    from .drivers import get_driver
    from .dsn import parse
    from .health import ProbeResult, probe
    from .manager import _split_dsns
    from .node import Node

    dsns = list(args.dsns)
    if not dsns:
        dsns = _split_dsns(os.environ.get("AREPLICA_PRIMARY", ""))
        dsns += _split_dsns(os.environ.get("AREPLICA_REPLICAS", ""))
    if not dsns:
        print(
            "areplica status: give DSNs or set AREPLICA_PRIMARY/AREPLICA_REPLICAS", file=sys.stderr
        )
        return 2
    driver = get_driver("aiopg")
    nodes = [
        Node(
            "primary" if i == 0 else f"replica-{i}",
            parse(text, option="dsn"),
            role="primary" if i == 0 else "replica",
            driver=driver,
            pool_size=1,
            connect_timeout=args.timeout,
        )
        for i, text in enumerate(dsns)
    ]
    results = await asyncio.gather(*(probe(n, args.timeout) for n in nodes), return_exceptions=True)
    primary_lsn = None
    for result in results:
        if isinstance(result, ProbeResult) and not result.in_recovery:
            primary_lsn = result.lsn
    rows: list[dict[str, Any]] = []
    healthy = True
    for node, result in zip(nodes, results, strict=True):
        row: dict[str, Any] = {"name": node.name, "dsn": node.dsn.masked}
        if isinstance(result, ProbeResult):
            lag = None
            if result.in_recovery and primary_lsn is not None and result.lsn is not None:
                lag = max(0, primary_lsn - result.lsn)
            seconds = 0.0 if lag == 0 else result.replay_age
            row.update(
                role="replica" if result.in_recovery else "primary",
                state="up",
                lag_bytes=lag,
                lag_seconds=seconds,
                latency_ms=round(result.latency_ms, 2),
            )
            if seconds is not None and seconds > args.max_lag:
                row["state"] = "lagging"
            expected = "primary" if node.name == "primary" else "replica"
            if row["role"] != expected:
                row["state"] = f"wrong role (expected {expected})"
        else:
            node.note_error(result)  # masks the password, should a driver echo it
            row.update(role=None, state="down", error=node.last_error)
        healthy = healthy and row["state"] == "up"
        rows.append(row)
    if args.json:
        print(json.dumps({"healthy": healthy, "nodes": rows}, indent=2))
    else:
        for row in rows:
            print(
                f"{row['name']:<11} {row['role'] or '-':<8} {row['state']:<8} "
                f"lag={row.get('lag_bytes')}B/{row.get('lag_seconds')}s "
                f"latency={row.get('latency_ms')}ms  {row['dsn']}"
                + (f"  {row['error']}" if "error" in row else "")
            )
    return 0 if healthy else 1
