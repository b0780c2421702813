"""A real Patroni cluster (etcd and three Patroni members) for the tests in this folder.

The session-scoped ``patroni`` fixture skips, with the one-line reason, where etcd, Patroni
or PostgreSQL is missing (see ``areplica.testing.patroni``) or ``AREPLICA_SKIP_INTEGRATION``
is set; with ``AREPLICA_REQUIRE_PATRONI=1`` (for CI) a missing program fails instead.

Tests that change the cluster (switchover, crash, tags, members) leave it healthy again;
``healthy_patroni`` waits for that before a test starts.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from areplica.testing.patroni import PatroniTopology, PatroniUnavailable


def start_or_skip(topology: PatroniTopology) -> PatroniTopology:
    """Start ``topology``; skip the test with the reason when Patroni cannot run here."""
    if os.environ.get("AREPLICA_SKIP_INTEGRATION"):
        pytest.skip("AREPLICA_SKIP_INTEGRATION is set")
    try:
        topology.start()
    except PatroniUnavailable as exc:
        if os.environ.get("AREPLICA_REQUIRE_PATRONI"):
            pytest.fail(f"AREPLICA_REQUIRE_PATRONI is set: {exc}", pytrace=False)
        pytest.skip(str(exc))
    return topology


@pytest.fixture(scope="session")
def patroni() -> Iterator[PatroniTopology]:
    """Three Patroni members ``n1``..``n3`` over one etcd, for the whole session."""
    topology = PatroniTopology()
    try:
        yield start_or_skip(topology)
    finally:
        topology.close()


@pytest.fixture
def healthy_patroni(patroni: PatroniTopology) -> PatroniTopology:
    """The session's cluster, once a leader accepts writes and every other member streams."""
    patroni.wait_healthy(timeout=120)
    return patroni


def in_recovery(topology: PatroniTopology, member: str) -> bool:
    """The server's own answer to ``pg_is_in_recovery()``."""
    return bool(topology.query(member, "SELECT pg_is_in_recovery()")[0][0])


def streaming_to(topology: PatroniTopology, leader: str) -> set[str]:
    """Who ``leader``'s ``pg_stat_replication`` lists as streaming (Patroni names them)."""
    rows: list[Any] = topology.query(
        leader, "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'"
    )
    return {row[0] for row in rows}
