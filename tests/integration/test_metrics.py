"""The Prometheus collector reports what the servers did, and never a DSN or a password.

Reads return ``inet_server_port()``, so the server that answered is known for each one; the
scraped per-node read counters must match that tally exactly. Writes are counted on the
primary with a direct connection. Everything runs on the shared topology (no faults here).
"""

from __future__ import annotations

import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from psycopg2.extensions import make_dsn, parse_dsn

from areplica import ConfigurationError, ReplicaManager
from areplica.metrics import AreplicaCollector, register, unregister
from areplica.testing.topology import LocalTopology
from tests.conftest import caught_up, sql_on

pytestmark = pytest.mark.integration

PASSWORD = "s3cret-metrics-Pw"  # the topology trusts local connections: any password works
READS = 24
WRITES = 7


def with_password(dsn: str) -> str:
    params = parse_dsn(dsn)
    params["password"] = PASSWORD
    return str(make_dsn(**params))


@pytest.fixture
async def manager(
    topology: LocalTopology, schema: None, driver: str
) -> AsyncIterator[ReplicaManager]:
    replicas = {n: with_password(topology.dsn(n)) for n in topology.nodes if n != "primary"}
    mgr = ReplicaManager(
        with_password(topology.dsn("primary")),
        replicas,
        name="metrics-test",
        driver=driver,
        health_interval=0.2,
        health_timeout=1.0,
        pool_size=4,
    )
    async with mgr:
        yield mgr


def scrape(registry: CollectorRegistry) -> tuple[str, dict[str, list[Any]]]:
    """The exposition text, and its samples grouped by sample name."""
    text = generate_latest(registry).decode()
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return text, samples


def by_node(samples: dict[str, list[Any]], name: str, **match: str) -> dict[str, float]:
    return {
        s.labels["node"]: s.value
        for s in samples.get(name, [])
        if all(s.labels.get(k) == v for k, v in match.items())
    }


async def test_scrape_matches_what_the_servers_did(
    manager: ReplicaManager, topology: LocalTopology
) -> None:
    mgr = manager
    ports = {topology.port(n): n for n in topology.nodes}
    replicas = [n for n in topology.nodes if n != "primary"]
    label = f"metrics-{uuid.uuid4().hex[:12]}"

    for _ in range(WRITES):
        await mgr.execute_sql("INSERT INTO counter (label) VALUES (%s)", (label,))
    await caught_up(mgr, topology)

    served: Counter[str] = Counter()
    async with mgr.session():  # a fresh session: no causal token pins reads anywhere
        for _ in range(READS):
            rows = await mgr.execute_sql("SELECT inet_server_port()")
            assert rows is not None
            served[ports[rows[0][0]]] += 1
    assert sum(served.values()) == READS
    assert set(served) <= set(replicas)  # every read ran on a replica, by the server's word
    [(written,)] = sql_on(
        topology, "primary", "SELECT count(*) FROM counter WHERE label = %s", (label,)
    )
    assert written == WRITES

    registry = CollectorRegistry()
    collector = register(mgr, registry)
    assert isinstance(collector, AreplicaCollector)
    text, samples = scrape(registry)

    # Reads: per node, exactly the tally of the servers' answers; writes: all on the primary.
    reads = by_node(samples, "areplica_reads_total", manager="metrics-test")
    assert reads == {n: float(served[n]) for n in topology.nodes}
    writes = by_node(samples, "areplica_writes_total", manager="metrics-test")
    assert writes == {"primary": float(WRITES), **{n: 0.0 for n in replicas}}
    # Roles and states: every node up, with one state sample at 1.
    roles = {s.labels["node"]: s.labels["role"] for s in samples["areplica_node_up"]}
    assert roles == {"primary": "primary", **{n: "replica" for n in replicas}}
    assert by_node(samples, "areplica_node_up") == {n: 1.0 for n in topology.nodes}
    for state in ("up", "lagging", "down"):
        expected = 1.0 if state == "up" else 0.0
        assert by_node(samples, "areplica_node_state", state=state) == {
            n: expected for n in topology.nodes
        }
    # Gauges: as status() has them (lag only for replicas), nothing running now.
    status = {s.name: s for s in mgr.status()}
    for name in ("areplica_node_lag_bytes", "areplica_node_lag_seconds"):
        lag = by_node(samples, name)
        assert set(lag) == set(replicas) and all(v >= 0 for v in lag.values())
    latency = by_node(samples, "areplica_node_probe_latency_seconds")
    assert set(latency) == set(topology.nodes) and all(v > 0 for v in latency.values())
    assert by_node(samples, "areplica_node_in_flight") == {n: 0.0 for n in topology.nodes}
    assert by_node(samples, "areplica_node_pool_in_use") == {n: 0.0 for n in topology.nodes}
    assert by_node(samples, "areplica_node_pool_size") == {n: 4.0 for n in topology.nodes}
    errors = by_node(samples, "areplica_errors_total")
    assert errors == {n: float(status[n].errors) for n in topology.nodes}
    assert by_node(samples, "areplica_evictions_total") == {n: 0.0 for n in topology.nodes}
    # Manager counters: nothing fell back to the primary or was retried.
    for name in (
        "areplica_fallback_reads_total",
        "areplica_retried_reads_total",
        "areplica_unknown_positions_total",
        "areplica_lost_tokens_total",
    ):
        assert [(s.labels, s.value) for s in samples[name]] == [({"manager": "metrics-test"}, 0.0)]

    # Scrapes read the counters live: more reads show up in the next scrape.
    async with mgr.session():
        await mgr.execute_sql("SELECT 1")
    _, again = scrape(registry)
    assert sum(by_node(again, "areplica_reads_total").values()) == READS + 1

    # No DSN, host or password anywhere in the output, and only the documented labels.
    assert PASSWORD not in text
    assert "password" not in text.lower()
    assert "127.0.0.1" not in text and "dbname" not in text
    allowed = {"manager", "node", "role", "state"}
    assert {k for group in samples.values() for s in group for k in s.labels} == allowed


async def test_managers_share_one_collector_per_registry(topology: LocalTopology) -> None:
    primary = with_password(topology.dsn("primary"))
    one = ReplicaManager(primary, name="one")
    two = ReplicaManager(primary, name="two")
    registry = CollectorRegistry()
    collector = register(one, registry)
    assert register(two, registry) is collector
    assert register(two, registry) is collector  # the same manager again: no change
    assert collector.managers == [one, two]
    # Neither is connected: both report their node down, without any I/O.
    _, samples = scrape(registry)
    assert sorted((s.labels["manager"], s.value) for s in samples["areplica_node_up"]) == [
        ("one", 0.0),
        ("two", 0.0),
    ]
    with pytest.raises(ConfigurationError, match="one"):
        register(ReplicaManager(primary, name="one"), registry)
    unregister(one, registry)
    _, samples = scrape(registry)
    assert {s.labels["manager"] for s in samples["areplica_node_up"]} == {"two"}
    unregister(two, registry)
    assert scrape(registry)[1] == {}
    assert register(one, registry) is not collector  # a new collector once the old one left


def test_missing_prometheus_client_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, topology: LocalTopology
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    mgr = ReplicaManager(with_password(topology.dsn("primary")))
    with pytest.raises(ConfigurationError, match=r"pip install 'areplica\[prometheus\]'"):
        AreplicaCollector(mgr)
    with pytest.raises(ConfigurationError, match="prometheus-client"):
        register(mgr)
