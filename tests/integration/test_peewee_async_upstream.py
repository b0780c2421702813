"""peewee-async 2.1's own tests about ``is_connected``, deferred init and TransactionTestCase,
re-written against ``mgr.database``.

Origin: https://github.com/05bit/peewee-async at tag ``v2.1.0`` (the PyPI sdist carries no
tests): ``tests/test_database.py``, ``tests/test_testing.py`` and the tests its conftest runs
inside ``peewee_async.testing.TransactionTestCase`` (the ``use_transaction`` mark of
``tests/aio_model/test_selecting.py``, ``test_updating.py`` and ``test_deleting.py``).
Nothing here is copied: each test is written for this suite and says which upstream test it
mirrors; the scenarios and assertions are upstream's, the database is ``mgr.database`` of a
manager over the real topology (both drivers, replica-1 replaying 200 ms late), and where
the upstream test trusts the library a server fact is added (``inet_server_port()``, rows
on the primary asked directly).

Upstream's ``db`` fixture hands each test a database that never connected, its models bound
(``bound_models``); with ``use_transaction`` the test runs inside peewee-async's own
``TransactionTestCase(db)``. ``db`` and ``tx_db`` below do the same on ``mgr.database``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import peewee
import peewee_async
import peewee_async.testing
import pytest
from peewee_async.aio_model import AioModelCompoundSelectQuery, AioModelRaw
from playhouse.shortcuts import model_to_dict

from areplica import ReplicaManager
from areplica.errors import ConfigurationError
from areplica.testing.topology import LocalTopology
from tests.conftest import make_manager, sql_on

pytestmark = pytest.mark.integration

LAGGING = "replica-1"
NOT_INITIALISED = "Error, database must be initialized before creating a connection pool"
fetchone = peewee_async.databases.fetchone


# ---------------------------------------------------------------------- models (upstream's shape)


class Base(peewee_async.AioModel):
    class Meta:
        database = None


class UpModel(Base):  # upstream's TestModel
    text = peewee.CharField(max_length=100, unique=True)
    data = peewee.TextField(default="")

    class Meta:
        table_name = "upstream_testmodel"


class UpAlpha(Base):  # upstream's TestModelAlpha
    text = peewee.CharField()

    class Meta:
        table_name = "upstream_alpha"


class UpBeta(Base):  # upstream's TestModelBeta
    alpha = peewee.ForeignKeyField(UpAlpha, backref="betas")
    text = peewee.CharField()

    class Meta:
        table_name = "upstream_beta"


MODELS: list[Any] = [UpModel, UpAlpha, UpBeta]
TABLES = "upstream_beta, upstream_alpha, upstream_testmodel"


def primary_count(topology: LocalTopology, table: str) -> int:
    """Rows of ``table`` that the primary's other sessions see (committed rows)."""
    return int(sql_on(topology, "primary", f"SELECT count(*) FROM {table}")[0][0])


@pytest.fixture(scope="module")
def upstream(topology: LocalTopology, schema: None) -> Iterator[LocalTopology]:
    """The tables, on every node; replica-1 replaying 200 ms late for the module."""
    ddl = peewee.PostgresqlDatabase(None)
    statements = [f"DROP TABLE IF EXISTS {TABLES} CASCADE"]
    with ddl.bind_ctx(MODELS):
        for model in MODELS:
            statements.append(model._schema._create_table(safe=False).query()[0])
            statements.extend(ix.query()[0] for ix in model._schema._create_indexes(safe=False))
    for statement in statements:
        sql_on(topology, "primary", statement)
    topology.wait_replicated()
    topology.set_apply_delay(LAGGING, 200)
    try:
        yield topology
    finally:
        topology.set_apply_delay(LAGGING, 0)
        sql_on(topology, "primary", f"DROP TABLE IF EXISTS {TABLES} CASCADE")
        topology.wait_replicated()


def _empty_tables(topology: LocalTopology) -> None:
    sql_on(topology, "primary", f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    topology.wait_replicated()  # the lagging replica too: no earlier test's rows anywhere


@pytest.fixture
async def db(upstream: LocalTopology, driver: str) -> AsyncIterator[Any]:
    """Upstream's ``db`` fixture: a database that never connected, the models bound to it."""
    _empty_tables(upstream)
    mgr = make_manager(upstream, driver=driver)
    with mgr.database.bind_ctx(MODELS):
        yield mgr.database
    await mgr.close()


@pytest.fixture
async def tx_db(db: Any, upstream: LocalTopology) -> AsyncIterator[Any]:
    """Upstream's ``use_transaction``: the test inside peewee-async's own test case."""
    async with peewee_async.testing.TransactionTestCase(db):
        yield db
    # Every write of the test was rolled back: the primary has none of it.
    for table in TABLES.split(", "):
        assert primary_count(upstream, table) == 0, table


# ---------------------------------------------------------------------- tests/test_database.py


async def test_is_connected(db: Any, upstream: LocalTopology) -> None:
    """Mirrors tests/test_database.py::test_is_connected (re-written, not copied)."""
    assert db.is_connected is False

    await db.aio_connect()
    assert db.is_connected is True
    row = await db.aio_execute_sql("SELECT inet_server_port()", fetch_results=fetchone)
    assert row[0] in {upstream.port(n) for n in upstream.nodes}  # really connected

    await db.aio_close()
    assert db.is_connected is False
    assert not db.manager.is_open


async def test_aio_close_idempotent(db: Any) -> None:
    """Mirrors tests/test_database.py::test_aio_close_idempotent (re-written, not copied)."""
    assert db.is_connected is False

    await db.aio_close()
    assert db.is_connected is False

    await db.aio_close()
    assert db.is_connected is False


async def test_db_should_connect_manually_after_close(db: Any, upstream: LocalTopology) -> None:
    """Mirrors tests/test_database.py::test_db_should_connect_manually_after_close
    (re-written, not copied)."""
    await UpModel.aio_create(text="test")

    await db.aio_close()
    with pytest.raises((RuntimeError, peewee.OperationalError)):
        await UpModel.aio_get_or_none(text="test")
    await db.aio_connect()

    assert await UpModel.aio_get_or_none(text="test") is not None
    assert primary_count(upstream, "upstream_testmodel") == 1


async def test_deferred_init(upstream: LocalTopology, driver: str) -> None:
    """Mirrors tests/test_database.py::test_deferred_init (re-written, not copied).

    Upstream: ``DB_CLASSES[name](None)``, a query raises, ``database.init(**params)``, the
    query runs. Here: a manager created without members; its database's ``init()`` takes
    the manager's arguments.
    """
    database = ReplicaManager(driver=driver, health_interval=0.2, health_timeout=1.0).database

    with pytest.raises(Exception, match=NOT_INITIALISED):
        await database.aio_execute_sql(sql="SELECT 1;")

    replicas = [upstream.dsn(n) for n in upstream.nodes if n != "primary"]
    database.init(primary=upstream.dsn("primary"), replicas=replicas)

    await database.aio_execute_sql(sql="SELECT 1;")
    # And it routes: a read on a standby, by the server's own answer.
    row = await database.aio_execute_sql(
        "SELECT pg_is_in_recovery(), inet_server_port()", fetch_results=fetchone
    )
    assert row[0] is True and row[1] in {upstream.port(n) for n in upstream.nodes[1:]}
    await database.aio_close()
    assert database.is_connected is False


# ---------------------------------------------------------------------- tests/test_testing.py


@pytest.mark.parametrize("transaction_method", ["aio_transaction", "aio_atomic"])
async def test_transcations_disabled(db: Any, transaction_method: str) -> None:
    """Mirrors tests/test_testing.py::test_transcations_disabled (re-written, not copied;
    upstream's spelling kept in the name)."""
    async with peewee_async.testing.TransactionTestCase(db):
        with pytest.raises(ValueError):
            async with getattr(db, transaction_method)():
                pass
    async with getattr(db, transaction_method)():
        pass  # not raised


async def test_aio_begin_savepoint_disabled(db: Any) -> None:
    """Mirrors tests/test_testing.py::test_aio_begin_savepoint_disabled (re-written, not
    copied)."""
    async with peewee_async.testing.TransactionTestCase(db):
        async with db.aio_connection():
            with pytest.raises(ValueError):
                await db.aio_begin()
            with pytest.raises(ValueError):
                await db.aio_savepoint()


async def test_integration(db: Any, upstream: LocalTopology) -> None:
    """Mirrors tests/test_testing.py::test_integration (re-written, not copied)."""
    async with peewee_async.testing.TransactionTestCase(db):
        await UpModel.aio_create(text="Test 1")
        assert await UpModel.select().aio_exists()
        # Server facts: the read ran on the primary, in the test's transaction, which no
        # other session of the primary sees.
        row = await db.aio_execute_sql(
            "SELECT inet_server_port(), pg_is_in_recovery(), count(*) FROM upstream_testmodel",
            fetch_results=fetchone,
        )
        assert tuple(row) == (upstream.port("primary"), False, 1)
        assert primary_count(upstream, "upstream_testmodel") == 0

    assert not await UpModel.select().aio_exists()
    assert primary_count(upstream, "upstream_testmodel") == 0


# ---------------------------------------------------------------------- use_transaction tests


async def test_select_w_join(tx_db: Any) -> None:
    """Mirrors tests/aio_model/test_selecting.py::test_select_w_join (re-written, not copied)."""
    alpha = await UpAlpha.aio_create(text="Test 1")
    beta = await UpBeta.aio_create(alpha_id=alpha.id, text="text")

    result = (
        await UpBeta.select(UpBeta, UpAlpha).join(UpAlpha, attr="joined_alpha").aio_execute()
    )[0]

    assert result.id == beta.id
    assert result.joined_alpha.id == alpha.id


async def test_raw_select(tx_db: Any) -> None:
    """Mirrors tests/aio_model/test_selecting.py::test_raw_select (re-written, not copied)."""
    first = await UpModel.aio_create(text="Test 1")
    second = await UpModel.aio_create(text="Test 2")
    query = UpModel.raw("SELECT id, text, data FROM upstream_testmodel m ORDER BY m.text")
    assert isinstance(query, AioModelRaw)
    assert list(await query.aio_execute()) == [first, second]


async def test_tuples(tx_db: Any) -> None:
    """Mirrors tests/aio_model/test_selecting.py::test_tuples (re-written, not copied)."""
    obj = await UpModel.aio_create(text="Test 1")
    result = await UpModel.select(UpModel.id, UpModel.text).tuples().aio_execute()
    assert result[0] == (obj.id, obj.text)


async def test_dicts(tx_db: Any) -> None:
    """Mirrors tests/aio_model/test_selecting.py::test_dicts (re-written, not copied)."""
    obj = await UpModel.aio_create(text="Test 1")
    result = await UpModel.select(UpModel.id, UpModel.text).dicts().aio_execute()
    assert result[0] == {"id": obj.id, "text": obj.text}


async def test_union_all(tx_db: Any) -> None:
    """Mirrors tests/aio_model/test_selecting.py::test_union_all (re-written, not copied)."""
    one = await UpModel.aio_create(text="1")
    two = await UpModel.aio_create(text="2")
    query = (
        UpModel.select().where(UpModel.id == one.id)
        + UpModel.select().where(UpModel.id == two.id)
        + UpModel.select().where(UpModel.id == two.id)
    )
    assert sorted(r.text for r in await query.aio_execute()) == ["1", "2", "2"]


async def test_union(tx_db: Any) -> None:
    """Mirrors tests/aio_model/test_selecting.py::test_union (re-written, not copied)."""
    one = await UpModel.aio_create(text="1")
    two = await UpModel.aio_create(text="2")
    query = (
        UpModel.select().where(UpModel.id == one.id)
        | UpModel.select().where(UpModel.id == two.id)
        | UpModel.select().where(UpModel.id == two.id)
    )
    assert isinstance(query, AioModelCompoundSelectQuery)
    assert sorted(r.text for r in await query.aio_execute()) == ["1", "2"]


async def test_intersect(tx_db: Any) -> None:
    """Mirrors tests/aio_model/test_selecting.py::test_intersect (re-written, not copied)."""
    for text in ("1", "2", "3"):
        await UpModel.aio_create(text=text)
    query = UpModel.select().where((UpModel.text == "1") | (UpModel.text == "2")) & (
        UpModel.select().where((UpModel.text == "2") | (UpModel.text == "3"))
    )
    assert sorted(r.text for r in await query.aio_execute()) == ["2"]


async def test_except(tx_db: Any) -> None:
    """Mirrors tests/aio_model/test_selecting.py::test_except (re-written, not copied)."""
    for text in ("1", "2", "3"):
        await UpModel.aio_create(text=text)
    query = UpModel.select().where(UpModel.text.in_(["1", "2", "3"])) - UpModel.select().where(
        UpModel.text == "2"
    )
    assert sorted(r.text for r in await query.aio_execute()) == ["1", "3"]


async def test_update__count(tx_db: Any) -> None:
    """Mirrors tests/aio_model/test_updating.py::test_update__count (re-written, not copied)."""
    for n in range(3):
        await UpModel.aio_create(text=f"{n}")
    assert await UpModel.update(data="new_data").aio_execute() == 3


async def test_update__field_updated(tx_db: Any) -> None:
    """Mirrors tests/aio_model/test_updating.py::test_update__field_updated (re-written, not
    copied)."""
    created = await UpModel.aio_create(text=f"Test {uuid.uuid4()}")
    await UpModel.update(text="Test update query").where(UpModel.id == created.id).aio_execute()
    assert (await UpModel.aio_get(id=created.id)).text == "Test update query"


async def test_update__returning_model(tx_db: Any) -> None:
    """Mirrors tests/aio_model/test_updating.py::test_update__returning_model (re-written,
    not copied)."""
    m = await UpModel.aio_create(text="text1", data="data")
    query = UpModel.update(data="New_data").where(UpModel.data == "data").returning(UpModel)
    res = await query.aio_execute()
    assert model_to_dict(res[0]) == {"id": m.id, "text": "text1", "data": "New_data"}


async def test_update__returning_namedtuples(tx_db: Any) -> None:
    """Mirrors tests/aio_model/test_updating.py::test_update__returning_namedtuples
    (re-written, not copied)."""
    m = await UpModel.aio_create(text="text1", data="data")
    res = await UpModel.update(data="New_data").returning(UpModel).namedtuples().aio_execute()
    assert (res[0].id, res[0].text, res[0].data) == (m.id, "text1", "New_data")


async def test_delete__count(tx_db: Any) -> None:
    """Mirrors tests/aio_model/test_deleting.py::test_delete__count (re-written, not copied)."""
    await UpModel.insert_many([{"text": f"Test {uuid.uuid4()}"} for _ in range(2)]).aio_execute()
    assert await UpModel.delete().aio_execute() == 2


async def test_delete__by_condition(tx_db: Any) -> None:
    """Mirrors tests/aio_model/test_deleting.py::test_delete__by_condition (re-written, not
    copied)."""
    await UpModel.insert_many([{"text": "text1"}, {"text": "text2"}]).aio_execute()
    await UpModel.delete().where(UpModel.text == "text2").aio_execute()
    res = await UpModel.select().aio_execute()
    assert [r.text for r in res] == ["text1"]


async def test_delete__return_model(tx_db: Any) -> None:
    """Mirrors tests/aio_model/test_deleting.py::test_delete__return_model (re-written, not
    copied)."""
    m = await UpModel.aio_create(text="text", data="data")
    res = await UpModel.delete().returning(UpModel).aio_execute()
    assert (res[0].id, res[0].text, res[0].data) == (m.id, m.text, m.data)


async def test_delete__return_dicts(tx_db: Any) -> None:
    """Mirrors tests/aio_model/test_deleting.py::test_delete__return_dicts (re-written, not
    copied)."""
    m = await UpModel.aio_create(text="text", data="data")
    res = await UpModel.delete().returning(UpModel).dicts().aio_execute()
    assert res == [{"id": m.id, "text": "text", "data": "data"}]


async def test_delete__return_tuples(tx_db: Any) -> None:
    """Mirrors tests/aio_model/test_deleting.py::test_delete__return_tuples (re-written, not
    copied)."""
    m = await UpModel.aio_create(text="text", data="data")
    res = await UpModel.delete().returning(UpModel).tuples().aio_execute()
    assert res == [(m.id, "text", "data")]


async def test_delete__return_field(tx_db: Any) -> None:
    """Mirrors tests/aio_model/test_deleting.py::test_delete__return_field (re-written, not
    copied)."""
    await UpModel.aio_create(text="text", data="data")
    res = await UpModel.delete().returning(UpModel.data).aio_execute()
    assert model_to_dict(res[0]) == {"id": None, "text": None, "data": "data"}


# ---------------------------------------------------------------------- beyond upstream


async def test_deferred_manager_behind_a_database_proxy(
    upstream: LocalTopology, driver: str
) -> None:
    """The Flask-style pattern: models bound to a DatabaseProxy, the proxy pointed at a
    deferred manager's database, the manager initialised later (``mgr.init``)."""
    _empty_tables(upstream)
    proxy = peewee.DatabaseProxy()
    mgr = ReplicaManager(driver=driver, name="deferred", health_interval=0.2)
    assert mgr.deferred and mgr.database.deferred and not mgr.database.is_connected
    proxy.initialize(mgr.database)
    with proxy.bind_ctx(MODELS):
        with pytest.raises(ConfigurationError, match=NOT_INITIALISED):
            await UpModel.select().aio_execute()
        with pytest.raises(ConfigurationError, match=NOT_INITIALISED):
            await mgr.connect()
        replicas = {n: upstream.dsn(n) for n in upstream.nodes if n != "primary"}
        mgr.init(upstream.dsn("primary"), replicas, health_timeout=1.0)
        assert not mgr.deferred and not mgr.database.deferred
        assert mgr.options.name == "deferred" and mgr.options.health_timeout == 1.0
        try:
            created = await UpModel.aio_create(text="through-the-proxy")  # lazy connect
            assert mgr.is_open and proxy.is_connected
            assert primary_count(upstream, "upstream_testmodel") == 1  # on the primary
            port = peewee.fn.inet_server_port().alias("port")
            row = await UpModel.select(UpModel.text, port).where(UpModel.id == created.id).aio_get()
            assert row.text == "through-the-proxy"  # read-your-writes, from a standby
            assert row.port in {upstream.port(n) for n in replicas}
        finally:
            await mgr.close()


async def test_init_only_while_new_or_closed(upstream: LocalTopology, driver: str) -> None:
    """``init()`` re-initialises a new or closed manager; an open one refuses; a failed
    ``init()`` changes nothing; the driver (the database's dialect) is fixed."""
    mgr = make_manager(upstream, driver=driver)
    database = mgr.database
    replica = upstream.dsn("replica-2")
    mgr.init(upstream.dsn("primary"), [replica])  # new: allowed
    assert [s.name for s in mgr.status()] == ["primary", "replica-1"]
    other = "psycopg" if driver == "aiopg" else "aiopg"
    with pytest.raises(ConfigurationError, match="driver"):
        mgr.init(upstream.dsn("primary"), driver=other)
    with pytest.raises(ConfigurationError, match="pool_size"):
        mgr.init(upstream.dsn("primary"), pool_size=0)
    assert [s.name for s in mgr.status()] == ["primary", "replica-1"]  # unchanged
    with pytest.raises(ConfigurationError, match="no members"):
        mgr.init()
    await mgr.connect()
    try:
        with pytest.raises(ConfigurationError, match="is open"):
            mgr.init(upstream.dsn("primary"))
        row = await mgr.execute_sql("SELECT inet_server_port()")
        assert row[0][0] == upstream.port("replica-2")  # the only standby it has
    finally:
        await mgr.close()
    mgr.init(upstream.dsn("primary"))  # closed: allowed; a fresh start
    assert mgr.database is database and not database.is_connected
    assert await database.aio_execute_sql("SELECT 1", fetch_results=fetchone) == (1,)
    assert [s.name for s in mgr.status()] == ["primary"]
    await mgr.close()


async def test_pool_backend_connection_is_the_primarys(db: Any, upstream: LocalTopology) -> None:
    """What peewee-async's test case takes from ``pool_backend``: a primary connection that
    every query of the manager joins (its own API too), until released."""
    backend = db.pool_backend
    mgr = db.manager
    assert backend.is_connected is False and not backend.has_acquired_connections()
    conn = await backend.acquire()
    try:
        assert backend.is_connected and backend.has_acquired_connections()
        async with conn.cursor() as cursor:
            await cursor.execute("BEGIN")
            await cursor.execute("SELECT inet_server_port(), pg_is_in_recovery()")
            assert await cursor.fetchone() == (upstream.port("primary"), False)
        await mgr.create(UpModel, text="via-manager")
        assert await mgr.count(UpModel.select()) == 1  # a read: on the same connection
        assert primary_count(upstream, "upstream_testmodel") == 0  # uncommitted
        with pytest.raises(RuntimeError, match="already taken"):
            await backend.acquire()
    finally:
        await backend.release(conn)  # rolls back what is still open
    assert not backend.has_acquired_connections()
    assert primary_count(upstream, "upstream_testmodel") == 0
    await UpModel.aio_create(text="after")  # back to normal routing and commits
    assert primary_count(upstream, "upstream_testmodel") == 1
