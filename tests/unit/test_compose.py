"""docker/docker-compose.yml validates without a Docker engine (`docker-compose config`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

COMPOSE = Path(__file__).resolve().parents[2] / "docker" / "docker-compose.yml"


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_compose_file_validates() -> None:
    done = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    for service in ("primary:", "replica-1:", "replica-2:", "app:"):
        assert service in done.stdout
    assert "pg_basebackup" in (COMPOSE.parent / "replica-entrypoint.sh").read_text()
