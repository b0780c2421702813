"""Entry point of the example app's container: create the example tables, then serve.

The manager is built by ``ReplicaManager.from_env()`` from ``AREPLICA_PRIMARY`` and
``AREPLICA_REPLICAS`` (DSNs separated by ``;``) and any other ``AREPLICA_*`` option. The
tables of ``examples/models.py`` are created on the primary if missing (the replicas get
them by replication), then uvicorn serves ``examples/fastapi_app.py`` on ``$PORT`` (8000).
"""

from __future__ import annotations

import asyncio
import os

import uvicorn

from areplica import ReplicaManager
from examples.fastapi_app import create_app
from examples.models import MODELS, bind


async def create_tables() -> None:
    async with ReplicaManager.from_env(name="example-setup") as mgr:
        bind(mgr.database)
        await mgr.create_tables(MODELS)


def main() -> None:
    asyncio.run(create_tables())
    app = create_app(ReplicaManager.from_env())
    uvicorn.run(app, host="0.0.0.0", port=int(os.environ.get("PORT", "8000")))


if __name__ == "__main__":
    main()
