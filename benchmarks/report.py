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


def _secs(values: Any) -> str:
    """Seconds of several runs, e.g. ``2.57 / 2.73``."""
    if not isinstance(values, list) or not values:
        return "n/a"
    return " / ".join(_num(v, 2) for v in values)


def _spread(p: Any) -> str:
    """A per-round ratio: its median and its spread, e.g. ``0.95x (0.90x..1.02x)``."""
    if not isinstance(p, dict):
        return "n/a"
    return f"{_x(p.get('median'))} ({_x(p.get('min'))}..{_x(p.get('max'))})"


def _le(p: Any, limit: float) -> bool | None:
    value = p.get("median") if isinstance(p, dict) else None
    return None if not isinstance(value, (int, float)) or math.isnan(value) else value <= limit


def _ge(p: Any, limit: float) -> bool | None:
    value = p.get("median") if isinstance(p, dict) else None
    return None if not isinstance(value, (int, float)) or math.isnan(value) else value >= limit


def _link_label(d: dict[str, Any]) -> str:
    link = d.get("link")
    return f", {_num(link.get('delay_ms_each_way'), 1)} ms link" if isinstance(link, dict) else ""


def _bound_text(d: dict[str, Any]) -> str:
    """How the causal p99 bound on a link is made, with the link's figures."""
    link = d["link"]
    return (
        f"(eventual p99 + {_num(link['rtt_us']['added_by_link'])} µs link round trip + "
        f"{_num(link['replication_us']['link']['median'])} µs replication) x 1.2"
    )


def _cell(text: str) -> str:
    """Text safe in a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


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
        try:
            build(data)
        except (KeyError, TypeError, IndexError) as exc:
            rows.append(
                {
                    "scenario": label,
                    "contenders": "-",
                    "medians": f"results in an older format ({type(exc).__name__}: {exc}): "
                    "run the scenario again",
                    "ratio": "-",
                    "goal": "-",
                    "met": None,
                }
            )

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
                "contenders": "`engine.reads.target` (2 replicas) + cached `classify_query`",
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
        where = _link_label(d)
        if "skipped" in d:
            rows.append(
                {
                    "scenario": f"3. Pgpool-II peer{where}",
                    "contenders": "areplica vs Pgpool-II",
                    "medians": f"skipped: {d['skipped'][:150]}",
                    "ratio": "-",
                    "goal": "faster, lower p99",
                    "met": None,
                }
            )
            return
        total = d["rounds"]
        majority = total // 2 + 1
        for workload, w in d["workloads"].items():
            p = w["contenders"]["pgpool"]
            for name, a in w["contenders"].items():
                if name == "pgpool":
                    continue
                higher, lower = a["throughput_higher_rounds"], a["p99_lower_rounds"]
                vs = a["vs_pgpool"]
                label = "areplica (causal, default)" if name == "areplica" else "areplica eventual"
                rows.append(
                    {
                        "scenario": f"3. vs Pgpool-II {d.get('pgpool_version') or ''}, "
                        f"{workload.replace('_', ' ').replace('90 10', '90/10')}"
                        + ("" if name == "areplica" else " (eventual, like-for-like)")
                        + where,
                        "contenders": f"{label} vs Pgpool-II",
                        "medians": f"{_num(a['throughput'])} vs {_num(p['throughput'])} q/s; "
                        f"p50 {_num(a['p50_us'])} vs {_num(p['p50_us'])} µs; "
                        f"p99 {_num(a['p99_us'])} vs {_num(p['p99_us'])} µs; "
                        f"rounds with higher throughput {higher}/{total}, with lower p99 "
                        f"{lower}/{total}",
                        "ratio": f"tput {_spread(vs['throughput'])}; p99 {_spread(vs['p99'])}",
                        "goal": f"higher throughput and lower p99 in >= {majority}/{total} rounds",
                        "met": higher >= majority and lower >= majority,
                        "value": vs["throughput"]["median"],
                    }
                )
            cve = w.get("causal_vs_eventual")
            if cve is not None and "p99_vs_link_bound" in cve:
                c, e = w["contenders"]["areplica"], w["contenders"]["areplica (eventual)"]
                rows.append(
                    {
                        "scenario": f"3. Causal p99 on the link, "
                        f"{workload.replace('_', ' ').replace('90 10', '90/10')}{where}",
                        "contenders": "areplica causal vs areplica eventual",
                        "medians": f"p99 {_num(c['p99_us'])} vs {_num(e['p99_us'])} µs; bound "
                        + _bound_text(d),
                        "ratio": f"{_spread(cve['p99_vs_link_bound'])} of the bound",
                        "goal": "<= 1x the bound",
                        "met": _le(cve["p99_vs_link_bound"], 1.0),
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
        where = _link_label(d)
        on_link = "link" in d
        default = d["default_mode"]
        wait = d.get("default_causal_wait")
        others = [m for m in d["modes"] if m not in ("eventual", default)]
        c = d["contenders"]
        for driver, modes in d["by_driver"].items():
            ev, ca = c[f"eventual/{driver}"], c[f"{default}/{driver}"]
            m = modes[default]
            tag = f"({driver}{where})"
            causal = f"causal (default, causal_wait={_num(wait, 2)} s)"

            def alias(mode: str, driver: str = driver) -> str:
                same = c[f"{mode}/{driver}"].get("same_as")
                return f" = {same.split('/')[0]}" if same else ""

            rows.append(
                {
                    "scenario": f"5. Causal write throughput vs eventual {tag}",
                    "contenders": f"{causal} vs eventual; also "
                    + ", ".join(f"{o}{alias(o)}" for o in others),
                    "medians": f"{_num(ca['write_throughput'])} vs "
                    f"{_num(ev['write_throughput'])} writes/s; "
                    + "; ".join(
                        f"{o} {_num(c[f'{o}/{driver}']['write_throughput'])}" for o in others
                    ),
                    "ratio": f"{_spread(m['write_throughput_vs_eventual'])}; "
                    + "; ".join(
                        f"{o} {_x(modes[o]['write_throughput_vs_eventual']['median'])}"
                        for o in others
                    ),
                    "goal": ">= 0.95x",
                    "met": _ge(m["write_throughput_vs_eventual"], 0.95),
                    "value": m["write_throughput_vs_eventual"]["median"],
                }
            )
            rows.append(
                {
                    "scenario": f"5. Causal mixed throughput vs eventual, 30% write-then-read "
                    f"{tag}",
                    "contenders": f"{causal} vs eventual",
                    "medians": f"{_num(ca['mixed_throughput'])} vs "
                    f"{_num(ev['mixed_throughput'])} req/s",
                    "ratio": _spread(m["mixed_throughput_vs_eventual"]),
                    "goal": ">= 0.9x",
                    "met": _ge(m["mixed_throughput_vs_eventual"], 0.9),
                    "value": m["mixed_throughput_vs_eventual"]["median"],
                }
            )
            if on_link:
                rows.append(
                    {
                        "scenario": f"5. Causal mixed p99 on the link {tag}",
                        "contenders": f"{causal} vs eventual",
                        "medians": f"p99 {_num(ca['mixed_p99_us'])} vs "
                        f"{_num(ev['mixed_p99_us'])} µs; bound " + _bound_text(d),
                        "ratio": f"{_spread(m['mixed_p99_vs_link_bound'])} of the bound; "
                        f"{_spread(m['mixed_p99_vs_eventual'])} of eventual",
                        "goal": "<= 1x the bound",
                        "met": _le(m["mixed_p99_vs_link_bound"], 1.0),
                    }
                )
            else:
                rows.append(
                    {
                        "scenario": f"5. Causal mixed p99 vs eventual {tag}",
                        "contenders": f"{causal} vs eventual",
                        "medians": f"{_num(ca['mixed_p99_us'])} vs {_num(ev['mixed_p99_us'])} µs",
                        "ratio": _spread(m["mixed_p99_vs_eventual"]),
                        "goal": "<= 1.25x",
                        "met": _le(m["mixed_p99_vs_eventual"], 1.25),
                    }
                )
            share = ca["replica_read_share"]
            rows.append(
                {
                    "scenario": f"5. Reads on replicas, causal default {tag}",
                    "contenders": f"{causal}; eventual; "
                    + ", ".join(f"{o}{alias(o)}" for o in others),
                    "medians": f"{_pct(share)} (lowest round {_pct(ca['replica_read_share_min'])})"
                    f"; eventual {_pct(ev['replica_read_share'])}; "
                    + "; ".join(
                        f"{o} {_pct(c[f'{o}/{driver}']['replica_read_share'])}" for o in others
                    ),
                    "ratio": "-",
                    "goal": ">= 95%" if not on_link else "(reported)",
                    "met": (share >= 0.95) if not on_link else None,
                    "value": share,
                }
            )
            stale = {
                mode: c[f"{mode}/{driver}"]["totals"]["stale"]
                for mode in d["modes"]
                if not c[f"{mode}/{driver}"].get("same_as")
            }
            checked = sum(
                c[f"{mode}/{driver}"]["totals"].get("writes_read_back", 0) for mode in stale
            )
            rows.append(
                {
                    "scenario": f"5. Stale read-after-write {tag}",
                    "contenders": "causal modes (eventual for comparison)",
                    "medians": ", ".join(f"{mode} {n}" for mode, n in stale.items())
                    + f" stale of {checked:,} writes read back",
                    "ratio": "-",
                    "goal": "0 in causal modes",
                    "met": all(n == 0 for mode, n in stale.items() if mode != "eventual"),
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

    def s7(d: dict[str, Any]) -> None:
        if "skipped" in d:
            rows.append(
                {
                    "scenario": "7. HAProxy + Patroni peer",
                    "contenders": "areplica vs HAProxy (Patroni REST checks)",
                    "medians": f"skipped: {d['skipped'][:150]}",
                    "ratio": "-",
                    "goal": "-",
                    "met": None,
                }
            )
            return
        r = d["reads"]
        a, h = r["contenders"]["areplica"], r["contenders"]["haproxy"]
        rows.append(
            {
                "scenario": f"7. vs HAProxy {d.get('haproxy_version') or ''} + Patroni checks, "
                f"reads ({d['concurrency']} tasks)",
                "contenders": "areplica (`patroni=`) vs aiopg pool on HAProxy's read port",
                "medians": f"{_num(a['throughput'])} vs {_num(h['throughput'])} q/s; "
                f"p50 {_num(a['p50_us'])} vs {_num(h['p50_us'])} µs; "
                f"p99 {_num(a['p99_us'])} vs {_num(h['p99_us'])} µs "
                f"(rounds with higher throughput {r['throughput_higher_rounds']}/{d['rounds']}, "
                f"with lower p99 {r['p99_lower_rounds']}/{d['rounds']})",
                "ratio": f"{_x(r['throughput_ratio'])} tput, {_x(r['p99_ratio'])} p99",
                "goal": "(reported)",
                "met": None,
                "value": r["throughput_ratio"],
            }
        )
        sw = d["switchover"]["contenders"]
        a, h = sw["areplica"], sw["haproxy"]
        rows.append(
            {
                "scenario": f"7. Planned switchovers, {d['readers']} readers + 1 writer "
                f"({a['switchovers']} per contender)",
                "contenders": "areplica vs HAProxy",
                "medians": f"failed reads {a['failed_reads']} vs {h['failed_reads']}; "
                f"failed writes {a['failed_writes']} vs {h['failed_writes']}; "
                f"write outage {_secs(a['write_outage_seconds'])} vs "
                f"{_secs(h['write_outage_seconds'])} s (Patroni's switchovers: "
                f"{_secs(a['patroni_seconds'])} vs {_secs(h['patroni_seconds'])} s)",
                "ratio": "-",
                "goal": "0 failed reads",
                "met": a["failed_reads"] == 0,
                "value": a["failed_reads"],
            }
        )

    guarded("1_overhead", "1. Routing overhead", s1)
    guarded("2_scaling", "2. Read scaling", s2)
    guarded("3_pgpool", "3. Pgpool-II peer", s3)
    guarded("3_pgpool_link", "3. Pgpool-II peer, link", s3)
    guarded("4_faults", "4. Faults", s4)
    guarded("5_consistency", "5. Consistency cost", s5)
    guarded("5_consistency_link", "5. Consistency cost, link", s5)
    if _scenario(results, "1_overhead") or _scenario(results, "5_consistency"):
        try:
            s6({})
        except (KeyError, TypeError, IndexError):
            pass  # older results of scenario 1 or 5: their own rows say so
    guarded("7_haproxy", "7. HAProxy + Patroni peer", s7)
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
    peer = results.get("scenarios", {}).get("7_haproxy", {})
    if isinstance(peer, dict) and peer.get("haproxy_version"):
        parts.append(f"HAProxy {peer['haproxy_version']}")
    if isinstance(peer, dict) and peer.get("patroni_version"):
        parts.append(f"Patroni {peer['patroni_version']}")
    parts.append(str(m.get("date")))
    return " · ".join(parts)


def _load(meta: dict[str, Any]) -> str:
    def first(key: str) -> str:
        value = meta.get(key)
        return f"{value[0]:.2f}" if isinstance(value, list) and value else "n/a"

    return f"{first('loadavg_before')} / {first('loadavg_after')}"


def markdown(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    command = meta.get("command") or (
        "python -m benchmarks" + (" --quick" if meta.get("quick") else "")
    )
    lines = [
        f"# areplica benchmarks ({'quick' if meta.get('quick') else 'full'} run)",
        "",
        f"Machine: {machine_line(results)}",
        "",
        f"Run time {meta.get('seconds', 0):.0f} s (`{command}`), areplica commit "
        f"{results.get('machine', {}).get('areplica_commit')}. Contenders run side by side in "
        "one process, alternating order every round; figures are medians over rounds. "
        "Ratios are areplica's cost over the baseline unless a row says otherwise. "
        f"Load average (1 min) before / after the run: {_load(meta)}: the machine may be "
        "shared, so compare only figures of one run.",
        "",
    ]
    for key, run in meta.get("updated", {}).items():
        loads = f"{_load(run)}" if run.get("loadavg_before") else "n/a"
        lines += [
            f"Scenario {key.split('_', 1)[0]} comes from a later run (`{run.get('command')}`, "
            f"{run.get('date')}, areplica commit {run.get('areplica_commit')}, "
            f"Python {run.get('python')}, "
            f"{_num(run.get('seconds'))} s, load average before / after {loads}); the "
            "other scenarios from the run above. Compare figures within a scenario only.",
            "",
        ]
    lines += ["## Summary", ""]
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
            f"`reads.target` 1 replica eventual {_num(dec['pick_1_replica_eventual_us'], 2)}, "
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
    for key in ("3_pgpool", "3_pgpool_link"):
        lines += _details_s3(results, key)
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
    for key in ("5_consistency", "5_consistency_link"):
        lines += _details_s5(results, key)
    lines += _details_s7(results)
    notes = _notes(results)
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return lines


def _safe(build: Callable[[], list[str]], title: str) -> list[str]:
    """A details section, or a line saying its results are in an older format."""
    try:
        return build()
    except (KeyError, TypeError, IndexError) as exc:
        return ["", f"## {title}", "", f"Results in an older format ({exc!r}): run it again."]


def _details_s3(results: dict[str, Any], key: str) -> list[str]:
    d = _scenario(results, key)
    if d is None:
        return []
    title = f"3. Pgpool-II peer{_link_label(d)}"

    def build() -> list[str]:
        lines = ["", f"## {title}", ""]
        if "skipped" in d:
            return [*lines, f"Skipped: {d['skipped']}"]
        lines += [
            f"Pgpool-II {d.get('pgpool_version')} (streaming replication, statement-level "
            "load balancing, primary weight 0) vs areplica straight to the nodes; "
            f"pool {d['pool_size']} on both sides, {d['concurrency']} tasks, "
            f"{d['seconds_per_round']} s x {d['rounds']} rounds, driver {d['driver']}; "
            f"areplica's default causal_wait {_num(d.get('default_causal_wait'), 2)} s."
            + (
                " On the link, clients reach Pgpool-II through a delaying proxy and Pgpool-II "
                "reaches each backend through one: a query through Pgpool-II crosses two links."
                if "link" in d
                else ""
            ),
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
                vs = c.get("vs_pgpool")
                rows.append(
                    [
                        workload,
                        name,
                        _num(c["throughput"]),
                        _num(c["p50_us"]),
                        _num(c["p99_us"]),
                        _spread(vs["throughput"]) if vs else "-",
                        _spread(vs["p99"]) if vs else "-",
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
                "Throughput / Pgpool-II per round",
                "p99 / Pgpool-II per round",
                "Errors",
                "Reads per node (pgpool: `show pool_nodes` select_cnt)",
            ],
            rows,
        )
        splits = [
            (f"{workload}: {name}", c["time_split"])
            for workload, w in d["workloads"].items()
            for name, c in w["contenders"].items()
        ]
        lines += _split_table(splits)
        lines += _link_table(d)
        return lines

    return _safe(build, title)


def _details_s5(results: dict[str, Any], key: str) -> list[str]:
    d = _scenario(results, key)
    if d is None:
        return []
    title = f"5. Consistency cost (and 6. drivers){_link_label(d)}"

    def build() -> list[str]:
        same = d.get("same_as") or {}
        lines = [
            "",
            f"## {title}",
            "",
            f"2 replicas, pool {d['pool_size']} per node, {d['concurrency']} tasks; writes: "
            f"{d['write_seconds_per_round']} s, mixed ({int(100 * d['write_share'])}% "
            f"write-then-read, each task in its own session): {d['mixed_seconds_per_round']} s; "
            f"{d['rounds']} rounds. `{d['default_mode']}` is causal with the default "
            f"causal_wait ({_num(d.get('default_causal_wait'), 2)} s)"
            + (
                "; "
                + ", ".join(f"`{m}` has the same options, so it is not run again" for m in same)
                if same
                else ""
            )
            + ". Ratios: per round against eventual with the same driver, median (min..max).",
            "",
        ]
        c = d["contenders"]
        rows = []
        for name, v in c.items():
            mode, driver = name.split("/")
            ratios = d["by_driver"][driver].get(mode, {})
            rows.append(
                [
                    name + (f" (= {v['same_as']})" if v.get("same_as") else ""),
                    _num(v["write_throughput"]),
                    _spread(ratios.get("write_throughput_vs_eventual")) if ratios else "-",
                    _num(v["mixed_throughput"]),
                    _spread(ratios.get("mixed_throughput_vs_eventual")) if ratios else "-",
                    _num(v["mixed_p99_us"]),
                    _spread(ratios.get("mixed_p99_vs_eventual")) if ratios else "-",
                    _pct(v["replica_read_share"]),
                    f"{v['totals']['stale']} / {v['totals'].get('writes_read_back', 'n/a')}",
                    str(v["errors"]),
                ]
            )
        lines += _table(
            [
                "Contender",
                "Writes/s",
                "vs eventual",
                "Mixed req/s",
                "vs eventual",
                "Mixed p99 (µs)",
                "vs eventual",
                "Reads on replicas",
                "Stale / writes read back",
                "Errors",
            ],
            rows,
        )
        splits = [
            (f"{name} {kind}", v["time_split"][kind])
            for name, v in c.items()
            if not v.get("same_as")
            for kind in ("write", "mixed")
        ]
        lines += _split_table(splits)
        lines += _link_table(d)
        return lines

    return _safe(build, title)


_SPLIT_KEYS = ("slot_wait", "catch_up", "query", "write", "write_position", "other")
_CALL_KEYS = ("write", "read_after_write", "read")


def _split_table(splits: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Where the time goes: ``mgr.timings()`` shares of the request time, and call times."""
    if not splits:
        return []
    available = any(split.get("library") for _, split in splits)
    lines = [
        "",
        "Where the time goes: shares of the time spent inside requests (all tasks, all "
        "rounds), from the library's `mgr.timings()`: waiting for a connection slot, for a "
        "replica to catch up (position), running reads, running writes, reading a write's "
        "WAL position; `other` is the rest (the client's own work, the event loop). Then "
        "the benchmark's own timing of each kind of call: mean µs (share of request time)."
        + (
            ""
            if available
            else " This library has no `mgr.timings()`: only the benchmark's call timings."
        ),
        "",
    ]
    rows = []
    for label, split in splits:
        lib = split.get("library")
        shares = [_pct(lib["shares"].get(k)) if lib else "n/a" for k in _SPLIT_KEYS]
        calls = split.get("calls", {})
        rows.append(
            [
                label,
                _num(split.get("mean_request_us")),
                *shares,
                *(
                    f"{_num(calls[k]['mean_us'])} ({_pct(calls[k]['share'])})"
                    if k in calls
                    else "-"
                    for k in _CALL_KEYS
                ),
            ]
        )
    return lines + _table(
        [
            "Contender, load",
            "Mean request (µs)",
            "Slot wait",
            "Catch-up",
            "Query",
            "Write",
            "Write position",
            "Other",
            "Write calls",
            "Read after own write",
            "Other reads",
        ],
        rows,
    )


def _link_table(d: dict[str, Any]) -> list[str]:
    """What the link of this scenario's run measured (none: nothing)."""
    link = d.get("link")
    if not isinstance(link, dict):
        return []
    rtt, tput, rep = link["rtt_us"], link["throughput_qps"], link["replication_us"]
    return [
        "",
        f"The link: a proxy (in a process of its own) adding {_num(link['delay_ms_each_way'], 2)} "
        f"ms each way on every hop: {'; '.join(link['hops'])}. Measured on "
        f"{link['measured_on']} before the scenarios:",
        "",
        *_table(
            [
                "Path",
                "SELECT 1 round trip p50 (µs)",
                "p90 (µs)",
                f"{tput['concurrency']} tasks (q/s)",
            ],
            [
                [
                    label,
                    _num(rtt[path]),
                    _num(rtt["p90"][path]),
                    _num(tput[path]),
                ]
                for path, label in (
                    ("direct", "direct"),
                    ("proxy_no_delay", "proxy, no delay"),
                    ("link", "link"),
                )
            ],
        ),
        "",
        f"The proxy itself adds {_num(rtt['added_by_proxy'])} µs per round trip and keeps "
        f"{_x(tput['proxy_vs_direct'])} of the direct throughput; the link adds "
        f"{_num(rtt['added_by_link'])} µs per round trip (nominal "
        f"{_num(link['nominal_rtt_added_us'])}). Through the link {tput['concurrency']} tasks "
        f"could at most do {_num(tput['link_bound'])} q/s (one query per round trip each): "
        f"connections are not serialized if the figure above comes near it or the client's "
        "own ceiling (direct). Replication (a commit on the primary until a standby replayed "
        f"it): {_num(rep['proxy_no_delay']['median'])} µs through the replication proxy "
        f"without delay, {_num(rep['link']['median'])} µs through the link (p90 "
        f"{_num(rep['link']['p90'])}), +{_num(rep['added_by_link'])} µs.",
    ]


def _details_s7(results: dict[str, Any]) -> list[str]:
    d = _scenario(results, "7_haproxy")
    if d is None:
        return []
    lines = ["", "## 7. HAProxy + Patroni peer", ""]
    if "skipped" in d:
        return [*lines, f"Skipped: {d['skipped']}"]
    checks = d.get("haproxy_checks", {})
    inter = f"{checks['inter']:g}" if isinstance(checks.get("inter"), (int, float)) else "?"
    options = ", ".join(f"{k}={v}" for k, v in d.get("areplica_options", {}).items())
    lines += [
        f"A Patroni {d.get('patroni_version')} cluster of its own (etcd, 3 members, started in "
        f"{_num(d.get('patroni_startup_seconds'), 1)} s). HAProxy {d.get('haproxy_version')}: "
        "a write listener checked with `GET /primary` and a read listener checked with "
        "`GET /replica` (`balance roundrobin`) on each member's Patroni REST port, "
        f"`inter {inter}s fall {checks.get('fall')} rise {checks.get('rise')} "
        "on-marked-down shutdown-sessions` (configuration below). Its client: a plain "
        f"peewee-async database ({d['driver']} pool) per port. areplica: one manager with "
        f"`patroni=` the REST URLs, {options}, same driver.",
        "",
        f"Reads: `{d['read_sql']}`, {d['concurrency']} tasks, pool {d['pool_size']} on both "
        f"sides, {d['seconds_per_round']} s x {d['rounds']} rounds, alternating.",
        "",
    ]
    r = d["reads"]
    lines += _table(
        ["Contender", "Throughput (q/s)", "p50 (µs)", "p99 (µs)", "Errors", "Reads per member"],
        [
            [
                n,
                _num(c["throughput"]),
                _num(c["p50_us"]),
                _num(c["p99_us"]),
                str(c["errors"]),
                str(c.get("served_by", "-")),
            ]
            for n, c in r["contenders"].items()
        ],
    )
    lines += [
        "",
        f"areplica / HAProxy: throughput {_x(r['throughput_ratio'])} (per round "
        f"{', '.join(_x(v) for v in r['paired_throughput_ratios'])}), p50 {_x(r['p50_ratio'])}, "
        f"p99 {_x(r['p99_ratio'])}. Reads per member count server answers "
        f"(`inet_server_port()`); {r['leader']} led.",
        "",
        f"Planned switchovers (`topo.switchover()`, Patroni's `POST /switchover`): "
        f"{d['readers']} readers (a read, then a 5 ms pause) and one writer "
        f"(an INSERT, then a 20 ms pause) through one contender on fresh pools (areplica "
        f"pool {d['switch_pool_size']} per member; HAProxy: read pool "
        f"{d['switch_pool_size']} per replica, write pool {d['switch_pool_size']}), "
        f"{_num(d['before_seconds'], 1)} s of load before the request, kept until Patroni "
        f"reports the old leader streaming again plus {_num(d['after_seconds'], 1)} s; each "
        "switchover from a healthy cluster that both HAProxy and the manager see. "
        "Write outage: the longest time without an acknowledged write from the request to "
        "the end; Patroni's seconds: from the request until the new leader runs and "
        "accepts writes; reads on the new primary: reads it answered after that (times "
        "from the request).",
        "",
    ]
    sw = d["switchover"]
    lines += _table(
        [
            "#",
            "Contender",
            "Switchover",
            "Patroni (s)",
            "OK reads",
            "Failed reads",
            "OK writes",
            "Failed writes",
            "Lost writes",
            "Write outage (s)",
            "Longest without a read (s)",
            "Reads on the new primary (last at s)",
        ],
        [
            [
                str(i + 1),
                name,
                f"{p['old_leader']} -> {p['new_leader']}",
                _num(p["patroni_seconds"], 2),
                str(p["ok_reads"]),
                str(p["failed_reads"]),
                str(p["ok_writes"]),
                str(p["failed_writes"]),
                str(p["lost_writes"]),
                _num(p["write_outage_seconds"], 2),
                _num(p["read_gap_seconds"], 2),
                f"{p.get('reads_on_new_primary', 'n/a')}"
                + (
                    f" ({_num(p['last_read_on_new_primary'], 2)})"
                    if p.get("last_read_on_new_primary") is not None
                    else ""
                ),
            ]
            for i, (name, p) in enumerate(_phases_in_order(sw))
        ],
    )
    fallback = [p.get("fallback_reads") for p in sw["contenders"]["areplica"]["phases"]]
    retried = [p.get("retried_reads") for p in sw["contenders"]["areplica"]["phases"]]
    lines += [
        "",
        "areplica's own counters per switchover: reads sent to the primary for want of an "
        f"eligible replica (fallback) {' / '.join(str(v) for v in fallback)}, reads retried "
        f"on another node {' / '.join(str(v) for v in retried)}.",
    ]
    for name, c in sw["contenders"].items():
        for kind in ("read", "write"):
            errors = c.get(f"{kind}_errors") or {}
            if errors:
                lines += ["", f"{name}, failed {kind}s:"]
                lines += [f"- {count} x `{_cell(text)}`" for text, count in errors.items()]
    lines += ["", "HAProxy configuration:", "", "```", d["haproxy_config"].rstrip(), "```"]
    return lines


def _phases_in_order(sw: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The switchover phases in the order they ran (``order`` names the contenders)."""
    taken = {name: 0 for name in sw["contenders"]}
    out: list[tuple[str, dict[str, Any]]] = []
    for name in sw.get("order", []):
        phases = sw["contenders"][name]["phases"]
        if taken[name] < len(phases):
            out.append((name, phases[taken[name]]))
            taken[name] += 1
    return out


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
    for key in ("3_pgpool", "3_pgpool_link"):
        d = _scenario(results, key)
        if d is not None and "workloads" in d:
            balanced = all(w.get("pgpool_balanced") for w in d["workloads"].values())
            notes.append(
                f"Scenario 3{_link_label(d)}: Pgpool-II "
                + ("did" if balanced else "did NOT")
                + " spread reads over both standbys (`show pool_nodes` select counts in the "
                "table); the primary got no balanced reads (weight 0)."
            )
    if _scenario(results, "5_consistency") or _scenario(results, "5_consistency_link"):
        notes.append(
            "Scenario 5: in causal mode a read after the session's own write needs a replica "
            "that has replayed the write; it waits up to `causal_wait` for one, then reads the "
            "primary. With `causal_wait=0` it goes to the primary at once unless a replica is "
            "already known to have replayed it."
        )
    d = _scenario(results, "7_haproxy")
    if d is not None and "switchover" in d:
        sw = d["switchover"]["contenders"]
        notes.append(
            "Scenario 7: HAProxy keeps sending reads to the promoted member until its "
            "`/replica` check has failed `fall` times, then cuts those sessions "
            "(`shutdown-sessions`): its failed reads are those cut queries and pooled "
            "connections the aiopg pool hands out after the cut; its writes wait for the "
            "`/primary` check to mark the new leader up, hence the longer write outage. "
            f"areplica's {sw['areplica']['failed_writes']} failed writes are `NoPrimaryError`s "
            "(texts above). Its readers and writer are tasks spawned by the task that "
            "connected the manager, so they share that task's consistency session (causal, "
            "the default): after each write, reads need a standby that replayed it, and while "
            "the remaining standby re-points to the new leader they wait `causal_wait` and "
            "then read the primary (the fallback reads above). HAProxy gives no such guarantee."
        )
    return notes
