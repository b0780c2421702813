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


def test_status_prints_a_table_with_a_header_and_dashes_for_unknowns(small: LocalTopology) -> None:
    dsns = [small.dsn(n) for n in small.nodes]
    dead = "postgresql://postgres@127.0.0.1:1/postgres"  # nothing listens on port 1
    done = status(*dsns, dead)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:6] == ["NAME", "ROLE", "STATE", "LAG", "LATENCY", "DSN"]
    assert lines[0].split()[-1] == "ERROR"
    assert "None" not in done.stdout
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert list(rows) == ["primary", "replica-1", "replica-2", "replica-3"]
    primary = rows["primary"]
    assert primary[1:4] == ["primary", "up", "-"]  # no lag for a primary
    assert primary[4].endswith("ms") and primary[-1] == "-"
    replica = rows["replica-1"]
    assert replica[1:3] == ["replica", "up"] and replica[3].endswith("B")
    down = rows["replica-3"]
    assert down[1:6] == ["-", "down", "-", "-", "user=postgres"]
    assert "Connection refused" in lines[-1] or "OperationalError" in lines[-1]
    assert len(lines) == 5  # the driver's multi-line message stays on its row


def test_status_rejects_a_bad_dsn_in_one_masked_line() -> None:
    done = status("postgresql://app:Tr0ub4dor/horse@db.example:5432/app")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "Tr0ub4dor" not in done.stderr and "horse" not in done.stderr
    assert done.stderr.startswith("areplica status: dsn: ambiguous URL")


def test_help_is_plain_text_and_version_is_the_installed_one() -> None:
    from importlib.metadata import version

    run = [sys.executable, "-m", "areplica"]
    helps = [
        subprocess.run([*run, *command, "--help"], capture_output=True, text=True, timeout=60)
        for command in ([], ["demo"], ["status"], ["down"])
    ]
    for done in helps:
        assert done.returncode == 0, done.stderr
        assert "``" not in done.stdout and ":class:" not in done.stdout
    assert "down" in helps[0].stdout and "--version" in helps[0].stdout
    shown = subprocess.run([*run, "--version"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0
    assert shown.stdout.strip() == f"areplica {version('areplica')}"


def test_demo_keep_then_down_stops_every_server_and_removes_the_directory() -> None:
    env = {**os.environ, "AREPLICA_PG_SOURCE": "embedded"}
    kept = subprocess.run(
        [sys.executable, "-m", "areplica", "demo", "--duration", "3", "--keep"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    directory: Path | None = None
    try:
        assert kept.returncode == 0, kept.stdout[-3000:] + kept.stderr[-3000:]
        hint = next(ln for ln in kept.stdout.splitlines() if ln.startswith("stop it with: "))
        command = hint.removeprefix("stop it with: ").split()
        assert command[:2] == ["areplica", "down"]
        directory = Path(command[2])
        dsns = [
            ln.split()[1]
            for ln in kept.stdout.splitlines()
            if ln.startswith("  ") and "postgresql://" in ln
        ]
        assert len(dsns) == 3
        from areplica.testing._support import run_sql

        recovery = [run_sql(dsn, "SELECT pg_is_in_recovery()")[0][0] for dsn in dsns]
        assert recovery == [False, True, True]  # the servers outlived the demo
        pids = [
            int((home / "data" / "postmaster.pid").read_text().split()[0])
            for home in directory.iterdir()
            if (home / "data" / "postmaster.pid").exists()
        ]
        assert len(pids) == 3
        down = subprocess.run(
            [sys.executable, "-m", "areplica", *command[1:]],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert down.returncode == 0, down.stdout + down.stderr
        assert "stopped primary, replica-1, replica-2" in down.stdout
        assert not directory.exists()
        from areplica.testing.topology import _alive  # live and not a zombie

        assert not [p for p in pids if _alive(p)]  # gone (init may reap them a bit later)
        assert processes_mentioning(str(directory)) == []
        # A folder that is not a kept topology is refused and left alone.
        refused = subprocess.run(
            [sys.executable, "-m", "areplica", "down", str(Path.cwd())],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode == 2 and "not the directory" in refused.stderr
        assert Path.cwd().exists()
    finally:
        if directory is not None and directory.exists():
            from areplica.testing.topology import remove_detached

            remove_detached(directory)
