"""The example apps' models: users and their posts, bound to a manager by ``bind()``."""

from __future__ import annotations

import peewee
import peewee_async

from areplica import ReplicaManager

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
    await mgr.create_tables(MODELS)  # safe=True: CREATE TABLE IF NOT EXISTS
    await mgr.wait_replicated(timeout)  # a replica still behind is left to the health checks
