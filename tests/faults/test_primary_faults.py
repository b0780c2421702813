"""A primary that fails fails writes loudly (NoPrimaryError), loses none, and is followed."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

import peewee
import pytest

from areplica import NoPrimaryError, ReadTimeoutError, writes
from areplica.testing.topology import LocalTopology
from tests.conftest import sql_on, wait_for
from tests.faults.conftest import (
    SLACK,
    TIMINGS,
    assert_clean_after_close,
    baseline,
    fault_manager,
    under_load,
)

pytestmark = [pytest.mark.faults, pytest.mark.integration]

FOLLOW_BOUND = (
    TIMINGS["fail_after"] * TIMINGS["health_interval"] + TIMINGS["health_timeout"] + SLACK
)


@pytest.fixture
def own_topo() -> Iterator[LocalTopology]:
    """A fresh topology: promotion cannot be undone."""
    with LocalTopology(replicas=2) as topology:
        sql_on(topology, "primary", "CREATE TABLE fault_log (id bigserial PRIMARY KEY, tag text)")
        topology.wait_replicated()
        yield topology


async def test_primary_killed_then_restarted(ftopo: LocalTopology) -> None:
    before = baseline(ftopo)
    mgr = fault_manager(ftopo)
    await mgr.connect()
    async with under_load(mgr, ftopo, readers=50) as load:
        await asyncio.sleep(1.0)
        ftopo.kill("primary")
        killed_at = time.monotonic()
        # Every write from now on fails with NoPrimaryError, each within the bound.
        for _ in range(10):
            started = time.monotonic()
            with pytest.raises(NoPrimaryError) as info:
                await mgr.execute_sql("INSERT INTO fault_log (tag) VALUES ('after-kill')")
            assert time.monotonic() - started < TIMINGS["health_timeout"] + 1.0
            assert info.value.node == "primary"
            await asyncio.sleep(0.1)
        reads_before = len(load.reads)
        await asyncio.sleep(1.0)
        assert len(load.reads) > reads_before  # reads go on, on the replicas
        ftopo.start_node("primary")
        await wait_for(lambda: mgr.status()[0].state == "up", timeout=15)
        rows = await mgr.execute_sql(
            "INSERT INTO fault_log (tag) VALUES ('resumed') RETURNING inet_server_port()"
        )
        assert rows == [(ftopo.port("primary"),)]
        await asyncio.sleep(0.5)
    assert load.failed_reads == []
    del killed_at
    assert all(isinstance(e, NoPrimaryError) for e in load.failed_writes)
    load.check_writes_on_primary()
    assert sql_on(ftopo, "primary", "SELECT count(*) FROM fault_log WHERE tag = 'after-kill'") == [
        (0,)
    ]
    await asyncio.to_thread(ftopo.wait_replicated)
    await assert_clean_after_close(mgr, ftopo, before)


async def test_primary_stopped_and_replica_promoted(own_topo: LocalTopology) -> None:
    mgr = fault_manager(own_topo)
    await mgr.connect()
    async with under_load(mgr, own_topo, readers=50) as load:
        await asyncio.sleep(0.5)
        stopped_at = time.monotonic()
        own_topo.stop("primary")
        await asyncio.to_thread(own_topo.promote, "replica-1")
        promoted_at = time.monotonic()

        async def writes_reach_promoted() -> bool:
            try:
                rows = await mgr.execute_sql(
                    "INSERT INTO fault_log (tag) VALUES ('promoted') RETURNING inet_server_port()"
                )
            except NoPrimaryError:
                return False
            return rows == [(own_topo.port("replica-1"),)]

        await wait_for(writes_reach_promoted, timeout=FOLLOW_BOUND, interval=0.05)
        followed = time.monotonic() - promoted_at
        await asyncio.sleep(0.5)
    print(
        f"\nprimary stopped, promotion took {promoted_at - stopped_at:.2f}s; writes reached "
        f"the promoted node {followed:.2f}s after it (bound {FOLLOW_BOUND:.2f}s)"
    )
    assert load.failed_reads == []
    assert all(isinstance(e, NoPrimaryError) for e in load.failed_writes)
    # Every acknowledged write is on the new primary (the old one's were replicated first).
    load.check_writes_on_primary("replica-1")
    status = {s.name: s for s in mgr.status()}
    assert status["replica-1"].role == "primary"
    await mgr.close()


async def test_promotion_while_old_primary_is_up_follows_the_newer_timeline(
    own_topo: LocalTopology, caplog: pytest.LogCaptureFixture
) -> None:
    """A standby promoted while the old primary still runs: the newer timeline wins.

    The old primary (timeline 1) is a former primary that was not demoted yet: it takes no
    write and no read. Two members on the same highest timeline would be a split brain
    (tests/unit/test_cluster.py).
    """
    caplog.set_level(logging.WARNING, logger="areplica")
    mgr = fault_manager(own_topo)
    await mgr.connect()
    await mgr.execute_sql("INSERT INTO fault_log (tag) VALUES ('before')")
    await asyncio.to_thread(own_topo.promote, "replica-2")

    async def followed() -> bool:
        rows = await mgr.execute_sql(
            "INSERT INTO fault_log (tag) VALUES ('after') RETURNING inet_server_port()"
        )
        return rows == [(own_topo.port("replica-2"),)]

    await wait_for(followed, timeout=FOLLOW_BOUND)
    for _ in range(5):
        rows = await mgr.execute_sql("SELECT pg_is_in_recovery(), inet_server_port()")
        assert rows is not None and rows[0][1] != own_topo.port("primary")
    assert "behind the primary's" in caplog.text and "split brain" not in caplog.text
    status = {s.name: s for s in mgr.status()}
    assert status["replica-2"].role == "primary" and status["primary"].state == "down"
    await mgr.close()


@pytest.mark.parametrize("driver", ["aiopg", "psycopg"])
async def test_a_write_whose_position_died_with_the_primary_is_read_on_the_new_one(
    own_topo: LocalTopology, driver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The primary dies between a write's commit and its position read (a crash failover).

    The session cannot know where its write is. Its next read waits for a primary (up to
    ``primary_wait``), settles on the promoted standby's position and sees the write: it
    neither fails while the cluster has no primary nor reads a standby that is behind.
    """
    mgr = fault_manager(own_topo, driver=driver, primary_wait=30.0)
    impatient = fault_manager(own_topo, driver=driver, primary_wait=0.0)
    await mgr.connect()
    await impatient.connect()
    try:
        tag = f"died-{driver}"

        async def lost(cursor: Any) -> int:
            raise peewee.OperationalError("server closed the connection unexpectedly")

        monkeypatch.setattr(writes, "_read_position", lost)
        monkeypatch.setattr(writes, "_position_in_band", lost)  # psycopg's
        await mgr.execute_sql("INSERT INTO fault_log (tag) VALUES (%s)", [tag])
        await impatient.execute_sql("INSERT INTO fault_log (tag) VALUES (%s)", [tag + "-0"])
        monkeypatch.undo()
        assert mgr.unknown_positions == 1 and impatient.unknown_positions == 1
        await asyncio.to_thread(own_topo.wait_replicated)  # the write survives the failover
        own_topo.kill("primary")
        sql = "SELECT (SELECT count(*) FROM fault_log WHERE tag = %s), inet_server_port()"
        # No wait: says so and reads nothing, whether or not its health task has seen the
        # primary go yet (CI's race: the position read failed on a primary still "up").
        seen = [impatient.status()[0].state]
        with pytest.raises(NoPrimaryError, match="position was never read") as info:
            await impatient.execute_sql(sql, [tag + "-0"])
        assert info.value.node == "primary"
        await wait_for(lambda: impatient.status()[0].state != "up", timeout=FOLLOW_BOUND)
        with pytest.raises(NoPrimaryError, match="position was never read") as info:
            await impatient.execute_sql(sql, [tag + "-0"])
        assert info.value.node == "primary"
        print(f"\nimpatient saw the primary {seen[0]} at its first read")
        await wait_for(lambda: mgr.status()[0].state != "up", timeout=FOLLOW_BOUND)

        # The call's own timeout bounds the wait for a primary's position: said, not hung.
        with pytest.raises(ReadTimeoutError, match="waiting for the primary's WAL position"):
            await asyncio.wait_for(mgr.execute_sql(sql, [tag], timeout=0.5), 10)

        async def reader() -> tuple[Any, str | None]:
            return await mgr.execute_sql(sql, [tag]), mgr.token

        read = asyncio.ensure_future(reader())
        await asyncio.sleep(1.0)
        assert not read.done(), read  # waiting for a primary, not failed
        await asyncio.to_thread(own_topo.promote, "replica-1")
        rows, token = await read
        assert rows is not None and rows[0][0] == 1, rows
        assert token is not None and token.startswith("2/"), token  # the new timeline's
        # The next reads go on without the primary's help: the position is known now.
        again = await mgr.execute_sql(sql, [tag])
        assert again is not None and again[0][0] == 1
    finally:
        await mgr.close()
        await impatient.close()


@pytest.mark.parametrize("driver", ["aiopg", "psycopg"])
async def test_contended_writes_unread_when_the_primary_dies_are_read_on_the_new_one(
    own_topo: LocalTopology, driver: str
) -> None:
    """Writes under contention return unread; the primary dies before the session reads.

    Their positions are read only when a read needs them (README, "Consistency modes"): here
    after the crash. The read waits for a primary (``primary_wait``), settles on the
    promoted standby's position and sees all six rows, on the new timeline; nothing is
    counted as an unknown position, nothing fails.
    """
    mgr = fault_manager(own_topo, driver=driver, primary_wait=30.0, pool_size=1)
    await mgr.connect()
    try:
        prefix = f"unread-{driver}-"
        before = mgr.timings()

        async def writer(i: int) -> None:
            await mgr.execute_sql("INSERT INTO fault_log (tag) VALUES (%s)", [f"{prefix}{i}"])

        await asyncio.gather(*(asyncio.create_task(writer(i)) for i in range(6)))
        written = mgr.timings()
        read_then = (written["position_reads"] - before["position_reads"]) + (
            written["positions_in_band"] - before["positions_in_band"]
        )
        assert read_then <= 2, read_then  # at most the writes that found nobody waiting
        assert mgr.token == "FFFFFFFF/FFFFFFFF/FFFFFFFF"  # this task requires them, unread
        await asyncio.to_thread(own_topo.wait_replicated)  # the writes survive the failover
        own_topo.kill("primary")
        sql = "SELECT (SELECT count(*) FROM fault_log WHERE tag LIKE %s), inet_server_port()"

        async def reader() -> Any:
            return await mgr.execute_sql(sql, [prefix + "%"])

        read = asyncio.ensure_future(reader())
        await asyncio.sleep(1.0)
        assert not read.done(), read  # waiting for a primary, not failed, not stale
        await asyncio.to_thread(own_topo.promote, "replica-1")
        rows = await read
        assert rows is not None and rows[0][0] == 6, rows
        token = mgr.token
        assert token is not None and token.startswith("2/"), token  # the new timeline's
        assert mgr.unknown_positions == 0
    finally:
        await mgr.close()


@pytest.mark.parametrize("noticed", [True, False], ids=["seen-down", "not-seen-yet"])
async def test_a_session_read_waits_for_the_standbys_when_its_primary_dies(
    own_topo: LocalTopology, noticed: bool
) -> None:
    """The primary dies after a session's write, before any standby has replayed it.

    No standby can serve the read yet and there is no primary to fall back to: the read
    waits (up to ``primary_wait``) for a standby to replay the write, and neither fails nor
    reads stale. ``not-seen-yet``: the health loop has not noticed (a long interval), so the
    read's first pick is the dead primary; its connection failure must not be retried on
    it until the retries run out (CI saw that once, during a Patroni switchover).
    """
    for standby in ("replica-1", "replica-2"):
        own_topo.set_apply_delay(standby, 1500)
    mgr = fault_manager(
        own_topo, primary_wait=10.0, max_lag=30.0, health_interval=0.25 if noticed else 30.0
    )
    await mgr.connect()
    try:
        tag = f"orphaned-{'seen' if noticed else 'unseen'}"
        await mgr.execute_sql("INSERT INTO fault_log (tag) VALUES (%s)", [tag])
        own_topo.kill("primary")
        if noticed:
            await wait_for(lambda: mgr.status()[0].state != "up", timeout=FOLLOW_BOUND)
        sql = "SELECT (SELECT count(*) FROM fault_log WHERE tag = %s), inet_server_port()"
        rows = await mgr.execute_sql(sql, [tag])
        assert rows is not None and rows[0][0] == 1, rows  # not stale
        assert rows[0][1] in (own_topo.port("replica-1"), own_topo.port("replica-2"))
    finally:
        await mgr.close()
