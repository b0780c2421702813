"""The pytest plugin's fixtures, as a user's test suite gets them.

The first test uses them in this suite (auto mode, session loops). The others run pytest in
a subprocess on a temporary project of the user's shape, in pytest-asyncio's strict mode and
in auto mode, with ``-W error``: the fixtures work and nothing warns. The project sets
``asyncio_default_fixture_loop_scope`` because pytest-asyncio itself warns when it is unset,
areplica or not (the README's sample project sets it too).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from areplica import ReplicaManager
from areplica.testing import LocalTopology

pytestmark = pytest.mark.integration

SRC = Path(__file__).resolve().parents[2] / "src"

USER_TESTS = """
import peewee
import peewee_async
import pytest

from areplica import ReplicaManager
from areplica.testing import LocalTopology


class Item(peewee_async.AioModel):
    title = peewee.CharField()

    class Meta:
        table_name = "plugin_item"


@pytest.mark.asyncio
async def test_manager_reads_on_a_standby(
    areplica_topology: LocalTopology, areplica_manager: ReplicaManager
) -> None:
    rows = await areplica_manager.execute_sql("SELECT pg_is_in_recovery(), inet_server_port()")
    assert rows[0][0] is True
    assert rows[0][1] in {areplica_topology.port(n) for n in areplica_topology.nodes[1:]}


@pytest.mark.asyncio
async def test_transaction_sees_its_writes(areplica_transaction: ReplicaManager) -> None:
    mgr = areplica_transaction
    with mgr.database.bind_ctx([Item]):
        await mgr.create_tables([Item])
        await Item.aio_create(title="a")
        rows = await mgr.execute_sql("SELECT count(*), inet_server_port() FROM plugin_item")
        assert rows[0][0] == 1


@pytest.mark.asyncio
async def test_the_transaction_was_rolled_back(areplica_topology: LocalTopology) -> None:
    import psycopg2

    conn = psycopg2.connect(areplica_topology.dsn("primary"))
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT to_regclass('plugin_item')")
            assert cursor.fetchone() == (None,)
    finally:
        conn.close()
"""


def run_user_project(
    tmp_path: Path, ini: str, tests: str = USER_TESTS
) -> subprocess.CompletedProcess[str]:
    """pytest -W error on a project holding ``tests`` and a pyproject.toml of ``ini``."""
    (tmp_path / "pyproject.toml").write_text("[tool.pytest.ini_options]\n" + textwrap.dedent(ini))
    (tmp_path / "test_user.py").write_text(tests)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-W",
            "error",
            "-p",
            "no:cacheprovider",
            "-q",
            "--areplica-replicas",
            "1",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


async def test_plugin_fixtures(
    areplica_topology: LocalTopology, areplica_manager: ReplicaManager
) -> None:
    assert areplica_manager.is_open
    assert [s.name for s in areplica_manager.status()] == areplica_topology.nodes
    rows = await areplica_manager.execute_sql("SELECT pg_is_in_recovery(), inet_server_port()")
    assert rows is not None and rows[0][0] is True
    assert rows[0][1] in {areplica_topology.port(n) for n in areplica_topology.nodes[1:]}


@pytest.mark.parametrize(
    "ini",
    [
        'asyncio_mode = "strict"\nasyncio_default_fixture_loop_scope = "function"\n',
        'asyncio_mode = "auto"\nasyncio_default_fixture_loop_scope = "function"\n',
        # Fixtures default to a loop per function, tests to the session's: the manager must
        # follow the tests (a manager made in another loop fails "attached to a different
        # loop").
        'asyncio_mode = "auto"\nasyncio_default_fixture_loop_scope = "function"\n'
        'asyncio_default_test_loop_scope = "session"\n',
    ],
    ids=["strict", "auto", "auto-session-tests"],
)
def test_a_user_project(tmp_path: Path, ini: str) -> None:
    result = run_user_project(tmp_path, ini)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "3 passed" in output and "warning" not in output.lower(), output[-4000:]


def test_a_test_in_another_loop_is_told_why(tmp_path: Path) -> None:
    tests = """
import pytest


@pytest.mark.asyncio(loop_scope="module")
async def test_in_the_module_loop(areplica_manager) -> None:
    pass
"""
    ini = 'asyncio_mode = "strict"\nasyncio_default_fixture_loop_scope = "function"\n'
    result = run_user_project(tmp_path, ini, tests)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-4000:]
    assert "areplica_manager runs in the 'function' event loop" in output, output[-4000:]
    assert "asks for the 'module' one" in output
