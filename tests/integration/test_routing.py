"""Every read form runs on a replica, every write form on the primary: proved by the server.

Reads return ``inet_server_port()`` or filter on ``pg_is_in_recovery()`` (true only on a
standby), so the answer itself says where the query ran. Writes are checked on the primary
with a direct connection, and no "refused by a replica" warning (rule 6) may appear: the
classifier, not the fallback, must have sent them there.
"""

from __future__ import annotations

import asyncio
import logging

import peewee
import pytest
from peewee import fn

from areplica import ReplicaManager
from areplica.testing.topology import LocalTopology
from tests.conftest import Author, BaseModel, PlainCounter, Post, caught_up, make_manager, sql_on

pytestmark = pytest.mark.integration

PORT = fn.inet_server_port().alias("port")
ON_STANDBY = fn.pg_is_in_recovery()


@pytest.fixture
async def seeded(mgr: ReplicaManager, topology: LocalTopology) -> ReplicaManager:
    alex = await mgr.create(Author, name="alex", karma=3)
    await mgr.create(Author, name="bo", karma=5)
    await mgr.create(Post, author=alex, title="hello")
    await mgr.create(Post, author=alex, title="again")
    await caught_up(mgr, topology)
    return mgr


@pytest.fixture
def no_reroute(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="areplica")
    return caplog


def replica_ports(ports: dict[str, int]) -> set[int]:
    return {port for name, port in ports.items() if name != "primary"}


async def test_read_forms_run_on_a_replica(
    seeded: ReplicaManager, ports: dict[str, int], no_reroute: pytest.LogCaptureFixture
) -> None:
    mgr = seeded
    replicas = replica_ports(ports)

    row = await mgr.get(Author.select(Author, PORT).where(Author.name == "alex"))
    assert row.port in replicas
    row = await mgr.get_or_none(Author.select(Author, PORT).where(Author.name == "alex"))
    assert row is not None and row.port in replicas
    assert await mgr.get_or_none(Author.select().where(Author.name == "nobody")) is None
    rows = await mgr.execute(Author.select(Author, PORT).order_by(Author.id))
    assert [r.name for r in rows] == ["alex", "bo"] and {r.port for r in rows} <= replicas
    # count / exists / scalar: the filter only matches on a standby.
    assert await mgr.count(Author.select().where(ON_STANDBY)) == 2
    assert await mgr.exists(Author.select().where(ON_STANDBY, Author.name == "bo"))
    assert await mgr.scalar(Author.select(fn.inet_server_port())) in replicas
    # prefetch: both queries only match on a standby.
    authors = await mgr.prefetch(
        Author.select().where(ON_STANDBY).order_by(Author.id), Post.select().where(ON_STANDBY)
    )
    assert [len(a.posts) for a in authors] == [2, 0]
    # AioModel API on models bound to mgr.database.
    got = await Author.aio_get(Author.name == "alex", ON_STANDBY)
    assert got.karma == 3
    rows = await Author.select(Author, PORT).aio_execute()
    assert {r.port for r in rows} <= replicas
    assert await Author.select().where(ON_STANDBY).aio_count() == 2
    assert await Author.select().where(ON_STANDBY).aio_exists()
    assert await Author.select(fn.inet_server_port()).aio_scalar() in replicas
    # Raw SELECT, through a model and as plain SQL.
    raw = await mgr.execute(Author.raw("SELECT *, inet_server_port() AS port FROM author"))
    assert {r.port for r in raw} <= replicas
    assert (await mgr.execute_sql("SELECT inet_server_port()"))[0][0] in replicas
    # A plain peewee model works through the manager too.
    assert await mgr.count(PlainCounter.select().where(ON_STANDBY)) == 0
    assert "refused" not in no_reroute.text
    assert mgr.fallback_reads == 0


async def test_write_forms_run_on_the_primary(
    seeded: ReplicaManager,
    topology: LocalTopology,
    ports: dict[str, int],
    no_reroute: pytest.LogCaptureFixture,
) -> None:
    mgr = seeded
    primary = ports["primary"]

    def on_primary(sql: str) -> list[tuple[object, ...]]:
        return sql_on(topology, "primary", sql)

    created = await mgr.create(Author, name="cy")
    assert on_primary(f"SELECT name FROM author WHERE id = {created.id}") == [("cy",)]
    obj, was_created = await mgr.get_or_create(Author, name="dee", defaults={"karma": 7})
    assert was_created and on_primary("SELECT karma FROM author WHERE name = 'dee'") == [(7,)]
    again, was_created = await mgr.get_or_create(Author, name="dee")
    assert not was_created and again.id == obj.id
    obj.karma = 8
    assert await mgr.update(obj) == 1
    assert on_primary("SELECT karma FROM author WHERE name = 'dee'") == [(8,)]
    assert await mgr.delete(obj) == 1
    assert on_primary("SELECT count(*) FROM author WHERE name = 'dee'") == [(0,)]
    # Query objects, with RETURNING saying where they ran.
    rows = await mgr.execute(
        Author.update(karma=Author.karma + 1).where(Author.name == "alex").returning(PORT)
    )
    assert [r.port for r in rows] == [primary]
    rows = await mgr.execute(Author.insert(name="eve").returning(Author.id, PORT))
    assert [r.port for r in rows] == [primary]
    assert await mgr.execute(Author.insert_many([{"name": "f1"}, {"name": "f2"}])) is not None
    assert await mgr.execute(Author.delete().where(Author.name == "f2")) == 1
    assert on_primary("SELECT count(*) FROM author WHERE name LIKE 'f%'") == [(1,)]
    await Author.insert(name="gil").aio_execute()
    assert on_primary("SELECT count(*) FROM author WHERE name = 'gil'") == [(1,)]
    await mgr.execute(PlainCounter.insert(label="plain"))
    assert on_primary("SELECT label FROM counter") == [("plain",)]
    # Locking reads: every strength.
    for lock in (True, "FOR NO KEY UPDATE", "FOR SHARE", "FOR KEY SHARE"):
        row = await mgr.get(
            Author.select(Author, PORT).where(Author.name == "alex").for_update(lock)
        )
        assert row.port == primary, lock
    # Side-effect function in a SELECT, raw writes, DDL.
    rows = await mgr.execute_sql("SELECT nextval('test_seq'), inet_server_port()")
    assert rows is not None and rows[0][1] == primary
    await mgr.execute_sql("UPDATE author SET karma = 42 WHERE name = 'bo'")
    assert on_primary("SELECT karma FROM author WHERE name = 'bo'") == [(42,)]
    await mgr.execute(Author.raw("DELETE FROM author WHERE name = 'cy'"))
    assert on_primary("SELECT count(*) FROM author WHERE name = 'cy'") == [(0,)]

    class Temp(Author):
        class Meta:
            table_name = "routing_ddl_probe"

    await mgr.create_tables([Temp])
    assert on_primary("SELECT to_regclass('routing_ddl_probe') IS NOT NULL") == [(True,)]
    await mgr.drop_tables([Temp])
    assert on_primary("SELECT to_regclass('routing_ddl_probe') IS NULL") == [(True,)]
    assert "refused" not in no_reroute.text
    status = {s.name: s for s in mgr.status()}
    assert status["primary"].writes > 10
    assert all(status[n].writes == 0 for n in status if n != "primary")


async def test_a_misclassified_write_runs_once_on_the_primary(
    seeded: ReplicaManager, topology: LocalTopology, caplog: pytest.LogCaptureFixture
) -> None:
    """Rule 6: a "read" that a standby refuses (25006) runs on the primary, with a warning."""
    mgr = seeded
    sql_on(
        topology,
        "primary",
        "CREATE OR REPLACE FUNCTION bump_karma() RETURNS int LANGUAGE sql AS "
        "$$ UPDATE author SET karma = karma + 100 WHERE name = 'alex' RETURNING karma $$",
    )
    await caught_up(mgr, topology)
    caplog.set_level(logging.WARNING, logger="areplica")
    rows = await mgr.execute_sql("SELECT bump_karma()")
    assert rows == [(103,)]
    assert sql_on(topology, "primary", "SELECT karma FROM author WHERE name = 'alex'") == [(103,)]
    assert "25006" in caplog.text


async def test_atomic_runs_on_one_primary_connection(
    seeded: ReplicaManager, topology: LocalTopology, ports: dict[str, int]
) -> None:
    mgr = seeded
    async with mgr.atomic():
        pid = await mgr.scalar(Author.select(fn.pg_backend_pid()))
        created = await mgr.create(Author, name="tx-row")
        # Reads inside see the uncommitted row, on the same backend, on the primary.
        row = await mgr.get(
            Author.select(Author, PORT, fn.pg_backend_pid().alias("pid")).where(
                Author.id == created.id
            )
        )
        assert (row.port, row.pid) == (ports["primary"], pid)
        assert await Author.select().where(Author.name == "tx-row").aio_exists()
        # Not visible from outside the transaction.
        assert sql_on(topology, "primary", "SELECT count(*) FROM author WHERE name='tx-row'") == [
            (0,)
        ]
    assert sql_on(topology, "primary", "SELECT count(*) FROM author WHERE name='tx-row'") == [(1,)]


async def test_nested_atomic_uses_savepoints_and_rollback_leaves_nothing(
    seeded: ReplicaManager, topology: LocalTopology
) -> None:
    mgr = seeded

    class Boom(Exception):
        pass

    async with mgr.atomic():
        await mgr.create(Author, name="outer")
        with pytest.raises(Boom):
            async with mgr.atomic():
                await mgr.create(Author, name="inner")
                assert await mgr.exists(Author.select().where(Author.name == "inner"))
                raise Boom
        assert not await mgr.exists(Author.select().where(Author.name == "inner"))
    names = sql_on(topology, "primary", "SELECT name FROM author WHERE name IN ('outer','inner')")
    assert names == [("outer",)]

    with pytest.raises(Boom):
        async with mgr.transaction():
            await mgr.create(Author, name="doomed")
            await mgr.execute(Author.update(karma=999))
            raise Boom
    assert sql_on(topology, "primary", "SELECT count(*) FROM author WHERE name='doomed'") == [(0,)]
    assert sql_on(topology, "primary", "SELECT count(*) FROM author WHERE karma=999") == [(0,)]
    # peewee-async's own aio_atomic on the routing database is the manager's.
    with pytest.raises(Boom):
        async with mgr.database.aio_atomic():
            await Author.insert(name="via-aio-atomic").aio_execute()
            raise Boom
    assert sql_on(topology, "primary", "SELECT count(*) FROM author WHERE name LIKE 'via%'") == [
        (0,)
    ]
    # And a failed SQL statement inside a transaction rolls it all back.
    with pytest.raises(peewee.IntegrityError):
        async with mgr.atomic():
            await mgr.create(Author, name="dup-1")
            await mgr.create(Author, name="alex")
    assert sql_on(topology, "primary", "SELECT count(*) FROM author WHERE name='dup-1'") == [(0,)]


async def test_scopes_and_per_call_overrides(
    seeded: ReplicaManager, topology: LocalTopology, ports: dict[str, int]
) -> None:
    mgr = seeded
    query = Author.select(fn.inet_server_port())
    async with mgr.primary():
        assert await mgr.scalar(query) == ports["primary"]
        assert await query.aio_scalar() == ports["primary"]
    for name in ("replica-1", "replica-2"):
        async with mgr.replica(name):
            for _ in range(3):
                assert await mgr.scalar(query) == ports[name]
        assert await mgr.scalar(query, on=name) == ports[name]
    async with mgr.replica():
        assert await mgr.scalar(query) in replica_ports(ports)
    assert await mgr.scalar(query, on="primary") == ports["primary"]
    assert await mgr.scalar(query, on="replica") in replica_ports(ports)
    # Scopes nest; the innermost wins.
    async with mgr.primary():
        async with mgr.replica("replica-2"):
            assert await mgr.scalar(query) == ports["replica-2"]
        assert await mgr.scalar(query) == ports["primary"]


async def test_a_write_inside_replica_scope_sends_nothing(
    seeded: ReplicaManager, topology: LocalTopology
) -> None:
    from areplica import ReadOnlyScopeError

    mgr = seeded
    writes = {s.name: s.writes for s in mgr.status()}
    async with mgr.replica("replica-1"):
        with pytest.raises(ReadOnlyScopeError):
            await mgr.create(Author, name="nope")
        with pytest.raises(ReadOnlyScopeError):
            await Author.update(karma=0).aio_execute()
        with pytest.raises(ReadOnlyScopeError):
            await mgr.execute_sql("SELECT nextval('test_seq')")
        with pytest.raises(ReadOnlyScopeError):
            async with mgr.atomic():
                pass
    with pytest.raises(ReadOnlyScopeError):
        await mgr.execute(Author.delete(), on="replica-2")
    assert sql_on(topology, "primary", "SELECT count(*) FROM author WHERE name = 'nope'") == [(0,)]
    assert sql_on(topology, "primary", "SELECT karma FROM author WHERE name = 'alex'") == [(3,)]
    assert {s.name: s.writes for s in mgr.status()} == writes
    assert mgr.status()[0].errors == 0


async def test_create_tables_from_many_workers_at_once(
    mgr: ReplicaManager, topology: LocalTopology
) -> None:
    """Workers starting together (``uvicorn --workers 4``) each create the tables at startup.

    PostgreSQL's ``CREATE TABLE IF NOT EXISTS`` is not safe against itself: two sessions that
    both find the name free both insert it, and one fails on ``pg_type_typname_nsp_index``.
    ``create_tables`` serializes the creation on the primary, so every worker succeeds and
    the tables exist once on the primary. So does ``aio_create_tables`` of the routing
    database, from tasks of one process.
    """

    workers = [make_manager(topology) for _ in range(4)]
    names = [f"routing_startup_{n}" for n in range(12)]
    try:
        for worker in workers:
            await worker.connect()
        for n, name in enumerate(names):
            meta = type("Meta", (), {"table_name": name})
            model = type(name, (BaseModel,), {"tag": peewee.TextField(index=True), "Meta": meta})
            if n % 2:
                await asyncio.gather(*(worker.create_tables([model]) for worker in workers))
            else:
                await asyncio.gather(*(mgr.database.aio_create_tables([model]) for _ in workers))
            assert sql_on(topology, "primary", f"SELECT to_regclass('{name}') IS NOT NULL") == [
                (True,)
            ]
    finally:
        for worker in workers:
            await worker.close()
        for name in names:
            sql_on(topology, "primary", f"DROP TABLE IF EXISTS {name}")
