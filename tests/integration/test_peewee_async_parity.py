"""peewee-async parity: the same scenarios on plain peewee-async and on ``mgr.database``.

Every scenario is one function that takes a database and returns an outcome (rows, return
values, exceptions as ``Raised``). Each test runs it on a plain peewee-async database on the
topology's primary and on a fresh, never-connected manager's ``mgr.database`` (replica-1
replaying 200 ms late), with the same tables reset before each run, and asserts the outcomes
are the same: equal values, and for exceptions a type the plain one's handler catches (and
the same message). Both drivers.

The routed runs start in a session carrying the position of the table reset (what the
reset's writer would hand over), so a lagging replica never serves a read of a table it does
not have yet; everything after is the scenario's own read-your-writes.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import peewee
import peewee_async
import peewee_async.signals
import peewee_async.testing
import pytest
from psycopg2.extensions import parse_dsn

from areplica import ReplicaManager
from areplica.database import DatabaseClosedError, RoutedTransaction
from areplica.errors import ClosedError, ConfigurationError, ReadOnlyScopeError
from areplica.testing import TransactionTestCase
from areplica.testing.topology import LocalTopology
from tests.conftest import make_manager, sql_on

pytestmark = pytest.mark.integration

LAGGING = "replica-1"
LAG_MS = 200
fetchone = peewee_async.databases.fetchone
fetchall = peewee_async.databases.fetchall


# ---------------------------------------------------------------------- models (this module's own)


class Base(peewee_async.AioModel):
    class Meta:
        database = None


class Writer(Base):
    name = peewee.CharField(unique=True)
    karma = peewee.IntegerField(default=0)

    class Meta:
        table_name = "parity_writer"


class Note(Base):
    writer = peewee.ForeignKeyField(Writer, backref="notes", on_delete="CASCADE")
    title = peewee.CharField(index=True)

    class Meta:
        table_name = "parity_note"


class Ticket(Base):
    number = peewee.IntegerField(sequence="parity_ticket_seq")
    label = peewee.CharField()

    class Meta:
        table_name = "parity_ticket"
        indexes = ((("label", "number"), True),)


class Audited(peewee_async.signals.AioModel):
    name = peewee.CharField()

    class Meta:
        database = None
        table_name = "parity_audited"


MODELS: list[Any] = [Writer, Note, Ticket, Audited]
TABLES = "parity_audited, parity_note, parity_ticket, parity_writer"


# ---------------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class Raised:
    """An exception as an outcome: its type and (unless dropped) its message."""

    type: type[BaseException]
    message: str | None


async def attempt(awaitable: Awaitable[Any], *, message: bool = True) -> Any:
    """The awaitable's result, or the exception it raised as ``Raised``."""
    try:
        return await awaitable
    except Exception as exc:
        return Raised(type(exc), str(exc) if message else None)


def norm(value: Any) -> Any:
    """Model instances as (model, fields); containers recursively."""
    if isinstance(value, peewee.Model):
        return (type(value).__name__, tuple(sorted(value.__data__.items())))
    if isinstance(value, list):
        return [norm(v) for v in value]
    if isinstance(value, tuple):
        return tuple(norm(v) for v in value)
    if isinstance(value, dict):
        return {k: norm(v) for k, v in value.items()}
    return value


def assert_same(plain: Any, routed: Any, path: str = "outcome") -> None:
    """Equal values; an exception whose type the plain one's handler catches, same message."""
    if isinstance(plain, Raised):
        assert isinstance(routed, Raised), f"{path}: plain raised {plain}, routed gave {routed!r}"
        assert issubclass(routed.type, plain.type), f"{path}: {routed.type} vs {plain.type}"
        assert routed.message == plain.message, f"{path}: {routed.message!r} != {plain.message!r}"
        return
    if isinstance(plain, (list, tuple)) and isinstance(routed, (list, tuple)):
        assert type(plain) is type(routed), f"{path}: {type(plain)} vs {type(routed)}"
        assert len(plain) == len(routed), f"{path}: {plain!r} != {routed!r}"
        for i, (p, r) in enumerate(zip(plain, routed, strict=True)):
            assert_same(p, r, f"{path}[{i}]")
        return
    if isinstance(plain, dict) and isinstance(routed, dict):
        assert plain.keys() == routed.keys(), f"{path}: {plain!r} != {routed!r}"
        for key in plain:
            assert_same(plain[key], routed[key], f"{path}[{key!r}]")
        return
    assert plain == routed, f"{path}: plain {plain!r} != routed {routed!r}"


# ---------------------------------------------------------------------- databases and runs


def plain_database(topology: LocalTopology, driver: str) -> Any:
    """A plain peewee-async database on the primary (what a user migrates from)."""
    params = parse_dsn(topology.dsn("primary"))
    options = {
        "host": params["host"],
        "port": int(params["port"]),
        "user": params["user"],
        "password": params.get("password"),
    }
    if driver == "psycopg":
        return peewee_async.Psycopg3Database(params["dbname"], **options)
    return peewee_async.PostgresqlDatabase(params["dbname"], **options)


def reset_tables(topology: LocalTopology, *, create: bool = True) -> str:
    """Drop this module's tables (and create them again); the primary's position after."""
    statements = [
        f"DROP TABLE IF EXISTS {TABLES} CASCADE",
        "DROP SEQUENCE IF EXISTS parity_ticket_seq",
    ]
    if create:
        ddl = peewee.PostgresqlDatabase(None)
        statements.append("CREATE SEQUENCE parity_ticket_seq")
        with ddl.bind_ctx(MODELS):
            for model in MODELS:
                statements.append(model._schema._create_table(safe=False).query()[0])
                statements.extend(ix.query()[0] for ix in model._schema._create_indexes(safe=False))
    for statement in statements:
        sql_on(topology, "primary", statement)
    return str(sql_on(topology, "primary", "SELECT pg_current_wal_insert_lsn()::text")[0][0])


Scenario = Callable[[Any], Awaitable[Any]]


@dataclass
class Run:
    """One scenario's two outcomes, and how many routed reads replicas served."""

    plain: Any
    routed: Any
    replica_reads: int


async def run_both(
    topology: LocalTopology, driver: str, scenario: Scenario, *, create: bool = True
) -> Run:
    """The scenario on plain peewee-async, then on a fresh manager's ``mgr.database``."""
    reset_tables(topology, create=create)
    plain = plain_database(topology, driver)
    try:
        with plain.bind_ctx(MODELS):
            plain_outcome = norm(await attempt(scenario(plain)))
    finally:
        await plain.aio_close()
    token = reset_tables(topology, create=create)
    mgr = make_manager(topology, driver=driver)
    try:
        async with mgr.session(token):
            with mgr.database.bind_ctx(MODELS):
                routed_outcome = norm(await attempt(scenario(mgr.database)))
        replica_reads = sum(s.reads for s in mgr.status() if s.role == "replica")
    finally:
        await mgr.close()
    return Run(plain_outcome, routed_outcome, replica_reads)


async def same(topology: LocalTopology, driver: str, scenario: Scenario, **kw: Any) -> Run:
    run = await run_both(topology, driver, scenario, **kw)
    assert_same(run.plain, run.routed)
    return run


@pytest.fixture(scope="module")
def lagging(topology: LocalTopology, schema: None) -> Iterator[LocalTopology]:
    """replica-1 replays 200 ms late for the whole module; reset afterwards."""
    topology.set_apply_delay(LAGGING, LAG_MS)
    try:
        yield topology
    finally:
        topology.set_apply_delay(LAGGING, 0)
        topology.wait_replicated()


@pytest.fixture
def topo(lagging: LocalTopology) -> LocalTopology:
    return lagging


async def test_the_replica_really_lags(topo: LocalTopology) -> None:
    """The premise: replica-1 does not have a fresh write yet; the parity runs read through it."""
    reset_tables(topo)
    topo.wait_replicated()
    sql_on(topo, "primary", "INSERT INTO parity_writer (name, karma) VALUES ('fresh', 0)")
    assert sql_on(topo, LAGGING, "SELECT count(*) FROM parity_writer") == [(0,)]
    assert sql_on(topo, "primary", "SELECT count(*) FROM parity_writer") == [(1,)]


# ---------------------------------------------------------------------- lifecycle (items 3 and 8)


async def lazy_connect(db: Any) -> Any:
    before = db.is_connected
    row = await db.aio_execute_sql("SELECT 41 + 1", fetch_results=fetchone)
    created = await Writer.aio_create(name="lazy")
    return before, tuple(row), db.is_connected, created.id, await Writer.select().aio_count()


async def test_lazy_connect(topo: LocalTopology, driver: str) -> None:
    run = await same(topo, driver, lazy_connect)
    assert run.plain == (False, (42,), True, 1, 1)


async def lazy_connect_concurrently(db: Any) -> Any:
    rows = await asyncio.gather(
        *(db.aio_execute_sql("SELECT %s", (i,), fetch_results=fetchone) for i in range(8))
    )
    return [tuple(r) for r in rows], db.is_connected


async def test_lazy_connect_concurrent_first_queries(topo: LocalTopology, driver: str) -> None:
    await same(topo, driver, lazy_connect_concurrently)


async def query_after_close(db: Any) -> Any:
    await Writer.aio_create(name="before-close")
    await db.aio_close()
    closed = db.is_connected
    sql = await attempt(db.aio_execute_sql("SELECT 1", fetch_results=fetchone), message=False)
    model = await attempt(Writer.select().aio_execute(), message=False)
    get = await attempt(Writer.aio_get(name="before-close"), message=False)
    await db.aio_close()  # idempotent
    return closed, sql, model, get


async def test_query_after_close(topo: LocalTopology, driver: str) -> None:
    """aiopg's pool raises RuntimeError, psycopg's a peewee OperationalError: ours is both."""
    run = await same(topo, driver, query_after_close)
    expected = RuntimeError if driver == "aiopg" else peewee.OperationalError
    assert run.plain[1] == Raised(expected, None)


async def test_closed_error_is_both(topo: LocalTopology) -> None:
    mgr = make_manager(topo)
    await mgr.database.aio_connect()
    await mgr.database.aio_close()
    with pytest.raises(DatabaseClosedError) as info:
        await mgr.database.aio_execute_sql("SELECT 1")
    assert isinstance(info.value, ClosedError)
    assert isinstance(info.value, peewee.OperationalError)
    assert isinstance(info.value, RuntimeError)
    assert "aio_connect()" in str(info.value)


async def connection_blocks_after_close(db: Any) -> Any:
    await db.aio_execute_sql("SELECT 1")
    await db.aio_close()
    outcomes = []
    for opener in (db.aio_connection, db.aio_atomic, db.aio_transaction):
        try:
            async with opener():
                outcomes.append("entered")
        except Exception as exc:
            outcomes.append(type(exc))
    return outcomes


async def test_connection_blocks_after_close(topo: LocalTopology, driver: str) -> None:
    """Outside a query, psycopg's peewee-async leaks the pool's own PoolClosed (a psycopg
    OperationalError): the one documented difference, ours raises DatabaseClosedError."""
    run = await run_both(topo, driver, connection_blocks_after_close)
    assert run.routed == [DatabaseClosedError] * 3
    if driver == "aiopg":
        assert run.plain == [RuntimeError] * 3
    else:
        import psycopg_pool

        assert run.plain == [psycopg_pool.PoolClosed] * 3


async def reopen(db: Any) -> Any:
    await Writer.aio_create(name="first")
    await db.aio_close()
    await db.aio_connect()
    reopened = db.is_connected
    await db.aio_connect()  # a no-op when open
    await Writer.aio_create(name="second")
    names = [w.name for w in await Writer.select().order_by(Writer.id).aio_execute()]
    return reopened, names


async def test_close_then_connect_reopens(topo: LocalTopology, driver: str) -> None:
    run = await same(topo, driver, reopen)
    assert run.plain == (True, ["first", "second"])


async def close_never_connected(db: Any) -> Any:
    await db.aio_close()  # no pool yet: nothing to close, the next query still connects
    return db.is_connected, tuple(await db.aio_execute_sql("SELECT 7", fetch_results=fetchone))


async def test_close_before_connect_keeps_lazy_connect(topo: LocalTopology, driver: str) -> None:
    await same(topo, driver, close_never_connected)


async def connected_states(db: Any) -> Any:
    states = [("new", db.is_connected)]
    await db.aio_execute_sql("SELECT 1")
    states.append(("after a lazy connect", db.is_connected))
    await db.aio_close()
    states.append(("after aio_close()", db.is_connected))
    await db.aio_close()
    states.append(("after a second aio_close()", db.is_connected))
    await db.aio_connect()
    states.append(("after aio_connect()", db.is_connected))
    await db.aio_connect()
    states.append(("after a second aio_connect()", db.is_connected))
    await db.aio_close()
    return states


async def test_is_connected_in_every_state(topo: LocalTopology, driver: str) -> None:
    run = await same(topo, driver, connected_states)
    assert [connected for _, connected in run.plain] == [False, True, False, False, True, True]


async def deferred_states(db: Any, init: Any) -> Any:
    async def connection() -> None:
        async with db.aio_connection():  # peewee-async raises at the call, before entering
            pass

    async def atomic() -> None:
        async with db.aio_atomic():
            pass

    facts: list[Any] = [db.deferred, db.is_connected]
    for use in (
        lambda: db.aio_execute_sql("SELECT 1"),
        db.aio_connect,
        db.aio_close,
        lambda: Writer.select().aio_execute(),
        connection,
        atomic,
    ):
        facts.append(await attempt(use(), message=False))
    facts.append(await attempt(sync(lambda: _sync_count(db)), message=False))
    init(db)
    facts.extend([db.deferred, db.is_connected])
    facts.append(tuple(await db.aio_execute_sql("SELECT 2", fetch_results=fetchone)))
    facts.append(db.is_connected)
    await db.aio_close()
    return facts


def _sync_count(db: Any) -> Any:
    with db.allow_sync():
        return Writer.select().count()


async def test_deferred_database(topo: LocalTopology, driver: str) -> None:
    """``Database(None)`` then ``init()``: peewee-async's and a deferred manager's database
    refuse the same uses before (peewee-async raises a bare Exception, areplica a
    ConfigurationError with its message), and work after."""
    reset_tables(topo)
    params = parse_dsn(topo.dsn("primary"))
    cls = peewee_async.Psycopg3Database if driver == "psycopg" else peewee_async.PostgresqlDatabase
    plain = cls(None)
    connection = {"host": params["host"], "port": int(params["port"]), "user": params["user"]}
    connection["password"] = params.get("password")  # psycopg's pool backend needs the key
    with plain.bind_ctx(MODELS):
        plain_facts = await deferred_states(plain, lambda d: d.init(params["dbname"], **connection))
    mgr = ReplicaManager(driver=driver, health_interval=0.2, health_timeout=1.0)
    replicas = [topo.dsn(n) for n in topo.nodes if n != "primary"]
    with mgr.database.bind_ctx(MODELS):
        routed_facts = await deferred_states(
            mgr.database, lambda d: d.init(primary=topo.dsn("primary"), replicas=replicas)
        )
    deferred_error = Raised(Exception, None)
    assert plain_facts[:8] == [True, False] + [deferred_error] * 6
    assert plain_facts[8] == Raised(peewee.InterfaceError, None)  # peewee's sync refusal
    assert plain_facts[9:] == [False, False, (2,), True]
    assert routed_facts[:2] == [True, False]
    assert routed_facts[2:8] == [Raised(ConfigurationError, None)] * 6
    assert routed_facts[8:] == plain_facts[8:]


# ---------------------------------------------------------------------- allow_sync (item 2)


def sync_facts(db: Any, primary_port: int) -> Any:
    with db.allow_sync():
        Writer.create(name="sync", karma=3)  # a sync write
        count = Writer.select().count()
        indexes = sorted(ix.name for ix in db.get_indexes("parity_writer"))
        columns = [c.name for c in db.get_columns("parity_writer")]
        exists = db.table_exists("parity_writer")
        port, standby = db.execute_sql("SELECT inet_server_port(), pg_is_in_recovery()").fetchone()
        with db.atomic():
            Writer.create(name="sync-txn")
    return count, indexes, columns, exists, port == primary_port, standby


async def sync_then_async(db: Any, primary_port: int) -> Any:
    params = db.connect_params
    before = sync_facts(db, primary_port)
    # Async reads right after the sync writes: read-your-writes through a lagging replica.
    names = [w.name for w in await Writer.select().order_by(Writer.id).aio_execute()]
    after = sync_facts_again(db, primary_port)
    return int(params["port"]) == primary_port, before, names, after


def sync_facts_again(db: Any, primary_port: int) -> Any:
    with db.allow_sync():
        return db.execute_sql("SELECT inet_server_port()").fetchone()[0] == primary_port


async def test_allow_sync_runs_on_the_primary(
    topo: LocalTopology, driver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before and after connect; PGPORT pointing at a replica changes nothing."""
    monkeypatch.setenv("PGPORT", str(topo.port(LAGGING)))
    monkeypatch.setenv("PGHOST", "127.0.0.1")
    primary = topo.port("primary")
    run = await same(topo, driver, lambda db: sync_then_async(db, primary))
    assert run.plain == (
        True,
        (
            1,
            ["parity_writer_pkey", "writer_name"],
            ["id", "name", "karma"],
            True,
            True,
            False,
        ),
        ["sync", "sync-txn"],
        True,
    )


async def test_allow_sync_write_advances_the_token(topo: LocalTopology, driver: str) -> None:
    token = reset_tables(topo)
    mgr = make_manager(topo, driver=driver)
    async with mgr, mgr.session(token):
        db = mgr.database
        with db.bind_ctx(MODELS):
            before = mgr.token
            with db.allow_sync():
                Writer.create(name="sync")
            assert mgr.token is not None and mgr.token != before
            assert db.connect_params["port"] == str(topo.port("primary"))


async def sync(fn: Callable[[], Any]) -> Any:
    """Call sync peewee code from a scenario (it raises before any I/O when refused)."""
    return fn()


async def test_sync_refused_without_allow_sync(topo: LocalTopology, driver: str) -> None:
    async def scenario(db: Any) -> Any:
        return await attempt(sync(lambda: Writer.select().count()), message=False)

    run = await same(topo, driver, scenario)
    assert run.plain == Raised(AssertionError, None)


# ---------------------------------------------------------------------- transactions (items 5, 6)


async def nested_transactions(db: Any) -> Any:
    async with db.aio_transaction():
        await Writer.aio_create(name="outer")
        inner = await attempt(_enter(db.aio_transaction()))
        async with db.aio_atomic():  # a savepoint
            await Writer.aio_create(name="savepoint")
        rolled = await attempt(_fail_in(db.aio_atomic(), Writer.aio_create(name="undone")))
    async with db.aio_atomic():
        in_atomic = await attempt(_enter(db.aio_transaction()))
    names = [w.name for w in await Writer.select().order_by(Writer.id).aio_execute()]
    return inner, rolled, in_atomic, names


async def _enter(scope: Any) -> str:
    async with scope:
        return "entered"


class Boom(Exception):
    pass


async def _fail_in(scope: Any, work: Awaitable[Any]) -> None:
    async with scope:
        await work
        raise Boom("rolled back")


async def test_nested_transaction_raises(topo: LocalTopology, driver: str) -> None:
    run = await same(topo, driver, nested_transactions)
    opened = Raised(peewee.OperationalError, "Transaction already opened")
    assert run.plain == (opened, Raised(Boom, "rolled back"), opened, ["outer", "savepoint"])


async def manual_transactions(db: Any) -> Any:
    outside = await attempt(db.aio_begin())
    outside_sp = await attempt(db.aio_savepoint())
    async with db.aio_connection():
        tr = await db.aio_begin()
        await Writer.aio_create(name="kept")
        sp = await db.aio_savepoint()
        await Writer.aio_create(name="undone")
        await sp.rollback()
        sp2 = await db.aio_savepoint()
        await Writer.aio_create(name="released")
        await sp2.commit()
        kinds = (
            isinstance(tr, peewee_async.Transaction),
            tr.is_savepoint,
            sp.is_savepoint,
            sp.savepoint.startswith("PWASYNC__"),
        )
        await tr.commit()
        tr2 = await db.aio_begin()
        await Writer.aio_create(name="rolled-back")
        await tr2.rollback()
    # Read outside the connection: the commit's own writes, through a lagging replica.
    names = [w.name for w in await Writer.select().order_by(Writer.id).aio_execute()]
    return outside, outside_sp, kinds, names


async def test_aio_begin_and_savepoint(topo: LocalTopology, driver: str) -> None:
    run = await same(topo, driver, manual_transactions)
    not_in = Raised(
        peewee.OperationalError,
        "This method can only be called within the aio_connection context manager",
    )
    assert run.plain == (not_in, not_in, (True, False, True, True), ["kept", "released"])


async def test_aio_begin_routing_and_token(topo: LocalTopology, driver: str) -> None:
    """Manual transactions run on the primary and their commit records the causal token."""
    token = reset_tables(topo)
    mgr = make_manager(topo, driver=driver)
    async with mgr, mgr.session(token):
        db = mgr.database
        with db.bind_ctx(MODELS):
            async with db.aio_connection():
                tr = await db.aio_begin()
                assert isinstance(tr, RoutedTransaction)
                row = await db.aio_execute_sql(
                    "SELECT inet_server_port(), pg_is_in_recovery()", fetch_results=fetchone
                )
                assert tuple(row) == (topo.port("primary"), False)
                before = mgr.token
                await Writer.aio_create(name="manual")
                assert mgr.token == before  # not yet: uncommitted
                await tr.commit()
                assert mgr.token != before
            assert await Writer.select().where(Writer.name == "manual").aio_exists()


async def pinned_autocommit_write(db: Any) -> Any:
    async with db.aio_connection():
        await Writer.aio_create(name="pinned")
    return [w.name for w in await Writer.select().aio_execute()]


async def test_aio_connection_write_then_read(topo: LocalTopology, driver: str) -> None:
    run = await same(topo, driver, pinned_autocommit_write)
    assert run.plain == ["pinned"]


# ---------------------------------------------------------------------- logging (item 7)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[Any] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.msg)


async def sql_logging(db: Any) -> Any:
    log = logging.getLogger("peewee.async")
    handler = _Records()
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        writer = await Writer.aio_create(name="logged")
        await Writer.aio_get(Writer.id == writer.id)
        await db.aio_execute_sql("SELECT %s", (5,), fetch_results=fetchone)
        await Writer.update(karma=1).where(Writer.id == writer.id).aio_execute()
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    return handler.messages


async def test_sql_logging(topo: LocalTopology, driver: str) -> None:
    run = await same(topo, driver, sql_logging)
    assert len(run.plain) == 4 and run.plain[2] == ("SELECT %s", (5,))


async def test_sql_logging_costs_nothing_when_off(topo: LocalTopology) -> None:
    """With DEBUG off the query is compiled once (by the manager), never for the log."""
    token = reset_tables(topo)
    mgr = make_manager(topo)
    calls = 0
    engine = mgr.database.engine
    compile_ = engine.compile

    def counting(query: Any) -> Any:
        nonlocal calls
        calls += 1
        return compile_(query)

    log = logging.getLogger("peewee.async")
    assert not log.isEnabledFor(logging.DEBUG)
    async with mgr, mgr.session(token):
        with mgr.database.bind_ctx(MODELS):
            engine.compile = counting  # type: ignore[method-assign]
            await Writer.select().aio_execute()
            assert calls == 1


# ---------------------------------------------------------------------- test case (item 4)


async def transaction_test_case(db: Any) -> Any:
    started = asyncio.Event()
    finish = asyncio.Event()

    async def worker() -> int:  # a task that exists before the test case: not its child
        await started.wait()
        await Writer.aio_create(name="from-another-task")
        count: int = await Writer.select().aio_count()
        finish.set()
        return count

    task = asyncio.create_task(worker())
    async with peewee_async.testing.TransactionTestCase(db):  # peewee-async's own, on both
        await Writer.aio_create(name="in-test")
        seen = [w.name for w in await Writer.select().aio_execute()]
        (standby,) = await db.aio_execute_sql("SELECT pg_is_in_recovery()", fetch_results=fetchone)
        started.set()
        await finish.wait()
        other = await task
        inside = await Writer.select().aio_count()
    after = await Writer.select().aio_count()
    return seen, standby, other, inside, after


async def test_transaction_test_case(topo: LocalTopology, driver: str) -> None:
    run = await same(topo, driver, transaction_test_case)
    assert run.plain == (["in-test"], False, 2, 2, 0)


async def test_transaction_test_case_rolls_back_on_the_servers(
    topo: LocalTopology, driver: str
) -> None:
    """Manager API too; nothing reaches the primary; transactions inside are savepoints."""
    token = reset_tables(topo)
    mgr = make_manager(topo, driver=driver)
    async with mgr.session(token):
        db = mgr.database
        with db.bind_ctx(MODELS):
            async with TransactionTestCase(db) as case:
                assert mgr.is_open  # connected lazily
                await mgr.create(Writer, name="via-manager")
                async with db.aio_transaction():  # a savepoint of the test transaction
                    await Writer.aio_create(name="in-transaction")
                    nested = await attempt(_enter(db.aio_transaction()))
                with pytest.raises(Boom):
                    await _fail_in(mgr.transaction(), Writer.aio_create(name="undone"))
                async with db.aio_connection():
                    tr = await db.aio_begin()
                    assert tr.is_savepoint  # the test's transaction stays open
                    await Writer.aio_create(name="manual")
                    await tr.commit()
                row = await mgr.get(Writer.select(peewee.fn.inet_server_port().alias("port")))
                assert row.port == topo.port("primary")
                names = {w.name for w in await Writer.select().aio_execute()}
                assert names == {"via-manager", "in-transaction", "manual"}
                assert nested == Raised(peewee.OperationalError, "Transaction already opened")
                # Uncommitted: the primary's other sessions see nothing.
                assert sql_on(topo, "primary", "SELECT count(*) FROM parity_writer") == [(0,)]
                assert "active" in repr(case)
            assert sql_on(topo, "primary", "SELECT count(*) FROM parity_writer") == [(0,)]
            await Writer.aio_create(name="after")  # back to normal routing and commits
    assert sql_on(topo, "primary", "SELECT name FROM parity_writer") == [("after",)]
    await mgr.close()


async def peewee_async_test_case_forbids_transactions(db: Any) -> Any:
    async with peewee_async.testing.TransactionTestCase(db):
        await Writer.aio_create(name="in-test")
        refused = []
        for opener in (db.aio_atomic, db.aio_transaction):
            refused.append(await attempt(_enter(opener())))
        async with db.aio_connection():
            refused.append(await attempt(db.aio_begin()))
            refused.append(await attempt(db.aio_savepoint()))
        inside = [w.name for w in await Writer.select().aio_execute()]
    async with db.aio_atomic():  # allowed again
        await Writer.aio_create(name="after")
    return refused, inside, [w.name for w in await Writer.select().aio_execute()]


async def test_peewee_async_test_case_forbids_transactions(
    topo: LocalTopology, driver: str
) -> None:
    run = await same(topo, driver, peewee_async_test_case_forbids_transactions)
    atomic = Raised(ValueError, "Using 'aio_atomic' and 'aio_transcation' is disabled.")
    begin = Raised(ValueError, "Using 'aio_begin' and 'aio_savepoint' is disabled.")
    assert run.plain == ([atomic, atomic, begin, begin], ["in-test"], ["after"])


async def test_peewee_async_test_case_on_the_servers(topo: LocalTopology, driver: str) -> None:
    """peewee-async's own test case on mgr.database: one primary transaction that every
    query of the manager joins (its own API too, and mgr.atomic() as a savepoint), rolled
    back at the end; nothing reaches the primary's other sessions."""
    token = reset_tables(topo)
    mgr = make_manager(topo, driver=driver)
    async with mgr.session(token):
        db = mgr.database
        with db.bind_ctx(MODELS):
            async with peewee_async.testing.TransactionTestCase(db):
                assert mgr.is_open  # connected lazily
                assert db.pool_backend.has_acquired_connections()
                await mgr.create(Writer, name="via-manager")
                await Writer.aio_create(name="via-model")
                with pytest.raises(Boom):
                    await _fail_in(mgr.atomic(), Writer.aio_create(name="undone"))
                port = peewee.fn.inet_server_port().alias("port")
                row = await mgr.get(Writer.select(port))
                assert row.port == topo.port("primary")
                names = {w.name for w in await Writer.select().aio_execute()}
                assert names == {"via-manager", "via-model"}
                assert sql_on(topo, "primary", "SELECT count(*) FROM parity_writer") == [(0,)]
            assert not db.pool_backend.has_acquired_connections()
            assert sql_on(topo, "primary", "SELECT count(*) FROM parity_writer") == [(0,)]
            await Writer.aio_create(name="after")  # back to normal routing and commits
    assert sql_on(topo, "primary", "SELECT name FROM parity_writer") == [("after",)]
    await mgr.close()


async def test_transaction_fixture(
    areplica_transaction: ReplicaManager, topo: LocalTopology
) -> None:
    mgr = areplica_transaction
    reset_tables(topo)
    with mgr.database.bind_ctx(MODELS):
        await Writer.aio_create(name="fixture")
        assert await Writer.select().aio_count() == 1
    assert sql_on(topo, "primary", "SELECT count(*) FROM parity_writer") == [(0,)]


# ---------------------------------------------------------------------- the AioModel API


async def create(db: Any) -> Any:
    a = await Writer.aio_create(name="a", karma=2)
    b = await Writer.aio_create(name="b")
    dup = await attempt(Writer.aio_create(name="a"), message=False)
    return a, b, dup, await Writer.select().order_by(Writer.id).aio_execute()


async def test_aio_create(topo: LocalTopology, driver: str) -> None:
    run = await same(topo, driver, create)
    assert run.plain[2] == Raised(peewee.IntegrityError, None)


async def get(db: Any) -> Any:
    a = await Writer.aio_create(name="a", karma=4)
    return (
        await Writer.aio_get(a.id),
        await Writer.aio_get(Writer.name == "a"),
        await Writer.aio_get(name="a", karma=4),
        await Writer.select().where(Writer.karma > 3).aio_get(),
        await attempt(Writer.aio_get(name="nobody")),
    )


async def test_aio_get(topo: LocalTopology, driver: str) -> None:
    run = await same(topo, driver, get)
    assert run.replica_reads > 0
    assert run.plain[4].type is Writer.DoesNotExist


async def get_or_none(db: Any) -> Any:
    await Writer.aio_create(name="a")
    return await Writer.aio_get_or_none(name="a"), await Writer.aio_get_or_none(name="zz")


async def test_aio_get_or_none(topo: LocalTopology, driver: str) -> None:
    run = await same(topo, driver, get_or_none)
    assert run.plain[1] is None


async def select_forms(db: Any) -> Any:
    for i in range(4):
        await Writer.aio_create(name=f"w{i}", karma=i)
    q = Writer.select().order_by(Writer.karma.desc())
    return (
        await q.aio_execute(),
        await q.tuples().aio_execute(),
        await q.dicts().aio_execute(),
        await Writer.select(Writer.name)
        .where(Writer.karma >= 2)
        .order_by(Writer.name)
        .aio_execute(),
        await q.aio_peek(),
        await q.aio_first(n=2),
        await (Writer.select().where(Writer.karma < 1) | Writer.select().where(Writer.karma > 2))
        .order_by(Writer.id)
        .aio_execute(),
        await Writer.raw("SELECT * FROM parity_writer WHERE karma = %s", 1).aio_execute(),
        await attempt(
            Writer.raw("UPDATE parity_writer SET karma = 9").aio_execute(), message=False
        ),
        await db.aio_execute(peewee.Select([Writer._meta.table], [peewee.SQL("1")])),
        await db.aio_execute_sql(
            "SELECT name FROM parity_writer ORDER BY id", fetch_results=fetchall
        ),
    )


async def test_select_aio_execute(topo: LocalTopology, driver: str) -> None:
    run = await same(topo, driver, select_forms)
    assert run.replica_reads > 0  # the reads really were routed to replicas
    assert run.plain[8] == Raised(peewee.ProgrammingError, None)  # no rows to fetch
    assert run.plain[9] is None  # a plain peewee query has no fetch_results


async def test_write_whose_fetch_failed_is_still_read_back(
    topo: LocalTopology, driver: str
) -> None:
    """peewee-async: the raw UPDATE is committed though its fetch raised; a read sees it."""
    token = reset_tables(topo)
    mgr = make_manager(topo, driver=driver)
    async with mgr.session(token):
        with mgr.database.bind_ctx(MODELS):
            for i in range(4):
                await Writer.aio_create(name=f"w{i}")
            # Both replicas past the inserts, and the manager knows it: they are eligible.
            await asyncio.to_thread(topo.wait_replicated)
            await mgr.check()
            with pytest.raises(peewee.ProgrammingError):  # no rows to fetch
                await Writer.raw("UPDATE parity_writer SET karma = 9").aio_execute()
            # Round robin: two of these four reads go to the replica 200 ms behind.
            seen = [await Writer.select(Writer.karma).tuples().aio_execute() for _ in range(4)]
    await mgr.close()
    assert seen == [[(9,)] * 4] * 4


async def update(db: Any) -> Any:
    for name in ("a", "b", "c"):
        await Writer.aio_create(name=name)
    changed = await Writer.update(karma=Writer.karma + 5).where(Writer.name != "b").aio_execute()
    returned = (
        await Writer.update(karma=1).where(Writer.name == "b").returning(Writer.name).aio_execute()
    )
    return changed, returned, await Writer.select().order_by(Writer.id).tuples().aio_execute()


async def test_update(topo: LocalTopology, driver: str) -> None:
    run = await same(topo, driver, update)
    assert run.plain[0] == 2


async def delete(db: Any) -> Any:
    for name in ("a", "b", "c"):
        await Writer.aio_create(name=name)
    gone = await Writer.delete().where(Writer.name << ["a", "c"]).aio_execute()
    none = await Writer.delete().where(Writer.name == "zz").aio_execute()
    return gone, none, await Writer.select().tuples().aio_execute()


async def test_delete(topo: LocalTopology, driver: str) -> None:
    run = await same(topo, driver, delete)
    assert run.plain[:2] == (2, 0)


async def insert_many(db: Any) -> Any:
    rows = [{"name": f"m{i}", "karma": i} for i in range(3)]
    ids = await Writer.insert_many(rows).aio_execute()
    tuples = await Writer.insert_many(
        [("t1", 7), ("t2", 8)], fields=[Writer.name, Writer.karma]
    ).aio_execute()
    counted = await Writer.insert_many([{"name": "r"}]).as_rowcount().aio_execute()
    one = await Writer.insert(name="single").aio_execute()
    from_query = await Note.insert_from(
        Writer.select(Writer.id, Writer.name).where(Writer.karma >= 7), [Note.writer, Note.title]
    ).aio_execute()
    return (
        ids,
        tuples,
        counted,
        one,
        from_query,
        await Writer.select().order_by(Writer.id).tuples().aio_execute(),
    )


async def test_insert_many(topo: LocalTopology, driver: str) -> None:
    await same(topo, driver, insert_many)


async def _authors_with_notes() -> None:
    a = await Writer.aio_create(name="a")
    b = await Writer.aio_create(name="b")
    await Writer.aio_create(name="c")
    for title, writer in (("a1", a), ("a2", a), ("b1", b)):
        await Note.aio_create(writer=writer, title=title)


async def prefetch(db: Any) -> Any:
    await _authors_with_notes()
    writers = (
        await Writer.select().order_by(Writer.id).aio_prefetch(Note.select().order_by(Note.id))
    )
    again = await peewee_async.aio_prefetch(Note.select().order_by(Note.id), Writer.select())
    return [(w.name, [n.title for n in w.notes]) for w in writers], [
        (n.title, n.writer.name) for n in again
    ]


async def test_prefetch(topo: LocalTopology, driver: str) -> None:
    run = await same(topo, driver, prefetch)
    assert run.replica_reads > 0
    assert run.plain[0] == [("a", ["a1", "a2"]), ("b", ["b1"]), ("c", [])]


async def aggregates(db: Any) -> Any:
    await _authors_with_notes()
    q = Writer.select()
    return (
        await q.aio_count(),
        await q.limit(1).aio_count(),
        await q.limit(1).aio_count(clear_limit=True),
        await Note.select(Note.writer).distinct().aio_count(),
        await Writer.select(peewee.fn.MAX(Writer.id)).aio_scalar(),
        await Writer.select(peewee.fn.MIN(Writer.id), peewee.fn.MAX(Writer.id)).aio_scalar(
            as_tuple=True
        ),
        await Writer.select(Writer.name).where(Writer.name == "b").aio_scalar(as_dict=True),
        await Writer.select().where(Writer.name == "zz").aio_scalar(),
        await q.aio_exists(),
        await q.where(Writer.name == "zz").aio_exists(),
        await Writer.aio_table_exists(),
    )


async def test_count_scalar_exists(topo: LocalTopology, driver: str) -> None:
    run = await same(topo, driver, aggregates)
    assert run.plain[:4] == (3, 1, 3, 2)


async def related(db: Any) -> Any:
    await _authors_with_notes()
    note = await Note.aio_get(title="b1")
    unloaded = await attempt(sync(lambda: note.writer), message=False)
    writer = await note.aio_fetch("writer")
    cached = await note.aio_fetch(Note.writer)
    not_fk = await attempt(note.aio_fetch("title"))
    joined = await Note.select(Note, Writer).join(Writer).where(Note.title == "a2").aio_get()
    return writer.name, cached is writer, note.writer.name, unloaded, not_fk, joined.writer.name


async def test_related_object_fetch(topo: LocalTopology, driver: str) -> None:
    run = await same(topo, driver, related)
    assert run.plain[:3] == ("b", True, "b")
    assert run.plain[3] == Raised(AssertionError, None)  # a sync lazy load is refused


async def table_lifecycle(db: Any) -> Any:
    await db.aio_create_tables([Note, Writer, Ticket, Audited])  # sorted by dependency
    await Ticket.aio_create_table()  # safe: a second time is fine
    facts = [
        await Writer.aio_table_exists(),
        await Ticket.aio_table_exists(),
        await db.aio_table_exists("parity_note"),
        await db.aio_sequence_exists("parity_ticket_seq"),
        [t for t in await db.aio_get_tables() if t.startswith("parity_")],
        [
            tuple(r)
            for r in await db.aio_execute_sql(
                "SELECT indexname FROM pg_indexes WHERE tablename LIKE 'parity_%%' ORDER BY 1",
                fetch_results=fetchall,
            )
        ],
    ]
    await Ticket.aio_create(label="x")
    await Ticket.aio_create(label="y")
    facts.append(await Ticket.select(Ticket.number).order_by(Ticket.id).tuples().aio_execute())
    await Ticket.aio_truncate_table(restart_identity=True)
    facts.append(await Ticket.select().aio_count())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # peewee-async 2.1 never awaits its DROP SEQUENCE (a RuntimeWarning): same on both.
        await Ticket.aio_drop_table()
        import gc

        gc.collect()
    facts.append(sorted({w.category.__name__ for w in caught}))
    facts.append(await Ticket.aio_table_exists())
    facts.append(await db.aio_sequence_exists("parity_ticket_seq"))
    await db.aio_drop_tables([Writer, Note, Audited])
    facts.append([t for t in await db.aio_get_tables() if t.startswith("parity_")])
    return facts


async def test_table_creation_and_drop(topo: LocalTopology, driver: str) -> None:
    run = await same(topo, driver, table_lifecycle, create=False)
    assert run.plain[3] is True and run.plain[6] == [(1,), (2,)]
    assert run.plain[8] == ["RuntimeWarning"] and run.plain[10] is True  # the sequence stays


_events: list[tuple[str, str, Any]] = []


async def signals(db: Any) -> Any:
    _events.clear()
    signal = peewee_async.signals

    async def pre_save(sender: Any, instance: Any, created: bool) -> None:
        _events.append(("pre_save", instance.name, created))

    async def post_save(sender: Any, instance: Any, created: bool) -> None:
        seen = await Audited.select().where(Audited.name == instance.name).aio_exists()
        _events.append(("post_save", instance.name, (created, seen)))

    async def pre_delete(sender: Any, instance: Any) -> None:
        _events.append(("pre_delete", instance.name, None))

    async def post_delete(sender: Any, instance: Any) -> None:
        _events.append(("post_delete", instance.name, await Audited.select().aio_count()))

    def on_init(sender: Any, instance: Any) -> None:
        _events.append(("pre_init", type(instance).__name__, None))

    pairs = [
        (signal.aio_pre_save, pre_save),
        (signal.aio_post_save, post_save),
        (signal.aio_pre_delete, pre_delete),
        (signal.aio_post_delete, post_delete),
        (signal.pre_init, on_init),
    ]
    for sig, receiver in pairs:
        sig.connect(receiver, sender=Audited)
    try:
        item = await Audited.aio_create(name="x")
        item.name = "y"
        await item.aio_save()
        await item.aio_delete_instance()
    finally:
        for sig, receiver in pairs:
            sig.disconnect(receiver, sender=Audited)
    return list(_events)


async def test_signals(topo: LocalTopology, driver: str) -> None:
    run = await same(topo, driver, signals)
    assert ("post_save", "x", (True, True)) in run.plain


async def get_or_create(db: Any) -> Any:
    first = await Writer.aio_get_or_create(name="a", defaults={"karma": 9})
    second = await Writer.aio_get_or_create(name="a", defaults={"karma": 1})
    third = await Writer.aio_get_or_create(name="b")
    return first, second, third, await Writer.select().order_by(Writer.id).tuples().aio_execute()


async def test_aio_get_or_create(topo: LocalTopology, driver: str) -> None:
    run = await same(topo, driver, get_or_create)
    assert [created for _, created in run.plain[:3]] == [True, False, True]


async def save(db: Any) -> Any:
    w = Writer(name="new")
    inserted = await w.aio_save()
    w.karma = 5
    updated = await w.aio_save()
    only = await w.aio_save(only=[Writer.karma])
    forced = await attempt(Writer(id=w.id, name="dup").aio_save(force_insert=True), message=False)
    fresh = await Writer.aio_get(Writer.id == w.id)
    return inserted, w.id, updated, only, forced, fresh, w.is_dirty()


async def test_aio_save(topo: LocalTopology, driver: str) -> None:
    run = await same(topo, driver, save)
    assert run.plain[:4] == (1, 1, 1, 1)


async def delete_instance(db: Any) -> Any:
    await _authors_with_notes()
    a = await Writer.aio_get(name="a")
    c = await Writer.aio_get(name="c")
    plain_delete = await c.aio_delete_instance()
    recursive = await a.aio_delete_instance(recursive=True)
    return (
        plain_delete,
        recursive,
        await Writer.select().order_by(Writer.id).tuples().aio_execute(),
        await Note.select().order_by(Note.id).tuples().aio_execute(),
    )


async def test_aio_delete_instance(topo: LocalTopology, driver: str) -> None:
    run = await same(topo, driver, delete_instance)
    assert run.plain[:2] == (1, 1)


async def atomic_blocks(db: Any) -> Any:
    async with db.aio_atomic():
        await Writer.aio_create(name="kept")
        async with db.aio_atomic():
            await Writer.aio_create(name="kept-too")
    failed = await attempt(_fail_in(db.aio_atomic(), Writer.aio_create(name="undone")))
    dup = await attempt(_in_transaction(db), message=False)
    return failed, dup, await Writer.select().order_by(Writer.id).tuples().aio_execute()


async def _in_transaction(db: Any) -> None:
    async with db.aio_transaction():
        await Writer.aio_create(name="lost")
        await Writer.aio_create(name="kept")  # IntegrityError: the whole transaction goes


async def test_aio_atomic(topo: LocalTopology, driver: str) -> None:
    run = await same(topo, driver, atomic_blocks)
    assert run.plain[1] == Raised(peewee.IntegrityError, None)


# ---------------------------------------------------------------------- the documented differences


async def test_write_in_replica_scope_is_refused(topo: LocalTopology, driver: str) -> None:
    """The one rule a replica forces: a write inside mgr.replica() raises, nothing is sent."""
    token = reset_tables(topo)
    mgr = make_manager(topo, driver=driver)
    async with mgr.session(token):
        with mgr.database.bind_ctx(MODELS):
            async with mgr.replica():
                with pytest.raises(ReadOnlyScopeError):
                    await Writer.aio_create(name="nope")
                with pytest.raises(ReadOnlyScopeError):
                    await Writer.update(karma=1).aio_execute()
                assert await Writer.select().aio_count() == 0  # reads are fine
    await mgr.close()
    assert sql_on(topo, "primary", "SELECT count(*) FROM parity_writer") == [(0,)]


async def test_atomic_inside_manual_transaction_is_a_savepoint(
    topo: LocalTopology, driver: str
) -> None:
    """peewee-async would send a second BEGIN (and commit the manual transaction early)."""
    token = reset_tables(topo)
    mgr = make_manager(topo, driver=driver)
    async with mgr.session(token):
        db = mgr.database
        with db.bind_ctx(MODELS):
            async with db.aio_connection():
                tr = await db.aio_begin()
                await Writer.aio_create(name="manual")
                async with db.aio_atomic():
                    await Writer.aio_create(name="inner")
                with pytest.raises(peewee.OperationalError, match="Transaction already opened"):
                    async with db.aio_transaction():
                        pass
                await tr.rollback()
            assert await Writer.select().aio_count() == 0
    await mgr.close()
