"""The example apps on a fresh database: they create their tables and answer at once.

Each test gets a database that never saw the examples' tables (created on the primary and
replayed by every replica), starts an app on it the way its README section says, and checks
the first requests (200/201, never ``relation "users" does not exist``) and that the write
landed on the primary, asking the primary itself. test_frameworks.py covers routing and
tokens in depth; these are about the first minute.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from aiohttp.test_utils import TestClient, TestServer

from areplica.testing._support import run_sql
from areplica.testing.topology import LocalTopology
from examples import aiohttp_app, fastapi_app
from tests.integration.fresh import FreshDatabase, fresh_database

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fresh_db(topology: LocalTopology) -> Iterator[FreshDatabase]:
    with fresh_database(topology, "areplica_examples") as db:
        for node in topology.nodes:  # every replica has it (and no users table)
            assert run_sql(db.direct_dsn(node), "SELECT to_regclass('users')") == [(None,)]
        yield db


async def test_fastapi_example_creates_its_tables_and_answers_its_first_requests(
    fresh_db: FreshDatabase,
) -> None:
    app = fastapi_app.create_app(fresh_db.manager())
    # No asgi-lifespan here: the lifespan runs by hand, as an ASGI server runs it.
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            listed = await client.get("/users")  # the very first request: a replica read
            assert listed.status_code == 200, listed.text
            assert listed.json() == []
            created = await client.post("/users", json={"name": "first"})
            assert created.status_code == 201, created.text
            fetched = await client.get(f"/users/{created.json()['id']}")  # cookie: the token
            assert fetched.status_code == 200 and fetched.json()["name"] == "first"
    assert fresh_db.on_primary("SELECT name FROM users") == [("first",)]


async def test_aiohttp_example_creates_its_tables_and_answers_its_first_requests(
    fresh_db: FreshDatabase,
) -> None:
    app = aiohttp_app.create_app(fresh_db.manager())
    async with TestClient(TestServer(app)) as client:
        listed = await client.get("/users")
        assert listed.status == 200, await listed.text()
        assert await listed.json() == []
        created = await client.post("/users", json={"name": "first"})
        assert created.status == 201, await created.text()
        uid = (await created.json())["id"]
        fetched = await client.get(f"/users/{uid}")  # the cookie jar carries the token
        assert fetched.status == 200 and (await fetched.json())["name"] == "first"
    assert fresh_db.on_primary("SELECT name FROM users") == [("first",)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "uvicorn", "--factory", "examples.fastapi_app:app_from_env", "--port", "{port}"],
        ["-m", "aiohttp.web", "-H", "127.0.0.1", "-P", "{port}", "examples.aiohttp_app:init_app"],
    ],
    ids=["uvicorn", "aiohttp.web"],
)
def test_the_readme_commands_serve_the_examples(
    fresh_db: FreshDatabase, command: list[str]
) -> None:
    port = _free_port()
    args = [sys.executable, *(part.format(port=port) for part in command)]
    server = subprocess.Popen(
        args,
        cwd=ROOT,
        env=fresh_db.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:  # until the server listens (its tables are created before that)
            try:
                listed = httpx.get(f"{base}/users", timeout=5)
                break
            except httpx.TransportError:
                assert server.poll() is None, server.communicate()[0][-3000:]
                assert time.monotonic() < deadline, "the example did not start in 30 s"
                time.sleep(0.1)
        assert listed.status_code == 200 and listed.json() == [], listed.text
        created = httpx.post(f"{base}/users", json={"name": "from-readme"}, timeout=5)
        assert created.status_code == 201, created.text
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0]
    assert fresh_db.on_primary("SELECT name FROM users") == [("from-readme",)], output[-3000:]
