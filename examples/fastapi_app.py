"""A small FastAPI service on areplica: users and posts; create, list, fetch.

Run it from the checkout (``pip install -e '.[examples]'``), with a primary and replicas
reachable through AREPLICA_PRIMARY / AREPLICA_REPLICAS (README, "Examples"):

    uvicorn --factory examples.fastapi_app:app_from_env

Its tables are created at startup. Writes go to the primary; reads go to replicas; a client
that wrote sends back the token it got (header or cookie) and its next read is served by a
replica that has its write.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from areplica import ReplicaManager
from areplica.contrib.fastapi import AreplicaMiddleware, Manager, lifespan

try:
    from .models import MODELS, Post, User, bind, create_tables
except ImportError:  # run as a script
    from models import MODELS, Post, User, bind, create_tables  # type: ignore[no-redef]


class NewUser(BaseModel):
    name: str


class NewPost(BaseModel):
    title: str
    body: str = ""


def create_app(mgr: ReplicaManager) -> FastAPI:
    """The app, bound to ``mgr`` (connected, and its tables created, by the app's lifespan)."""
    bind(mgr.database)

    @contextlib.asynccontextmanager
    async def startup(app: FastAPI) -> AsyncIterator[None]:
        async with lifespan(mgr)(app):  # connects the manager, closes it at shutdown
            await create_tables(mgr)
            yield

    app = FastAPI(lifespan=startup)
    app.add_middleware(AreplicaMiddleware, manager=mgr)

    @app.post("/users", status_code=201)
    async def create_user(data: NewUser, mgr: Manager) -> dict[str, Any]:
        user = await mgr.create(User, name=data.name)
        return {"id": user.id, "name": user.name}

    @app.get("/users")
    async def list_users(mgr: Manager) -> list[dict[str, Any]]:
        users = await mgr.execute(User.select().order_by(User.id))
        return [{"id": u.id, "name": u.name} for u in users]

    @app.get("/users/{user_id}")
    async def get_user(user_id: int, mgr: Manager) -> dict[str, Any]:
        user = await mgr.get_or_none(User, id=user_id)
        if user is None:
            raise HTTPException(404, "no such user")
        return {"id": user.id, "name": user.name}

    @app.post("/users/{user_id}/posts", status_code=201)
    async def create_post(user_id: int, data: NewPost, mgr: Manager) -> dict[str, Any]:
        async with mgr.atomic():
            author = await mgr.get_or_none(User, id=user_id)
            if author is None:
                raise HTTPException(404, "no such user")
            post = await mgr.create(Post, author=author, title=data.title, body=data.body)
        return {"id": post.id, "title": post.title}

    @app.get("/users/{user_id}/posts")
    async def list_posts(user_id: int) -> list[dict[str, Any]]:
        # The AioModel API routes through the same manager.
        posts = await Post.select().where(Post.author == user_id).order_by(Post.id).aio_execute()
        return [{"id": p.id, "title": p.title} for p in posts]

    app.state.models = MODELS
    return app


def app_from_env() -> FastAPI:
    """The app over ``ReplicaManager.from_env()`` (for ``uvicorn --factory``)."""
    return create_app(ReplicaManager.from_env())


if __name__ == "__main__":  # pragma: no cover
    import uvicorn

    uvicorn.run(app_from_env(), host="127.0.0.1", port=8000)
