"""A read after a write checks its standby's replay position in its own round trip.

README, "Catching up": both drivers send a string of statements as one simple query (aiopg,
and psycopg's client-side binding cursor, which peewee-async uses), so a read whose
session's position no standby is known to have replayed goes at once to the standby the
policy picks, behind a check that fails when that standby has not replayed the position (or
its transactions are not READ COMMITTED). A refused read waits for the replay as any other
(``causal_wait``), then reads there or on the primary. Facts from the servers: the port that
served each read and whether it saw the write.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest

from areplica import ReplicaManager
from areplica.consistency import LSN_MASK, parse_token
from areplica.testing.topology import LocalTopology
from tests.conftest import DRIVERS, make_manager, sql_on, standbys_behind

pytestmark = pytest.mark.integration

READ = "SELECT (SELECT count(*) FROM guarded WHERE tag = %s), inet_server_port()"


@pytest.fixture
def table(topology: LocalTopology) -> Iterator[LocalTopology]:
    sql_on(topology, "primary", "CREATE TABLE IF NOT EXISTS guarded (tag text)")
    topology.wait_replicated()
    yield topology


@pytest.fixture
def delayed(table: LocalTopology) -> Iterator[LocalTopology]:
    with standbys_behind(table, 1500):
        yield table


async def write_then_read(mgr: ReplicaManager, sql: str = READ) -> tuple[int, int, float]:
    """One session's write and its read back: (rows seen, port, seconds the read took)."""
    tag = uuid.uuid4().hex
    async with mgr.session():
        await mgr.execute_sql("INSERT INTO guarded (tag) VALUES (%s)", [tag])
        began = time.monotonic()
        rows = await mgr.execute_sql(sql, [tag])
    assert rows is not None
    return int(rows[0][0]), int(rows[0][1]), time.monotonic() - began


async def standbys_have(topology: LocalTopology, lsn: int, timeout: float = 30.0) -> None:
    """Until both standbys report a replay position at or past ``lsn`` (their own answer)."""
    sql = "SELECT pg_last_wal_replay_lsn() - pg_lsn '0/0'"

    def replayed() -> bool:
        return all(
            int(sql_on(topology, name, sql)[0][0]) >= lsn for name in ("replica-1", "replica-2")
        )

    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(replayed):
        assert time.monotonic() < deadline, f"standbys did not replay {lsn:X} in {timeout}s"
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("driver", DRIVERS)
async def test_reads_after_writes_are_fresh_on_standbys(table: LocalTopology, driver: str) -> None:
    """Fifty sessions, each reading its write back at once: every read sees it, on a standby."""
    mgr = make_manager(table, driver=driver, causal_wait=2.0, health_interval=30.0)
    standbys = {table.port("replica-1"), table.port("replica-2")}
    async with mgr:
        results = await asyncio.gather(*(write_then_read(mgr) for _ in range(50)))
        polls, caught_up = mgr._engine.reads._watch.polls, mgr.caught_up_reads
        print(f"\n[{driver}] 50 concurrent: caught up {caught_up}, replay polls {polls}")
        # Twenty in turn, each read sent once both standbys have replayed the session's
        # position (asked of the servers, not of areplica, whose health rounds are 30 s
        # apart): each is checked in its own round trip, none waits for a replay poll. The
        # session's token, not the primary's write position (wait_replicated): the token is
        # the insert position read after the commit, which also covers a record another
        # process inserted meanwhile and had not written out yet (the background writer's
        # running-transactions record every 15 s, an autoanalyze): until a standby replays
        # that, its check rightly refuses (CI saw it once: 324 polls, the read still fresh).
        for _ in range(20):
            tag = uuid.uuid4().hex
            async with mgr.session():
                await mgr.execute_sql("INSERT INTO guarded (tag) VALUES (%s)", [tag])
                token = await mgr.settled_token()
                assert token is not None
                await standbys_have(table, parse_token(token) & LSN_MASK)
                rows = await mgr.execute_sql(READ, [tag])
            assert rows is not None
            results.append((int(rows[0][0]), int(rows[0][1]), 0.0))
        assert mgr._engine.reads._watch.polls - polls == 0
        assert mgr.caught_up_reads - caught_up == 20
    assert [seen for seen, _, _ in results] == [1] * 70
    assert {port for _, port, _ in results} <= standbys
    assert mgr.fallback_reads == 0


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_standby_behind_refuses_and_the_read_waits_or_falls_back(
    delayed: LocalTopology, driver: str
) -> None:
    """Standbys 1.5 s behind: the check refuses; the read waits for the replay, else goes on."""
    ports = {name: delayed.port(name) for name in delayed.nodes}
    impatient = make_manager(delayed, driver=driver, causal_wait=0.2)
    patient = make_manager(delayed, driver=driver, causal_wait=5.0)
    async with impatient, patient:
        seen, port, _ = await write_then_read(impatient)
        assert (seen, port) == (1, ports["primary"])  # refused, waited 0.2 s, then the primary
        assert impatient.fallback_reads == 1
        seen, port, took = await write_then_read(patient)
        assert seen == 1 and port in (ports["replica-1"], ports["replica-2"])
        assert took > 0.5, took  # it waited for the delayed replay, it did not read early
        assert patient.fallback_reads == 0


@pytest.mark.parametrize("driver", DRIVERS)
async def test_standbys_at_repeatable_read_are_waited_for_not_checked(
    table: LocalTopology, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Under REPEATABLE READ the check's snapshot would serve the read: it refuses, once.

    The standbys' connections run every transaction at REPEATABLE READ (a user's
    ``default_transaction_isolation``): the check refuses, the member is read after a wait
    from then on, and every read still sees its write.
    """
    caplog.set_level(logging.INFO, logger="areplica")
    option = quote("-c default_transaction_isolation=repeatable\\ read")
    replicas = {
        name: f"{table.dsn(name)}{'&' if '?' in table.dsn(name) else '?'}options={option}"
        for name in ("replica-1", "replica-2")
    }
    mgr = ReplicaManager(
        table.dsn("primary"), replicas, driver=driver, causal_wait=2.0, health_interval=0.2
    )
    standbys = {table.port("replica-1"), table.port("replica-2")}
    async with mgr:
        rows = await mgr.execute_sql(
            "SELECT current_setting('transaction_isolation')", on="replica-1"
        )
        assert rows == [("repeatable read",)]
        results = [await write_then_read(mgr) for _ in range(20)]
    assert [seen for seen, _, _ in results] == [1] * 20
    assert {port for _, port, _ in results} <= standbys
    assert "runs reads at repeatable read isolation" in caplog.text


@pytest.mark.parametrize("driver", DRIVERS)
async def test_the_check_leaves_the_read_s_own_text_alone(
    table: LocalTopology, driver: str
) -> None:
    """Semicolons, percent signs and quotes in the read and its parameters are the read's."""
    mgr = make_manager(table, driver=driver, causal_wait=2.0)
    hostile: list[Any] = ["x'; SELECT 1; --%s %%"]
    sql = (
        "SELECT (SELECT count(*) FROM guarded WHERE tag = %s), inet_server_port(), "
        "%s || ';' || '%%' || E'\\x3b'"
    )
    async with mgr:
        for _ in range(5):
            tag = uuid.uuid4().hex
            async with mgr.session():
                await mgr.execute_sql("INSERT INTO guarded (tag) VALUES (%s)", [tag])
                rows = await mgr.execute_sql(sql, [tag, *hostile])
            assert rows is not None
            assert rows[0][0] == 1 and rows[0][1] != table.port("primary")
            assert rows[0][2] == "x'; SELECT 1; --%s %%;%;"
