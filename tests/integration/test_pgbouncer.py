"""PgBouncer in front of a LocalTopology node, checked against the servers' own answers."""

from __future__ import annotations

import os
import select
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest
from psycopg2.extensions import make_dsn

from areplica.testing._support import run_sql
from areplica.testing.daemon import find_program
from areplica.testing.pgbouncer import PgBouncer
from areplica.testing.topology import LocalTopology
from tests.integration.test_topology import alive, wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(find_program("pgbouncer") is None, reason="pgbouncer is not installed"),
]


@pytest.fixture(scope="module")
def topo() -> Iterator[LocalTopology]:
    with LocalTopology(replicas=1) as topology:
        yield topology


def connect(dsn: str) -> Any:
    conn = psycopg2.connect(dsn, connect_timeout=5)
    conn.autocommit = True
    return conn


def one(conn: Any, sql: str) -> Any:
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()[0]


def answered(conn: Any) -> bool:
    """Whether an asynchronous connection's pending query has its answer (non-blocking)."""
    select.select([conn.fileno()], [], [], 0)
    return bool(conn.poll() == psycopg2.extensions.POLL_OK)


def server_backends(topo: LocalTopology, node: str, bouncer: PgBouncer) -> list[tuple[Any, ...]]:
    """(pid, state) of the backends on ``node`` that PgBouncer's server connections use."""
    ports = [row["local_port"] for row in bouncer.show("SERVERS")]
    sql = "SELECT pid, state FROM pg_stat_activity WHERE client_port = ANY(%s) ORDER BY pid"
    return run_sql(topo.direct_dsn(node), sql, (ports,))


def test_a_query_through_pgbouncer_lands_on_its_node(topo: LocalTopology) -> None:
    for node in topo.nodes:
        with PgBouncer(topo, node) as bouncer:
            assert bouncer.port != topo.port(node)
            sql = "SELECT inet_server_port(), pg_is_in_recovery()"
            assert run_sql(bouncer.dsn, sql) == [(topo.port(node), node != "primary")]
            (server,) = bouncer.show("SERVERS")
            assert server["port"] == topo.port(node)
            assert server_backends(topo, node, bouncer) == [(server["remote_pid"], "idle")]


@pytest.mark.parametrize(("mode", "pool_size"), [("transaction", 1), ("session", 2)])
def test_the_pool_mode_shows_in_show_pools_and_on_the_server(
    topo: LocalTopology, mode: Any, pool_size: int
) -> None:
    with PgBouncer(topo, "primary", mode=mode, pool_size=pool_size) as bouncer:
        a, b = connect(bouncer.dsn), connect(bouncer.dsn)
        try:
            pids = [one(c, "SELECT pg_backend_pid()") for c in (a, b, a, b)]
            assert bouncer.pool()["pool_mode"] == mode
        finally:
            a.close()
            b.close()
    if mode == "transaction":  # one server connection serves both clients in turn
        assert len(set(pids)) == 1
    else:  # each client keeps its own server connection for its whole session
        assert pids[0] == pids[2] != pids[1] == pids[3]


def test_a_pool_smaller_than_its_clients_queues(topo: LocalTopology) -> None:
    with PgBouncer(topo, "primary", mode="transaction", pool_size=1) as bouncer:
        holder = psycopg2.connect(bouncer.dsn, connect_timeout=5)
        waiter = psycopg2.connect(bouncer.dsn, async_=True)
        try:
            wait_until(lambda: answered(waiter), 5, "the second client logged in")
            held_by = one(holder, "SELECT pg_backend_pid()")  # its transaction stays open
            queued = waiter.cursor()
            queued.execute("SELECT pg_backend_pid()")
            wait_until(lambda: bouncer.pool().get("cl_waiting") == 1, 5, "a client waiting")
            pool = bouncer.pool()
            assert (pool["cl_active"], pool["sv_active"], pool["sv_idle"]) == (1, 1, 0)
            assert server_backends(topo, "primary", bouncer) == [(held_by, "idle in transaction")]
            assert not answered(waiter)
            holder.commit()  # the server connection goes to the client in line
            wait_until(lambda: answered(waiter), 5, "the waiting client served")
            assert queued.fetchone() == (held_by,)  # the one server connection, in turn
            assert bouncer.pool()["cl_waiting"] == 0
        finally:
            holder.close()
            waiter.close()


def test_kill_stop_start_and_cleanup_with_the_topology() -> None:
    password = "pw with 'quote\" and space"
    with LocalTopology(replicas=0, user="app", password=password) as topology:
        bouncer = PgBouncer(topology, "primary", mode="session")
        bouncer.start()
        assert run_sql(bouncer.dsn, "SELECT current_user, inet_server_port()") == [
            ("app", topology.port("primary"))
        ]
        with pytest.raises(psycopg2.OperationalError, match="password"):
            run_sql(make_dsn(bouncer.dsn, password="wrong"), "SELECT 1")
        assert password not in bouncer.log_path.read_text()
        assert (bouncer.folder / "userlist.txt").stat().st_mode & 0o777 == 0o600
        if os.geteuid() == 0:  # PgBouncer refuses root: it runs as the servers' user
            assert Path(f"/proc/{bouncer.pid}").stat().st_uid != 0
        port, pid = bouncer.port, bouncer.pid
        assert pid is not None
        bouncer.kill()
        assert not alive(pid) and not bouncer.running
        with pytest.raises(psycopg2.OperationalError):
            run_sql(bouncer.dsn, "SELECT 1", connect_timeout=2)
        bouncer.start()  # again, on the same port
        assert bouncer.port == port
        assert run_sql(bouncer.dsn, "SELECT 1") == [(1,)]
        bouncer.stop()
        assert not bouncer.running
        bouncer.start()
        folder, pid = bouncer.folder, bouncer.pid
        assert pid is not None
    assert bouncer.closed  # stopped with the topology
    assert not alive(pid)
    assert not folder.exists()
