"""HAProxy balancing a LocalTopology's standbys, checked against the servers' own answers."""

from __future__ import annotations

import itertools

import pytest

from areplica.testing._support import run_sql
from areplica.testing.haproxy import LoadBalancer, find_executable
from areplica.testing.topology import LocalTopology
from tests.integration.test_topology import alive

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(find_executable() is None, reason="haproxy is not installed"),
]


def landed(balancer: LoadBalancer, connections: int) -> list[tuple[int, bool]]:
    """(server port, in recovery) of ``connections`` successive connections through it."""
    sql = "SELECT inet_server_port(), pg_is_in_recovery()"
    return [run_sql(balancer.dsn, sql)[0] for _ in range(connections)]  # type: ignore[misc]


def test_connections_go_round_robin_and_a_killed_standby_is_skipped() -> None:
    with LocalTopology(replicas=2) as topo:
        one, two = topo.port("replica-1"), topo.port("replica-2")
        balancer = LoadBalancer(topo, ["replica-1", "replica-2"], inter=0.2, fall=2)
        balancer.start()
        balancer.wait_backends({"replica-1", "replica-2"}, timeout=20)
        ports = [port for port, standby in landed(balancer, 6) if standby]
        assert len(ports) == 6 and set(ports) == {one, two}
        assert all(a != b for a, b in itertools.pairwise(ports))  # one each, in turn
        topo.kill("replica-1")
        assert landed(balancer, 4) == [(two, True)] * 4  # refused connects go elsewhere
        balancer.wait_backends({"replica-2"}, timeout=20)  # and its checks mark it down
        topo.start_node("replica-1")
        balancer.wait_backends({"replica-1", "replica-2"}, timeout=20)
        assert {port for port, _ in landed(balancer, 4)} == {one, two}
        pid, folder = balancer.pid, balancer.folder
        assert pid is not None
    assert not alive(pid) and not folder.exists()  # stopped with the topology
