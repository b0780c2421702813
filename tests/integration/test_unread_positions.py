"""Writes under contention return at their commit; their position is read when needed, shared.

README, "Consistency modes", "Which writes a read sees" and "Tokens": a causal write that
finds callers waiting for a connection to the primary does not read its WAL position. Its
session notes the position as unread; the session's next read (or ``settled_token()``)
settles it with one read of the primary's position, shared by every write before it, and a
write nobody reads after costs none.
These tests check what users rely on, against the servers: the session's next read, the
settled token (``settled_token()``) and the "unknown" token (``token`` before the answer)
all lead to a read that sees the write, on standbys 1.5 s behind it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from areplica import ReplicaManager
from areplica.consistency import format_lsn, parse_lsn, parse_token
from areplica.testing.topology import LocalTopology
from tests.conftest import DRIVERS, make_manager, sql_on, standbys_behind

pytestmark = pytest.mark.integration

UNKNOWN_TOKEN = "FFFFFFFF/FFFFFFFF/FFFFFFFF"


@pytest.fixture
def delayed(topology: LocalTopology) -> Iterator[LocalTopology]:
    sql_on(topology, "primary", "CREATE TABLE IF NOT EXISTS unread (tag text)")
    sql_on(topology, "primary", "TRUNCATE unread")  # tags repeat when a test is repeated
    topology.wait_replicated()
    with standbys_behind(topology, 1500):
        yield topology


def manager(topology: LocalTopology, driver: str, **options: Any) -> ReplicaManager:
    return make_manager(topology, driver=driver, causal_wait=0.2, **options)


async def count_on_server(mgr: ReplicaManager, tag: str) -> tuple[int, int]:
    rows = await mgr.execute_sql(
        "SELECT (SELECT count(*) FROM unread WHERE tag = %s), inet_server_port()", [tag]
    )
    assert rows is not None
    return int(rows[0][0]), int(rows[0][1])


@pytest.mark.parametrize("driver", DRIVERS)
async def test_writes_under_contention_return_before_their_position_is_read(
    delayed: LocalTopology, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    """One connection, six concurrent writers: a write others wait for returns unsettled.

    (Both drivers: psycopg carries the position in band only when nobody waits.)

    Its token is the "unknown" one until the shared read answers; ``settled_token()`` is a
    position past the write's own WAL record (``RETURNING pg_current_wal_insert_lsn()``
    inside the write, from the server). The write's next read, a session resumed from either
    token, and the settled one all see the row although both standbys are 1.5 s behind.
    """
    caplog.set_level(logging.WARNING, logger="areplica")
    mgr = manager(delayed, driver, pool_size=1)
    async with mgr:
        await mgr.check()

        async def writer(i: int) -> tuple[str, str | None, str | None, int, tuple[int, int]]:
            tag = f"{driver}-{i}"
            rows = await mgr.execute_sql(
                "INSERT INTO unread (tag) VALUES (%s) RETURNING pg_current_wal_insert_lsn()::text",
                [tag],
            )
            assert rows is not None
            now = mgr.token  # before any await: the shared read cannot have answered
            settled = await mgr.settled_token()
            return tag, now, settled, parse_lsn(rows[0][0]), await count_on_server(mgr, tag)

        before = mgr.timings()
        results = await asyncio.gather(*(asyncio.create_task(writer(i)) for i in range(6)))
        spent = mgr.timings()
        assert spent["writes"] - before["writes"] == 6
        unread = [r for r in results if r[1] == UNKNOWN_TOKEN]
        assert unread, [r[1] for r in results]  # some had callers waiting behind them
        in_band = spent["positions_in_band"] - before["positions_in_band"]
        if driver == "psycopg":
            assert in_band == 6 - len(unread), (in_band, [r[1] for r in results])
        else:
            assert in_band == 0
        for tag, _now, settled, inside, (count, _port) in results:
            assert count == 1, f"{tag}: its own next read missed it"
            assert settled is not None and settled != UNKNOWN_TOKEN
            lsn = parse_token(settled) & ((1 << 64) - 1)
            assert lsn > inside, (tag, settled, format_lsn(inside))  # past its WAL record
        # Both token forms, resumed elsewhere (a client's next request), see the write.
        for tag, now, settled, _inside, _seen in results:
            for token in {now, settled}:

                async def resumed(token: str | None = token, tag: str = tag) -> int:
                    async with mgr.session(token):
                        return (await count_on_server(mgr, tag))[0]

                assert await asyncio.create_task(resumed()) == 1, (tag, token)
        assert mgr.clamped_tokens == 0 and mgr.unknown_positions == 0
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_write_nobody_reads_after_reads_no_position(
    delayed: LocalTopology, driver: str
) -> None:
    """Twenty writers on one connection: the contended ones read no position at all.

    Only a write that found nobody waiting got a position (psycopg in band, aiopg on its
    connection). Then the task that awaited them all reads: one read of
    the primary's position settles every unread write, and the read sees all twenty rows,
    counted on the server that served it, although both standbys are 1.5 s behind.
    """
    mgr = manager(delayed, driver, pool_size=1)
    async with mgr:
        await mgr.check()
        prefix = f"quiet-{driver}-"

        async def writer(i: int) -> None:
            await mgr.execute_sql("INSERT INTO unread (tag) VALUES (%s)", [f"{prefix}{i}"])

        before = mgr.timings()
        await asyncio.gather(*(asyncio.create_task(writer(i)) for i in range(20)))
        await asyncio.sleep(0.5)  # a read started in the background would have answered
        written = mgr.timings()
        assert written["writes"] - before["writes"] == 20
        inline = (written["positions_in_band"] - before["positions_in_band"]) + (
            written["position_reads"] - before["position_reads"]
        )
        # Only a write that found nobody waiting got a position (psycopg: the first one
        # sent; aiopg: the last one done), each its own; the others none at all.
        assert inline <= 2, inline
        assert mgr.token == UNKNOWN_TOKEN  # this task awaited them: it requires them all
        rows = await mgr.execute_sql(
            "SELECT count(*), inet_server_port() FROM unread WHERE tag LIKE %s", [prefix + "%"]
        )
        assert rows is not None and rows[0][0] == 20, rows
        after = mgr.timings()
        assert after["position_reads"] - written["position_reads"] == 1
        assert mgr.token is not None and mgr.token != UNKNOWN_TOKEN
        assert mgr.unknown_positions == 0


@pytest.mark.parametrize("token", [UNKNOWN_TOKEN, "1/FFFFFFFF/FFFFFFFF", "FFFFFFFF/FFFFFFFF"])
async def test_an_unknown_token_from_a_client_requires_the_primary_position(
    delayed: LocalTopology, token: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The "unknown" token (or one forged like it) requires the primary's position now.

    Not clamped, not logged as forged, no read fails; the read requires what the primary had
    flushed when the token arrived, so a row written before is seen on 1.5 s late standbys
    (ignoring the token would read 0 rows there).
    """
    caplog.set_level(logging.WARNING, logger="areplica")
    mgr = manager(delayed, "aiopg")
    async with mgr:
        await mgr.check()
        tag = f"before-{token}"
        sql_on(delayed, "primary", "INSERT INTO unread (tag) VALUES (%s)", (tag,))

        async def request() -> tuple[int, str | None]:
            async with mgr.session(token, client="10.0.0.9"):
                count, _port = await count_on_server(mgr, tag)
                return count, mgr.token

        count, after = await asyncio.create_task(request())
        assert count == 1
        assert after is not None and after != UNKNOWN_TOKEN
        assert mgr.clamped_tokens == 0
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
