"""The peewee-async 0.x ``Manager`` query API (``get``, ``create``, ``count``, ...).

peewee-async 2.x removed its ``Manager``; ``QueryAPI`` brings those methods back as a layer
over one core call, ``Engine.execute``. Every method routes by the engine's rules: reads to
a caught-up replica, writes and transactions to the primary. Reads take
``on="primary" | "replica" | NAME``, ``max_staleness=SECONDS`` and ``timeout=SECONDS`` (the
whole call's bound).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import peewee

from .engine import Engine
from .results import fetchall_or_none, fetchone_raw, select_of

__all__ = ["QueryAPI"]


class QueryAPI:
    """The classic Manager's query methods, over ``self._engine``."""

    _engine: Engine

    async def execute(
        self,
        query: Any,
        *,
        on: str | None = None,
        max_staleness: float | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Execute any peewee query; returns what peewee-async's ``aio_execute`` returns.

        ``timeout``: seconds the whole read may take, retries and waits included
        (``ReadTimeoutError``); for a write, only the wait before it is sent.
        """
        return await self._engine.execute(
            query, on=on, max_staleness=max_staleness, timeout=timeout
        )

    async def execute_sql(
        self,
        sql: str,
        params: Sequence[Any] | None = None,
        *,
        on: str | None = None,
        max_staleness: float | None = None,
        timeout: float | None = None,
    ) -> list[tuple[Any, ...]] | None:
        """Run raw SQL, routed by the classifier; returns the rows of a read."""
        rows: list[tuple[Any, ...]] | None = await self._engine.execute_sql(
            sql, params, fetchall_or_none, on=on, max_staleness=max_staleness, timeout=timeout
        )
        return rows

    async def get(
        self,
        source: Any,
        *args: Any,
        on: str | None = None,
        max_staleness: float | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """The one row matching, or the model's ``DoesNotExist``."""
        query, model = select_of(source, args, kwargs)
        rows = await self._engine.execute(
            query.limit(1), on=on, max_staleness=max_staleness, timeout=timeout
        )
        if not rows:
            sql, params = self._engine.compile(query)
            raise model.DoesNotExist(
                f"{model.__name__} instance matching query does not exist:\n"
                f"SQL: {sql}\nParams: {params}"
            )
        return rows[0]

    async def get_or_none(self, source: Any, *args: Any, **kwargs: Any) -> Any:
        """The one row matching, or ``None`` (the arguments of ``get``)."""
        try:
            return await self.get(source, *args, **kwargs)
        except peewee.DoesNotExist:
            return None

    async def create(self, model: Any, **fields: Any) -> Any:
        """Insert a row on the primary and return the model instance."""
        instance = model(**fields)
        pk = await self._engine.execute(model.insert(**dict(instance.__data__)))
        if instance._pk is None:
            instance._pk = pk
        return instance

    async def get_or_create(
        self, model: Any, defaults: Mapping[str, Any] | None = None, **eq: Any
    ) -> tuple[Any, bool]:
        """``(instance, created)``: read (routed), then create on the primary if missing."""
        try:
            return await self.get(model, **eq), False
        except model.DoesNotExist:
            pass
        data = dict(eq)
        data.update(defaults or {})
        try:
            async with self._engine.transactions.atomic():
                return await self.create(model, **data), True
        except peewee.IntegrityError:
            # Another writer won the race; the row is on the primary even if no replica has it.
            try:
                return await self.get(model, on="primary", **eq), False
            except model.DoesNotExist:
                pass
            raise

    async def update(self, obj: Any, only: Iterable[Any] | None = None) -> int:
        """Save an instance's changed fields (or ``only`` those) on the primary."""
        field_dict = dict(obj.__data__)
        pk_field = obj._meta.primary_key
        if only is not None:
            field_dict = obj._prune_fields(field_dict, only)
        elif obj._meta.only_save_dirty:
            field_dict = obj._prune_fields(field_dict, obj.dirty_fields)
        if obj._meta.composite_key:
            for part in pk_field.field_names:
                field_dict.pop(part, None)
        else:
            field_dict.pop(pk_field.name, None)
        if not field_dict:
            return 0
        query = type(obj).update(**field_dict).where(obj._pk_expr())
        rows: int = await self._engine.execute(query)
        obj._dirty.clear()
        return rows

    async def delete(self, obj: Any, recursive: bool = False, delete_nullable: bool = False) -> int:
        """Delete an instance (and, with ``recursive``, its dependents) on the primary."""
        execute = self._engine.execute
        async with self._engine.transactions.atomic():
            if recursive:
                for query, fk in reversed(list(obj.dependencies(delete_nullable))):
                    model = fk.model
                    if fk.null and not delete_nullable:
                        await execute(model.update(**{fk.name: None}).where(query))
                    else:
                        await execute(model.delete().where(query))
            rows: int = await execute(type(obj).delete().where(obj._pk_expr()))
        return rows

    async def scalar(
        self,
        query: Any,
        as_tuple: bool = False,
        *,
        on: str | None = None,
        max_staleness: float | None = None,
        timeout: float | None = None,
    ) -> Any:
        """The first column of the first row (or the row with ``as_tuple``)."""
        row = await self._engine.execute(
            query, fetchone_raw, on=on, max_staleness=max_staleness, timeout=timeout
        )
        if row is None:
            return None
        return tuple(row) if as_tuple else row[0]

    async def count(
        self,
        query: Any,
        clear_limit: bool = False,
        *,
        on: str | None = None,
        max_staleness: float | None = None,
        timeout: float | None = None,
    ) -> int:
        """``SELECT COUNT(1)`` over the query, as peewee's ``count()`` does."""
        clone = query.order_by().alias("_wrapped")
        if clear_limit:
            clone._limit = clone._offset = None
        if _plain(clone):
            clone = clone.select(peewee.SQL("1"))
        wrapped = peewee.Select([clone], [peewee.fn.COUNT(peewee.SQL("1"))])
        return int(
            await self.scalar(wrapped, on=on, max_staleness=max_staleness, timeout=timeout) or 0
        )

    async def exists(
        self,
        query: Any,
        *,
        on: str | None = None,
        max_staleness: float | None = None,
        timeout: float | None = None,
    ) -> bool:
        """True when the query matches at least one row."""
        clone = query.columns(peewee.SQL("1"))
        clone._limit = 1
        clone._offset = None
        return bool(await self.scalar(clone, on=on, max_staleness=max_staleness, timeout=timeout))

    async def prefetch(
        self, query: Any, *subqueries: Any, prefetch_type: int = peewee.PREFETCH_TYPE.WHERE
    ) -> list[Any]:
        """peewee's ``prefetch()``: the query's rows with their related rows attached."""
        execute = self._engine.execute
        if not subqueries:
            return list(await execute(query))
        fixed = peewee.prefetch_add_subquery(query, subqueries, prefetch_type)  # type: ignore[attr-defined]
        deps: dict[Any, Any] = {}
        rel_map: dict[Any, list[Any]] = {}
        result: list[Any] = []
        for pq in reversed(fixed):
            query_model = pq.model
            if pq.fields:
                for rel_model in pq.rel_models:
                    rel_map.setdefault(rel_model, []).append(pq)
            deps[query_model] = {}
            id_map = deps[query_model]
            has_relations = bool(rel_map.get(query_model))
            result = list(await execute(pq.query))
            for instance in result:
                if pq.fields:
                    pq.store_instance(instance, id_map)
                if has_relations:
                    for rel in rel_map[query_model]:
                        rel.populate_instance(instance, deps[rel.model])
        return result

    async def create_tables(self, models: Iterable[Any], safe: bool = True, **options: Any) -> None:
        """Create the models' sequences, tables and indexes on the primary.

        In one transaction holding an advisory lock, so that workers starting together
        (each creating the same tables) wait for each other instead of failing.
        """
        execute = self._engine.execute
        async with self._engine.schema_change():
            for model in peewee.sort_models(list(models)):  # type: ignore[attr-defined]
                schema = model._schema
                for fld in model._meta.sorted_fields:
                    if fld.sequence and self._engine.core.database.sequences:
                        await execute(
                            schema._create_context()
                            .literal("CREATE SEQUENCE IF NOT EXISTS ")
                            .sql(schema._sequence_for_field(fld))
                        )
                await execute(schema._create_table(safe=safe, **options))
                for index in schema._create_indexes(safe=safe):
                    await execute(index)

    async def drop_tables(self, models: Iterable[Any], safe: bool = True, **options: Any) -> None:
        """Drop the models' tables on the primary."""
        for model in reversed(peewee.sort_models(list(models))):  # type: ignore[attr-defined]
            await self._engine.execute(model._schema._drop_table(safe=safe, **options))


def _plain(query: Any) -> bool:
    """True for a query without grouping, windows or DISTINCT (count it as ``SELECT 1``)."""
    return (
        getattr(query, "_having", None) is None
        and getattr(query, "_group_by", None) is None
        and getattr(query, "_windows", None) is None
        and getattr(query, "_distinct", None) is None
        and getattr(query, "_simple_distinct", None) is not True
    )
