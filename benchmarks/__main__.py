"""``python -m benchmarks [--quick] [--only 1,3] [--link-delay-ms MS]``: run the scenarios,
write and print results.

``--link-delay-ms MS`` runs scenarios 3 and 5 (those of ``--only`` among them) on a topology
whose every hop goes through a proxy adding MS milliseconds each way (``benchmarks/link.py``),
and reports them as ``3_pgpool_link`` and ``5_consistency_link`` next to the loopback ones.

Everything started is stopped and removed at the end, also on an exception, Ctrl-C or
SIGTERM: topologies (and scenario 7's Patroni cluster) are closed, Pgpool-II, HAProxy and the
proxy processes are stopped by their pids, temporary folders go.

A run with ``--only`` updates its scenarios in the results folder and keeps the others'
results from earlier runs (``meta.updated`` says which scenarios came from which run);
``--replace`` writes only the scenarios run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType
from typing import Any

from areplica.testing import LocalTopology
from areplica.testing.proxy import ProxyProcess

from . import (
    link,
    report,
    s1_overhead,
    s2_scaling,
    s3_pgpool,
    s4_faults,
    s5_consistency,
    s7_haproxy,
)
from .common import Context, Settings, create_schema, machine_info

RESULTS = Path(__file__).resolve().parent / "results"

Scenario = Callable[[Context], Awaitable[dict[str, Any]]]
SCENARIOS: list[tuple[str, str, Scenario]] = [
    ("1_overhead", "1. Routing overhead (and 6. drivers)", s1_overhead.run),
    ("2_scaling", "2. Read scaling", s2_scaling.run),
    ("3_pgpool", "3. Pgpool-II peer", s3_pgpool.run),
    ("4_faults", "4. Faults", s4_faults.run),
    ("5_consistency", "5. Consistency cost (and 6. drivers)", s5_consistency.run),
    ("7_haproxy", "7. HAProxy + Patroni peer", s7_haproxy.run),
]
#: The scenarios ``--link-delay-ms`` runs; their results go under ``KEY + LINK_SUFFIX``.
LINK_SCENARIOS = ("3", "5")
LINK_SUFFIX = "_link"
#: The order of the results: each link variant right after its loopback scenario.
ORDER = [
    key + suffix
    for key, _, _ in SCENARIOS
    for suffix in ("", LINK_SUFFIX)
    if not suffix or key.split("_", 1)[0] in LINK_SCENARIOS
]


class _Log:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)


def _clean(value: Any) -> Any:
    """NaN and infinities become null: the JSON file stays standard JSON."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def run_all(
    settings: Settings, only: set[str], log: _Log, link_delay_ms: float | None = None
) -> dict[str, Any]:
    results: dict[str, Any] = {
        "meta": {
            "quick": settings.quick,
            "settings": dict(vars(settings)),
            "loadavg_before": list(os.getloadavg()),
            "link_delay_ms": link_delay_ms,
        },
        "scenarios": {},
    }
    linked = link_delay_ms is not None
    topo = link.topology() if linked else LocalTopology(replicas=2)
    proxies = ProxyProcess("areplica-bench-proxy") if linked else None
    try:
        what = "a primary and 2 streaming replicas"
        if linked:
            what += f", every hop through a proxy adding {link_delay_ms} ms each way"
        log(f"starting {what}")
        await asyncio.to_thread(topo.start)
        log(f"  in {topo.directory}")
        await asyncio.to_thread(create_schema, topo)
        results["machine"] = await asyncio.to_thread(machine_info, topo)
        ctx = Context(settings=settings, topology=topo, log=log)
        if linked and link_delay_ms is not None and proxies is not None:
            await asyncio.to_thread(proxies.start)
            await asyncio.to_thread(link.apply, topo, link_delay_ms)
            ctx.link_delay_ms, ctx.proxies = link_delay_ms, proxies
            log("measuring the link")
            ctx.link = await link.measure(ctx)
            rtt, rep = ctx.link["rtt_us"], ctx.link["replication_us"]
            log(
                f"  SELECT 1 round trip {rtt['direct']:.0f} µs direct, "
                f"{rtt['proxy_no_delay']:.0f} µs through a proxy without delay, "
                f"{rtt['link']:.0f} µs through the link (+{rtt['added_by_link']:.0f}); "
                f"replication {rep['proxy_no_delay']['median']:.0f} -> "
                f"{rep['link']['median']:.0f} µs"
            )
        for key, title, scenario in SCENARIOS:
            number = key.split("_", 1)[0]
            if only and number not in only:
                continue
            if linked:
                if number not in LINK_SCENARIOS:
                    continue
                key += LINK_SUFFIX
                title += f", {link_delay_ms} ms link"
            log(title)
            began = time.monotonic()
            await asyncio.to_thread(topo.wait_replicated, 60)
            try:
                data = await scenario(ctx)
            except Exception as exc:
                log(f"  failed: {type(exc).__name__}: {exc}")
                data = {
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(),
                }
            if ctx.link is not None:
                data["link"] = ctx.link  # each link scenario carries the link's figures
            data["scenario_seconds"] = round(time.monotonic() - began, 1)
            results["scenarios"][key] = data
            log(f"  done in {data['scenario_seconds']} s")
    finally:
        # Blocking on purpose: it must run even when the task was cancelled.
        if proxies is not None:
            proxies.close()
        topo.close()
    return results


def _merge(previous: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    """The earlier results with the scenarios of this (partial) run put in their place.

    Everything else of the earlier run (its meta, machine, other scenarios) stays; what this
    run was (command, date, duration, load) is kept per scenario in ``meta.updated``.
    """
    order = {key: index for index, key in enumerate(ORDER)}
    scenarios = {**previous.get("scenarios", {}), **results["scenarios"]}
    merged = dict(previous)
    merged["scenarios"] = dict(
        sorted(scenarios.items(), key=lambda item: order.get(item[0], len(order)))
    )
    meta = dict(previous.get("meta", {}))
    updated = dict(meta.get("updated", {}))
    new = results["meta"]
    machine = results.get("machine", {})
    for key in results["scenarios"]:
        updated[key] = {
            "command": new.get("command"),
            "quick": new.get("quick"),
            "date": machine.get("date"),
            "areplica_commit": machine.get("areplica_commit"),
            "python": machine.get("python"),
            "seconds": new.get("seconds"),
            "loadavg_before": new.get("loadavg_before"),
            "loadavg_after": new.get("loadavg_after"),
        }
    meta["updated"] = dict(sorted(updated.items(), key=lambda i: order.get(i[0], len(order))))
    merged["meta"] = meta
    return merged


def _previous(path: Path) -> dict[str, Any] | None:
    """The results a partial run updates, or None when there are none (or unreadable)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("scenarios"), dict):
        return None
    return data


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="about a minute: shorter rounds")
    parser.add_argument(
        "--only", default="", help="comma-separated scenario numbers, e.g. 1,3 (default: all)"
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help=f"results folder (default: {RESULTS})"
    )
    parser.add_argument(
        "--link-delay-ms",
        type=float,
        default=None,
        metavar="MS",
        help="run scenarios 3 and 5 through proxies adding MS ms each way on every hop "
        "(clients to nodes, Pgpool-II to its backends, replication); 0: proxies, no delay",
    )
    parser.add_argument(
        "--replace",
        action="store_true",
        help="with --only: write only the scenarios run (default: keep the others' results)",
    )
    args = parser.parse_args(argv)
    only = {part.strip() for part in args.only.split(",") if part.strip()}
    if args.link_delay_ms is not None:
        if not args.link_delay_ms >= 0:
            parser.error("--link-delay-ms must be >= 0")
        if only - set(LINK_SCENARIOS):
            parser.error(f"--link-delay-ms runs scenarios {', '.join(LINK_SCENARIOS)} only")
        only = only or set(LINK_SCENARIOS)
    settings = Settings.quick_pass() if args.quick else Settings.full()
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("areplica").setLevel(logging.CRITICAL)
    warnings.simplefilter("ignore")
    signal.signal(signal.SIGTERM, _interrupt)
    log = _Log()
    began = time.monotonic()
    try:
        results = asyncio.run(run_all(settings, only, log, args.link_delay_ms))
    except KeyboardInterrupt:
        print("interrupted: everything started was stopped and removed", file=sys.stderr)
        return 130
    results["meta"]["seconds"] = round(time.monotonic() - began, 1)
    results["meta"]["loadavg_after"] = list(os.getloadavg())
    results["meta"]["command"] = (
        "python -m benchmarks"
        + (" --quick" if args.quick else "")
        + (f" --only {','.join(sorted(only))}" if only else "")
        + (f" --link-delay-ms {args.link_delay_ms:g}" if args.link_delay_ms is not None else "")
    )
    if only:
        results["meta"]["only"] = sorted(only)
        previous = None if args.replace else _previous(args.out / "latest.json")
        if previous is not None:
            results = _merge(previous, results)
    results["goals"] = report.goals(results)
    text = report.markdown(results)
    args.out.mkdir(parents=True, exist_ok=True)
    _write(args.out / "latest.json", json.dumps(_clean(results), indent=2, default=str) + "\n")
    _write(args.out / "latest.md", text)
    print(text)
    log(f"wrote {args.out / 'latest.json'} and {args.out / 'latest.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
