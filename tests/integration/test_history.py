"""LocalTopology's history and HA tools, checked against what the real servers say:
cascading standbys, a forked history, pg_rewind of an old primary, a standby rebuilt."""

from __future__ import annotations

from typing import Any

import pytest

from areplica.testing._support import run_sql
from areplica.testing.topology import LocalTopology

pytestmark = pytest.mark.integration

RECEIVER = "SELECT status, sender_port, received_tli FROM pg_stat_wal_receiver"


def q(topo: LocalTopology, node: str, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
    """``sql`` straight on ``node``'s server."""
    return run_sql(topo.direct_dsn(node), sql, params)


def in_recovery(topo: LocalTopology, node: str) -> bool:
    return bool(q(topo, node, "SELECT pg_is_in_recovery()")[0][0])


def receiver(topo: LocalTopology, node: str) -> tuple[str, int, int]:
    """(status, sender port, timeline received) of ``node``'s WAL receiver."""
    ((status, port, tli),) = q(topo, node, RECEIVER)
    return status, port, tli


def tags(topo: LocalTopology, node: str) -> list[str]:
    return [row[0] for row in q(topo, node, "SELECT tag FROM history ORDER BY tag")]


def slots(topo: LocalTopology, node: str) -> dict[str, bool]:
    return dict(q(topo, node, "SELECT slot_name, active FROM pg_replication_slots"))  # type: ignore[arg-type]


def write(topo: LocalTopology, node: str, tag: str) -> None:
    q(topo, node, "INSERT INTO history (tag) VALUES (%s)", (tag,))


def with_table(topo: LocalTopology) -> LocalTopology:
    q(topo, "primary", "CREATE TABLE history (tag text PRIMARY KEY)")
    topo.wait_replicated()
    return topo


def test_a_cascading_standby_streams_from_a_standby() -> None:
    with LocalTopology(replicas=1) as topo:
        with_table(topo)
        assert topo.add_replica("replica-2", upstream="replica-1") == "replica-2"
        assert topo.nodes == ["primary", "replica-1", "replica-2"]
        assert in_recovery(topo, "replica-2")
        assert receiver(topo, "replica-2")[:2] == ("streaming", topo.port("replica-1"))
        (conninfo,) = q(topo, "replica-2", "SELECT conninfo FROM pg_stat_wal_receiver")[0]
        assert f"port={topo.port('replica-1')}" in conninfo
        sql = "SELECT application_name, state FROM pg_stat_replication"
        assert q(topo, "replica-1", sql) == [("replica-2", "streaming")]
        assert q(topo, "primary", sql) == [("replica-1", "streaming")]
        assert slots(topo, "replica-1") == {"areplica_replica_2": True}
        write(topo, "primary", "through-replica-1")
        topo.wait_replicated(timeout=20)  # waits for the cascaded standby too
        assert tags(topo, "replica-2") == ["through-replica-1"]
        assert {topo.timeline(n) for n in topo.nodes} == {topo.timeline("primary")}
        with pytest.raises(ValueError, match="already"):
            topo.add_replica("replica-1")


def test_fork_two_primaries_and_the_other_standby_stays_on_the_old_one() -> None:
    with LocalTopology(replicas=2) as topo:
        with_table(topo)
        before = topo.timeline("primary")
        topo.fork("replica-1")
        assert not in_recovery(topo, "primary") and not in_recovery(topo, "replica-1")
        assert topo.timeline("replica-1") == before + 1
        assert topo.timeline("primary") == before
        write(topo, "primary", "old-history")
        write(topo, "replica-1", "new-history")
        topo.wait_replicated(timeout=20)  # still measured against the old primary
        assert in_recovery(topo, "replica-2")
        assert receiver(topo, "replica-2") == ("streaming", topo.port("primary"), before)
        assert tags(topo, "replica-2") == ["old-history"]
        assert tags(topo, "replica-1") == ["new-history"]
        assert tags(topo, "primary") == ["old-history"]
        assert slots(topo, "primary") == {"areplica_replica_2": True}


def test_rewind_makes_the_old_primary_a_standby_of_the_new_one() -> None:
    with pytest.raises(RuntimeError, match="rewindable"):
        LocalTopology(replicas=1).rewind("primary", "replica-1")
    with LocalTopology(replicas=1, rewindable=True) as topo:
        sql = "SELECT current_setting('wal_log_hints'), current_setting('full_page_writes')"
        assert q(topo, "primary", sql) == [("on", "on")]
        with_table(topo)
        topo.fork("replica-1")
        write(topo, "primary", "lost")
        write(topo, "replica-1", "kept")
        topo.kill("primary")  # crashed: pg_rewind runs its crash recovery first
        topo.rewind("primary", source="replica-1")
        assert in_recovery(topo, "primary")
        status, port, tli = receiver(topo, "primary")
        assert (status, port) == ("streaming", topo.port("replica-1"))
        assert tli == topo.timeline("replica-1") == topo.timeline("primary")
        assert slots(topo, "replica-1") == {"areplica_primary": True}
        write(topo, "replica-1", "after")
        topo.wait_replicated(timeout=20)  # now measured against replica-1
        assert tags(topo, "primary") == ["after", "kept"]  # its own write is gone
        # rewindable: full_page_writes is on, so a standby can be the base backup's source.
        topo.add_replica("replica-2", upstream="primary")
        assert receiver(topo, "replica-2")[:2] == ("streaming", topo.port("primary"))
        topo.wait_replicated(timeout=20)
        assert tags(topo, "replica-2") == ["after", "kept"]


def test_rebuild_re_clones_a_diverged_standby_from_another_node() -> None:
    with LocalTopology(replicas=2) as topo:
        with_table(topo)
        topo.fork("replica-1")
        write(topo, "primary", "old-only")
        topo.wait_replicated(timeout=20)  # replica-2 replays the old history past the fork
        write(topo, "replica-1", "new-only")
        old_pids = topo.pids("replica-2")
        topo.rebuild("replica-2", source="replica-1")
        assert topo.pids("replica-2")[0] not in old_pids
        assert in_recovery(topo, "replica-2")
        status, port, tli = receiver(topo, "replica-2")
        assert (status, port, tli) == (
            "streaming",
            topo.port("replica-1"),
            topo.timeline("replica-1"),
        )
        topo.wait_replicated(timeout=20, source="replica-1")
        assert tags(topo, "replica-2") == ["new-only"]
        assert "areplica_replica_2" not in slots(topo, "primary")
        assert slots(topo, "replica-1") == {"areplica_replica_2": True}
        with pytest.raises(ValueError, match="cannot follow"):
            topo.rebuild("replica-1", source="replica-2")
