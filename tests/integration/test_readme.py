"""Every ```python example in README.md runs, against the real topology."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from fastapi import FastAPI

from areplica.testing.topology import LocalTopology

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_examples() -> None:
    assert len(BLOCKS) >= 3


def localise(code: str, topology: LocalTopology) -> str:
    hosts = {"db-primary": "primary", "db-r1": "replica-1", "db-r2": "replica-2"}
    for host, node in hosts.items():
        code = code.replace(f"postgresql://app:secret@{host}:5432/app", topology.dsn(node))
    assert "db-primary" not in code
    return code


@pytest.mark.parametrize("index", range(len(BLOCKS)))
async def test_readme_example(index: int, topology: LocalTopology, schema: None) -> None:
    namespace: dict[str, Any] = {"__name__": f"readme_example_{index}"}
    exec(compile(localise(BLOCKS[index], topology), f"README.md[{index}]", "exec"), namespace)
    ran = False
    if "main" in namespace:
        await namespace["main"]()
        ran = True
    app = namespace.get("app")
    if isinstance(app, FastAPI):
        async with app.router.lifespan_context(app):
            await namespace["mgr"].create_tables([namespace["Item"]])
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                added = await client.post("/items", params={"title": "first"})
                assert added.status_code == 200
                token = added.headers["X-Areplica-Token"]
                listed = await client.get("/items", headers={"X-Areplica-Token": token})
                assert "first" in listed.json()
            await namespace["mgr"].drop_tables([namespace["Item"]])
        ran = True
    elif isinstance(app, web.Application):
        mgr = namespace["mgr"]
        async with TestClient(TestServer(app)) as client:
            await mgr.create_tables([namespace["Item"]])
            await mgr.create(namespace["Item"], title="x")
            # The client carries the token of those writes (the replicas may not have the
            # new table yet): the middleware then serves it from a replica that does.
            listed = await client.get("/items", headers={"X-Areplica-Token": mgr.token})
            assert listed.status == 200 and isinstance(await listed.json(), list)
            await mgr.drop_tables([namespace["Item"]])
        ran = True
    assert ran, f"README example {index} defines neither main() nor app"
