"""The example apps' models: users and their posts, bound to a manager by ``bind()``."""

from __future__ import annotations

import peewee
import peewee_async

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
