"""Behind PgBouncer and a load balancer: identity, deadlines, cancels, pool limits.

Real PgBouncer 1.18 and HAProxy (Debian packages), both drivers. Every claim is a server
fact: ``inet_server_port()`` for where a read ran, ``pg_stat_activity`` for what still runs,
rows on the primary for writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import peewee
import psycopg2
import pytest

from areplica import (
    NoPrimaryError,
    NoReplicaAvailableError,
    ReadTimeoutError,
    ReplicaManager,
    writes,
)
from areplica.reads import ATTEMPT_BOUND
from areplica.testing._support import run_sql
from areplica.testing.daemon import find_program
from areplica.testing.haproxy import LoadBalancer, find_executable
from areplica.testing.pgbouncer import PgBouncer
from areplica.testing.topology import LocalTopology
from tests.conftest import DRIVERS, standbys_behind, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(find_program("pgbouncer") is None, reason="pgbouncer is not installed"),
    pytest.mark.skipif(find_executable() is None, reason="haproxy is not installed"),
]

FAST: dict[str, Any] = {
    "health_interval": 0.25,
    "health_timeout": 1.0,
    "fail_after": 2,
    "recover_after": 2,
}


@pytest.fixture(scope="module")
def topo() -> Iterator[LocalTopology]:
    with LocalTopology(replicas=2) as topology:
        run_sql(
            topology.direct_dsn("primary"),
            "CREATE TABLE IF NOT EXISTS pooled (id bigserial PRIMARY KEY, tag text NOT NULL)",
        )
        topology.wait_replicated()
        yield topology


@contextlib.asynccontextmanager
async def opened(mgr: ReplicaManager) -> AsyncIterator[ReplicaManager]:
    await mgr.connect()
    try:
        yield mgr
    finally:
        await mgr.close()


def direct(topo: LocalTopology, driver: str, **options: Any) -> ReplicaManager:
    """A manager straight to the primary and both standbys (FAST options, then ``options``)."""
    return ReplicaManager(
        topo.dsn("primary"),
        {n: topo.dsn(n) for n in ("replica-1", "replica-2")},
        driver=driver,
        **{**FAST, **options},
    )


def active(topo: LocalTopology, node: str, pattern: str) -> list[tuple[Any, ...]]:
    """Backends on ``node`` running a query like ``pattern`` (not this one)."""
    return run_sql(
        topo.direct_dsn(node),
        "SELECT pid, query FROM pg_stat_activity WHERE state = 'active'"
        " AND query LIKE %s AND pid <> pg_backend_pid()",
        (pattern,),
    )


# ---------------------------------------------------------------------- one address, two servers


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("form", ["replicas", "members"])
async def test_a_load_balanced_address_is_refused_and_serves_nothing(
    topo: LocalTopology, driver: str, form: str
) -> None:
    """HAProxy over a fresh and a 3 s late standby: refused at connect, 0 stale own reads."""
    balancer = LoadBalancer(topo, ["replica-1", "replica-2"], inter=0.2, fall=2)
    balancer.start()
    topo.set_apply_delay("replica-2", 3000)
    try:
        balancer.wait_backends({"replica-1", "replica-2"}, timeout=20)
        if form == "replicas":
            mgr = ReplicaManager(topo.dsn("primary"), [balancer.dsn], driver=driver, **FAST)
            member = "replica-1"
        else:
            mgr = ReplicaManager(
                members={"db": topo.dsn("primary"), "standbys": balancer.dsn},
                driver=driver,
                **FAST,
            )
            member = "standbys"
        async with opened(mgr):
            status = {s.name: s for s in mgr.status()}[member]
            assert status.state == "down", status
            assert status.last_error is not None and "several servers" in status.last_error
            assert "list each server as a member" in status.last_error
            assert mgr.cluster.refused(mgr.cluster.get(member)) is not None  # type: ignore[arg-type]
            primary_port = topo.port("primary")
            stale = 0
            ports: set[int] = set()

            async def pairs(worker: int) -> None:
                nonlocal stale
                for i in range(100):
                    tag = f"{driver}-{form}-{worker}-{i}"
                    await mgr.execute_sql("INSERT INTO pooled (tag) VALUES (%s)", [tag])
                    rows = await mgr.execute_sql(
                        "SELECT (SELECT count(*) FROM pooled WHERE tag = %s), inet_server_port()",
                        [tag],
                    )
                    assert rows is not None
                    stale += rows[0][0] != 1
                    ports.add(int(rows[0][1]))

            started = time.monotonic()
            await asyncio.gather(*(pairs(w) for w in range(20)))
            took = time.monotonic() - started
            # Nothing was served from the refused address, at any time.
            assert {s.name: s.reads for s in mgr.status()}[member] == 0
            with pytest.raises(NoReplicaAvailableError):
                async with mgr.replica():
                    await mgr.execute_sql("SELECT 1")
        print(f"\n[{driver} {form}] 2000 pairs in {took:.1f}s: stale={stale} ports={ports}")
        assert stale == 0
        assert ports == {primary_port}
    finally:
        topo.set_apply_delay("replica-2", 0)
        balancer.close()


# ---------------------------------------------------------------------- deadlines and cancels


def _bystander(dsn: str, outcome: dict[str, Any]) -> None:
    """Another client of the same PgBouncer: a 2 s query that must end normally."""
    try:
        conn = psycopg2.connect(dsn, connect_timeout=5, application_name="bystander")
        conn.autocommit = True
        with conn.cursor() as cur:
            started = time.monotonic()
            cur.execute("SELECT pg_sleep(2), 'fine'")
            outcome["row"] = cur.fetchone()
            outcome["took"] = time.monotonic() - started
        conn.close()
    except Exception as exc:  # reported by the test
        outcome["error"] = exc


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("via", ["direct", "transaction", "session"])
async def test_read_timeout_cancels_the_query_on_the_server(
    topo: LocalTopology, driver: str, via: str
) -> None:
    """read_timeout=1, read_retries=0 on pg_sleep(5): error within 1.5 s, query gone in 1 s."""
    bouncer = None
    dsn = topo.dsn("replica-1")
    if via != "direct":
        bouncer = PgBouncer(topo, "replica-1", mode=via, pool_size=6)  # type: ignore[arg-type]
        bouncer.start()
        dsn = bouncer.dsn
    try:
        mgr = ReplicaManager(
            topo.dsn("primary"),
            {"replica-1": dsn},
            driver=driver,
            read_timeout=1.0,
            read_retries=0,
            fallback_to_primary=False,
            **FAST,
        )
        async with opened(mgr):
            outcome: dict[str, Any] = {}
            bystander = threading.Thread(target=_bystander, args=(dsn, outcome), daemon=True)
            bystander.start()
            await asyncio.sleep(0.2)  # the bystander's query is running
            started = time.monotonic()
            with pytest.raises(ReadTimeoutError):
                await mgr.execute_sql("SELECT pg_sleep(5), 'areplica-deadline'")
            took = time.monotonic() - started
            errored_at = time.monotonic()
            await wait_for(
                lambda: active(topo, "replica-1", "%areplica-deadline%") == [], timeout=5
            )
            gone = time.monotonic() - errored_at
            await asyncio.to_thread(bystander.join, 10)
        print(f"\n[{driver} {via}] error after {took:.3f}s, query gone {gone:.3f}s later")
        assert took < 1.5
        assert gone < 1.0
        assert "error" not in outcome, outcome
        assert outcome["row"][1] == "fine"
        assert outcome["took"] < 3.0
    finally:
        if bouncer is not None:
            bouncer.close()


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_call_timeout_bounds_every_attempt(topo: LocalTopology, driver: str) -> None:
    """timeout= bounds the whole call, retries included; the queries are cancelled."""
    mgr = direct(topo, driver, read_timeout=10.0, read_retries=3)
    async with opened(mgr):
        started = time.monotonic()
        with pytest.raises(ReadTimeoutError):
            await mgr.execute_sql("SELECT pg_sleep(4), 'areplica-call-timeout'", timeout=0.6)
        took = time.monotonic() - started
        assert took < 0.6 + ATTEMPT_BOUND, took
        for node in ("replica-1", "replica-2"):
            await wait_for(lambda n=node: active(topo, n, "%areplica-call-timeout%") == [], 5)
        assert await mgr.execute_sql("SELECT 1", timeout=5) == [(1,)]


# ---------------------------------------------------------------------- pool limits


@pytest.mark.parametrize("driver", DRIVERS)
async def test_session_pooler_smaller_than_the_pool_loses_no_write(
    topo: LocalTopology, driver: str
) -> None:
    """Session PgBouncer with 3 server connections, pool_size 10, 50 tasks: 0 failed writes."""
    bouncer = PgBouncer(topo, "primary", mode="session", pool_size=3)
    bouncer.start()
    try:
        mgr = ReplicaManager(
            bouncer.dsn,
            {n: topo.dsn(n) for n in ("replica-1", "replica-2")},
            driver=driver,
            pool_size=10,
            pool_timeout=30.0,
            **FAST,
        )
        acknowledged: list[str] = []
        failed: list[BaseException] = []
        reads = 0
        async with opened(mgr):
            stop = time.monotonic() + 6.0

            async def worker(w: int) -> None:
                nonlocal reads
                i = 0
                while time.monotonic() < stop:
                    i += 1
                    tag = f"session-{driver}-{w}-{i}"
                    try:
                        if w % 2:
                            await mgr.execute_sql("INSERT INTO pooled (tag) VALUES (%s)", [tag])
                            acknowledged.append(tag)
                        else:
                            async with mgr.atomic():
                                await mgr.execute_sql("INSERT INTO pooled (tag) VALUES (%s)", [tag])
                                await mgr.execute_sql("SELECT pg_sleep(0.01)", on="primary")
                            acknowledged.append(tag)
                        await mgr.execute_sql("SELECT count(*) FROM pooled WHERE tag = %s", [tag])
                        reads += 1
                    except Exception as exc:
                        failed.append(exc)

            await asyncio.gather(*(worker(w) for w in range(50)))
            primary = {s.name: s for s in mgr.status()}["primary"]
        present = {r[0] for r in run_sql(topo.direct_dsn("primary"), "SELECT tag FROM pooled")}
        print(
            f"\n[{driver}] writes={len(acknowledged)} failed={len(failed)} reads={reads}; "
            f"primary {primary.state}, pool {primary.pool_in_use}/{primary.pool_size}"
        )
        assert failed == [], failed[:3]
        assert len(acknowledged) > 50
        assert [t for t in acknowledged if t not in present] == []
    finally:
        bouncer.close()


@pytest.mark.parametrize("driver", DRIVERS)
async def test_idle_connections_are_closed_and_old_ones_replaced(
    topo: LocalTopology, driver: str
) -> None:
    """max_idle closes idle connections (the server sees them go); max_lifetime renews."""
    app = f"areplica-recycle-{driver}"
    dsn = str(psycopg2.extensions.make_dsn(topo.dsn("replica-1"), application_name=app))

    def ours() -> list[int]:
        rows = run_sql(
            topo.direct_dsn("replica-1"),
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
            (app,),
        )
        return sorted(int(r[0]) for r in rows)

    mgr = ReplicaManager(
        topo.dsn("primary"),
        {"replica-1": dsn},
        driver=driver,
        max_idle=0.6,
        max_lifetime=1.0,
        **FAST,
    )
    async with opened(mgr):
        await asyncio.gather(*(mgr.execute_sql("SELECT pg_sleep(0.1)") for _ in range(4)))
        busy = ours()
        assert len(busy) >= 3  # the probe and the pool's connections
        # Idle for longer than max_idle: only the probe's connection is left.
        await wait_for(lambda: len(ours()) == 1, timeout=5)
        # Used every 0.2 s (never idle for max_idle), yet renewed after max_lifetime.
        pids = set()
        for _ in range(12):
            rows = await mgr.execute_sql("SELECT pg_backend_pid()")
            assert rows is not None
            pids.add(rows[0][0])
            await asyncio.sleep(0.2)
        assert len(pids) >= 2, pids


# ---------------------------------------------------------------------- honest write errors


async def write_losing_its_position(
    mgr: ReplicaManager, monkeypatch: pytest.MonkeyPatch, tag: str
) -> None:
    """One write whose position read fails after its commit (the connection dies there)."""

    async def lost(cursor: Any) -> int:
        raise peewee.OperationalError("server closed the connection unexpectedly")

    with monkeypatch.context() as patched:
        patched.setattr(writes, "_read_position", lost)
        patched.setattr(writes, "_position_in_band", lost)  # psycopg's
        assert await mgr.execute_sql("INSERT INTO pooled (tag) VALUES (%s)", [tag]) is None
    assert mgr.unknown_positions == 1


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_committed_write_whose_position_is_lost_is_acknowledged(
    topo: LocalTopology, driver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The position read after a committed write fails: acknowledged, and no stale read."""
    with standbys_behind(topo, 3000):
        async with opened(direct(topo, driver)) as mgr:
            tag = f"unknown-{driver}"
            await write_losing_its_position(mgr, monkeypatch, tag)
            rows = await mgr.execute_sql(
                "SELECT (SELECT count(*) FROM pooled WHERE tag = %s), inet_server_port()", [tag]
            )
            assert rows is not None and rows[0][0] == 1  # not stale: 3 s behind standbys
            assert mgr.token is not None and "FFFFFFFF/FFFFFFFF" not in mgr.token  # settled
            present = run_sql(
                topo.direct_dsn("primary"), "SELECT count(*) FROM pooled WHERE tag = %s", (tag,)
            )
            assert present == [(1,)]


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_write_after_an_unknown_position_is_not_lost_by_its_settling(
    topo: LocalTopology, driver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session whose position is unknown writes again: its read must see that write.

    The unknown position is settled by a read of the primary's position shared with other
    sessions. One read of it started before the session's second write must not settle the
    session: it would erase that write's position (the unknown one sat above it), and a
    standby past the shared read but not past the write would serve a stale row.
    """
    with standbys_behind(topo, 1500):
        async with opened(direct(topo, driver, causal_wait=5.0)) as mgr:
            await write_losing_its_position(mgr, monkeypatch, f"first-{driver}")

            async def child() -> None:  # inherits the unknown position and settles it
                await mgr.execute_sql("SELECT 1")

            await asyncio.create_task(child())
            # Both standbys replay past everything written so far (the shared read too).
            target = run_sql(topo.direct_dsn("primary"), "SELECT pg_current_wal_lsn()::text")
            assert target is not None
            for standby in ("replica-1", "replica-2"):
                await wait_for(
                    lambda n=standby: (
                        run_sql(
                            topo.direct_dsn(n),
                            "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn",
                            (target[0][0],),
                        )
                        == [(True,)]
                    ),
                    timeout=20,
                )
            tag = f"second-{driver}"
            await mgr.execute_sql("INSERT INTO pooled (tag) VALUES (%s)", [tag])
            rows = await mgr.execute_sql(
                "SELECT (SELECT count(*) FROM pooled WHERE tag = %s), inet_server_port()", [tag]
            )
            assert rows is not None and rows[0][0] == 1, rows  # standbys are 1.5 s behind it


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_write_the_pooler_never_forwarded_says_not_applied(
    topo: LocalTopology, driver: str
) -> None:
    """PgBouncer gives up on a queued write (query_wait_timeout): NoPrimaryError, not applied."""
    bouncer = PgBouncer(
        topo, "primary", mode="transaction", pool_size=1, settings={"query_wait_timeout": 1}
    )
    bouncer.start()
    holder = None
    try:
        mgr = ReplicaManager(
            bouncer.dsn,
            {n: topo.dsn(n) for n in ("replica-1", "replica-2")},
            driver=driver,
            health_interval=5.0,
            health_timeout=2.0,
        )
        async with opened(mgr):
            await mgr.execute_sql("INSERT INTO pooled (tag) VALUES ('warm')")  # a connection
            holder = psycopg2.connect(bouncer.dsn, connect_timeout=5)
            with holder.cursor() as cur:  # holds PgBouncer's one server connection
                cur.execute("SELECT 1")
            tag = f"never-forwarded-{driver}"
            with pytest.raises(NoPrimaryError) as info:
                await mgr.execute_sql("INSERT INTO pooled (tag) VALUES (%s)", [tag])
            assert "not applied" in str(info.value) and "may or may not" not in str(info.value)
            assert "query_wait_timeout" in str(info.value)
        present = run_sql(
            topo.direct_dsn("primary"), "SELECT count(*) FROM pooled WHERE tag = %s", (tag,)
        )
        assert present == [(0,)]
    finally:
        if holder is not None:
            holder.close()
        bouncer.close()
