"""A write's WAL position in its own round trip (psycopg), and what that must not change.

README, "Which writes a read sees": a causal write records the primary's WAL position after
its commit. psycopg keeps every result of a query string, so one INSERT, UPDATE, DELETE,
MERGE or WITH statement is sent as ``BEGIN; <write>; COMMIT; SELECT
pg_current_wal_insert_lsn()``; aiopg (psycopg2 keeps only the last result) reads it after
the commit. Facts from the server: the write's own WAL position (``RETURNING
pg_current_wal_insert_lsn()`` inside it), the rows on the primary, its backend and its
transaction state.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import peewee
import pytest

from areplica import ReplicaManager
from areplica.consistency import parse_lsn, parse_token
from areplica.testing.topology import LocalTopology
from tests.conftest import DRIVERS, make_manager, sql_on

pytestmark = pytest.mark.integration

LOW_64 = (1 << 64) - 1


@pytest.fixture
def table(topology: LocalTopology) -> Iterator[LocalTopology]:
    sql_on(topology, "primary", "DROP TABLE IF EXISTS inband")
    sql_on(topology, "primary", "CREATE TABLE inband (id serial PRIMARY KEY, tag text UNIQUE)")
    topology.wait_replicated()
    yield topology


def on_primary(topology: LocalTopology, sql: str, *params: object) -> list[tuple[object, ...]]:
    return sql_on(topology, "primary", sql, params)


async def rowcount(_database: object, cursor: Any) -> int:
    """peewee-async's result handling of an UPDATE or a DELETE."""
    return int(cursor.rowcount)


def token_lsn(mgr: ReplicaManager) -> int:
    token = mgr.token
    assert token is not None
    return parse_token(token) & LOW_64


@pytest.mark.parametrize("driver", DRIVERS)
async def test_each_write_s_token_covers_it_and_its_results_are_its_own(
    table: LocalTopology, driver: str
) -> None:
    """INSERT ... RETURNING, UPDATE and DELETE: results as without areplica, tokens past them.

    psycopg: every position came back in the write's own round trip (none read apart);
    aiopg: one position read per write (nobody waits for the connection).
    """
    mgr = make_manager(table, driver=driver)
    async with mgr:
        before = mgr.timings()
        rows = await mgr.execute_sql(
            "INSERT INTO inband (tag) VALUES (%s), (%s) "
            "RETURNING id, tag, pg_current_wal_insert_lsn()::text",
            ["a", "b"],
        )
        assert rows is not None and [r[1] for r in rows] == ["a", "b"]
        assert token_lsn(mgr) > parse_lsn(str(rows[-1][2]))  # past the write's own record
        ids = [r[0] for r in rows]
        assert on_primary(table, "SELECT id, tag FROM inband ORDER BY id") == [
            (ids[0], "a"),
            (ids[1], "b"),
        ]
        lsn_after_insert = token_lsn(mgr)
        updated = await mgr.database.aio_execute_sql(
            "UPDATE inband SET tag = tag || '!' WHERE tag IN (%s, %s)", ("a", "zz"), rowcount
        )
        assert updated == 1
        assert token_lsn(mgr) > lsn_after_insert
        assert on_primary(table, "SELECT tag FROM inband ORDER BY id") == [("a!",), ("b",)]
        lsn_after_update = token_lsn(mgr)
        deleted = await mgr.database.aio_execute_sql(
            "DELETE FROM inband WHERE tag = %s", ("b",), rowcount
        )
        assert deleted == 1
        assert token_lsn(mgr) > lsn_after_update
        assert on_primary(table, "SELECT tag FROM inband") == [("a!",)]
        # The token is a position the primary has reached, not a guess past it.
        assert token_lsn(mgr) <= parse_lsn(
            str(on_primary(table, "SELECT pg_current_wal_insert_lsn()::text")[0][0])
        )
        spent = {k: v - before[k] for k, v in mgr.timings().items()}
    assert spent["writes"] == 3
    if driver == "psycopg":
        assert (spent["positions_in_band"], spent["position_reads"]) == (3, 0), spent
    else:
        assert (spent["positions_in_band"], spent["position_reads"]) == (0, 3), spent


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_failed_write_changes_nothing_and_its_connection_goes_on(
    table: LocalTopology, driver: str
) -> None:
    """A unique violation in the second of two rows: nothing inserted, the error is peewee's.

    One connection (pool_size=1): the same backend serves the next write, which commits, and
    no transaction is left open or aborted on the server.
    """
    mgr = make_manager(table, driver=driver, pool_size=1)
    async with mgr:
        first = await mgr.execute_sql(
            "INSERT INTO inband (tag) VALUES (%s) RETURNING pg_backend_pid()", ["taken"]
        )
        assert first is not None
        for _ in range(3):
            with pytest.raises(peewee.IntegrityError, match="inband_tag_key"):
                await mgr.execute_sql(
                    "INSERT INTO inband (tag) VALUES (%s), (%s)", ["fresh", "taken"]
                )
        assert on_primary(table, "SELECT tag FROM inband ORDER BY id") == [("taken",)]
        after = await mgr.execute_sql(
            "INSERT INTO inband (tag) VALUES (%s) RETURNING pg_backend_pid()", ["next"]
        )
        assert after is not None and after[0][0] == first[0][0]  # the same connection
        states = on_primary(
            table, "SELECT state FROM pg_stat_activity WHERE pid = %s", int(str(first[0][0]))
        )
        assert states == [("idle",)]
        assert on_primary(table, "SELECT tag FROM inband ORDER BY id") == [("taken",), ("next",)]
        # A violation found at COMMIT (a deferred constraint): the block ended with it.
        on_primary(
            table,
            "CREATE TABLE IF NOT EXISTS inband_deferred "
            "(tag text UNIQUE DEFERRABLE INITIALLY DEFERRED)",
        )
        on_primary(table, "TRUNCATE inband_deferred")
        with pytest.raises(peewee.IntegrityError, match="inband_deferred_tag_key"):
            await mgr.execute_sql(
                "INSERT INTO inband_deferred (tag) VALUES (%s), (%s)", ["same", "same"]
            )
        last = await mgr.execute_sql(
            "INSERT INTO inband_deferred (tag) VALUES (%s) RETURNING pg_backend_pid()", ["one"]
        )
        assert last is not None and last[0][0] == first[0][0]
        assert on_primary(table, "SELECT tag FROM inband_deferred") == [("one",)]


@pytest.mark.parametrize("driver", DRIVERS)
async def test_writes_that_cannot_run_in_a_block_run_as_sent(
    table: LocalTopology, driver: str
) -> None:
    """DDL that refuses a transaction block, a procedure that commits, two statements at once.

    Each would fail (or change meaning) inside ``BEGIN ... COMMIT``: they are sent as they
    are, and their positions read after them; the reads that follow see their effects.
    """
    mgr = make_manager(table, driver=driver, causal_wait=2.0)
    async with mgr:
        await mgr.execute_sql("CREATE INDEX CONCURRENTLY IF NOT EXISTS inband_id ON inband (id)")
        await mgr.execute_sql(
            "CREATE OR REPLACE PROCEDURE inband_twice(t text) LANGUAGE plpgsql AS $$ "
            "BEGIN INSERT INTO inband (tag) VALUES (t || '-1'); COMMIT; "
            "INSERT INTO inband (tag) VALUES (t || '-2'); COMMIT; END $$"
        )
        await mgr.execute_sql("CALL inband_twice(%s)", ["proc"])
        await mgr.execute_sql(
            "INSERT INTO inband (tag) VALUES ('two-1'); INSERT INTO inband (tag) VALUES ('two-2')"
        )
        rows = await mgr.execute_sql(
            "SELECT array_agg(tag ORDER BY tag), inet_server_port(), "
            "(SELECT count(*) FROM pg_indexes WHERE indexname = 'inband_id') FROM inband"
        )
    assert rows is not None
    assert rows[0][0] == ["proc-1", "proc-2", "two-1", "two-2"]
    assert rows[0][1] != table.port("primary") and rows[0][2] == 1


@pytest.mark.parametrize("driver", DRIVERS)
async def test_hostile_values_and_text_are_written_as_given(
    table: LocalTopology, driver: str
) -> None:
    """Semicolons, COMMIT, quotes, percent signs in values and in the write's own text."""
    values = ["x'); COMMIT; SELECT 1; --", "%s %% %(a)s", "$$; ROLLBACK; $$", "E'\\x3b'"]
    mgr = make_manager(table, driver=driver)
    async with mgr:
        for value in values:
            await mgr.execute_sql(
                "INSERT INTO inband (tag) VALUES (%s || '; -- %%' || E'\\x3b')", [value]
            )
    stored = [r[0] for r in on_primary(table, "SELECT tag FROM inband ORDER BY id")]
    assert stored == [f"{v}; -- %;" for v in values]
