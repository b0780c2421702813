"""Hostile tokens on the real topology: bounded memory, and no read fails because of one."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest

from areplica import ReplicaManager
from areplica.contrib.fastapi import AreplicaMiddleware
from areplica.testing.topology import LocalTopology
from tests.conftest import sql_on, wait_for

pytestmark = pytest.mark.integration


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.fixture(scope="module")
def own_topology() -> Iterator[LocalTopology]:
    """A private topology: these tests stop its primary."""
    with LocalTopology(replicas=2) as topology:
        yield topology


def manager_of(topology: LocalTopology, **options: Any) -> ReplicaManager:
    replicas = {n: topology.dsn(n) for n in topology.nodes if n != "primary"}
    options.setdefault("health_interval", 0.2)
    options.setdefault("health_timeout", 1.0)
    return ReplicaManager(topology.dsn("primary"), replicas, **options)


async def test_megabyte_tokens_through_the_middleware_keep_memory_bounded(
    own_topology: LocalTopology, caplog: pytest.LogCaptureFixture
) -> None:
    """1,000 requests with 1 MB malformed tokens and no client address: RSS grows < 20 MB."""
    caplog.set_level(logging.WARNING, logger="areplica")
    ports: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        rows = await mgr.execute_sql("SELECT inet_server_port()")
        assert rows is not None
        ports.append(rows[0][0])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message["type"])

    async with manager_of(own_topology) as mgr:
        middleware = AreplicaMiddleware(app, mgr)

        async def request(i: int) -> None:
            token = (f"{i:08X}/" + "Z" * (1 << 20)).encode("latin-1")
            scope = {"type": "http", "headers": [(b"x-areplica-token", token)], "client": None}
            await middleware(scope, receive, send)

        for i in range(50):  # warm up: pools, caches, allocator arenas
            await request(i)
        gc.collect()
        before = rss_mb()
        for i in range(1000):
            await request(i)
        gc.collect()
        grown = rss_mb() - before
        print(f"RSS grew {grown:.1f} MB over 1,000 requests with 1 MB tokens")
        assert grown < 20
        assert len(ports) == 1050 and set(ports) <= {
            own_topology.port("replica-1"),
            own_topology.port("replica-2"),
        }
        assert caplog.text.count("malformed") == 1  # once for the anonymous client
        assert "ZZZZ" not in caplog.text


async def test_forged_token_while_wal_awaits_its_flush_reads_from_replicas(
    own_topology: LocalTopology, driver: str
) -> None:
    """A forged token is clamped to what standbys can have: the primary's flush position.

    WAL inserted but not yet flushed (here an asynchronous commit, with the WAL writer slowed
    to 10 s; in production a background record) is sent to no standby. A clamp to the
    insert position made every read of that client wait for it and then go to the primary.
    """
    topo = own_topology
    replicas = {topo.port("replica-1"), topo.port("replica-2")}
    sql_on(topo, "primary", "CREATE TABLE IF NOT EXISTS async_note (id serial PRIMARY KEY)")
    sql_on(topo, "primary", "ALTER SYSTEM SET wal_writer_delay = '10s'")
    sql_on(topo, "primary", "SELECT pg_reload_conf()")
    try:
        topo.wait_replicated()
        async with manager_of(topo, driver=driver) as mgr:
            await mgr.check()
            served = []
            for attempt in range(6):
                # A forged token, and the "unknown" one: each settles at the flush position.
                token = ("FFFFFFFF/FFFFFFFE", "FFFFFFFF/FFFFFFFF")[attempt % 2]
                unflushed = False
                for _ in range(5):  # the first may be flushed at once (the writer was idle)
                    sql_on(
                        topo,
                        "primary",
                        "SET synchronous_commit = off; INSERT INTO async_note DEFAULT VALUES",
                    )
                    row = sql_on(
                        topo,
                        "primary",
                        "SELECT pg_current_wal_insert_lsn() > pg_current_wal_flush_lsn()",
                    )
                    if row[0][0]:
                        unflushed = True
                        break
                assert unflushed, "the primary flushed every asynchronous commit at once"
                async with mgr.session(token, client="198.51.100.4"):
                    rows = await mgr.execute_sql("SELECT inet_server_port()")
                    assert rows is not None
                    served.append(rows[0][0])
            assert set(served) <= replicas, served
    finally:
        sql_on(topo, "primary", "ALTER SYSTEM RESET wal_writer_delay")
        sql_on(topo, "primary", "SELECT pg_reload_conf()")
        topo.wait_replicated()


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_forged_token_with_the_primary_down_fails_no_read(
    own_topology: LocalTopology, driver: str, how: str
) -> None:
    """Forged and unknown tokens settle at the highest position an up standby replayed.

    Stopped (a shutdown checkpoint the standbys replay) or SIGKILLed in the middle of a
    stream of writes (WAL the standbys never receive): no read fails, every one is served by
    a standby, and none waits for the dead primary.
    """
    topo = own_topology
    replicas = {topo.port("replica-1"), topo.port("replica-2")}
    sql_on(topo, "primary", "CREATE TABLE IF NOT EXISTS hostile_burst (n int)")
    async with manager_of(topo, driver=driver, fail_after=1) as mgr:
        if how == "kill":
            # Writes in flight when the primary dies: WAL generated that no standby gets.
            burst = "INSERT INTO hostile_burst SELECT generate_series(1, 20000)"
            writers = [asyncio.create_task(writes_until_refused(mgr, burst)) for _ in range(3)]
            await asyncio.sleep(0.5)
            topo.kill("primary")
            assert sum(await asyncio.gather(*writers)) > 0  # it was writing when killed
        else:
            topo.stop("primary")
        try:
            await wait_for(lambda: mgr.status()[0].state == "down", 15)
            failures: list[BaseException] = []
            served = set()
            tokens = (
                "FFFFFFFF/FFFFFFFF",
                "FFFFFFFF/FFFFFFFE",
                "7FFFFFFF/0",
                "FFFF/FFFF",
                "FFFFFFFF/FFFFFFFF/FFFFFFFF",  # the unknown token (a write's unread position)
                "1/FFFFFFFF/FFFFFFFF",
                "9/1/0",  # a timeline no member has seen
            )
            for token in tokens:
                for _ in range(20):
                    async with mgr.session(token, client="203.0.113.9"):
                        try:
                            rows = await mgr.execute_sql("SELECT inet_server_port()")
                            assert rows is not None
                            served.add(rows[0][0])
                        except Exception as exc:
                            failures.append(exc)
            assert failures == []
            assert served <= replicas
        finally:
            topo.start_node("primary")
            await wait_for(lambda: mgr.status()[0].state == "up", 30)
            topo.wait_replicated()


async def writes_until_refused(mgr: ReplicaManager, sql: str) -> int:
    """Write until the primary is gone (the error is the point: it was killed); how many."""
    done = 0
    while True:
        try:
            await mgr.execute_sql(sql)
        except Exception:
            return done
        done += 1
