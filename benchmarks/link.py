"""A link with latency (``--link-delay-ms MS``): every hop through a proxy adding MS each way.

The topology of such a run (:func:`topology`) has a proxy in front of every node, which
clients (areplica, and Pgpool-II towards its backends) reach the servers through, and one
on each standby's replication stream (``primary_conninfo`` names it). A scenario adds one
in front of a middleman clients connect to (Pgpool-II), with ``Context.front``. The proxies
are :class:`areplica.testing.proxy.FaultProxy` objects in a child process (no interpreter
lock shared with the benchmark), each chunk held MS milliseconds in each direction, timed
to the microsecond (``timerfd``), each connection and direction on its own.

:func:`measure` proves what the link does, before the scenarios run: the round trip of
``SELECT 1`` straight to a standby, through its proxy with no delay (the proxy's own cost)
and through the link; the throughput of 16 tasks on those three paths (the proxy must not
serialize connections: through the link the bound is 16 / round trip); and replication's
delivery (a commit on the primary until its replay on a standby) through the replication
proxy with no delay and through the link.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import aiopg
import psycopg2

from areplica.consistency import format_lsn, parse_lsn, token_position
from areplica.testing import LocalTopology

from .common import Context, median, percentile, ratio, rnd

#: The causal p99 goal on a link allows this much over eventual p99 + one link round trip
#: + replication's delivery.
P99_SLACK = 1.2
PROBE_TABLE = "bench_link_probe"
CONCURRENCY = 16
NODE = "replica-1"


def topology(replicas: int = 2) -> LocalTopology:
    """A topology whose every hop can be delayed (delays are set by :func:`apply`)."""
    return LocalTopology(
        replicas=replicas, proxies=True, replication_proxies=True, proxy_process=True
    )


def apply(topo: LocalTopology, ms: float) -> None:
    """Delay every proxy of ``topo`` (clients' and replication's) by ``ms`` each way."""
    for node in topo.nodes:
        topo.delay(node, ms)
        if topo.replication_proxy_port(node) is not None:
            topo.delay(node, ms, replication=True)


def p99_bound_us(eventual_p99_us: float, link: dict[str, Any]) -> float:
    """The causal p99 allowed on the link: (eventual's + one link round trip + replication's
    delivery) x 1.2, with the link's measured figures."""
    added = link["rtt_us"]["added_by_link"]
    delivery = link["replication_us"]["link"]["median"]
    return (eventual_p99_us + added + delivery) * P99_SLACK


def _rtt(dsn: str, count: int) -> list[float]:
    """Round trips (µs) of ``SELECT 1`` one after the other on one connection (blocking)."""
    conn = psycopg2.connect(dsn, connect_timeout=10, application_name="areplica-bench-link")
    try:
        conn.autocommit = True
        out: list[float] = []
        with conn.cursor() as cur:
            for _ in range(count + 20):
                began = time.perf_counter()
                cur.execute("SELECT 1")
                cur.fetchall()
                out.append((time.perf_counter() - began) * 1e6)
        return out[20:]  # the first ones warm the connection up
    finally:
        conn.close()


async def _throughput(dsn: str, seconds: float) -> float:
    """``SELECT 1`` per second from CONCURRENCY tasks on an aiopg pool of that size."""
    pool = await aiopg.create_pool(dsn, minsize=CONCURRENCY, maxsize=CONCURRENCY)
    try:
        done = 0
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                async with pool.acquire() as conn, conn.cursor() as cur:
                    await cur.execute("SELECT 1")
                    await cur.fetchall()
                done += 1

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return done / (time.perf_counter() - began)
    finally:
        pool.close()
        await pool.wait_closed()


def _delivery(topo: LocalTopology, count: int, delays: dict[str, float]) -> dict[str, list[float]]:
    """Microseconds from a commit on the primary until a standby has replayed it (blocking),
    ``count`` times for each replication delay of ``delays``, alternating.

    The standby is polled on a direct connection as fast as it answers; the commit's
    position is read right after it returns (the WAL travels meanwhile)."""
    primary = psycopg2.connect(topo.direct_dsn("primary"), connect_timeout=10)
    standby = psycopg2.connect(topo.direct_dsn(NODE), connect_timeout=10)
    out: dict[str, list[float]] = {path: [] for path in delays}
    try:
        primary.autocommit = standby.autocommit = True
        with primary.cursor() as write, standby.cursor() as poll:
            for i in range(count):
                paths = list(delays) if i % 2 == 0 else list(reversed(delays))
                for path in paths:
                    topo.delay(NODE, delays[path], replication=True)
                    time.sleep(0.005)  # the stream is idle: the new delay holds from now
                    write.execute(f"INSERT INTO {PROBE_TABLE} DEFAULT VALUES")
                    began = time.perf_counter()
                    write.execute("SELECT pg_current_wal_insert_lsn()::text")
                    # Where a replay that covers the commit ends: an insert position just
                    # past a page header (the commit ended the page) is never reported
                    # by a standby while the primary is idle.
                    inserted = write.fetchone()[0]  # type: ignore[index]
                    lsn = format_lsn(token_position(parse_lsn(inserted)))
                    while True:
                        poll.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,))
                        if poll.fetchone()[0]:  # type: ignore[index]
                            break
                        if time.perf_counter() - began > 10:
                            raise TimeoutError(f"{NODE} did not replay {lsn} in 10 s")
                    out[path].append((time.perf_counter() - began) * 1e6)
        return out
    finally:
        primary.close()
        standby.close()


def _summary(values: list[float]) -> dict[str, Any]:
    return {
        "median": rnd(median(values), 1),
        "p90": rnd(percentile(values, 90), 1),
        "min": rnd(min(values), 1) if values else None,
        "samples": len(values),
    }


async def measure(ctx: Context) -> dict[str, Any]:
    """The link's figures (see the module docstring); delays are back as they were after."""
    ms = ctx.link_delay_ms
    if ms is None:
        raise RuntimeError("no link in this run")
    topo = ctx.topology
    quick = ctx.settings.quick
    rounds, count, seconds, samples = (2, 200, 0.5, 40) if quick else (4, 400, 1.0, 100)
    direct, through = topo.direct_dsn(NODE), topo.dsn(NODE)
    rtt: dict[str, list[float]] = {"direct": [], "proxy_no_delay": [], "link": []}
    tput: dict[str, list[float]] = {"direct": [], "proxy_no_delay": [], "link": []}
    try:
        for r in range(rounds):
            order = ["direct", "proxy_no_delay", "link"]
            for path in order[r % 3 :] + order[: r % 3]:
                await asyncio.to_thread(topo.delay, NODE, ms if path == "link" else 0.0)
                dsn = direct if path == "direct" else through
                rtt[path] += await asyncio.to_thread(_rtt, dsn, count)
                tput[path].append(await _throughput(dsn, seconds))
    finally:
        await asyncio.to_thread(topo.delay, NODE, ms)
    rtt_med = {path: median(values) for path, values in rtt.items()}
    tput_med = {path: median(values) for path, values in tput.items()}

    await asyncio.to_thread(
        _sql, topo, f"CREATE TABLE IF NOT EXISTS {PROBE_TABLE} (id serial PRIMARY KEY)"
    )
    try:
        await asyncio.to_thread(topo.wait_replicated, 30)
        delivery = await asyncio.to_thread(
            _delivery, topo, samples, {"proxy_no_delay": 0.0, "link": ms}
        )
    finally:
        await asyncio.to_thread(topo.delay, NODE, ms, replication=True)
        await asyncio.to_thread(_sql, topo, f"DROP TABLE IF EXISTS {PROBE_TABLE}")
        await asyncio.to_thread(topo.wait_replicated, 30)
    out: dict[str, Any] = {
        "delay_ms_each_way": ms,
        "nominal_rtt_added_us": rnd(2 * ms * 1000, 1),
        "hops": [
            "client (areplica) -> each node",
            "client -> Pgpool-II, and Pgpool-II -> each backend (two links per query)",
            "each standby -> primary (replication)",
        ],
        "measured_on": NODE,
        # The topology's proxy process runs at nice -10 when allowed (ProxyProcess).
        "proxy_niced": getattr(getattr(topo, "_proxies", None), "niced", None),
        "rtt_us": {
            **{path: rnd(v, 1) for path, v in rtt_med.items()},
            "p90": {path: rnd(percentile(v, 90), 1) for path, v in rtt.items()},
            "added_by_proxy": rnd(rtt_med["proxy_no_delay"] - rtt_med["direct"], 1),
            "added_by_link": rnd(rtt_med["link"] - rtt_med["direct"], 1),
            "samples": {path: len(v) for path, v in rtt.items()},
        },
        "throughput_qps": {
            **{path: rnd(v, 1) for path, v in tput_med.items()},
            "concurrency": CONCURRENCY,
            "link_bound": rnd(CONCURRENCY / (rtt_med["link"] / 1e6), 1),
            "proxy_vs_direct": rnd(ratio(tput_med["proxy_no_delay"], tput_med["direct"])),
            "rounds": {path: [rnd(v, 1) for v in values] for path, values in tput.items()},
        },
        "replication_us": {
            **{path: _summary(v) for path, v in delivery.items()},
            "added_by_link": rnd(
                statistics.median(delivery["link"]) - statistics.median(delivery["proxy_no_delay"]),
                1,
            ),
        },
    }
    return out


def _sql(topo: LocalTopology, sql: str) -> None:
    conn = psycopg2.connect(topo.direct_dsn("primary"), connect_timeout=10)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()
