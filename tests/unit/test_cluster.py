"""The cluster's role and identity rules, fed with probe answers (no server)."""

from __future__ import annotations

import pytest

from areplica.cluster import Cluster, Identity
from areplica.drivers import get_driver
from areplica.dsn import parse
from areplica.errors import ConfigurationError
from areplica.node import Node

SYSID = 7000000000000000001
OTHER = 7000000000000000002


def member(name: str, port: int) -> Node:
    return Node(
        name,
        parse(f"host=127.0.0.1 port={port} dbname=app"),
        role="replica",
        driver=get_driver("aiopg"),
        pool_size=1,
        connect_timeout=1.0,
    )


def ident(recovery: bool, timeline: int = 1, sysid: int = SYSID, port: int = 0) -> Identity:
    return Identity(recovery, sysid, timeline, (sysid, 1.0, port))


def three() -> tuple[Cluster, Node, Node, Node]:
    cluster = Cluster("c")
    a, b, c = member("a", 1), member("b", 2), member("c", 3)
    for node in (a, b, c):
        cluster.add(node)
    return cluster, a, b, c


def test_roles_are_discovered_and_follow_a_switchover() -> None:
    cluster, a, b, c = three()
    cluster.observe({a: ident(False, 1, port=1), b: ident(True, port=2), c: ident(True, port=3)})
    assert cluster.primary is a and cluster.readers() == [b, c]
    # Switchover: b promoted on timeline 2, a demoted and replaying.
    cluster.observe({a: ident(True, 2, port=1), b: ident(False, 2, port=2), c: ident(True, port=3)})
    assert cluster.primary is b and a.role == "replica" and set(cluster.readers()) == {a, c}
    assert not cluster.split_brain


def test_old_primary_on_an_older_timeline_is_not_split_brain() -> None:
    cluster, a, b, c = three()
    cluster.observe({a: ident(False, 1, port=1), b: ident(True, port=2), c: ident(True, port=3)})
    # Failover: b promoted while a still runs (not yet demoted) on timeline 1.
    cluster.observe(
        {a: ident(False, 1, port=1), b: ident(False, 2, port=2), c: ident(True, port=3)}
    )
    assert cluster.primary is b and not cluster.split_brain
    assert a not in cluster.readers()  # out of recovery but not the primary: serves nothing


def test_two_primaries_on_one_timeline_are_split_brain() -> None:
    cluster, a, b, c = three()
    cluster.observe({a: ident(False, 1, port=1), b: ident(True, port=2), c: ident(True, port=3)})
    cluster.observe(
        {a: ident(False, 1, port=1), b: ident(False, 1, port=2), c: ident(True, port=3)}
    )
    assert cluster.split_brain


def test_foreign_and_duplicate_members_are_refused() -> None:
    cluster, a, b, c = three()
    cluster.observe(
        {a: ident(False, 1, port=1), b: ident(True, sysid=OTHER, port=2), c: ident(True, port=1)}
    )
    assert cluster.primary is a
    assert "another cluster" in (cluster.refused(b) or "")
    assert "same server" in (cluster.refused(c) or "")
    assert cluster.readers() == []


def test_one_server_listed_twice_is_refused_at_construction() -> None:
    cluster = Cluster("c")
    cluster.add(member("a", 1))
    with pytest.raises(ConfigurationError, match="same server"):
        cluster.add(member("b", 1))
    with pytest.raises(ConfigurationError, match="duplicate member name"):
        cluster.add(member("a", 2))


def test_a_demoted_primary_with_no_successor_leaves_no_primary() -> None:
    cluster, a, b, c = three()
    cluster.observe({a: ident(False, 1, port=1), b: ident(True, port=2), c: ident(True, port=3)})
    cluster.observe({a: ident(True, 1, port=1), b: ident(True, port=2), c: ident(True, port=3)})
    assert cluster.primary is None and set(cluster.readers()) == {a, b, c}


def test_an_unreachable_primary_stays_primary_until_another_appears() -> None:
    cluster, a, b, c = three()
    cluster.observe({a: ident(False, 1, port=1), b: ident(True, port=2), c: ident(True, port=3)})
    cluster.observe({a: TimeoutError(), b: ident(True, port=2), c: ident(True, port=3)})
    assert cluster.primary is a
