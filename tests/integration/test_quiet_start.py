"""A healthy start is quiet: with logging never configured, nothing reaches stderr."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from areplica.testing.topology import LocalTopology

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import asyncio, sys
from areplica import ReplicaManager

async def main():
    mgr = ReplicaManager(sys.argv[1], sys.argv[2:], health_interval=0.2)
    async with mgr:
        await mgr.execute_sql("SELECT 1")
        await mgr.check()
        await asyncio.sleep(0.5)  # a few health rounds
    print("done")

asyncio.run(main())
"""


@pytest.mark.parametrize("driver", ["aiopg", "psycopg"])
def test_a_healthy_start_writes_nothing_to_stderr(topology: LocalTopology, driver: str) -> None:
    replicas = [topology.dsn(n) for n in topology.nodes if n != "primary"]
    script = SCRIPT.replace("health_interval=0.2", f"health_interval=0.2, driver={driver!r}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    done = subprocess.run(
        [sys.executable, "-c", script, topology.dsn("primary"), *replicas],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "done"
    assert done.stderr == ""
