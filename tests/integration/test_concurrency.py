"""500 concurrent tasks mixing writes, reads and transactions, checked against the servers."""

from __future__ import annotations

import asyncio
import random

import peewee_async
import pytest
from peewee import fn

from areplica.testing.topology import LocalTopology
from tests.conftest import Author, caught_up, client_backends, make_manager, proxy, sql_on, wait_for

pytestmark = pytest.mark.integration

PORT = fn.inet_server_port().alias("port")
PID = fn.pg_backend_pid().alias("pid")


async def test_500_mixed_tasks(
    topology: LocalTopology, schema: None, ports: dict[str, int], driver: str
) -> None:
    sql_on(topology, "primary", "TRUNCATE author, post, counter RESTART IDENTITY CASCADE")
    await asyncio.to_thread(topology.wait_replicated)
    baseline = {name: client_backends(topology, name) for name in topology.nodes}
    replicas = {p for n, p in ports.items() if n != "primary"}
    mgr = make_manager(topology, driver=driver, pool_size=8)
    # A plain peewee-async database straight on replica-1: its connection lives in
    # peewee-async's shared ContextVar, which must never capture areplica's queries.
    direct = peewee_async.PostgresqlDatabase(
        "postgres",
        host="127.0.0.1",
        port=ports["replica-1"],
        user="postgres",
        pool_params={"minsize": 0, "maxsize": 4},
    )
    acknowledged: list[str] = []
    violations: list[str] = []
    rng = random.Random(7)

    async def writer(i: int) -> None:
        name = f"w{i}"
        rows = await mgr.execute(Author.insert(name=name).returning(Author.id, PORT))
        if rows[0].port != ports["primary"]:
            violations.append(f"write {name} ran on {rows[0].port}")
        acknowledged.append(name)

    async def reader(i: int) -> None:
        rows = await mgr.execute_sql("SELECT inet_server_port()")
        if rows is None or rows[0][0] not in replicas:
            violations.append(f"read {i} ran on {rows}")

    async def transaction(i: int) -> None:
        async with mgr.atomic():
            # No FROM: the answer does not depend on rows existing yet.
            first = (await mgr.execute_sql("SELECT pg_backend_pid()") or [(None,)])[0][0]
            rows = await mgr.execute(Author.insert(name=f"t{i}").returning(PORT, PID))
            seen = await mgr.get(Author.select(Author, PORT, PID).where(Author.name == f"t{i}"))
            if {rows[0].pid, seen.pid} != {first} or {rows[0].port, seen.port} != {
                ports["primary"]
            }:
                violations.append(f"transaction {i} left its connection")
        acknowledged.append(f"t{i}")

    async def mixed(i: int) -> None:
        # Inside a peewee-async transaction on a replica, areplica still routes by its rules.
        async with direct.aio_atomic():
            held = await direct.aio_execute_sql(
                "SELECT inet_server_port()", fetch_results=peewee_async.databases.fetchone
            )
            read = (await mgr.execute_sql("SELECT pg_is_in_recovery()") or [(None,)])[0][0]
            rows = await mgr.execute(Author.insert(name=f"m{i}").returning(PORT))
            if (
                held[0] != ports["replica-1"]
                or rows[0].port != ports["primary"]
                or read is not True
            ):
                violations.append(f"mixed {i}: {held[0]} {rows[0].port} {read}")
        acknowledged.append(f"m{i}")

    async with mgr:
        proxy.initialize(mgr.database)
        await caught_up(mgr, topology)
        kinds = [writer] * 150 + [reader] * 250 + [transaction] * 75 + [mixed] * 25
        rng.shuffle(kinds)

        async def run(kind, i):  # type: ignore[no-untyped-def]
            await asyncio.sleep(rng.random() * 0.05)
            await kind(i)

        async def in_session(kind, i):  # type: ignore[no-untyped-def]
            async with mgr.session():  # each task is its own user: no inherited token
                await run(kind, i)

        results = await asyncio.gather(
            *(in_session(kind, i) for i, kind in enumerate(kinds)), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        assert errors == []
        assert violations == []
        assert not mgr.fallback_reads
    await direct.aio_close()
    on_primary = {r[0] for r in sql_on(topology, "primary", "SELECT name FROM author")}
    assert set(acknowledged) <= on_primary and len(acknowledged) == 250

    async def back_to_baseline() -> bool:
        now = {name: client_backends(topology, name) for name in topology.nodes}
        return now == baseline

    await wait_for(back_to_baseline, timeout=10)
