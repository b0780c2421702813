"""``areplica status`` on a real Patroni cluster, before and after a switchover."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from psycopg2.extensions import parse_dsn

import areplica
from areplica.testing.patroni import PatroniTopology

pytestmark = pytest.mark.patroni

SOURCE = str(Path(areplica.__file__).resolve().parents[1])


def status(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m areplica status ARGS`` with this checkout's areplica."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("AREPLICA_PRIMARY", "AREPLICA_REPLICAS")
    }
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SOURCE, env.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, "-m", "areplica", "status", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def healthy_report(*args: str, timeout: float = 30.0) -> dict[str, Any]:
    """The ``--json`` report once it says healthy (a member may still be catching up)."""
    deadline = time.monotonic() + timeout
    while True:
        done = status("--json", *args)
        assert done.returncode in (0, 1), done.stdout + done.stderr
        data: dict[str, Any] = json.loads(done.stdout)
        if done.returncode == 0:
            assert data["healthy"] is True
            return data
        if time.monotonic() > deadline:
            raise AssertionError(f"never healthy: {done.stdout}{done.stderr}")
        time.sleep(0.5)


def test_status_follows_patroni_through_a_switchover(healthy_patroni: PatroniTopology) -> None:
    topo = healthy_patroni
    password = parse_dsn(topo.dsn("n1"))["password"]
    from_patroni = [arg for url in topo.rest_urls for arg in ("--patroni", url)]
    from_patroni += ["--dsn", topo.dsn("n1")]
    saved = [topo.dsn(member) for member in topo.members]  # an operator's saved command

    before = healthy_report(*from_patroni)
    old = topo.leader()
    assert before["primary"] == old
    assert {n["name"]: n["role"] for n in before["nodes"]} == {
        m: "primary" if m == old else "replica" for m in topo.members
    }

    result = topo.switchover()
    topo.wait_healthy(timeout=120)
    new = result.new_leader
    after = healthy_report(*from_patroni)
    assert after["primary"] == new != old
    assert {n["name"]: n["role"] for n in after["nodes"]} == {
        m: "primary" if m == new else "replica" for m in topo.members
    }
    assert {n["timeline"] for n in after["nodes"] if n["name"] == new} == {
        max(n["timeline"] for n in before["nodes"]) + 1
    }

    # The saved list of DSNs stays right too: roles are discovered, not positional.
    listed = healthy_report(*saved)
    primary = topo.members.index(new) + 1
    assert listed["primary"] == f"member-{primary}"

    table = status(*from_patroni)
    assert table.returncode == 0, table.stdout + table.stderr
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines()[1:]}
    assert rows[new][1:3] == ["primary", "up"] and rows[old][1:3] == ["replica", "up"]
    for done in (table, status("--json", *from_patroni), status(*saved)):
        assert password not in done.stdout + done.stderr
