"""Query classification: may a query run on a read-only hot standby? (pure logic, no I/O)

Rule 3 of DESIGN.md: misrouting a read to the primary costs speed, misrouting a write costs an
error, so anything not recognised as a plain read is a write.

- peewee ``Insert``/``Update``/``Delete`` queries are writes by type; a ``Select`` with
  ``for_update()`` (any lock strength) is a write; everything else is judged by its SQL.
- SQL is a read only if every statement in it, after comments and whitespace, starts with
  ``SELECT``, ``WITH``, ``VALUES``, ``TABLE``, ``SHOW`` (or ``(``), or is an ``EXPLAIN``
  without ``ANALYZE`` of such a statement, and contains no ``INSERT``, ``UPDATE``,
  ``DELETE``, ``MERGE``, ``COPY`` or ``INTO`` keyword (data-modifying CTEs, ``SELECT INTO``),
  no locking clause (``FOR UPDATE``, ``FOR NO KEY UPDATE``, ``FOR SHARE``, ``FOR KEY
  SHARE``) and no call to a known side-effect function (``SIDE_EFFECT_FUNCTIONS``).
- Keywords count only as whole words outside string literals ('...', E'...', $$...$$,
  $tag$...$tag$), quoted identifiers ("update") and comments (``--``, nested ``/* */``).
- A ``SELECT`` of an unknown user function that writes is classified a read: the replica
  refuses it (SQLSTATE 25006) and the manager runs it once on the primary with a warning
  (rule 6). Register such functions with ``register_side_effect_function()`` or route them
  with ``on="primary"``.

Results are cached by SQL text (peewee emits the same text, with ``%s`` placeholders, for
every query of one shape), so the hot path is a dictionary lookup.
"""

from __future__ import annotations

import enum
import re

import peewee

__all__ = [
    "SIDE_EFFECT_FUNCTIONS",
    "QueryKind",
    "classify_query",
    "classify_sql",
    "register_side_effect_function",
]


class QueryKind(enum.Enum):
    """Where a query may run: ``READ`` on a replica, ``WRITE`` only on the primary."""

    READ = "read"
    WRITE = "write"


READ = QueryKind.READ
WRITE = QueryKind.WRITE

#: Functions whose call makes a SELECT a write (exact names; ``lo_*`` and the advisory-lock
#: family are matched by prefix, see ``_SIDE_EFFECT_PREFIXES``).
SIDE_EFFECT_FUNCTIONS: set[str] = {
    "nextval",
    "setval",
    "pg_notify",
    "txid_current",
    "pg_current_xact_id",
    "set_config",
    "pg_cancel_backend",
    "pg_terminate_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_switch_wal",
    "pg_create_restore_point",
    "pg_create_physical_replication_slot",
    "pg_create_logical_replication_slot",
    "pg_drop_replication_slot",
    "pg_copy_physical_replication_slot",
    "pg_copy_logical_replication_slot",
    "pg_replication_slot_advance",
    "pg_logical_slot_get_changes",
    "pg_logical_emit_message",
    "pg_backup_start",
    "pg_backup_stop",
    "pg_start_backup",
    "pg_stop_backup",
    "pg_promote",
    "pg_import_system_collations",
    "dblink_exec",
}
_SIDE_EFFECT_PREFIXES = ("pg_advisory_", "pg_try_advisory_", "lo_")

_READ_STARTS = frozenset({"SELECT", "WITH", "VALUES", "TABLE", "SHOW"})
_WRITE_WORDS = re.compile(r"\b(?:INSERT|UPDATE|DELETE|MERGE|COPY|INTO)\b")
_LOCKING = re.compile(r"\bFOR\s+(?:UPDATE|NO\s+KEY\s+UPDATE|SHARE|KEY\s+SHARE)\b")
_FIRST_WORD = re.compile(r"\s*(\(*)\s*([A-Za-z]+)")
_EXPLAIN_HEAD = re.compile(
    r"^\s*EXPLAIN\b\s*(?:\([^)]*\))?\s*(?:(?:VERBOSE|COSTS|BUFFERS|SETTINGS|WAL|TIMING|SUMMARY)"
    r"\b\s*)*",
)
_ANALYZE = re.compile(r"\bANALY[SZ]E\b")
_SPECIAL = re.compile(r"['\"$]|--|/\*")
_DOLLAR_TAG = re.compile(r"\$([A-Za-z_\x80-\uffff][A-Za-z_0-9\x80-\uffff]*)?\$")
_CALL = re.compile(r"([A-Za-z_][A-Za-z_0-9$]*)\s*\(")

_CACHE_SIZE = 4096
_cache: dict[str, QueryKind] = {}


def register_side_effect_function(name: str) -> None:
    """Treat ``SELECT name(...)`` as a write from now on (for user functions that write)."""
    if not name or not re.fullmatch(r"[A-Za-z_][A-Za-z_0-9$]*", name):
        raise ValueError(f"not a function name: {name!r}")
    SIDE_EFFECT_FUNCTIONS.add(name.lower())
    _cache.clear()


def classify_query(query: object, sql: str) -> QueryKind:
    """Classify a peewee query (or DDL context) whose compiled SQL is ``sql``."""
    if isinstance(query, (peewee.Insert, peewee.Update, peewee.Delete)):
        return WRITE
    if isinstance(query, peewee.SelectBase) and getattr(query, "_for_update", None):
        return WRITE
    return classify_sql(sql)


def classify_sql(sql: str) -> QueryKind:
    """Classify raw SQL text; anything not recognised as a plain read is a write."""
    kind = _cache.get(sql)
    if kind is None:
        kind = _classify(sql)
        if len(_cache) >= _CACHE_SIZE:
            _cache.clear()
        _cache[sql] = kind
    return kind


def _classify(sql: str) -> QueryKind:
    skeleton = _skeleton(sql)
    if skeleton is None:
        return WRITE  # unterminated literal or comment: not something to guess about
    statements = [s for s in skeleton.split(";") if s.strip()]
    if not statements:
        return WRITE
    for statement in statements:
        if not _is_read_statement(statement):
            return WRITE
    return READ


def _is_read_statement(statement: str) -> bool:
    upper = statement.upper()
    first = _FIRST_WORD.match(upper)
    if first is None:
        return False
    word = first.group(2)
    if word == "EXPLAIN":
        if _ANALYZE.search(upper):
            return False  # EXPLAIN ANALYZE runs the statement
        head = _EXPLAIN_HEAD.match(upper)
        rest = upper[head.end() :] if head else ""
        return bool(rest.strip()) and _is_read_statement(rest)
    if word not in _READ_STARTS:
        return False
    if _WRITE_WORDS.search(upper) or _LOCKING.search(upper):
        return False
    return not _calls_side_effect(statement)


def _calls_side_effect(statement: str) -> bool:
    for match in _CALL.finditer(statement):
        name = match.group(1).lower()
        if name in SIDE_EFFECT_FUNCTIONS or name.startswith(_SIDE_EFFECT_PREFIXES):
            return True
    return False


def _skeleton(sql: str) -> str | None:
    """``sql`` with literals, quoted identifiers and comments blanked; ``None`` if unclosed."""
    if _SPECIAL.search(sql) is None:
        return sql
    out: list[str] = []
    i = 0
    n = len(sql)
    while i < n:
        match = _SPECIAL.search(sql, i)
        if match is None:
            out.append(sql[i:])
            break
        start = match.start()
        out.append(sql[i:start])
        token = match.group()
        if token == "'":
            end = _string_end(sql, start)
            if end < 0:
                return None
            out.append(" '' ")
            i = end
        elif token == '"':
            end = start + 1
            while True:
                end = sql.find('"', end)
                if end < 0:
                    return None
                if sql.startswith('""', end):
                    end += 2
                    continue
                break
            out.append(' "" ')
            i = end + 1
        elif token == "--":
            end = sql.find("\n", start)
            out.append(" ")
            i = n if end < 0 else end + 1
        elif token == "/*":
            end = _block_comment_end(sql, start)
            if end < 0:
                return None
            out.append(" ")
            i = end
        else:  # "$": a dollar quote, a positional parameter, or part of an identifier
            prev = sql[start - 1] if start else " "
            tag = _DOLLAR_TAG.match(sql, start)
            if tag is None or prev.isalnum() or prev == "_":
                out.append("$")
                i = start + 1
                continue
            closing = tag.group()
            end = sql.find(closing, tag.end())
            if end < 0:
                return None
            out.append(" '' ")
            i = end + len(closing)
    return "".join(out)


def _string_end(sql: str, start: int) -> int:
    """Index just past the string literal opening at ``start`` (-1 when unterminated)."""
    prev = sql[start - 1] if start else " "
    before = sql[start - 2] if start > 1 else " "
    escapes = prev in "eE" and not (before.isalnum() or before == "_")
    j = start + 1
    n = len(sql)
    while j < n:
        ch = sql[j]
        if escapes and ch == "\\":
            j += 2
            continue
        if ch == "'":
            if j + 1 < n and sql[j + 1] == "'":
                j += 2
                continue
            return j + 1
        j += 1
    return -1


def _block_comment_end(sql: str, start: int) -> int:
    """Index just past the (possibly nested) block comment at ``start`` (-1 if unclosed)."""
    depth = 0
    j = start
    n = len(sql)
    while j < n:
        if sql.startswith("/*", j):
            depth += 1
            j += 2
        elif sql.startswith("*/", j):
            depth -= 1
            j += 2
            if depth == 0:
                return j
        else:
            j += 1
    return -1
