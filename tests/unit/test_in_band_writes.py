"""Which writes get their WAL position in their own round trip (pure logic: ``in_band``).

README, "Consistency modes": with psycopg, one INSERT, UPDATE, DELETE, MERGE or WITH
statement is sent as ``BEGIN; <write>; COMMIT; <position>``; every other write as it is
(what refuses a transaction block, what may commit itself, several statements).
The servers' side of it is in ``tests/integration/test_write_positions.py``.
"""

from __future__ import annotations

import pytest

from areplica.consistency import WAL_POSITION_SQL
from areplica.writes import in_band


@pytest.mark.parametrize(
    "sql",
    [
        'INSERT INTO "t" ("a") VALUES (%s) RETURNING "t"."id"',
        "  insert into t values (1)",
        "\n\tUPDATE t SET a = %s WHERE id = %s",
        "DELETE FROM t WHERE id = %s",
        "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE",
        "WITH d AS (DELETE FROM t RETURNING *) INSERT INTO u SELECT * FROM d",
        "INSERT INTO t (a) VALUES ('%%')",
    ],
)
def test_one_write_statement_is_wrapped(sql: str) -> None:
    assert in_band(sql) == f"BEGIN; {sql}; COMMIT; {WAL_POSITION_SQL}"


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE INDEX CONCURRENTLY i ON t (a)",  # refuses a transaction block
        "VACUUM t",
        "CALL proc()",  # a procedure may COMMIT: not inside a block
        "INSERT INTO t VALUES (1); INSERT INTO t VALUES (2)",  # several statements
        "INSERT INTO t VALUES (1);",
        "INSERT INTO t VALUES (';')",  # a semicolon in the text: not told apart, sent as is
        "/* app=x */ INSERT INTO t VALUES (1)",
        "SELECT nextval('s')",
        "SELECT * FROM t FOR UPDATE",
        "BEGIN",
        "COMMIT",
        "INSERTS INTO t VALUES (1)",
        "TRUNCATE t",
        "COPY t FROM STDIN",
        "",
    ],
)
def test_anything_else_is_sent_as_it_is(sql: str) -> None:
    assert in_band(sql) is None
