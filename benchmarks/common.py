"""What every scenario shares: settings, the load harness, statistics, schema and models."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import gc
import importlib.metadata
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import peewee
import peewee_async

from areplica import ReplicaManager
from areplica.testing import LocalTopology
from areplica.testing._support import run_sql
from areplica.testing.proxy import ProxyProcess

ROWS = 10_000
TABLE = "bench_item"

# One unit of work of a load: gets the worker's random generator and the worker's index.
Op = Callable[[random.Random, int], Awaitable[Any]]
# What a worker holds open around its whole loop (e.g. ``mgr.session()``).
WorkerScope = Callable[[], contextlib.AbstractAsyncContextManager[Any]]


# ---------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """How long and how hard each scenario runs (``--quick`` shrinks times, not coverage)."""

    quick: bool
    rounds: int
    # 1: routing overhead
    s1_pool_size: int
    s1_concurrency: int
    s1_latency_queries: int
    s1_throughput_seconds: float
    s1_timeit_number: int
    # 2: read scaling
    s2_pool_size: int
    s2_concurrency: int
    s2_seconds: float
    # 3: Pgpool-II
    s3_rounds: int
    s3_pool_size: int
    s3_concurrency: int
    s3_seconds: float
    # 4: faults
    s4_rounds: int
    s4_pool_size: int
    s4_concurrency: int
    s4_phase_seconds: float
    s4_kill_at: float
    s4_restart_at: float
    # 5: consistency cost
    s5_rounds: int
    s5_pool_size: int
    s5_concurrency: int
    s5_write_seconds: float
    s5_mixed_seconds: float
    # 7: HAProxy + Patroni (read load, then planned switchovers under 30 readers + 1 writer)
    s7_rounds: int
    s7_pool_size: int
    s7_concurrency: int
    s7_seconds: float
    s7_switchovers: int  # per contender
    s7_readers: int
    s7_switch_pool_size: int
    s7_before_seconds: float  # load before the switchover request
    s7_after_seconds: float  # load after Patroni reports the old leader streaming again
    s5_write_share: float = 0.3
    warmup_seconds: float = 0.25

    @classmethod
    def full(cls) -> Settings:
        return cls(
            quick=False,
            rounds=7,
            s1_pool_size=8,
            s1_concurrency=16,
            s1_latency_queries=2000,
            s1_throughput_seconds=1.5,
            s1_timeit_number=200_000,
            s2_pool_size=4,
            s2_concurrency=64,
            s2_seconds=2.0,
            s3_rounds=10,
            s3_pool_size=16,
            s3_concurrency=16,
            s3_seconds=2.0,
            s4_rounds=3,
            s4_pool_size=8,
            s4_concurrency=16,
            s4_phase_seconds=8.0,
            s4_kill_at=2.0,
            s4_restart_at=4.5,
            s5_rounds=10,
            s5_pool_size=8,
            s5_concurrency=16,
            s5_write_seconds=1.5,
            s5_mixed_seconds=2.0,
            s7_rounds=7,
            s7_pool_size=16,
            s7_concurrency=16,
            s7_seconds=3.0,
            s7_switchovers=2,
            s7_readers=30,
            s7_switch_pool_size=10,
            s7_before_seconds=1.0,
            s7_after_seconds=3.0,
        )

    @classmethod
    def quick_pass(cls) -> Settings:
        return cls(
            quick=True,
            rounds=2,
            s1_pool_size=8,
            s1_concurrency=16,
            s1_latency_queries=400,
            s1_throughput_seconds=0.6,
            s1_timeit_number=30_000,
            s2_pool_size=4,
            s2_concurrency=64,
            s2_seconds=0.8,
            s3_rounds=2,
            s3_pool_size=16,
            s3_concurrency=16,
            s3_seconds=0.8,
            s4_rounds=1,
            s4_pool_size=8,
            s4_concurrency=16,
            s4_phase_seconds=4.5,
            s4_kill_at=1.0,
            s4_restart_at=2.5,
            s5_rounds=2,
            s5_pool_size=8,
            s5_concurrency=16,
            s5_write_seconds=0.5,
            s5_mixed_seconds=0.7,
            s7_rounds=2,
            s7_pool_size=16,
            s7_concurrency=16,
            s7_seconds=1.0,
            s7_switchovers=2,
            s7_readers=30,
            s7_switch_pool_size=10,
            s7_before_seconds=1.0,
            s7_after_seconds=2.0,
            warmup_seconds=0.15,
        )


@dataclass
class Context:
    """What a scenario gets: the settings and the shared topology (primary + 2 replicas).

    With a link (``--link-delay-ms``), ``topology`` has a delaying proxy in front of every
    node and on every standby's replication stream (``topology.dsn()`` goes through them),
    ``link`` holds the link's measurements (``link.measure``) and ``proxies`` runs further
    delaying proxies a scenario needs (e.g. in front of Pgpool-II).
    """

    settings: Settings
    topology: LocalTopology
    log: Callable[[str], None]
    link_delay_ms: float | None = None
    link: dict[str, Any] | None = None
    proxies: ProxyProcess | None = None

    def backend_port(self, node: str) -> int:
        """The port a middleman (Pgpool-II) reaches ``node`` on: through the link if any."""
        port = self.topology.proxy_port(node) if self.link_delay_ms is not None else None
        return port if port is not None else self.topology.port(node)

    def front(self, name: str, port: int) -> int:
        """The port clients reach a middleman on: ``port``, or a delaying proxy in front."""
        if self.link_delay_ms is None or self.proxies is None:
            return port
        front = self.proxies.add(name, "127.0.0.1", port)
        self.proxies.delay(name, self.link_delay_ms)
        return front


# ---------------------------------------------------------------------- statistics


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` percentile (0-100) by linear interpolation, as numpy's default."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Per-round ratios ``a[i] / b[i]`` (contenders of a round ran back to back): their
    median and spread."""
    values = [ratio(x, y) for x, y in zip(a, b, strict=True)]
    finite = [v for v in values if v == v]
    return {
        "median": rnd(median(finite)),
        "min": rnd(min(finite)) if finite else float("nan"),
        "max": rnd(max(finite)) if finite else float("nan"),
        "rounds": [rnd(v) for v in values],
    }


def rnd(value: float, digits: int = 3) -> float:
    """Round for the JSON file (keeps it readable)."""
    return round(value, digits) if value == value else value


# ---------------------------------------------------------------------- load harness


@dataclass
class LoadResult:
    """One closed-loop load: successful operations, failures and their latencies (µs)."""

    ok: int = 0
    errors: int = 0
    elapsed: float = 0.0
    busy_s: float = 0.0  # time spent inside operations (successful or not), all workers
    latencies_us: list[float] = field(default_factory=list)
    error_types: collections.Counter[str] = field(default_factory=collections.Counter)
    # Seconds from the start of the load at which each failure happened.
    error_times: list[float] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.ok / self.elapsed if self.elapsed else 0.0

    def p(self, q: float) -> float:
        return percentile(self.latencies_us, q)

    def summary(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "errors": self.errors,
            "error_types": dict(self.error_types),
            "seconds": rnd(self.elapsed),
            "throughput": rnd(self.throughput, 1),
            "p50_us": rnd(self.p(50), 1),
            "p99_us": rnd(self.p(99), 1),
            "max_us": rnd(max(self.latencies_us), 1) if self.latencies_us else None,
        }


async def run_load(
    op: Op,
    *,
    concurrency: int,
    duration: float,
    seed: int = 0,
    scope: WorkerScope | None = None,
) -> LoadResult:
    """``concurrency`` tasks each run ``op`` back to back for ``duration`` seconds.

    An exception from ``op`` counts as a failure (its class is tallied) and the worker goes
    on; latencies are kept for successful operations only.
    """
    result = LoadResult()
    latencies = result.latencies_us
    errors = result.error_types
    clock = time.perf_counter
    gc.collect()
    start = clock()
    deadline = start + duration

    async def worker(index: int) -> None:
        rng = random.Random(seed * 10_007 + index)
        async with scope() if scope is not None else contextlib.nullcontext():
            while True:
                began = clock()
                if began >= deadline:
                    return
                try:
                    await op(rng, index)
                except Exception as exc:
                    result.busy_s += clock() - began
                    result.errors += 1
                    errors[type(exc).__name__] += 1
                    result.error_times.append(clock() - start)
                    # A failing target can fail in microseconds: yield so that a tight
                    # failure loop cannot starve the other workers of the event loop.
                    await asyncio.sleep(0)
                    continue
                took = clock() - began
                result.busy_s += took
                latencies.append(took * 1e6)

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    result.elapsed = clock() - start
    result.ok = len(latencies)
    return result


async def run_sequential(op: Op, count: int, seed: int = 0) -> list[float]:
    """Latency (µs) of ``count`` operations run one after the other."""
    rng = random.Random(seed)
    clock = time.perf_counter
    out: list[float] = []
    gc.collect()
    for _ in range(count):
        began = clock()
        await op(rng, 0)
        out.append((clock() - began) * 1e6)
    return out


def rotated(names: Sequence[str], round_index: int) -> list[str]:
    """The contenders' order in round ``round_index``: rotated by one each round."""
    shift = round_index % len(names)
    return list(names[shift:]) + list(names[:shift])


# ---------------------------------------------------------------------- where the time goes

#: Cumulative seconds in ``mgr.timings()``, in the order they are reported.
TIMING_SECONDS = ("slot_wait_s", "catch_up_s", "query_s", "write_s", "write_position_s")
TIMING_COUNTS = ("reads", "writes", "position_reads", "positions_in_band")


def library_timings(mgr: Any) -> dict[str, float] | None:
    """``mgr.timings()`` (cumulative seconds and counts), or None when the library has none."""
    get = getattr(mgr, "timings", None)
    if not callable(get):
        return None
    try:
        data = get()
    except Exception:
        return None
    if not isinstance(data, Mapping):
        return None
    return {str(k): float(v) for k, v in data.items() if isinstance(v, (int, float))}


class Calls:
    """Client-side time per kind of call (``write``, ``read``...): what a benchmark sees."""

    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()
        self.count: collections.Counter[str] = collections.Counter()

    def add(self, kind: str, seconds: float) -> None:
        self.seconds[kind] += seconds
        self.count[kind] += 1

    def snapshot(self) -> tuple[dict[str, float], dict[str, int]]:
        return dict(self.seconds), dict(self.count)


@dataclass
class TimeSplit:
    """Where the request time of one contender's load went, summed over its rounds.

    ``library``: the deltas of ``mgr.timings()`` over the measured loads (None when the
    library has no ``timings()`` or for a contender that is not areplica); ``calls``: the
    benchmark's own timing of each kind of call inside a request.
    """

    request_s: float = 0.0
    requests: int = 0
    library: dict[str, float] | None = field(default_factory=dict)
    call_s: collections.Counter[str] = field(default_factory=collections.Counter)
    call_n: collections.Counter[str] = field(default_factory=collections.Counter)

    def add(
        self,
        load: LoadResult,
        before: dict[str, float] | None,
        after: dict[str, float] | None,
        calls_before: tuple[dict[str, float], dict[str, int]] | None = None,
        calls_after: tuple[dict[str, float], dict[str, int]] | None = None,
    ) -> None:
        self.request_s += load.busy_s
        self.requests += load.ok + load.errors
        if before is None or after is None or self.library is None:
            self.library = None
        else:
            for key, value in after.items():
                self.library[key] = self.library.get(key, 0.0) + value - before.get(key, 0.0)
        if calls_before is not None and calls_after is not None:
            for kind, value in calls_after[0].items():
                self.call_s[kind] += value - calls_before[0].get(kind, 0.0)
            for kind, n in calls_after[1].items():
                self.call_n[kind] += n - calls_before[1].get(kind, 0)

    def summary(self) -> dict[str, Any]:
        total = self.request_s
        out: dict[str, Any] = {
            "request_s": rnd(total),
            "requests": self.requests,
            "mean_request_us": rnd(ratio(total, self.requests) * 1e6, 1),
            "library": None,
        }
        if self.library is not None:
            seconds = {k: self.library.get(k, 0.0) for k in TIMING_SECONDS}
            shares = {k[: -len("_s")]: rnd(ratio(v, total), 4) for k, v in seconds.items()}
            shares["other"] = rnd(1.0 - ratio(sum(seconds.values()), total), 4)
            out["library"] = {
                "shares": shares,
                "per_request_us": {
                    k[: -len("_s")]: rnd(ratio(v, self.requests) * 1e6, 1)
                    for k, v in seconds.items()
                },
                "counts": {k: int(self.library.get(k, 0)) for k in TIMING_COUNTS},
            }
        out["calls"] = {
            kind: {
                "share": rnd(ratio(self.call_s[kind], total), 4),
                "mean_us": rnd(ratio(self.call_s[kind], self.call_n[kind]) * 1e6, 1),
                "count": self.call_n[kind],
            }
            for kind in sorted(self.call_s)
        }
        return out


# ---------------------------------------------------------------------- schema and models


def sql_on(dsn: str, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Run one statement straight on a server (blocking; call through ``to_thread``)."""
    return run_sql(dsn, sql, params, connect_timeout=10, application_name="areplica-bench")


def create_schema(topology: LocalTopology) -> None:
    """``bench_item`` with ROWS rows on the primary, replicated everywhere (blocking)."""
    dsn = topology.dsn("primary")
    sql_on(dsn, f"DROP TABLE IF EXISTS {TABLE}")
    sql_on(
        dsn,
        f"CREATE TABLE {TABLE} (id serial PRIMARY KEY, val integer NOT NULL, "
        "payload text NOT NULL)",
    )
    sql_on(
        dsn,
        f"INSERT INTO {TABLE} (val, payload) "
        "SELECT g, md5(g::text) FROM generate_series(1, %s) AS g",
        (ROWS,),
    )
    sql_on(dsn, f"VACUUM ANALYZE {TABLE}")
    topology.wait_replicated(timeout=60)


def item_model(db: Any) -> Any:
    """A peewee-async model of ``bench_item`` bound to ``db``."""

    class Item(peewee_async.AioModel):
        val = peewee.IntegerField()
        payload = peewee.TextField()

        class Meta:
            database = db
            table_name = TABLE

    return Item


def lookup_op(mgr: ReplicaManager, model: Any) -> Op:
    """``mgr.get(Item.select().where(Item.id == k))`` for a random ``k``, checked."""

    async def op(rng: random.Random, _: int) -> None:
        k = rng.randint(1, ROWS)
        row = await mgr.get(model.select().where(model.id == k))
        if row.id != k:
            raise AssertionError("wrong row")

    return op


def plain_database(driver: str, dsn: str, pool_size: int) -> Any:
    """A plain peewee-async database on one server, with a fixed pool of ``pool_size``."""
    url = urlparse(dsn)
    dbname = url.path.lstrip("/") or "postgres"
    if driver == "psycopg":
        return peewee_async.Psycopg3Database(
            dbname,
            host=url.hostname,
            port=url.port,
            user=url.username,
            password=url.password or "",
            pool_params={"min_size": pool_size, "max_size": pool_size},
        )
    return peewee_async.PostgresqlDatabase(
        dbname,
        host=url.hostname,
        port=url.port,
        user=url.username,
        pool_params={"minsize": pool_size, "maxsize": pool_size},
    )


@contextlib.asynccontextmanager
async def opened(db: Any) -> AsyncIterator[Any]:
    """A plain peewee-async database, connected for the block and closed after it."""
    await db.aio_connect()
    try:
        yield db
    finally:
        await db.aio_close()


@contextlib.asynccontextmanager
async def opened_manager(*args: Any, **kwargs: Any) -> AsyncIterator[ReplicaManager]:
    """A connected ``ReplicaManager``, closed after the block."""
    mgr = ReplicaManager(*args, **kwargs)
    async with mgr:
        yield mgr


def node_reads(mgr: ReplicaManager) -> dict[str, int]:
    return {status.name: status.reads for status in mgr.status()}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before.get(name, 0) for name in after}


async def wait_all_up(mgr: ReplicaManager, timeout: float = 30.0) -> None:
    """Probe until every node of ``mgr`` is up (after a restart)."""
    deadline = time.monotonic() + timeout
    while True:
        statuses = await mgr.check()
        if all(s.state == "up" for s in statuses):
            return
        if time.monotonic() > deadline:
            states = {s.name: s.state for s in statuses}
            raise TimeoutError(f"nodes not all up after {timeout}s: {states}")
        await asyncio.sleep(0.1)


# ---------------------------------------------------------------------- machine


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_info(topology: LocalTopology | None) -> dict[str, Any]:
    """CPU, cores, memory, Python, PostgreSQL and the drivers' versions (blocking)."""
    pg_version = None
    if topology is not None:
        with contextlib.suppress(Exception):
            pg_version = sql_on(topology.dsn("primary"), "SHOW server_version")[0][0]
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "postgresql": pg_version,
        "versions": {
            name: _version(name)
            for name in (
                "areplica",
                "peewee",
                "peewee-async",
                "aiopg",
                "psycopg2-binary",
                "psycopg",
                "psycopg-pool",
            )
        },
        "areplica_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
