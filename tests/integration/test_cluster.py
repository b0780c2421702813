"""The cluster model on real servers: discovered roles, identity, honest freshness."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest
from psycopg2.extensions import make_dsn, parse_dsn

from areplica import ReplicaManager
from areplica.testing.topology import LocalTopology
from tests.conftest import sql_on

pytestmark = pytest.mark.integration

FAST = {"health_interval": 0.2, "health_timeout": 1.0}


@pytest.fixture(scope="module")
def foreign() -> Iterator[LocalTopology]:
    """Another cluster (its own system identifier), with one standby."""
    with LocalTopology(replicas=1) as other:
        yield other


async def test_members_list_discovers_roles(topology: LocalTopology, driver: str) -> None:
    """Every server listed once, in any order: roles come from the servers."""
    members = [topology.dsn(n) for n in ("replica-2", "primary", "replica-1")]
    async with ReplicaManager(members=members, driver=driver, **FAST) as mgr:
        roles = {s.name: s.role for s in mgr.status()}
        assert roles == {"member-1": "replica", "member-2": "primary", "member-3": "replica"}
        rows = await mgr.execute_sql("SELECT pg_is_in_recovery(), inet_server_port()")
        assert rows is not None and rows[0][0] is True
        assert rows[0][1] in (topology.port("replica-1"), topology.port("replica-2"))
        written = await mgr.execute_sql("SELECT pg_is_in_recovery()", on="primary")
        assert written == [(False,)]


async def test_leader_listed_among_replicas_just_works(
    topology: LocalTopology, driver: str
) -> None:
    """The old configuration error: the primary given in replicas= is simply the primary."""
    mgr = ReplicaManager(
        topology.dsn("replica-1"),
        {"a": topology.dsn("primary"), "b": topology.dsn("replica-2")},
        driver=driver,
        **FAST,
    )
    async with mgr:
        assert {s.name: s.role for s in mgr.status()} == {
            "primary": "replica",
            "a": "primary",
            "b": "replica",
        }
        rows = await mgr.execute_sql("SELECT inet_server_port()", on="primary")
        assert rows == [(topology.port("primary"),)]


async def test_multi_host_dsn_is_one_member_per_server(topology: LocalTopology) -> None:
    base = dict(parse_dsn(topology.dsn("primary")))
    hosts = ",".join("127.0.0.1" for _ in topology.nodes)
    ports = ",".join(str(topology.port(n)) for n in ("replica-1", "primary", "replica-2"))
    dsn = make_dsn(**{**base, "host": hosts, "port": ports})
    async with ReplicaManager(members=[dsn], **FAST) as mgr:
        statuses = mgr.status()
        assert len(statuses) == 3
        primary = [s for s in statuses if s.role == "primary"]
        assert [s.name for s in primary] == [f"127.0.0.1:{topology.port('primary')}"]


async def test_foreign_standby_is_refused(
    topology: LocalTopology, foreign: LocalTopology, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A standby of another cluster never serves a read, even right after our own write."""
    caplog.set_level(logging.ERROR, logger="areplica")
    mgr = ReplicaManager(
        topology.dsn("primary"),
        {"ours": topology.dsn("replica-1"), "theirs": foreign.dsn("replica-1")},
        driver=driver,
        **FAST,
    )
    ours = topology.port("replica-1")
    async with mgr:
        assert {s.name: s.state for s in mgr.status()}["theirs"] == "down"
        assert "another cluster" in caplog.text
        ports = []
        for _ in range(40):
            rows = await mgr.execute_sql("SELECT inet_server_port()")
            assert rows is not None
            ports.append(rows[0][0])
        for i in range(10):
            await mgr.execute_sql("SELECT pg_current_wal_insert_lsn()", on="primary")
            await mgr.execute_sql("CREATE TEMP TABLE IF NOT EXISTS x (i int)", on="primary")
            rows = await mgr.execute_sql("SELECT inet_server_port()")
            assert rows is not None
            ports.append(rows[0][0])
            del i
        assert foreign.port("replica-1") not in ports
        assert set(ports) <= {ours, topology.port("primary")}
        await asyncio.sleep(0.6)  # rounds later it is still refused
        assert {s.name: s.state for s in mgr.status()}["theirs"] == "down"


async def test_standby_behind_at_startup_is_lagging_at_once(
    topology: LocalTopology, driver: str
) -> None:
    """Lag in seconds is known from the first probe, not counted from the connection."""
    topology.set_apply_delay("replica-2", 60_000)
    try:
        sql_on(topology, "primary", "CREATE TABLE IF NOT EXISTS behind (i int)")
        sql_on(topology, "primary", "INSERT INTO behind VALUES (1)")
        await asyncio.sleep(6.0)  # the standby's last replayed commit is now >= 6 s old
        sql_on(topology, "primary", "INSERT INTO behind VALUES (2)")
        mgr = ReplicaManager(
            topology.dsn("primary"),
            {"r1": topology.dsn("replica-1"), "r2": topology.dsn("replica-2")},
            driver=driver,
            max_lag=5.0,
            **FAST,
        )
        async with mgr:
            first = {s.name: s for s in mgr.status()}
            assert first["r2"].state == "lagging", first["r2"]
            assert first["r2"].lag_seconds is not None and first["r2"].lag_seconds > 5
            ports = set()
            for _ in range(30):
                rows = await mgr.execute_sql("SELECT inet_server_port()", max_staleness=5)
                assert rows is not None
                ports.add(rows[0][0])
            assert topology.port("replica-2") not in ports
    finally:
        topology.set_apply_delay("replica-2", 0)
        await asyncio.to_thread(topology.wait_replicated)
        sql_on(topology, "primary", "DROP TABLE IF EXISTS behind")
