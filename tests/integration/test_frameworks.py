"""FastAPI and aiohttp on the real topology: POST then GET sees the row, GETs hit replicas."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from aiohttp.test_utils import TestClient, TestServer

from areplica import ReplicaManager
from areplica.contrib import TOKEN_COOKIE, TOKEN_HEADER
from areplica.testing.topology import LocalTopology
from examples import aiohttp_app, fastapi_app
from examples.models import MODELS
from tests.conftest import make_manager, sql_on

pytestmark = pytest.mark.integration


@pytest.fixture
def app_db(topology: LocalTopology) -> Iterator[LocalTopology]:
    """The example apps' tables; replica-1 delayed by 1 s so that a stale read would show."""
    import peewee

    db = peewee.PostgresqlDatabase(None)
    for model in MODELS:
        model._meta.database = db
    for model in MODELS:
        sql_on(topology, "primary", model._schema._create_table(safe=True).query()[0])
    from examples.models import database

    for model in MODELS:
        model._meta.database = database
    sql_on(topology, "primary", "TRUNCATE users, posts RESTART IDENTITY CASCADE")
    topology.wait_replicated()
    topology.set_apply_delay("replica-1", 1000)
    try:
        yield topology
    finally:
        topology.set_apply_delay("replica-1", 0)
        topology.wait_replicated()


def served_by(mgr: ReplicaManager) -> dict[str, int]:
    return {s.name: s.reads for s in mgr.status()}


@pytest.mark.parametrize("carrier", ["header", "cookie"])
async def test_fastapi_post_then_get(app_db: LocalTopology, carrier: str) -> None:
    mgr = make_manager(app_db, weights={"replica-1": 1, "replica-2": 1})
    app = fastapi_app.create_app(mgr)
    async with app.router.lifespan_context(app):
        await mgr.check()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            before = served_by(mgr)
            for _ in range(30):
                r = await client.get("/users")
                assert r.status_code == 200
                assert TOKEN_HEADER not in r.headers  # no write: no token
            after = served_by(mgr)
            assert after["primary"] == before["primary"]  # GETs with no write: replicas only
            assert sum(after.values()) - sum(before.values()) == 30
            token: str | None = None
            for i in range(20):
                client.cookies.clear()
                headers = {TOKEN_HEADER: token} if (carrier == "header" and token) else {}
                created = await client.post(
                    "/users", json={"name": f"{carrier}-{i}"}, headers=headers
                )
                assert created.status_code == 201, created.text
                token = created.headers[TOKEN_HEADER]
                assert created.cookies.get(TOKEN_COOKIE) == token
                uid = created.json()["id"]
                if carrier == "header":
                    got = await client.get(f"/users/{uid}", headers={TOKEN_HEADER: token})
                else:
                    client.cookies.set(TOKEN_COOKIE, token)
                    got = await client.get(f"/users/{uid}")
                assert got.status_code == 200, f"write {i} not seen: {got.text}"
                post = await client.post(f"/users/{uid}/posts", json={"title": "t"})
                assert post.status_code == 201
                posts = await client.get(
                    f"/users/{uid}/posts", headers={TOKEN_HEADER: post.headers[TOKEN_HEADER]}
                )
                assert [p["title"] for p in posts.json()] == ["t"]


async def test_aiohttp_post_then_get(app_db: LocalTopology) -> None:
    mgr = make_manager(app_db)
    app = aiohttp_app.create_app(mgr)
    async with TestClient(TestServer(app)) as client:
        await mgr.check()
        before = served_by(mgr)
        for _ in range(30):
            r = await client.get("/users")
            assert r.status == 200 and TOKEN_HEADER not in r.headers
        after = served_by(mgr)
        assert after["primary"] == before["primary"]
        for i in range(20):
            created = await client.post("/users", json={"name": f"aio-{i}"})
            assert created.status == 201
            token = created.headers[TOKEN_HEADER]
            assert (
                client.session.cookie_jar.filter_cookies(client.make_url("/"))[TOKEN_COOKIE].value
                == token
            )
            uid = (await created.json())["id"]
            got = await client.get(f"/users/{uid}")  # the cookie jar sends the token back
            assert got.status == 200, f"write {i} not seen"
            post = await client.post(f"/users/{uid}/posts", json={"title": "t"})
            assert post.status == 201
            posts = await (await client.get(f"/users/{uid}/posts")).json()
            assert [p["title"] for p in posts] == ["t"]
    assert not mgr.is_open  # cleanup_ctx closed it
    await asyncio.sleep(0)
