"""Goals and the markdown report, from the results dict a run builds."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

Row = dict[str, Any]


def _num(value: Any, digits: int = 0, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float) and digits == 0:
        text = f"{value:,.0f}"
    elif isinstance(value, float):
        text = f"{value:,.{digits}f}"
    else:
        text = f"{value:,}"
    return f"{text}{unit}"


def _div(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _x(value: Any) -> str:
    return _num(value, 3, "x") if isinstance(value, (int, float)) else "n/a"


def _pct(value: Any) -> str:
    if not isinstance(value, (int, float)) or math.isnan(value):
        return "n/a"
    return f"{100 * value:.1f}%"


def _met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("pass" if ok else "**miss**")


def _scenario(results: dict[str, Any], key: str) -> dict[str, Any] | None:
    data = results.get("scenarios", {}).get(key)
    if not isinstance(data, dict) or "error" in data:
        return None
    return data


def goals(results: dict[str, Any]) -> list[Row]:
    """One row per goal (and per informational comparison): what was measured, met or not."""
    rows: list[Row] = []

    def guarded(key: str, label: str, build: Callable[[dict[str, Any]], None]) -> None:
        data = results.get("scenarios", {}).get(key)
        if data is None:
            return
        if not isinstance(data, dict) or "error" in data:
            error = data.get("error") if isinstance(data, dict) else data
            rows.append(
                {
                    "scenario": label,
                    "contenders": "-",
                    "medians": f"failed: {str(error)[:120]}",
                    "ratio": "-",
                    "goal": "-",
                    "met": None,
                }
            )
            return
        build(data)

    def s1(d: dict[str, Any]) -> None:
        for driver, v in d["by_driver"].items():
            a = d["contenders"][f"areplica/{driver}"]
            b = d["contenders"][f"peewee-async/{driver}"]
            rows.append(
                {
                    "scenario": f"1. Routing overhead, latency p50 ({driver})",
                    "contenders": "areplica `mgr.get` vs peewee-async `aio_execute`, same replica",
                    "medians": f"{_num(a['latency_p50_us'], 1)} µs vs "
                    f"{_num(b['latency_p50_us'], 1)} µs",
                    "ratio": _x(v["latency_ratio"]),
                    "goal": "<= 1.05x",
                    "met": v["latency_ratio"] <= 1.05,
                    "value": v["latency_ratio"],
                }
            )
            rows.append(
                {
                    "scenario": f"1. Routing overhead, throughput ({driver}, "
                    f"{d['concurrency']} tasks)",
                    "contenders": "areplica vs peewee-async (ratio: peewee-async / areplica)",
                    "medians": f"{_num(a['throughput'])} vs {_num(b['throughput'])} q/s",
                    "ratio": _x(v["throughput_ratio"]),
                    "goal": "<= 1.05x",
                    "met": v["throughput_ratio"] <= 1.05,
                    "value": v["throughput_ratio"],
                }
            )
        dec = d["decision"]
        rows.append(
            {
                "scenario": "1. Routing decision cost",
                "contenders": "`_read_target` (2 replicas) + cached `classify_query`",
                "medians": f"{_num(dec['pick_2_replicas_causal_us'], 2)} + "
                f"{_num(dec['classify_cached_us'], 2)} µs",
                "ratio": f"{_num(dec['decision_us'], 2)} µs",
                "goal": "< 5 µs",
                "met": dec["decision_us"] < 5.0,
                "value": dec["decision_us"],
            }
        )

    def s2(d: dict[str, Any]) -> None:
        c = d["contenders"]
        names = list(c)
        two = c[names[2]]
        rows.append(
            {
                "scenario": "2. Read scaling, I/O-bound (2 ms reads, pool 4/node, 64 tasks)",
                "contenders": "0 / 1 / 2 replicas",
                "medians": " / ".join(_num(c[n]["throughput"]) for n in names[:3]) + " q/s",
                "ratio": f"{_x(c[names[1]]['speedup'])} / {_x(two['speedup'])}",
                "goal": "(ceiling 2x: reads stay off the primary)",
                "met": None,
                "value": two["speedup"],
            }
        )
        if len(names) > 3:
            both = c[names[3]]
            rows.append(
                {
                    "scenario": "2. Read scaling, 2 replicas + primary reads (primary_weight=1)",
                    "contenders": "0 replicas vs 2 replicas + primary",
                    "medians": f"{_num(c[names[0]]['throughput'])} vs "
                    f"{_num(both['throughput'])} q/s",
                    "ratio": _x(both["speedup"]),
                    "goal": ">= 2.7x with 2 replicas",
                    "met": both["speedup"] >= 2.7,
                    "value": both["speedup"],
                }
            )

    def s3(d: dict[str, Any]) -> None:
        if "skipped" in d:
            rows.append(
                {
                    "scenario": "3. Pgpool-II peer",
                    "contenders": "areplica vs Pgpool-II",
                    "medians": f"skipped: {d['skipped'][:150]}",
                    "ratio": "-",
                    "goal": "faster, lower p99",
                    "met": None,
                }
            )
            return
        for workload, w in d["workloads"].items():
            p = w["contenders"]["pgpool"]
            for name, a in w["contenders"].items():
                if name == "pgpool":
                    continue
                ok = a["throughput"] > p["throughput"] and a["p99_us"] < p["p99_us"]
                label = "areplica" if name == "areplica" else "areplica eventual"
                rows.append(
                    {
                        "scenario": f"3. vs Pgpool-II {d.get('pgpool_version') or ''}, "
                        f"{workload.replace('_', ' ').replace('90 10', '90/10')}"
                        + ("" if name == "areplica" else " (eventual, like-for-like)"),
                        "contenders": f"{label} vs Pgpool-II",
                        "medians": f"{_num(a['throughput'])} vs {_num(p['throughput'])} q/s; "
                        f"p50 {_num(a['p50_us'])} vs {_num(p['p50_us'])} µs; "
                        f"p99 {_num(a['p99_us'])} vs {_num(p['p99_us'])} µs "
                        f"(rounds with higher throughput {a.get('throughput_higher_rounds')}"
                        f"/{d['rounds']}, with lower p99 {a.get('p99_lower_rounds')}"
                        f"/{d['rounds']})",
                        "ratio": f"{_x(_div(a['throughput'], p['throughput']))} tput, "
                        f"{_x(_div(a['p99_us'], p['p99_us']))} p99",
                        "goal": "higher throughput and lower p99",
                        "met": ok,
                        "value": _div(a["throughput"], p["throughput"]),
                    }
                )

    def s4(d: dict[str, Any]) -> None:
        a = d["contenders"]["areplica"]
        n = d["contenders"]["naive random router"]
        ok = a["failed_reads"] == 0 and n["failed_reads"] > 0
        rows.append(
            {
                "scenario": "4. Replica SIGKILLed mid-run, then restarted",
                "contenders": "areplica vs naive random router",
                "medians": f"failed reads {a['failed_reads']} vs {n['failed_reads']} "
                f"({_pct(a['failed_share'])} vs {_pct(n['failed_share'])}); "
                f"p99 {_num(a['p99_us'])} vs {_num(n['p99_us'])} µs",
                "ratio": "-",
                "goal": "0 failed reads where naive fails",
                "met": ok,
                "value": a["failed_reads"],
            }
        )

    def s5(d: dict[str, Any]) -> None:
        for driver, modes in d["by_driver"].items():
            ev = d["contenders"][f"eventual/{driver}"]
            ca = d["contenders"][f"causal/{driver}"]
            cw = d["contenders"][f"causal+wait50ms/{driver}"]
            value = modes["causal"]["write_throughput_vs_eventual"]
            rows.append(
                {
                    "scenario": f"5. Consistency cost, write throughput ({driver})",
                    "contenders": "causal (wait 0 / wait 50 ms) vs eventual",
                    "medians": f"{_num(ca['write_throughput'])} / "
                    f"{_num(cw['write_throughput'])} vs "
                    f"{_num(ev['write_throughput'])} writes/s",
                    "ratio": f"{_x(value)} / "
                    f"{_x(modes['causal+wait50ms']['write_throughput_vs_eventual'])}",
                    "goal": ">= 0.85x",
                    "met": value >= 0.85,
                    "value": value,
                }
            )
            rows.append(
                {
                    "scenario": f"5. Reads on replicas, 30% write-then-read ({driver})",
                    "contenders": "eventual / causal wait 0 / causal wait 50 ms",
                    "medians": f"{_pct(ev['replica_read_share'])} / "
                    f"{_pct(ca['replica_read_share'])} / {_pct(cw['replica_read_share'])}; "
                    f"stale {_pct(ev['stale_read_share'])} / "
                    f"{_pct(ca['stale_read_share'])} / {_pct(cw['stale_read_share'])}",
                    "ratio": "-",
                    "goal": "(reported)",
                    "met": None,
                }
            )

    def s6(_: dict[str, Any]) -> None:
        s1d = _scenario(results, "1_overhead")
        s5d = _scenario(results, "5_consistency")
        if s1d is not None:
            c = s1d["contenders"]
            a, p = c["areplica/aiopg"], c["areplica/psycopg"]
            rows.append(
                {
                    "scenario": "6. Drivers, scenario 1 (areplica)",
                    "contenders": "aiopg vs psycopg",
                    "medians": f"p50 {_num(a['latency_p50_us'], 1)} vs "
                    f"{_num(p['latency_p50_us'], 1)} µs; "
                    f"{_num(a['throughput'])} vs {_num(p['throughput'])} q/s",
                    "ratio": f"{_x(_div(p['throughput'], a['throughput']))} tput (psycopg/aiopg)",
                    "goal": "(reported)",
                    "met": None,
                }
            )
        if s5d is not None:
            c = s5d["contenders"]
            a, p = c["causal/aiopg"], c["causal/psycopg"]
            rows.append(
                {
                    "scenario": "6. Drivers, scenario 5 (causal)",
                    "contenders": "aiopg vs psycopg",
                    "medians": f"{_num(a['write_throughput'])} vs "
                    f"{_num(p['write_throughput'])} writes/s; mixed "
                    f"{_num(a['mixed_throughput'])} vs {_num(p['mixed_throughput'])} req/s",
                    "ratio": f"{_x(_div(p['write_throughput'], a['write_throughput']))} writes "
                    "(psycopg/aiopg)",
                    "goal": "(reported)",
                    "met": None,
                }
            )

    guarded("1_overhead", "1. Routing overhead", s1)
    guarded("2_scaling", "2. Read scaling", s2)
    guarded("3_pgpool", "3. Pgpool-II peer", s3)
    guarded("4_faults", "4. Faults", s4)
    guarded("5_consistency", "5. Consistency cost", s5)
    if _scenario(results, "1_overhead") or _scenario(results, "5_consistency"):
        s6({})
    return rows


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows)
    return out


def machine_line(results: dict[str, Any]) -> str:
    m = results.get("machine", {})
    v = m.get("versions", {})
    parts = [
        str(m.get("cpu_model")),
        f"{m.get('cores')} cores",
        f"{m.get('memory_gib')} GiB",
        f"Python {m.get('python')}",
        f"PostgreSQL {m.get('postgresql')}",
        f"peewee {v.get('peewee')}",
        f"peewee-async {v.get('peewee-async')}",
        f"aiopg {v.get('aiopg')}",
        f"psycopg {v.get('psycopg')}",
    ]
    pgpool = results.get("scenarios", {}).get("3_pgpool", {})
    if isinstance(pgpool, dict) and pgpool.get("pgpool_version"):
        parts.append(f"Pgpool-II {pgpool['pgpool_version']}")
    parts.append(str(m.get("date")))
    return " · ".join(parts)


def _load(meta: dict[str, Any]) -> str:
    def first(key: str) -> str:
        value = meta.get(key)
        return f"{value[0]:.2f}" if isinstance(value, list) and value else "n/a"

    return f"{first('loadavg_before')} / {first('loadavg_after')}"


def markdown(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    lines = [
        f"# areplica benchmarks ({'quick' if meta.get('quick') else 'full'} run)",
        "",
        f"Machine: {machine_line(results)}",
        "",
        f"Run time {meta.get('seconds', 0):.0f} s (`python -m benchmarks"
        f"{' --quick' if meta.get('quick') else ''}`), areplica commit "
        f"{results.get('machine', {}).get('areplica_commit')}. Contenders run side by side in "
        "one process, alternating order every round; figures are medians over rounds. "
        "Ratios are areplica's cost over the baseline unless a row says otherwise. "
        f"Load average (1 min) before / after the run: {_load(meta)}: the machine may be "
        "shared, so compare only figures of one run.",
        "",
        "## Summary",
        "",
    ]
    lines += _table(
        ["Scenario", "Contenders", "Medians", "Ratio", "Goal", "Met?"],
        [
            [r["scenario"], r["contenders"], r["medians"], r["ratio"], r["goal"], _met(r["met"])]
            for r in results.get("goals", [])
        ],
    )
    lines += _details(results)
    return "\n".join(lines) + "\n"


def _details(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    d = _scenario(results, "1_overhead")
    if d is not None:
        lines += [
            "",
            "## 1. Routing overhead",
            "",
            f'One replica, `consistency="eventual"`, pool {d["pool_size"]} on both sides; '
            f"latency: {d['latency_queries_per_round']} sequential lookups per round; "
            f"throughput: {d['concurrency']} tasks for {d['throughput_seconds_per_round']} s "
            f"per round; {d['rounds']} rounds.",
            "",
        ]
        lines += _table(
            [
                "Contender",
                "p50 latency (µs)",
                "Throughput (q/s)",
                "Client CPU per query (µs)",
                "Errors",
            ],
            [
                [
                    n,
                    _num(c["latency_p50_us"], 1),
                    _num(c["throughput"]),
                    _num(c.get("client_cpu_us_per_query"), 1),
                    str(c["errors"]),
                ]
                for n, c in d["contenders"].items()
            ],
        )
        lines += [
            "",
            "Client CPU ratio (areplica / peewee-async, the least noise-prone overhead "
            "figure): "
            + ", ".join(
                f"{driver} {_x(v.get('client_cpu_ratio'))}" for driver, v in d["by_driver"].items()
            )
            + ".",
        ]
        dec = d["decision"]
        lines += [
            "",
            "Decision cost (timeit, µs per call): "
            f"`_read_target` 1 replica eventual {_num(dec['pick_1_replica_eventual_us'], 2)}, "
            f"2 replicas causal {_num(dec['pick_2_replicas_causal_us'], 2)}; "
            f"`classify_query` cached {_num(dec['classify_cached_us'], 2)}; "
            f"for scale, compiling the query (both sides pay it) "
            f"{_num(dec['compile_us'], 2)}.",
        ]
    d = _scenario(results, "2_scaling")
    if d is not None:
        lines += [
            "",
            "## 2. Read scaling (I/O-bound)",
            "",
            f"`{d['sql']}`; pool {d['pool_size_per_node']} per node, {d['concurrency']} tasks, "
            f"{d['seconds_per_round']} s x {d['rounds']} rounds. Reads never go to the "
            "primary while a replica is eligible, so N replicas hold N x 4 read connections: "
            "the ideal is 1x / 2x.",
            "",
        ]
        lines += _table(
            ["Contender", "Throughput (q/s)", "Speedup", "Reads served"],
            [
                [n, _num(c["throughput"]), _x(c["speedup"]), str(c.get("reads_served", "-"))]
                for n, c in d["contenders"].items()
            ],
        )
    d = _scenario(results, "3_pgpool")
    if d is not None:
        lines += ["", "## 3. Pgpool-II peer", ""]
        if "skipped" in d:
            lines.append(f"Skipped: {d['skipped']}")
        else:
            lines += [
                f"Pgpool-II {d.get('pgpool_version')} (streaming replication, statement-level "
                "load balancing, primary weight 0) vs areplica straight to the nodes; "
                f"pool {d['pool_size']} on both sides, {d['concurrency']} tasks, "
                f"{d['seconds_per_round']} s x {d['rounds']} rounds, driver {d['driver']}.",
                "",
            ]
            rows = []
            for workload, w in d["workloads"].items():
                for name, c in w["contenders"].items():
                    served = (
                        w["pgpool_select_counts"]
                        if name == "pgpool"
                        else w["areplica_reads_served"].get(name)
                    )
                    rows.append(
                        [
                            workload,
                            name,
                            _num(c["throughput"]),
                            _num(c["p50_us"]),
                            _num(c["p99_us"]),
                            str(c["errors"]),
                            str(served),
                        ]
                    )
            lines += _table(
                [
                    "Workload",
                    "Contender",
                    "Throughput (q/s)",
                    "p50 (µs)",
                    "p99 (µs)",
                    "Errors",
                    "Reads per node (pgpool: `show pool_nodes` select_cnt)",
                ],
                rows,
            )
    d = _scenario(results, "4_faults")
    if d is not None:
        lines += [
            "",
            "## 4. Faults",
            "",
            f"{d['victim']} SIGKILLed at {d['kill_at']} s and started again at "
            f"{d['restart_at']} s of each {d['phase_seconds']} s phase; {d['concurrency']} "
            f"tasks, pool {d['pool_size']}, {d['rounds']} round(s), fresh pools per phase.",
            "",
        ]
        rows = []
        for name, c in d["contenders"].items():
            after = sum(p["failed_after_restart"] for p in c["phases"])
            extra = ""
            if name == "areplica":
                extra = (
                    f"retried {sum(p.get('retried_reads', 0) for p in c['phases'])}, "
                    f"fallback {sum(p.get('fallback_reads', 0) for p in c['phases'])}"
                )
            rows.append(
                [
                    name,
                    str(c["ok_reads"]),
                    str(c["failed_reads"]),
                    str(after),
                    _num(c["p50_us"]),
                    _num(c["p99_us"]),
                    _num(c["max_us"]),
                    extra,
                ]
            )
        lines += _table(
            [
                "Contender",
                "OK reads",
                "Failed reads",
                "of which after restart",
                "p50 (µs)",
                "p99 (µs)",
                "max (µs)",
                "Notes",
            ],
            rows,
        )
    d = _scenario(results, "5_consistency")
    if d is not None:
        lines += [
            "",
            "## 5. Consistency cost (and 6. drivers)",
            "",
            f"2 replicas, pool {d['pool_size']} per node, {d['concurrency']} tasks; writes: "
            f"{d['write_seconds_per_round']} s, mixed ({int(100 * d['write_share'])}% "
            f"write-then-read, each task in its own session): {d['mixed_seconds_per_round']} s; "
            f"{d['rounds']} rounds.",
            "",
        ]
        lines += _table(
            [
                "Contender",
                "Writes/s",
                "Mixed req/s",
                "Mixed p99 (µs)",
                "Reads on replicas",
                "Stale read-after-write",
                "Errors",
            ],
            [
                [
                    n,
                    _num(c["write_throughput"]),
                    _num(c["mixed_throughput"]),
                    _num(c["mixed_p99_us"]),
                    _pct(c["replica_read_share"]),
                    _pct(c["stale_read_share"]),
                    str(c["errors"]),
                ]
                for n, c in d["contenders"].items()
            ],
        )
    notes = _notes(results)
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return lines


def _notes(results: dict[str, Any]) -> list[str]:
    """Short explanations drawn from the figures of this run."""
    notes: list[str] = []
    d = _scenario(results, "2_scaling")
    if d is not None:
        two = list(d["contenders"].values())[2]
        notes.append(
            f"Scenario 2: 2 replicas reached {_x(two['speedup'])} of the primary-only "
            f"baseline, {_pct(two['speedup'] / 2.0)} of the 2x ceiling when reads stay off "
            "the primary; with primary_weight=1 the primary serves reads too (3 nodes)."
        )
    d = _scenario(results, "3_pgpool")
    if d is not None and "workloads" in d:
        balanced = all(w.get("pgpool_balanced") for w in d["workloads"].values())
        notes.append(
            "Scenario 3: Pgpool-II "
            + ("did" if balanced else "did NOT")
            + " spread reads over both standbys (`show pool_nodes` select counts in the "
            "table); the primary got no balanced reads (weight 0)."
        )
    d = _scenario(results, "5_consistency")
    if d is not None:
        notes.append(
            "Scenario 5: in causal mode a read after the session's write needs a replica "
            "whose known replay position covers the write. Positions are refreshed by the "
            "health probe (every `health_interval`) and, with `causal_wait` > 0, by polling "
            "the replicas for the waiting read; with `causal_wait=0` such reads go to the "
            "primary instead, which is why so few of them reach a replica."
        )
    return notes
