"""HAProxy in Patroni's layout (benchmark scenario 7), proven with the servers' answers."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from psycopg2.extensions import make_dsn, parse_dsn

from areplica.testing._support import run_sql
from areplica.testing.haproxy import READ, WRITE, Backend, HAProxy, find_executable
from areplica.testing.patroni import PatroniTopology
from tests.patroni.test_harness import gone


def through(topo: PatroniTopology, port: int, sql: str) -> list[tuple[object, ...]]:
    """``sql`` as the superuser through HAProxy's ``port``."""
    dsn = make_dsn(**{**parse_dsn(topo.dsn(topo.members[0])), "port": port})
    return run_sql(dsn, sql)


@pytest.mark.patroni
def test_writes_reach_the_leader_and_reads_the_replicas(healthy_patroni: PatroniTopology) -> None:
    if find_executable() is None:
        pytest.skip("haproxy is not installed")
    topo = healthy_patroni
    leader = topo.leader()
    assert leader is not None
    replicas = set(topo.members) - {leader}
    backends = [Backend(m, topo.port(m), urlsplit(topo.rest_url(m)).port) for m in topo.members]
    with HAProxy.for_patroni(backends, inter=0.2, fall=2, rise=1) as hap:
        assert "option httpchk GET /primary" in hap.config_text
        assert f"check port {urlsplit(topo.rest_url(leader)).port}" in hap.config_text
        hap.wait_states({WRITE: {leader}, READ: replicas}, timeout=30)
        sql = "SELECT inet_server_port(), pg_is_in_recovery()"
        assert through(topo, hap.write_port, sql) == [(topo.port(leader), False)]
        reads = {through(topo, hap.read_port, sql)[0] for _ in range(2 * len(replicas))}
        assert reads == {(topo.port(m), True) for m in replicas}  # round robin over both
        folder, pid = hap.folder, hap.pid
    assert pid is not None and gone(pid)
    assert not folder.exists()
