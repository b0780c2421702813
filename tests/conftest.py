"""Shared fixtures: models, a real topology (from the areplica pytest plugin) and managers."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import peewee
import peewee_async
import pytest

from areplica import ReplicaManager
from areplica.testing._support import run_sql
from areplica.testing.topology import LocalTopology

DRIVERS = ("aiopg", "psycopg")

proxy = peewee.DatabaseProxy()


class BaseModel(peewee_async.AioModel):
    class Meta:
        database = proxy


class Author(BaseModel):
    name = peewee.CharField(unique=True)
    karma = peewee.IntegerField(default=0)


class Post(BaseModel):
    author = peewee.ForeignKeyField(Author, backref="posts", on_delete="CASCADE")
    title = peewee.CharField()


class Counter(BaseModel):
    """A plain peewee model (not AioModel): the manager must handle it too."""

    label = peewee.CharField()


class PlainCounter(peewee.Model):
    label = peewee.CharField()

    class Meta:
        database = proxy
        table_name = "counter"


MODELS = [Author, Post, Counter]


def sql_on(topology: LocalTopology, node: str, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
    """Run SQL straight on one node (not through areplica): the server's own answer."""
    return run_sql(topology.direct_dsn(node), sql, params)


def client_backends(topology: LocalTopology, node: str) -> int:
    """Client connections on a node, not counting the one asking."""
    rows = sql_on(
        topology,
        node,
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
    )
    return int(rows[0][0])


async def wait_for(predicate: Any, timeout: float = 15.0, interval: float = 0.05) -> None:
    """Poll ``predicate`` (sync or async) until true; fail after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        await asyncio.sleep(interval)


@pytest.fixture(scope="session")
def topology(areplica_topology: LocalTopology) -> LocalTopology:
    return areplica_topology


@pytest.fixture(scope="session")
def ports(topology: LocalTopology) -> dict[str, int]:
    return {name: topology.port(name) for name in topology.nodes}


@pytest.fixture(scope="session")
def schema(topology: LocalTopology) -> Iterator[None]:
    """The test tables, created once on the primary through plain SQL."""
    db = peewee.PostgresqlDatabase(None)
    for model in MODELS:
        model._meta.database = db  # compile DDL without a manager
    proxy.initialize(db)
    ddl: list[str] = []
    for model in MODELS:
        ddl.append(model._schema._create_table(safe=True).query()[0])
        ddl.extend(ix.query()[0] for ix in model._schema._create_indexes(safe=True))
    for model in MODELS:
        model._meta.database = proxy
    for statement in ddl:
        sql_on(topology, "primary", statement)
    sql_on(topology, "primary", "CREATE SEQUENCE IF NOT EXISTS test_seq")
    topology.wait_replicated()
    yield


def make_manager(topology: LocalTopology, **options: Any) -> ReplicaManager:
    options.setdefault("health_interval", 0.2)
    options.setdefault("health_timeout", 1.0)
    replicas = {name: topology.dsn(name) for name in topology.nodes if name != "primary"}
    return ReplicaManager(topology.dsn("primary"), replicas, **options)


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def mgr(topology: LocalTopology, schema: None, driver: str) -> AsyncIterator[ReplicaManager]:
    """A connected manager, models bound to its routing database, tables emptied."""
    sql_on(topology, "primary", "TRUNCATE author, post, counter RESTART IDENTITY CASCADE")
    topology.wait_replicated()
    manager = make_manager(topology, driver=driver)
    async with manager:
        proxy.initialize(manager.database)
        yield manager


async def caught_up(mgr: ReplicaManager, topology: LocalTopology) -> None:
    """Wait until the replicas replayed everything and the manager has seen it."""
    await asyncio.to_thread(topology.wait_replicated)
    await mgr.check()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("AREPLICA_SKIP_INTEGRATION"):
        skip = pytest.mark.skip(reason="AREPLICA_SKIP_INTEGRATION is set")
        for item in items:
            if "integration" in item.keywords or "faults" in item.keywords:
                item.add_marker(skip)


@contextlib.contextmanager
def standbys_behind(topo: LocalTopology, delay_ms: int) -> Iterator[None]:
    """Both standbys replay commits ``delay_ms`` late for the block, then on time again."""
    for standby in ("replica-1", "replica-2"):
        topo.set_apply_delay(standby, delay_ms)
    try:
        yield
    finally:
        for standby in ("replica-1", "replica-2"):
            topo.set_apply_delay(standby, 0)
