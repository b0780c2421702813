"""The example apps' models: users and their posts, bound to a manager by ``bind()``."""

from __future__ import annotations

import asyncio

import peewee
import peewee_async

from areplica import ReplicaManager
from areplica.consistency import parse_lsn

database = peewee.DatabaseProxy()


class BaseModel(peewee_async.AioModel):
    class Meta:
        database = database


class User(BaseModel):
    name = peewee.CharField(unique=True)

    class Meta:
        table_name = "users"


class Post(BaseModel):
    author = peewee.ForeignKeyField(User, backref="posts", on_delete="CASCADE")
    title = peewee.CharField()
    body = peewee.TextField(default="")

    class Meta:
        table_name = "posts"


MODELS = [User, Post]


def bind(mgr_database: object) -> None:
    """Point the models at a manager's routing database (``mgr.database``)."""
    database.initialize(mgr_database)


async def create_tables(mgr: ReplicaManager, timeout: float = 30.0) -> None:
    """Create the tables on the primary (if missing), then wait until the replicas have them.

    Called at startup, before the first request: reads go to replicas, and a request carries
    no token yet, so a replica that had not replayed the ``CREATE TABLE`` would answer
    ``relation "users" does not exist``.
    """
    async with mgr.session():
        await mgr.create_tables(MODELS)  # safe=True: CREATE TABLE IF NOT EXISTS
        token = mgr.token
    if token is None:  # consistency="eventual" keeps no token: nothing to wait for
        return
    target = parse_lsn(token)
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        behind = [
            s.name
            for s in await mgr.check()
            if s.role == "replica"
            and s.state == "up"
            and (s.replay_lsn is None or parse_lsn(s.replay_lsn) < target)
        ]
        if not behind or asyncio.get_running_loop().time() > deadline:
            return  # a replica still behind then is left to causal reads and health checks
        await asyncio.sleep(0.05)
