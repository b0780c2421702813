"""Query classification (areplica.routing): SQL text and peewee query shapes, no server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import peewee
import pytest

from areplica import routing
from areplica.routing import (
    SIDE_EFFECT_FUNCTIONS,
    QueryKind,
    classify_query,
    classify_sql,
    clear_classification_cache,
    register_side_effect_function,
)

R = QueryKind.READ
W = QueryKind.WRITE

# A deferred database: query.sql() compiles with the PostgreSQL dialect and never connects.
db = peewee.PostgresqlDatabase(None)


class Base(peewee.Model):
    class Meta:
        database = db


class Author(Base):
    id = peewee.AutoField()
    name = peewee.CharField(index=True)
    updated_at = peewee.DateTimeField(null=True)


class Post(Base):
    id = peewee.AutoField()
    author = peewee.ForeignKeyField(Author, backref="posts")
    title = peewee.CharField()
    deleted = peewee.BooleanField(default=False)


@pytest.fixture(autouse=True)
def _fresh_state() -> Iterator[None]:
    """Each test starts with an empty cache and no registered functions."""
    clear_classification_cache()
    yield
    routing._registered_functions.clear()
    clear_classification_cache()


# --------------------------------------------------------------------------- raw SQL

SQL_CASES: list[tuple[str, QueryKind, str]] = [
    # Plain reads.
    ("SELECT 1", R, "select-literal"),
    ("select * from author", R, "lowercase-select"),
    ("SeLeCt * FrOm author", R, "mixed-case-select"),
    ("  \n\tSELECT 1  ", R, "leading-whitespace"),
    ("SELECT 1;", R, "trailing-semicolon"),
    ("SELECT a.*, p.title FROM author a JOIN post p ON p.author_id = a.id", R, "join"),
    ("SELECT * FROM author WHERE id IN (SELECT author_id FROM post)", R, "subquery"),
    ("(SELECT 1) UNION (SELECT 2)", R, "parenthesised-union"),
    ("SELECT 1 UNION ALL SELECT 2 EXCEPT SELECT 3", R, "compound"),
    ("WITH x AS (SELECT 1 AS n) SELECT n FROM x", R, "cte-read-only"),
    (
        "WITH RECURSIVE t(n) AS (VALUES (1) UNION ALL SELECT n + 1 FROM t WHERE n < 5) "
        "SELECT sum(n) FROM t",
        R,
        "cte-recursive",
    ),
    ("VALUES (1, 'a'), (2, 'b')", R, "values"),
    ("TABLE author", R, "table"),
    ("SHOW transaction_read_only", R, "show"),
    ("show all", R, "show-lowercase"),
    ("SELECT count(*), max(id), now() FROM author", R, "builtin-read-functions"),
    ("SELECT my_report(1)", R, "unknown-user-function-stays-read"),
    ("SELECT dblink('dbname=x', 'SELECT 1')", R, "dblink-remote-read"),
    ("SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()", R, "recovery-status-functions"),
    # Identifiers that merely look like keywords.
    ("SELECT updated_at, deleted, into_x, for_update FROM post", R, "keyword-prefixed-idents"),
    ('SELECT "update", "delete", "insert" FROM t', R, "quoted-keyword-idents"),
    ('SELECT "t1"."into" FROM "t" AS "t1" WHERE "t1"."copy" = %s', R, "quoted-into-copy"),
    ("SELECT t.update FROM t", R, "qualified-column-named-update"),
    ("SELECT x AS for_update FROM t", R, "alias-for_update"),
    ('SELECT "for" , "update" FROM t', R, "quoted-for-update-words"),
    ("SELECT lo_count FROM t", R, "lo-prefixed-column-not-a-call"),
    ("SELECT nextval_x(1), my_nextval(2)", R, "nextval-lookalike-functions"),
    ("SELECT a$update FROM t", R, "dollar-in-identifier"),
    # Literals containing write words.
    ("SELECT 'please delete me'", R, "string-with-delete"),
    ("SELECT * FROM t WHERE note = 'INSERT INTO x; UPDATE y'", R, "string-with-statements"),
    ("SELECT 'it''s an update'", R, "string-doubled-quote"),
    ("SELECT E'it\\'s FOR UPDATE'", R, "e-string-backslash-quote"),
    ("SELECT e'\\\\', 'insert'", R, "e-string-escaped-backslash"),
    ("SELECT 'a\\', 'b'", R, "standard-string-backslash-is-literal"),
    ("SELECT $$ DELETE FROM t $$", R, "dollar-quoted"),
    ("SELECT $fn$ it's $$ UPDATE $$ $fn$", R, "tagged-dollar-quote"),
    ("SELECT 'nextval(1)', 'lo_import(2)'", R, "side-effect-call-in-string"),
    ('SELECT "setval" FROM t', R, "column-named-like-side-effect-function"),
    ("SELECT * FROM t WHERE id = $1", R, "positional-parameter"),
    # Comments.
    ("-- leading comment\nSELECT 1", R, "line-comment-first"),
    ("/* header */ SELECT 1", R, "block-comment-first"),
    ("/* outer /* nested */ still comment; DELETE */ SELECT 1", R, "nested-block-comment"),
    ("SELECT 1 -- FOR UPDATE", R, "line-comment-with-lock"),
    ("SELECT /* INTO */ 1 /* ; DROP TABLE t */", R, "block-comments-inside"),
    ("SELECT 1 /* unterminated", W, "unterminated-block-comment"),
    ("SELECT 'unterminated", W, "unterminated-string"),
    ('SELECT "unterminated', W, "unterminated-quoted-identifier"),
    ("SELECT $$ unterminated", W, "unterminated-dollar-quote"),
    ("-- only a comment", W, "comment-only"),
    # Locking clauses.
    ("SELECT * FROM t FOR UPDATE", W, "for-update"),
    ("SELECT * FROM t FOR NO KEY UPDATE", W, "for-no-key-update"),
    ("SELECT * FROM t FOR SHARE", W, "for-share"),
    ("SELECT * FROM t FOR KEY SHARE", W, "for-key-share"),
    ("SELECT * FROM t for update of t nowait", W, "for-update-of-nowait-lower"),
    ("SELECT * FROM t FOR SHARE OF t SKIP LOCKED", W, "for-share-skip-locked"),
    ("SELECT * FROM t\nFOR\n  KEY\tSHARE", W, "for-key-share-odd-whitespace"),
    ("SELECT * FROM (SELECT * FROM t FOR UPDATE) s", W, "lock-in-subquery"),
    ('SELECT "t1"."id" FROM "t" AS "t1" FOR UPDATE', W, "lock-after-quoted-idents"),
    ("SELECT * FROM t WHERE a = 'x' FOR SHARE", W, "lock-after-string-literal"),
    ("SELECT * FROM t /* c */ FOR /* c */ UPDATE", W, "lock-split-by-comment"),
    # Data-modifying CTEs and SELECT INTO.
    ("WITH x AS (INSERT INTO t (a) VALUES (1) RETURNING id) SELECT * FROM x", W, "cte-insert"),
    ("WITH x AS (UPDATE t SET a = 1 RETURNING id) SELECT * FROM x", W, "cte-update"),
    ("WITH x AS (DELETE FROM t RETURNING id) SELECT count(*) FROM x", W, "cte-delete"),
    ("WITH s AS (SELECT 1) INSERT INTO t SELECT * FROM s", W, "cte-then-insert"),
    ("SELECT * INTO new_table FROM t", W, "select-into"),
    ("SELECT * INTO TEMP tmp FROM t", W, "select-into-temp"),
    # Side-effect functions.
    ("SELECT nextval('s')", W, "nextval"),
    ("SELECT NEXTVAL('s')", W, "nextval-uppercase"),
    ("SELECT pg_catalog.nextval('s')", W, "nextval-schema-qualified"),
    ("SELECT \"nextval\"('s')", W, "nextval-quoted-name"),
    ('SELECT "nextval"(%s)', W, "nextval-quoted-name-fast-path"),
    ("SELECT setval('s', 10)", W, "setval"),
    ("SELECT currval('s')", W, "currval-session-state"),
    ("SELECT pg_advisory_lock(1)", W, "advisory-lock"),
    ("SELECT pg_advisory_xact_lock_shared(1)", W, "advisory-xact-lock-shared"),
    ("SELECT pg_try_advisory_lock(1, 2)", W, "try-advisory-lock"),
    ("SELECT pg_advisory_unlock_all()", W, "advisory-unlock-all"),
    ("SELECT pg_notify('chan', 'hi')", W, "pg-notify"),
    ("SELECT txid_current()", W, "txid-current"),
    ("SELECT pg_current_xact_id()", W, "pg-current-xact-id"),
    ("SELECT set_config('work_mem', '64MB', false)", W, "set-config"),
    ("SELECT lo_import('/tmp/f')", W, "lo-import"),
    ("SELECT lo_from_bytea(0, '\\x00')", W, "lo-from-bytea"),
    ("SELECT lo_something_new(1)", W, "lo-prefix-family"),
    ("SELECT pg_terminate_backend(123)", W, "terminate-backend"),
    ("SELECT pg_create_logical_replication_slot('s', 'pgoutput')", W, "create-slot"),
    ("SELECT pg_drop_replication_slot('s')", W, "drop-slot"),
    ("SELECT dblink_exec('dbname=x', 'DELETE FROM t')", W, "dblink-exec"),
    ("SELECT pg_current_wal_lsn()", W, "primary-only-wal-function"),
    ("SELECT id FROM t WHERE id = nextval ('s')", W, "call-with-space-before-paren"),
    ("VALUES (nextval('s'))", W, "side-effect-in-values"),
    ("SELECT 'x' || nextval('s')", W, "side-effect-after-literal"),
    ("SELECT (SELECT max(id) FROM t), setval('s', 1)", W, "side-effect-after-subquery"),
    # Not reads.
    ("", W, "empty"),
    ("   \n\t ", W, "whitespace-only"),
    (";", W, "semicolon-only"),
    ("INSERT INTO t VALUES (1)", W, "insert"),
    ("update t set a = 1", W, "update-lowercase"),
    ("DELETE FROM t", W, "delete"),
    ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DO NOTHING", W, "merge"),
    ("CREATE TABLE t (id int)", W, "create-table"),
    ("CREATE INDEX i ON t (a)", W, "create-index"),
    ("CREATE TABLE t2 AS SELECT * FROM t", W, "create-table-as-select"),
    ("DROP TABLE t", W, "drop"),
    ("ALTER TABLE t ADD COLUMN b int", W, "alter"),
    ("TRUNCATE t", W, "truncate"),
    ("SET search_path TO x", W, "set"),
    ("RESET ALL", W, "reset"),
    ("BEGIN", W, "begin"),
    ("START TRANSACTION READ ONLY", W, "start-transaction"),
    ("COMMIT", W, "commit"),
    ("ROLLBACK", W, "rollback"),
    ("LISTEN chan", W, "listen"),
    ("NOTIFY chan, 'x'", W, "notify"),
    ("VACUUM t", W, "vacuum"),
    ("ANALYZE t", W, "analyze"),
    ("CALL do_things()", W, "call"),
    ("DO $$ BEGIN PERFORM 1; END $$", W, "do-block"),
    ("COPY t TO STDOUT", W, "copy-to"),
    ("COPY (SELECT 1) TO STDOUT", W, "copy-query"),
    ("LOCK TABLE t", W, "lock-table"),
    ("DECLARE c CURSOR FOR SELECT 1", W, "declare-cursor"),
    ("'SELECT 1'", W, "just-a-string"),
    # EXPLAIN takes the class of the explained statement.
    ("EXPLAIN SELECT * FROM t", R, "explain-select"),
    ("EXPLAIN (FORMAT JSON, COSTS OFF) SELECT 1", R, "explain-options-select"),
    ("EXPLAIN ANALYZE SELECT * FROM t", R, "explain-analyze-select-only-reads"),
    ("explain analyze verbose select 1", R, "explain-legacy-keywords-lower"),
    ("EXPLAIN ANALYZE DELETE FROM t", W, "explain-analyze-delete"),
    ("EXPLAIN (ANALYZE, BUFFERS) UPDATE t SET a = 1", W, "explain-options-update"),
    ("EXPLAIN INSERT INTO t VALUES (1)", W, "explain-insert-no-analyze"),
    ("EXPLAIN SELECT nextval('s')", W, "explain-side-effect"),
    ("EXPLAIN", W, "explain-nothing"),
    # Several statements.
    ("SELECT 1; SELECT 2", R, "two-reads"),
    ("SELECT 1; DROP TABLE t", W, "read-then-ddl"),
    ("SELECT 1; SET x = 1; SELECT 2", W, "set-in-the-middle"),
    ("SELECT ';'; SELECT 2", R, "semicolon-in-string"),
    ("SELECT 1 /* ; DELETE FROM t */; SHOW x", R, "semicolon-in-comment"),
]


@pytest.mark.parametrize(
    ("sql", "expected"),
    [pytest.param(sql, kind, id=case_id) for sql, kind, case_id in SQL_CASES],
)
def test_classify_sql(sql: str, expected: QueryKind) -> None:
    assert classify_sql(sql) is expected
    assert classify_sql(sql) is expected  # the cached answer agrees
    assert classify_query(None, sql) is expected  # a non-peewee "query" falls back to the SQL


def test_case_ids_are_unique() -> None:
    ids = [case_id for _, _, case_id in SQL_CASES]
    assert len(ids) == len(set(ids))


# --------------------------------------------------------------------------- peewee queries


def _cte_write(kind: str) -> peewee.Query:
    if kind == "insert":
        inner: Any = Author.insert(name="x").returning(Author.id)
    elif kind == "update":
        inner = Author.update(name="x").where(Author.id == 1).returning(Author.id)
    else:
        inner = Author.delete().where(Author.id == 1).returning(Author.id)
    cte = inner.cte("changed")
    return Author.select(cte.c.id).from_(cte).with_cte(cte)


def _recursive_cte() -> peewee.Query:
    base = Author.select(Author.id).where(Author.id == 1).cte("tree", recursive=True)
    rec = Author.select(Author.id).join(base, on=(Author.id == base.c.id))
    cte = base.union_all(rec)
    return cte.select_from(cte.c.id)


def _locked(clause: Any) -> peewee.Query:
    # peewee accepts the lock strength as a string (its type stubs say bool).
    return Author.select().for_update(clause)


PEEWEE_CASES: list[tuple[Callable[[], Any], QueryKind, str]] = [
    (lambda: Author.select(), R, "model-select"),
    (lambda: Author.select().where(Author.name == "x").limit(1), R, "select-where-limit"),
    (lambda: Author.select(Author.updated_at), R, "select-updated_at-column"),
    (lambda: Post.select(Post.deleted).where(~Post.deleted), R, "select-deleted-column"),
    (lambda: Post.select().join(Author), R, "join"),
    (
        lambda: Author.select().where(Author.id.in_(Post.select(Post.author))),
        R,
        "subquery",
    ),
    (
        lambda: Author.select(Author.name) | Post.select(Post.title),
        R,
        "union",
    ),
    (
        lambda: Author.select(Author.id, peewee.fn.COUNT(Post.id)).join(Post).group_by(Author.id),
        R,
        "group-by-count",
    ),
    (lambda: Author.select().where(Author.name.contains("update")), R, "param-with-write-word"),
    (lambda: peewee.Select(columns=[peewee.Value(1)]).bind(db), R, "plain-select-node"),
    (
        lambda: (
            Author.select(Author.id).where(Author.id == 1).cte("one").select_from(peewee.SQL("id"))
        ),
        R,
        "cte-read-only",
    ),
    (_recursive_cte, R, "cte-recursive"),
    (lambda: Author.raw("SELECT * FROM author"), R, "model-raw-read"),
    (lambda: Author.raw("SELECT * FROM author WHERE name = %s", "x"), R, "model-raw-param"),
    (lambda: Author.raw("DELETE FROM author RETURNING *"), W, "model-raw-delete"),
    (lambda: Author.select().for_update(), W, "for-update"),
    (lambda: _locked("FOR SHARE"), W, "for-share"),
    (lambda: _locked("FOR NO KEY UPDATE"), W, "for-no-key-update"),
    (lambda: _locked("FOR KEY SHARE"), W, "for-key-share"),
    (lambda: Author.select().for_update(of=Author, nowait=True), W, "for-update-of-nowait"),
    (lambda: Author.select().for_update(skip_locked=True), W, "for-update-skip-locked"),
    (lambda: Author.select().for_update().for_update(False), R, "for-update-cancelled"),
    (
        # Select(for_update=True) compiles to "SELECT %s %s": only the attribute tells.
        lambda: peewee.Select(columns=[peewee.Value(1)], for_update=True).bind(db),
        W,
        "ctor-for-update",
    ),
    (lambda: Author.select(peewee.fn.nextval("seq")), W, "fn-nextval"),
    (lambda: Author.select(peewee.fn.pg_advisory_xact_lock(1)), W, "fn-advisory-lock"),
    (lambda: _cte_write("insert"), W, "cte-insert"),
    (lambda: _cte_write("update"), W, "cte-update"),
    (lambda: _cte_write("delete"), W, "cte-delete"),
    (lambda: Author.insert(name="x"), W, "insert"),
    (lambda: Author.insert_many([{"name": "a"}, {"name": "b"}]), W, "insert-many"),
    (
        lambda: Author.insert(name="x").on_conflict(
            conflict_target=[Author.name], update={Author.name: "y"}
        ),
        W,
        "insert-on-conflict-update",
    ),
    (lambda: Author.insert(name="x").on_conflict_ignore(), W, "insert-on-conflict-ignore"),
    (
        lambda: Author.insert_from(Author.select(Author.name), [Author.name]),
        W,
        "insert-from-select",
    ),
    (lambda: Author.update(name="y").where(Author.id == 1), W, "update"),
    (lambda: Author.delete().where(Author.id == 1), W, "delete"),
    (lambda: Author.delete().where(Author.id == 1).returning(Author.id), W, "delete-returning"),
]


@pytest.mark.parametrize(
    ("make", "expected"),
    [pytest.param(make, kind, id=case_id) for make, kind, case_id in PEEWEE_CASES],
)
def test_classify_peewee_query(make: Callable[[], Any], expected: QueryKind) -> None:
    query = make()
    sql, _params = query.sql()
    assert classify_query(query, sql) is expected
    assert classify_query(query, sql) is expected  # cached


def test_write_queries_are_classified_by_type_not_sql() -> None:
    # Even if the SQL text handed over were misleading, the type decides.
    assert classify_query(Author.insert(name="x"), "SELECT 1") is W
    assert classify_query(Author.update(name="x"), "SELECT 1") is W
    assert classify_query(Author.delete(), "SELECT 1") is W
    assert classify_query(Author.select().for_update(), "SELECT 1") is W


class RecordingDatabase(peewee.PostgresqlDatabase):
    """Records what peewee hands to ``execute()`` (query object and SQL); never connects."""

    def __init__(self) -> None:
        super().__init__(None)
        self.executed: list[tuple[Any, str]] = []

    def execute(self, query: Any, commit: Any = None, **context_options: Any) -> Any:
        sql, _params = self.get_sql_context(**context_options).sql(query).query()
        self.executed.append((query, sql))
        return None


def test_ddl_from_schema_manager() -> None:
    rec = RecordingDatabase()
    with rec.bind_ctx([Author, Post]):
        rec.create_tables([Author, Post])
        Author.truncate_table(restart_identity=True)
        rec.drop_tables([Author, Post])
        peewee.SchemaManager(Author).create_table_as("author_copy", Author.select())
    kinds = [sql.split()[0] for _, sql in rec.executed]
    assert {"CREATE", "DROP", "TRUNCATE"} <= set(kinds), rec.executed
    assert any(" INDEX " in sql for _, sql in rec.executed)
    for query, sql in rec.executed:
        assert classify_query(query, sql) is W, sql


@pytest.mark.parametrize(
    "sql",
    [
        pytest.param("ALTER TABLE author ADD COLUMN x int", id="alter-add-column"),
        pytest.param("CREATE UNIQUE INDEX CONCURRENTLY i ON t (a)", id="create-index-concurrently"),
        pytest.param("DROP INDEX IF EXISTS i", id="drop-index"),
        pytest.param("TRUNCATE TABLE t RESTART IDENTITY CASCADE", id="truncate-cascade"),
        pytest.param("CREATE SEQUENCE s", id="create-sequence"),
        pytest.param("COMMENT ON TABLE t IS 'select only'", id="comment-on"),
    ],
)
def test_ddl_sql_node(sql: str) -> None:
    node = peewee.SQL(sql)
    assert classify_query(node, db.get_sql_context().sql(node).query()[0]) is W


# --------------------------------------------------------------------------- extension, cache


def test_side_effect_functions_is_a_documented_frozenset() -> None:
    assert isinstance(SIDE_EFFECT_FUNCTIONS, frozenset)
    for name in ("nextval", "setval", "pg_notify", "txid_current", "set_config", "dblink_exec"):
        assert name in SIDE_EFFECT_FUNCTIONS
    assert all(name == name.lower() for name in SIDE_EFFECT_FUNCTIONS)


def test_register_side_effect_function() -> None:
    sql = "SELECT bump_counter(%s)"
    assert classify_sql(sql) is R  # unknown user function: a read (documented limitation)
    register_side_effect_function("app.Bump_Counter")
    assert classify_sql(sql) is W  # the cache was cleared by the registration
    assert classify_sql("SELECT APP.BUMP_COUNTER(1)") is W
    assert classify_sql('SELECT "bump_counter"(1)') is W
    assert classify_sql("SELECT bump_counter_total FROM t") is R  # whole words only
    assert classify_query(Author.select(peewee.fn.bump_counter(1)), "SELECT 1") is R
    query = Author.select(peewee.fn.bump_counter(1))
    assert classify_query(query, query.sql()[0]) is W


@pytest.mark.parametrize("bad", ["", "  ", "1abc", "a b", "f()", "x.", "a;b"])
def test_register_rejects_non_names(bad: str) -> None:
    with pytest.raises(ValueError, match="not a function name"):
        register_side_effect_function(bad)


def test_cache_returns_the_same_answers() -> None:
    sqls = [sql for sql, _, _ in SQL_CASES]
    first = [classify_sql(sql) for sql in sqls]
    assert all(sql in routing._cache for sql in sqls)
    second = [classify_sql(sql) for sql in sqls]
    assert first == second
    clear_classification_cache()
    assert not routing._cache
    assert [classify_sql(sql) for sql in sqls] == first


def test_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routing, "_CACHE_MAX_ENTRIES", 10)
    for i in range(25):
        assert classify_sql(f"SELECT {i}") is R
        assert len(routing._cache) <= 10
    for i in range(25):
        assert classify_sql(f"DELETE FROM t WHERE id = {i}") is W


def test_long_sql_is_classified_but_not_cached() -> None:
    long_sql = "SELECT " + ", ".join(f"c{i}" for i in range(3000)) + " FROM t"
    assert len(long_sql) > routing._CACHE_MAX_SQL_LEN
    assert classify_sql(long_sql) is R
    assert long_sql not in routing._cache
    assert classify_sql(long_sql + " FOR UPDATE") is W
