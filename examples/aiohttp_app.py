"""A small aiohttp service on areplica: users and posts; create, list, fetch.

Run it from the checkout (``pip install -e '.[examples]'``), with a primary and replicas
reachable through AREPLICA_PRIMARY / AREPLICA_REPLICAS (README, "Examples"):

    python -m aiohttp.web -H 127.0.0.1 -P 8080 examples.aiohttp_app:init_app

Its tables are created at startup.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from areplica import ReplicaManager
from areplica.contrib.aiohttp import AREPLICA, setup

try:
    from .models import Post, User, bind, create_tables
except ImportError:  # run as a script
    from models import Post, User, bind, create_tables  # type: ignore[no-redef]

routes = web.RouteTableDef()


@routes.post("/users")
async def create_user(request: web.Request) -> web.Response:
    mgr = request.app[AREPLICA]
    data = await request.json()
    user = await mgr.create(User, name=data["name"])
    return web.json_response({"id": user.id, "name": user.name}, status=201)


@routes.get("/users")
async def list_users(request: web.Request) -> web.Response:
    mgr = request.app[AREPLICA]
    users = await mgr.execute(User.select().order_by(User.id))
    return web.json_response([{"id": u.id, "name": u.name} for u in users])


@routes.get("/users/{user_id}")
async def get_user(request: web.Request) -> web.Response:
    mgr = request.app[AREPLICA]
    user = await mgr.get_or_none(User, id=int(request.match_info["user_id"]))
    if user is None:
        raise web.HTTPNotFound(text="no such user")
    return web.json_response({"id": user.id, "name": user.name})


@routes.post("/users/{user_id}/posts")
async def create_post(request: web.Request) -> web.Response:
    mgr = request.app[AREPLICA]
    data = await request.json()
    async with mgr.atomic():
        author = await mgr.get_or_none(User, id=int(request.match_info["user_id"]))
        if author is None:
            raise web.HTTPNotFound(text="no such user")
        post = await mgr.create(Post, author=author, title=data["title"], body=data.get("body", ""))
    return web.json_response({"id": post.id, "title": post.title}, status=201)


@routes.get("/users/{user_id}/posts")
async def list_posts(request: web.Request) -> web.Response:
    author = int(request.match_info["user_id"])
    posts = await Post.select().where(Post.author == author).order_by(Post.id).aio_execute()
    return web.json_response([{"id": p.id, "title": p.title} for p in posts])


def create_app(mgr: ReplicaManager) -> web.Application:
    """The app, bound to ``mgr`` (opened and closed with the app, tables created at startup)."""
    bind(mgr.database)
    app = web.Application()
    setup(app, mgr)  # a cleanup_ctx: the manager is open for the contexts after it

    async def tables(app: web.Application) -> AsyncIterator[None]:
        await create_tables(app[AREPLICA])
        yield

    app.cleanup_ctx.append(tables)
    app.add_routes(routes)
    return app


def init_app(argv: list[str] | None = None) -> web.Application:
    """For ``python -m aiohttp.web``: a manager from AREPLICA_* variables."""
    return create_app(ReplicaManager.from_env())
