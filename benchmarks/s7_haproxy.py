"""Scenario 7: areplica following Patroni against HAProxy with Patroni's REST health checks.

On a Patroni cluster of its own (etcd and three members, ``PatroniTopology``; the shared
``LocalTopology`` is not used), HAProxy runs with two listeners over every member: writes
checked with ``GET /primary``, reads with ``GET /replica`` and ``balance roundrobin``, both
with ``default-server inter 1s fall 2 rise 1 on-marked-down shutdown-sessions`` and the
member's Patroni REST port as the check port (``areplica.testing.haproxy``). Its client is a plain
peewee-async database (an aiopg pool) on each port; areplica's is one manager following
Patroni (``patroni=`` REST URLs, ``health_interval=0.25``, ``health_timeout=1.0``), same
driver. Two measurements:

1. Reads: ``SELECT inet_server_port()`` from N tasks for a fixed time, same pool size,
   contenders alternating every round; throughput, p50 and p99, and which member answered.
2. Planned switchovers: 30 readers and one writer (a row per write) through one contender,
   ``topo.switchover()``, load kept on until Patroni reports the old leader streaming again
   and a little longer; failed reads and writes (with their exception texts), the longest
   gap between acknowledged writes, the longest without a successful read, and writes
   acknowledged but missing on the new leader. Each contender gets its own switchovers,
   in ABBA order, from a healthy cluster that HAProxy and the manager both see.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.metadata
import itertools
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import peewee_async
from peewee_async.databases import fetchall
from psycopg2.extensions import parse_dsn

from areplica import ReplicaManager
from areplica.testing.haproxy import (
    READ,
    WRITE,
    Backend,
    HAProxy,
    HAProxyUnavailable,
    find_executable,
    version,
)
from areplica.testing.patroni import PatroniTopology, PatroniUnavailable

from .common import Context, median, opened, percentile, ratio, rnd, rotated, run_load

AREPLICA = "areplica"
HAPROXY = "haproxy"
CONTENDERS = (AREPLICA, HAPROXY)
DRIVER = "aiopg"
READ_SQL = "SELECT inet_server_port()"
TABLE = "bench_s7_write"
INSERT_SQL = f"INSERT INTO {TABLE} (tag) VALUES (%s)"
# How areplica follows Patroni in tests/patroni: probes every 0.25 s, 1 s to answer.
TIMINGS: dict[str, Any] = {"health_interval": 0.25, "health_timeout": 1.0}
# HAProxy's checks as configured here (Patroni's sample uses inter 3s fall 3 rise 2).
CHECKS: dict[str, Any] = {"inter": 1.0, "fall": 2, "rise": 1}
READER_PAUSE = 0.005  # between two reads of one reader, as in tests/patroni
WRITER_PAUSE = 0.02  # between two writes

ReadFn = Callable[[], Awaitable[int]]
WriteFn = Callable[[str], Awaitable[None]]


# ---------------------------------------------------------------------- clients


def _manager(topo: PatroniTopology, pool_size: int, name: str) -> ReplicaManager:
    return ReplicaManager(
        patroni=topo.rest_urls,
        dsn=topo.dsn(topo.members[0]),
        driver=DRIVER,
        pool_size=pool_size,
        name=name,
        **TIMINGS,
    )


@contextlib.asynccontextmanager
async def _opened_manager(mgr: ReplicaManager) -> AsyncIterator[ReplicaManager]:
    async with mgr:
        yield mgr


def _haproxy_database(topo: PatroniTopology, port: int, pool_size: int) -> Any:
    """A plain peewee-async database (an aiopg pool of ``pool_size``) on an HAProxy port."""
    params = parse_dsn(topo.dsn(topo.members[0]))  # the user and password an app would use
    return peewee_async.PostgresqlDatabase(
        params.get("dbname", "postgres"),
        host="127.0.0.1",
        port=port,
        user=params.get("user"),
        password=params.get("password", ""),
        pool_params={"minsize": pool_size, "maxsize": pool_size},
    )


async def _wait_manager(mgr: ReplicaManager, leader: str, members: list[str]) -> None:
    """Until the manager sees ``leader`` as its primary and every other member as a replica."""
    deadline = time.monotonic() + 30.0
    while True:
        seen = {s.name: (s.role, s.state) for s in mgr.status()}
        wanted = {m: ("primary" if m == leader else "replica", "up") for m in members}
        if seen == wanted:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{mgr.name} sees {seen}, expected {wanted}")
        await asyncio.sleep(0.05)


async def _steady(topo: PatroniTopology, hap: HAProxy) -> str:
    """A healthy cluster, replayed everywhere, that HAProxy routes right; the leader."""
    leader = await asyncio.to_thread(topo.wait_healthy, 120)
    await asyncio.to_thread(topo.wait_replicated, 60)
    others = {m for m in topo.members if m != leader}
    await asyncio.to_thread(hap.wait_states, {WRITE: {leader}, READ: others}, 30)
    return leader


class _Masker:
    """Exception texts for the results: one line, short, the password masked."""

    def __init__(self, topo: PatroniTopology) -> None:
        self._secret = parse_dsn(topo.dsn(topo.members[0])).get("password") or None

    def __call__(self, exc: BaseException) -> str:
        text = " ".join(str(exc).split())
        if self._secret:
            text = text.replace(self._secret, "***")
        return f"{type(exc).__name__}: {text[:300]}"


# ---------------------------------------------------------------------- 1. reads


async def _throughput(ctx: Context, topo: PatroniTopology, hap: HAProxy) -> dict[str, Any]:
    s = ctx.settings
    leader = await _steady(topo, hap)
    names = {topo.port(m): m for m in topo.members}
    served: dict[str, collections.Counter[str]] = {n: collections.Counter() for n in CONTENDERS}
    async with contextlib.AsyncExitStack() as stack:
        mgr = await stack.enter_async_context(
            _opened_manager(_manager(topo, s.s7_pool_size, "bench-s7"))
        )
        await _wait_manager(mgr, leader, topo.members)
        db = await stack.enter_async_context(
            opened(_haproxy_database(topo, hap.read_port, s.s7_pool_size))
        )

        async def areplica_read(_: random.Random, __: int) -> None:
            rows = await mgr.execute_sql(READ_SQL)
            if not rows:
                raise RuntimeError("no row")
            served[AREPLICA][names.get(rows[0][0], str(rows[0][0]))] += 1

        async def haproxy_read(_: random.Random, __: int) -> None:
            rows = await db.aio_execute_sql(READ_SQL, fetch_results=fetchall)
            if not rows:
                raise RuntimeError("no row")
            served[HAPROXY][names.get(rows[0][0], str(rows[0][0]))] += 1

        ops = {AREPLICA: areplica_read, HAPROXY: haproxy_read}
        for op in ops.values():
            await run_load(op, concurrency=s.s7_concurrency, duration=max(0.5, s.warmup_seconds))
        for counter in served.values():
            counter.clear()
        rounds: dict[str, dict[str, list[float]]] = {
            n: {"throughput": [], "p50_us": [], "p99_us": [], "errors": []} for n in ops
        }
        for r in range(s.s7_rounds):
            for name in rotated(list(ops), r):
                load = await run_load(
                    ops[name], concurrency=s.s7_concurrency, duration=s.s7_seconds, seed=r
                )
                rounds[name]["throughput"].append(load.throughput)
                rounds[name]["p50_us"].append(load.p(50))
                rounds[name]["p99_us"].append(load.p(99))
                rounds[name]["errors"].append(load.errors)
            ctx.log(
                f"  reads round {r + 1}/{s.s7_rounds}: "
                + ", ".join(
                    f"{n} {rounds[n]['throughput'][-1]:.0f}/s p99 {rounds[n]['p99_us'][-1]:.0f}µs"
                    for n in ops
                )
            )
    out: dict[str, Any] = {"leader": leader, "contenders": {}}
    for name, values in rounds.items():
        out["contenders"][name] = {
            "throughput": rnd(median(values["throughput"]), 1),
            "p50_us": rnd(median(values["p50_us"]), 1),
            "p99_us": rnd(median(values["p99_us"]), 1),
            "errors": int(sum(values["errors"])),
            "served_by": dict(sorted(served[name].items())),
            "rounds": {k: [rnd(x, 1) for x in v] for k, v in values.items()},
        }
    a, h = out["contenders"][AREPLICA], out["contenders"][HAPROXY]
    out["throughput_ratio"] = rnd(ratio(a["throughput"], h["throughput"]))
    out["p50_ratio"] = rnd(ratio(a["p50_us"], h["p50_us"]))
    out["p99_ratio"] = rnd(ratio(a["p99_us"], h["p99_us"]))
    pairs = list(zip(rounds[AREPLICA]["throughput"], rounds[HAPROXY]["throughput"], strict=True))
    out["paired_throughput_ratios"] = [rnd(ratio(x, y)) for x, y in pairs]
    out["throughput_higher_rounds"] = sum(1 for x, y in pairs if x > y)
    out["p99_lower_rounds"] = sum(
        1
        for x, y in zip(rounds[AREPLICA]["p99_us"], rounds[HAPROXY]["p99_us"], strict=True)
        if x < y
    )
    return out


# ---------------------------------------------------------------------- 2. switchovers


@dataclass
class _Load:
    """Readers and a writer through one contender; what they saw, with monotonic times."""

    read: ReadFn
    write: WriteFn
    describe: Callable[[BaseException], str]
    prefix: str
    reads: list[tuple[float, int]] = field(default_factory=list)  # (answered, server port)
    failed_reads: list[tuple[float, str]] = field(default_factory=list)
    writes: list[tuple[float, float, str]] = field(default_factory=list)  # (sent, acked, tag)
    failed_writes: list[tuple[float, str]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def reader(self) -> None:
        while not self.stop.is_set():
            try:
                port = await self.read()
                self.reads.append((time.monotonic(), port))
            except Exception as exc:
                self.failed_reads.append((time.monotonic(), self.describe(exc)))
            await asyncio.sleep(READER_PAUSE)

    async def writer(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            tag = f"{self.prefix}-{n}"
            sent = time.monotonic()
            try:
                await self.write(tag)
                self.writes.append((sent, time.monotonic(), tag))
            except Exception as exc:
                self.failed_writes.append((time.monotonic(), self.describe(exc)))
            await asyncio.sleep(WRITER_PAUSE)


def _longest_gap(times: list[float], since: float, until: float) -> float:
    """The longest stretch of [since, until] without one of ``times``."""
    points = [since, *sorted(t for t in times if since <= t <= until), until]
    return max((b - a for a, b in itertools.pairwise(points)), default=0.0)


@contextlib.asynccontextmanager
async def _clients(
    name: str, topo: PatroniTopology, hap: HAProxy, leader: str, pool_size: int
) -> AsyncIterator[tuple[ReadFn, WriteFn, ReplicaManager | None]]:
    """The read and write functions of a contender, on fresh pools."""
    async with contextlib.AsyncExitStack() as stack:
        if name == AREPLICA:
            mgr = await stack.enter_async_context(
                _opened_manager(_manager(topo, pool_size, "bench-s7-switch"))
            )
            await _wait_manager(mgr, leader, topo.members)

            async def read() -> int:
                rows = await mgr.execute_sql(READ_SQL)
                if not rows:
                    raise RuntimeError("no row")
                return int(rows[0][0])

            async def write(tag: str) -> None:
                await mgr.execute_sql(INSERT_SQL, (tag,))

            yield read, write, mgr
            return
        # The same read connections as areplica holds (pool_size per replica), in one pool.
        replicas = len(topo.members) - 1
        rdb = await stack.enter_async_context(
            opened(_haproxy_database(topo, hap.read_port, pool_size * replicas))
        )
        wdb = await stack.enter_async_context(
            opened(_haproxy_database(topo, hap.write_port, pool_size))
        )

        async def hread() -> int:
            rows = await rdb.aio_execute_sql(READ_SQL, fetch_results=fetchall)
            if not rows:
                raise RuntimeError("no row")
            return int(rows[0][0])

        async def hwrite(tag: str) -> None:
            await wdb.aio_execute_sql(INSERT_SQL, (tag,))

        yield hread, hwrite, None


async def _switchover_phase(
    ctx: Context, topo: PatroniTopology, hap: HAProxy, name: str, index: int
) -> dict[str, Any]:
    s = ctx.settings
    leader = await _steady(topo, hap)
    describe = _Masker(topo)
    names = {topo.port(m): m for m in topo.members}
    prefix = f"{name}-{index}-{time.monotonic_ns()}"
    async with _clients(name, topo, hap, leader, s.s7_switch_pool_size) as (read, write, mgr):
        load = _Load(read, write, describe, prefix)
        tasks = [asyncio.ensure_future(load.reader()) for _ in range(s.s7_readers)]
        tasks.append(asyncio.ensure_future(load.writer()))
        try:
            await asyncio.sleep(s.s7_before_seconds)
            began = time.monotonic()
            done = await asyncio.to_thread(topo.switchover)
            await asyncio.sleep(s.s7_after_seconds)
        finally:
            load.stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        ended = time.monotonic()
        roles = {st.name: f"{st.role}/{st.state}" for st in mgr.status()} if mgr else None
        # Reads sent to the primary for want of an eligible replica, and reads retried on
        # another node after a failure (areplica's own counters, for the whole phase).
        counters = (
            {"fallback_reads": mgr.fallback_reads, "retried_reads": mgr.retried_reads}
            if mgr
            else None
        )
    haproxy_up = {k: sorted(v) for k, v in (await asyncio.to_thread(hap.up)).items()}
    new_leader = await asyncio.to_thread(topo.wait_leader, 60)
    present = {
        row[0]
        for row in await asyncio.to_thread(
            topo.query, new_leader, f"SELECT tag FROM {TABLE} WHERE tag LIKE %s", (prefix + "-%",)
        )
    }
    lost = [tag for _, _, tag in load.writes if tag not in present]
    # Reads the new leader answered once Patroni had it running as the primary: a router
    # that still sends reads there (HAProxy until its /replica check fails fall times).
    promoted = began + done.seconds
    new_port = topo.port(done.new_leader)
    on_primary = [at - began for at, port in load.reads if port == new_port and at >= promoted]
    read_times = [t for t, _ in load.reads]
    after = [(t - began) for t, _ in load.failed_reads]
    wafter = [(t - began) for t, _ in load.failed_writes]
    latencies = [(acked - sent) * 1e6 for sent, acked, _ in load.writes if sent >= began]
    result = {
        "old_leader": done.old_leader,
        "new_leader": done.new_leader,
        "patroni_seconds": rnd(done.seconds),
        "patroni_settled_seconds": rnd(done.settled_seconds),
        "ok_reads": len(load.reads),
        "failed_reads": len(load.failed_reads),
        "ok_writes": len(load.writes),
        "failed_writes": len(load.failed_writes),
        "lost_writes": len(lost),
        "write_outage_seconds": rnd(
            _longest_gap([acked for _, acked, _ in load.writes], began, ended)
        ),
        "read_gap_seconds": rnd(_longest_gap(read_times, began, ended)),
        "failed_reads_window": [rnd(min(after)), rnd(max(after))] if after else None,
        "failed_writes_window": [rnd(min(wafter)), rnd(max(wafter))] if wafter else None,
        "write_p99_us_after_request": rnd(percentile(latencies, 99), 1),
        "read_errors": dict(collections.Counter(text for _, text in load.failed_reads)),
        "write_errors": dict(collections.Counter(text for _, text in load.failed_writes)),
        "reads_on_new_primary": len(on_primary),
        "last_read_on_new_primary": rnd(max(on_primary)) if on_primary else None,
        "reads_served_by": dict(
            sorted(collections.Counter(names.get(p, str(p)) for _, p in load.reads).items())
        ),
        "phase_seconds": rnd(ended - began + s.s7_before_seconds),
        "haproxy_up_at_end": haproxy_up,
    }
    if roles is not None:
        result["areplica_roles_at_end"] = roles
    if counters is not None:
        result.update(counters)
    ctx.log(
        f"  switchover {index + 1} ({name}) {done.old_leader}->{done.new_leader}: patroni "
        f"{done.seconds:.2f}s; failed reads {result['failed_reads']}, failed writes "
        f"{result['failed_writes']}, write outage {result['write_outage_seconds']:.2f}s"
    )
    return result


async def _switchovers(ctx: Context, topo: PatroniTopology, hap: HAProxy) -> dict[str, Any]:
    s = ctx.settings
    leader = await asyncio.to_thread(topo.wait_leader, 60)
    create = f"CREATE TABLE IF NOT EXISTS {TABLE} (id bigserial PRIMARY KEY, tag text)"
    await asyncio.to_thread(topo.query, leader, create)
    phases: dict[str, list[dict[str, Any]]] = {n: [] for n in CONTENDERS}
    order: list[str] = []
    for r in range(s.s7_switchovers):
        for name in rotated(list(CONTENDERS), r):  # ABBA: who goes first alternates
            order.append(name)
            phases[name].append(await _switchover_phase(ctx, topo, hap, name, len(order) - 1))
    out: dict[str, Any] = {"order": order, "contenders": {}}
    for name, runs in phases.items():
        errors: collections.Counter[str] = collections.Counter()
        werrors: collections.Counter[str] = collections.Counter()
        for p in runs:
            errors.update(p["read_errors"])
            werrors.update(p["write_errors"])
        out["contenders"][name] = {
            "switchovers": len(runs),
            "ok_reads": sum(p["ok_reads"] for p in runs),
            "failed_reads": sum(p["failed_reads"] for p in runs),
            "failed_writes": sum(p["failed_writes"] for p in runs),
            "lost_writes": sum(p["lost_writes"] for p in runs),
            "write_outage_seconds": [p["write_outage_seconds"] for p in runs],
            "read_gap_seconds": [p["read_gap_seconds"] for p in runs],
            "reads_on_new_primary": sum(p["reads_on_new_primary"] for p in runs),
            "patroni_seconds": [p["patroni_seconds"] for p in runs],
            "read_errors": dict(errors.most_common(8)),
            "write_errors": dict(werrors.most_common(8)),
            "phases": runs,
        }
    return out


# ---------------------------------------------------------------------- scenario


def _patroni_version() -> str | None:
    try:
        return importlib.metadata.version("patroni")
    except importlib.metadata.PackageNotFoundError:
        return None


async def run(ctx: Context) -> dict[str, Any]:
    s = ctx.settings
    out: dict[str, Any] = {
        "driver": DRIVER,
        "pool_size": s.s7_pool_size,
        "concurrency": s.s7_concurrency,
        "seconds_per_round": s.s7_seconds,
        "rounds": s.s7_rounds,
        "switchovers_per_contender": s.s7_switchovers,
        "readers": s.s7_readers,
        "writers": 1,
        "switch_pool_size": s.s7_switch_pool_size,
        "before_seconds": s.s7_before_seconds,
        "after_seconds": s.s7_after_seconds,
        "areplica_options": dict(TIMINGS),
        "haproxy_checks": dict(CHECKS),
        "read_sql": READ_SQL,
    }
    executable = find_executable()
    if executable is None:
        out["skipped"] = (
            "haproxy not found on PATH nor at /usr/sbin/haproxy (Debian: apt-get install haproxy)"
        )
        return out
    out["haproxy_version"] = await asyncio.to_thread(version, executable)
    out["patroni_version"] = _patroni_version()
    topo = PatroniTopology()
    hap: HAProxy | None = None
    try:
        ctx.log("  starting etcd and 3 Patroni members")
        try:
            await asyncio.to_thread(topo.start)
        except PatroniUnavailable as exc:
            out["skipped"] = f"no Patroni cluster here: {exc}"
            return out
        out["patroni_startup_seconds"] = rnd(topo.startup_seconds or float("nan"), 1)
        backends = [
            Backend(m, topo.port(m), int(topo.rest_url(m).rsplit(":", 1)[1])) for m in topo.members
        ]
        hap = HAProxy.for_patroni(backends, executable=executable, **CHECKS)
        try:
            await asyncio.to_thread(hap.start)
        except (HAProxyUnavailable, OSError) as exc:
            out["skipped"] = f"haproxy did not start: {exc}"
            return out
        out["haproxy_config"] = hap.config_text
        ctx.log(
            f"  haproxy {out['haproxy_version']} write port {hap.write_port}, read port "
            f"{hap.read_port} (pid {hap.pid}); members {topo.members}"
        )
        out["reads"] = await _throughput(ctx, topo, hap)
        out["switchover"] = await _switchovers(ctx, topo, hap)
    finally:
        # Blocking on purpose: they must run even when the task was cancelled.
        if hap is not None:
            hap.close()
        topo.close()
    return out
