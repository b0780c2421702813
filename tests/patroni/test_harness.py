"""PatroniTopology itself, proven with the servers' and Patroni's own answers."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg2
import pytest

from areplica.testing import PatroniTopology, PatroniUnavailable
from tests.patroni.conftest import in_recovery, start_or_skip, streaming_to


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie waiting for its parent counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2 :].split()[0] in ("Z", "X", "x")


def rest_status(url: str) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)


@pytest.mark.patroni
def test_three_members_one_writable_and_it_is_patronis_leader(
    healthy_patroni: PatroniTopology,
) -> None:
    topo = healthy_patroni
    assert topo.members == ["n1", "n2", "n3"]
    assert len({topo.port(m) for m in topo.members}) == 3
    writable = []
    for member in topo.members:
        (port,) = topo.query(member, "SELECT inet_server_port()")[0]
        assert port == topo.port(member)
        if not in_recovery(topo, member):
            writable.append(member)
    leader = topo.leader()
    assert writable == [leader]
    assert streaming_to(topo, leader) == set(topo.members) - {leader}
    assert {m["name"] for m in topo.cluster()["members"]} == set(topo.members)
    assert len(topo.rest_urls) == 3
    assert "password=" in topo.dsn(leader)
    assert "password" not in repr(topo)


@pytest.mark.patroni
def test_switchover_hands_over_and_the_old_leader_streams_again(
    healthy_patroni: PatroniTopology,
) -> None:
    topo = healthy_patroni
    old = topo.leader()
    assert old is not None
    result = topo.switchover()
    new = result.new_leader
    assert (result.action, result.old_leader) == ("switchover", old)
    assert new != old
    assert topo.leader() == new
    assert not in_recovery(topo, new)
    assert in_recovery(topo, old)
    assert old in streaming_to(topo, new)
    assert 0 < result.seconds <= result.settled_seconds
    assert topo.last_switchover == result
    # What the new leader writes reaches the old one.
    topo.query(new, "CREATE TABLE harness_switchover (id int)")
    try:
        topo.query(new, "INSERT INTO harness_switchover VALUES (1)")
        topo.wait_replicated()
        assert topo.query(old, "SELECT id FROM harness_switchover") == [(1,)]
    finally:
        topo.query(new, "DROP TABLE harness_switchover")


@pytest.mark.patroni
def test_failover_to_a_named_candidate(healthy_patroni: PatroniTopology) -> None:
    topo = healthy_patroni
    old = topo.leader()
    candidate = sorted(set(topo.members) - {old})[-1]
    result = topo.failover(candidate)
    assert (result.old_leader, result.new_leader) == (old, candidate)
    assert topo.leader() == candidate
    assert not in_recovery(topo, candidate)
    assert in_recovery(topo, old)
    assert old in streaming_to(topo, candidate)


@pytest.mark.patroni
def test_crash_then_restart_brings_a_replica_back(healthy_patroni: PatroniTopology) -> None:
    topo = healthy_patroni
    leader = topo.leader()
    replica = sorted(set(topo.members) - {leader})[0]
    pids = topo.pids(replica)
    assert len(pids) >= 2  # Patroni and a postmaster at least
    topo.crash(replica)
    assert all(gone(pid) for pid in pids)
    assert topo.pids(replica) == []
    with pytest.raises(psycopg2.OperationalError):
        topo.query(replica, "SELECT 1")
    assert topo.wait_healthy() == leader  # a crashed member is not waited for
    topo.restart(replica)
    assert in_recovery(topo, replica)
    assert replica in streaming_to(topo, leader)
    assert topo.leader() == leader


@pytest.mark.patroni
def test_tags_reach_patroni(healthy_patroni: PatroniTopology) -> None:
    topo = healthy_patroni
    replica = sorted(set(topo.members) - {topo.leader()})[0]
    assert rest_status(f"{topo.rest_url(replica)}/replica") == 200
    topo.set_tags(replica, {"noloadbalance": True, "nofailover": True})
    try:
        entry = next(m for m in topo.cluster()["members"] if m["name"] == replica)
        assert entry["tags"]["noloadbalance"] is True
        assert rest_status(f"{topo.rest_url(replica)}/replica") == 503
    finally:
        topo.set_tags(replica, {})
    assert rest_status(f"{topo.rest_url(replica)}/replica") == 200


@pytest.mark.patroni
def test_add_member_joins_as_a_streaming_replica(healthy_patroni: PatroniTopology) -> None:
    topo = healthy_patroni
    leader = topo.leader()
    before = topo.members
    name = topo.add_member(tags={"noloadbalance": True})
    try:
        assert name not in before
        assert topo.members == [*before, name]
        assert in_recovery(topo, name)
        assert streaming_to(topo, leader) == {*before, name} - {leader}
        (port,) = topo.query(name, "SELECT inet_server_port()")[0]
        assert port == topo.port(name)
        entry = next(m for m in topo.cluster()["members"] if m["name"] == name)
        assert entry["tags"] == {"noloadbalance": True}
        pids = topo.pids(name)
    finally:
        topo.remove_member(name)
    assert topo.members == before
    assert {m["name"] for m in topo.cluster()["members"]} == set(before)
    assert all(gone(pid) for pid in pids)


@pytest.mark.patroni
async def test_teardown_leaves_no_process_and_no_directory() -> None:
    topo = start_or_skip(PatroniTopology(members=2))
    try:
        pids = topo.all_pids()
        directory = topo.directory
        leader = topo.wait_healthy()
        assert len(pids) > 4  # etcd, two Patronis, two postmasters and their children
        assert directory.is_dir()
        assert {m["name"] for m in topo.cluster()["members"]} == {"n1", "n2"}
        assert leader in topo.members
    finally:
        await topo.aclose()
    assert [pid for pid in pids if not gone(pid)] == []
    assert not directory.exists()
    await topo.aclose()  # idempotent
    assert "closed" in repr(topo)
    with pytest.raises(RuntimeError, match="closed"):
        topo.start()


def test_unavailable_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AREPLICA_ETCD", str(tmp_path / "no-etcd"))
    with pytest.raises(PatroniUnavailable) as caught:
        PatroniTopology().check()
    assert "no-etcd" in str(caught.value)
    assert "\n" not in str(caught.value)
    monkeypatch.delenv("AREPLICA_ETCD")
    monkeypatch.setenv("PATH", str(tmp_path))
    if not os.access("/usr/bin/etcd", os.X_OK):
        return
    monkeypatch.setenv("AREPLICA_ETCD", "/usr/bin/etcd")
    monkeypatch.setenv("AREPLICA_PATRONI", str(tmp_path / "no-patroni"))
    with pytest.raises(PatroniUnavailable, match="no-patroni") as caught:
        PatroniTopology().check()
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, RuntimeError)


FAKE_PATRONI = (
    '#!/bin/sh\n[ "$1" = --version ] && exit 0\necho "fake patroni gives up" >&2\nexit 3\n'
)


def test_unreachable_patroni_is_unavailable(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root runs Patroni as another user")
    tmp_path.chmod(0o700)
    script = tmp_path / "patroni"
    script.write_text(FAKE_PATRONI)
    script.chmod(0o755)
    topo = PatroniTopology(patroni=script)
    try:
        topo.check()
    except PatroniUnavailable as exc:
        message = str(exc)
    else:
        pytest.fail("check() accepted a patroni its user cannot reach")
    if "cannot be run by" not in message:  # something else is missing here: fine too
        pytest.skip(message)
    assert "\n" not in message
    assert str(script) in message


@pytest.mark.patroni
def test_a_patroni_that_exits_fails_start_at_once() -> None:
    folder = Path(tempfile.mkdtemp(prefix="areplica-fake-"))
    try:
        folder.chmod(0o755)
        script = folder / "patroni"
        script.write_text(FAKE_PATRONI)
        script.chmod(0o755)
        topo = PatroniTopology(members=1, patroni=script, start_timeout=120)
        began = time.monotonic()
        with pytest.raises(RuntimeError, match=r"Patroni of n1 exited \(code 3\)") as caught:
            start_or_skip(topo)
        assert time.monotonic() - began < 60
        assert "fake patroni gives up" in str(caught.value)
        assert "closed" in repr(topo)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
