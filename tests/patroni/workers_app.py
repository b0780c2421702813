"""The FastAPI app of the multi-worker switchover test, as the README shows an app.

Served by ``uvicorn --workers 4 --factory tests.patroni.workers_app:create``; the Patroni
REST URLs and the DSN template come from ``WORKERS_PATRONI`` (``;``-separated) and
``WORKERS_DSN``, the driver from ``WORKERS_DRIVER`` (aiopg when unset). Each request runs
in a session resumed from its token (the middleware).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import peewee
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from areplica import ReplicaManager
from areplica.contrib.fastapi import AreplicaMiddleware
from areplica.errors import AreplicaError


def create() -> FastAPI:
    # The defaults, as a README reader would run it (health_interval 1 s).
    mgr = ReplicaManager(
        patroni=os.environ["WORKERS_PATRONI"].split(";"),
        dsn=os.environ["WORKERS_DSN"],
        driver=os.environ.get("WORKERS_DRIVER", "aiopg"),
    )

    class WorkersLog(peewee.Model):
        id = peewee.BigAutoField()
        tag = peewee.TextField(null=True)

        class Meta:
            database = mgr.database
            table_name = "workers_log"

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with mgr:
            # Every worker creates the table at startup: create_tables serializes them.
            await mgr.create_tables([WorkersLog])
            app.state.areplica = mgr
            yield

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(AreplicaMiddleware, manager=mgr)

    @app.exception_handler(AreplicaError)
    async def unavailable(request: Request, exc: AreplicaError) -> JSONResponse:
        return JSONResponse({"error": type(exc).__name__}, status_code=503)

    @app.post("/rows/{tag}")
    async def add(tag: str) -> dict[str, Any]:
        await mgr.execute_sql("INSERT INTO workers_log (tag) VALUES (%s)", (tag,))
        return {"tag": tag, "pid": os.getpid()}

    @app.get("/rows/{tag}")
    async def get(tag: str) -> dict[str, Any]:
        rows = await mgr.execute_sql(
            "SELECT inet_server_port(), count(*) FROM workers_log WHERE tag = %s", (tag,)
        )
        assert rows is not None
        return {"found": rows[0][1] == 1, "port": rows[0][0], "pid": os.getpid()}

    return app
