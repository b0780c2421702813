"""Result handling: what a query returns once its cursor has run (no routing, no I/O of its own).

A *fetch* is peewee-async's ``fetch_results`` callable: ``await fetch(database, cursor)``.
peewee-async's ``AioModel`` queries bring their own; these are the ones areplica uses for plain
peewee queries, raw SQL and its own statements.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import peewee
from peewee_async.result_wrappers import fetch_models

__all__ = [
    "FetchResults",
    "default_fetch",
    "fetch_raw",
    "fetchall_or_none",
    "fetchone_raw",
    "select_of",
]

FetchResults = Callable[[Any, Any], Awaitable[Any]]


async def fetchone_raw(database: Any, cursor: Any) -> Any:
    """The first row as the driver returns it."""
    return await cursor.fetchone()


async def fetchall_or_none(database: Any, cursor: Any) -> list[tuple[Any, ...]] | None:
    """Every row as tuples; ``None`` for a statement that returns no rows."""
    if cursor.description is None:
        return None
    return [tuple(row) for row in await cursor.fetchall()]


def fetch_raw(query: Any) -> FetchResults:
    """A ``RawQuery``'s rows, or the row count of a raw write (it has no rows)."""

    async def fetch(database: Any, cursor: Any) -> Any:
        if cursor.description is None:
            return cursor.rowcount
        return await fetch_models(cursor, query)

    return fetch


def default_fetch(query_: object) -> FetchResults | None:
    """Result handling for plain peewee queries (peewee-async's mixins do it for AioModel)."""
    query: Any = query_
    if isinstance(query_, peewee.Insert):

        async def fetch_insert(database: Any, cursor: Any) -> Any:
            if query._returning is None and database.returning_clause and query.table._primary_key:
                query._returning = (query.table._primary_key,)
                return await database.aio_last_insert_id(cursor, query)
            if getattr(query, "_return_cursor", False):
                return await fetch_models(cursor, query)
            if getattr(query, "_as_rowcount", False):
                return await database.aio_rows_affected(cursor)
            return await database.aio_last_insert_id(cursor, query)

        return fetch_insert
    if isinstance(query_, (peewee.Update, peewee.Delete)):

        async def fetch_write(database: Any, cursor: Any) -> Any:
            if getattr(query, "_return_cursor", False):
                return await fetch_models(cursor, query)
            return await database.aio_rows_affected(cursor)

        return fetch_write
    if isinstance(query_, (peewee.SelectBase, peewee.RawQuery)):

        async def fetch_rows(database: Any, cursor: Any) -> Any:
            return await fetch_models(cursor, query)

        return fetch_rows
    return None


def select_of(source: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """``(query, model)`` for ``get(Model, *filters, **eq)`` or ``get(query, ...)``."""
    if isinstance(source, peewee.Query):
        query, model = source, getattr(source, "model", None)
    else:
        query, model = source.select(), source
    conditions = list(args) + [getattr(model, k) == v for k, v in kwargs.items()]
    if conditions:
        query = query.where(*conditions)
    return query, model
