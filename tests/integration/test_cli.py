"""The ``areplica`` command as a user runs it: a subprocess, checked against the system."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from areplica.testing.topology import LocalTopology

pytestmark = pytest.mark.integration


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


def test_demo_runs_clean_and_leaves_nothing_behind() -> None:
    env = {**os.environ, "AREPLICA_PG_SOURCE": "embedded"}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "areplica", "demo", "--duration", "20"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    took = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert took < 60, took
    summary = json.loads(done.stdout.split("SUMMARY ", 1)[1].splitlines()[0])
    assert summary["failed_reads"] == 0
    assert summary["stale_reads"] == 0
    assert summary["lost_writes"] == 0
    assert summary["reads"] > 1000 and summary["writes"] > 100
    assert summary["postgresql"] >= 18  # the embedded wheel, not a system install
    assert set(summary["reads_per_node"]) >= {"replica-1", "replica-2"}
    assert "FAULT kill -9 replica-1" in done.stdout and "replica-1: up -> down" in done.stdout
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("PostgreSQL "))
    directory = line.rsplit(" in ", 1)[1].strip()
    assert directory and not Path(directory).exists()
    assert processes_mentioning(directory) == []


@pytest.fixture
def small() -> Iterator[LocalTopology]:
    with LocalTopology(replicas=2) as topology:
        yield topology


def status(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "areplica", "status", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_status_lists_every_node_and_fails_when_one_is_down(small: LocalTopology) -> None:
    dsns = [small.dsn(n).replace("postgres@", "postgres:Hidden-Pw-1@", 1) for n in small.nodes]
    ok = status(*dsns)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for name in ("primary", "replica-1", "replica-2"):
        assert name in ok.stdout
    assert "Hidden-Pw-1" not in ok.stdout + ok.stderr
    as_json = json.loads(status("--json", *dsns).stdout)
    assert as_json["healthy"] is True
    assert [n["role"] for n in as_json["nodes"]] == ["primary", "replica", "replica"]
    # From AREPLICA_* variables too.
    from_env = status(
        "--json", env={"AREPLICA_PRIMARY": dsns[0], "AREPLICA_REPLICAS": ";".join(dsns[1:])}
    )
    assert json.loads(from_env.stdout)["healthy"] is True

    small.kill("replica-2")
    bad = status(*dsns)
    assert bad.returncode != 0
    line = next(ln for ln in bad.stdout.splitlines() if ln.startswith("replica-2"))
    assert "down" in line
    assert "Hidden-Pw-1" not in bad.stdout + bad.stderr
    report = json.loads(status("--json", *dsns).stdout)
    assert report["healthy"] is False
    assert [n["name"] for n in report["nodes"] if n["state"] != "up"] == ["replica-2"]
