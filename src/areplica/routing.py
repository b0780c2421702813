"""Query classification: may a query run on a read-only hot standby, or must it go to the primary?

Sending a read to the primary only costs speed; sending a write to a standby costs an error
(SQLSTATE 25006, ``cannot execute ... in a read-only transaction``). So anything this module
does not recognise as a plain read is classified :attr:`QueryKind.WRITE`. Pure logic, no I/O.

Peewee query objects (:func:`classify_query`)
    * ``Insert``, ``Update``, ``Delete`` (and ``ModelInsert``/``ModelUpdate``/``ModelDelete``,
      ``insert_many``, ``on_conflict``, ...) are writes, without looking at the SQL.
    * A ``Select``/``ModelSelect`` with a locking clause (``.for_update()``, any strength) is a
      write. Everything else (selects, compound selects, ``RawQuery``/``ModelRaw``, the DDL
      contexts of peewee's schema manager, plain strings) is classified from its compiled SQL
      by :func:`classify_sql`, which also catches data-modifying CTEs and side-effect
      functions such as ``fn.nextval``.

Raw SQL (:func:`classify_sql`)
    Literals (``'...'`` with ``''`` escapes, ``E'...'`` with backslash escapes, ``$$...$$`` and
    ``$tag$...$tag$``), quoted identifiers (``"..."``) and comments (``--`` and nestable
    ``/* */``) are blanked out first, so words inside them never count. Keywords and function
    names are matched as whole words: ``updated_at``, ``deleted``, ``into_x``, ``for_update``
    and a qualified column ``t.update`` are not keywords. The text is split on ``;`` and every
    statement must be a read. An empty string, or SQL with an unterminated literal, quoted
    identifier or comment, is a write. A statement is a read only if:

    * it starts (after any ``(``) with ``SELECT``, ``WITH``, ``VALUES``, ``TABLE`` or ``SHOW``
      (case-insensitive), or with ``EXPLAIN`` and its options followed by such a statement.
      ``EXPLAIN`` takes the class of the statement it explains, with or without ``ANALYZE``:
      ``EXPLAIN ANALYZE SELECT ...`` only runs the select, so it is a read, while
      ``EXPLAIN [ANALYZE] INSERT ...`` is a write (without ``ANALYZE`` it would not run, but
      the primary is the safe choice);
    * it contains none of the words ``INSERT``, ``UPDATE``, ``DELETE``, ``MERGE`` (e.g. in a
      data-modifying CTE), ``INTO`` (``SELECT ... INTO`` creates a table) or ``COPY``;
    * it has no locking clause: ``FOR UPDATE``, ``FOR NO KEY UPDATE``, ``FOR SHARE`` or
      ``FOR KEY SHARE`` (with or without ``OF ...``, ``NOWAIT``, ``SKIP LOCKED``);
    * it calls no side-effect function: a name in :data:`SIDE_EFFECT_FUNCTIONS`, a name that
      starts with one of :data:`SIDE_EFFECT_FUNCTION_PREFIXES` (``lo_*``, ``pg_advisory_*``,
      ``pg_try_advisory_*``, ``pg_create_*``) or a name added with
      :func:`register_side_effect_function`. Names match unqualified and case-insensitively
      (``pg_catalog.nextval(`` and ``NEXTVAL(`` count), also as a quoted identifier
      (``"nextval"(``).

    Everything else is a write: DML, DDL (``CREATE``, ``ALTER``, ``DROP``, ``TRUNCATE``, ...),
    ``SET``/``RESET``, ``BEGIN``/``START``/``COMMIT``/``ROLLBACK``/``SAVEPOINT``,
    ``LISTEN``/``NOTIFY``/``UNLISTEN``, ``VACUUM``, ``ANALYZE``, ``CLUSTER``, ``REINDEX``,
    ``LOCK``, ``CALL``, ``DO``, ``COPY``, ``DECLARE``/``FETCH``, ``PREPARE``/``EXECUTE``, ...

Limitations
    * ``SELECT my_func(...)`` of a user function that writes is classified READ (the one
      misrouting in the unsafe direction): route such queries with ``on="primary"`` or the
      ``primary()`` scope, or register the function with :func:`register_side_effect_function`.
    * An unquoted identifier spelled like a write keyword (``SELECT 1 AS update``) or like a
      locking clause (``substring(s FROM 1 FOR share)``) makes a read a WRITE (the safe
      direction). Peewee quotes every identifier, so its SQL is not affected.

Results are cached per SQL text (peewee produces the same text, with ``%s`` placeholders, for
every query of the same shape) in a dict of at most 4096 entries, emptied when full; SQL longer
than 8192 characters is classified every time rather than kept in memory.
"""

from __future__ import annotations

import enum
import re

import peewee

__all__ = [
    "SIDE_EFFECT_FUNCTIONS",
    "SIDE_EFFECT_FUNCTION_PREFIXES",
    "QueryKind",
    "classify_query",
    "classify_sql",
    "clear_classification_cache",
    "register_side_effect_function",
]


class QueryKind(enum.Enum):
    """Where a query may run: ``READ`` on any node, ``WRITE`` only on the primary."""

    READ = "read"
    WRITE = "write"


_READ = QueryKind.READ
_WRITE = QueryKind.WRITE

#: Built-in functions whose call makes a statement a write: they write data, assign a
#: transaction id, take locks, change (or depend on) session state that lives on the primary's
#: connection, administer the server, or only work on the primary. Lower-case, unqualified.
SIDE_EFFECT_FUNCTIONS: frozenset[str] = frozenset(
    {
        # Sequences (currval/lastval only make sense in the session that called nextval).
        "nextval",
        "setval",
        "currval",
        "lastval",
        # Advisory locks (the pg_advisory_* / pg_try_advisory_* families also match by prefix).
        "pg_advisory_lock",
        "pg_advisory_lock_shared",
        "pg_advisory_unlock",
        "pg_advisory_unlock_shared",
        "pg_advisory_unlock_all",
        "pg_advisory_xact_lock",
        "pg_advisory_xact_lock_shared",
        "pg_try_advisory_lock",
        "pg_try_advisory_lock_shared",
        "pg_try_advisory_xact_lock",
        "pg_try_advisory_xact_lock_shared",
        # Notifications, transaction ids, session settings.
        "pg_notify",
        "txid_current",
        "pg_current_xact_id",
        "set_config",
        # Large objects (the lo_* family also matches by prefix).
        "lo_create",
        "lo_creat",
        "lo_import",
        "lo_export",
        "lo_unlink",
        "lo_open",
        "lo_close",
        "lo_write",
        "lo_put",
        "lo_get",
        "lo_from_bytea",
        "lo_truncate",
        "lo_truncate64",
        "lo_lseek",
        "lo_lseek64",
        "lo_tell",
        "lo_tell64",
        "lowrite",
        "loread",
        # Primary-only WAL functions (they raise "recovery is in progress" on a standby).
        "pg_current_wal_lsn",
        "pg_current_wal_insert_lsn",
        "pg_current_wal_flush_lsn",
        "pg_current_xlog_location",
        "pg_current_xlog_insert_location",
        "pg_current_xlog_flush_location",
        "pg_walfile_name",
        "pg_walfile_name_offset",
        "pg_log_standby_snapshot",
        # Server administration, WAL, backups, replication slots and origins.
        "pg_cancel_backend",
        "pg_terminate_backend",
        "pg_reload_conf",
        "pg_rotate_logfile",
        "pg_switch_wal",
        "pg_switch_xlog",
        "pg_create_restore_point",
        "pg_create_physical_replication_slot",
        "pg_create_logical_replication_slot",
        "pg_copy_physical_replication_slot",
        "pg_copy_logical_replication_slot",
        "pg_drop_replication_slot",
        "pg_replication_slot_advance",
        "pg_logical_slot_get_changes",
        "pg_logical_slot_get_binary_changes",
        "pg_logical_emit_message",
        "pg_replication_origin_create",
        "pg_replication_origin_drop",
        "pg_replication_origin_advance",
        "pg_replication_origin_session_setup",
        "pg_replication_origin_session_reset",
        "pg_replication_origin_xact_setup",
        "pg_replication_origin_xact_reset",
        "pg_start_backup",
        "pg_stop_backup",
        "pg_backup_start",
        "pg_backup_stop",
        "pg_import_system_collations",
        "pg_file_write",
        # Index maintenance.
        "brin_summarize_new_values",
        "brin_summarize_range",
        "brin_desummarize_range",
        "gin_clean_pending_list",
        # dblink: runs a command on another server (dblink() itself, a remote read, stays READ).
        "dblink_exec",
    }
)

#: Name prefixes of side-effect function families: large objects, advisory locks, and
#: ``pg_create_*`` (replication slots, restore points).
SIDE_EFFECT_FUNCTION_PREFIXES: tuple[str, ...] = (
    "lo_",
    "pg_advisory_",
    "pg_try_advisory_",
    "pg_create_",
)

# Names added at run time with register_side_effect_function() (lower-case).
_registered_functions: set[str] = set()

_READ_STARTERS = frozenset({"SELECT", "WITH", "VALUES", "TABLE", "SHOW"})

_CACHE_MAX_ENTRIES = 4096
_CACHE_MAX_SQL_LEN = 8192
_cache: dict[str, QueryKind] = {}

# The first word of a statement, after any opening parentheses.
_LEAD_RE = re.compile(r"[\s(]*([A-Za-z_][\w$]*)")
# EXPLAIN and its options: "(option, ...)" or the legacy ANALYZE/VERBOSE keywords.
_EXPLAIN_RE = re.compile(
    r"[\s(]*EXPLAIN(?:\s*\([^)]*\)|(?:\s+(?:ANALYZE|ANALYSE|VERBOSE)(?![\w$]))*)",
    re.IGNORECASE,
)
# Words that make a read-looking statement a write (searched in upper-cased text). A "."
# before the word means a qualified column name (t.update), not a keyword. The locking
# clauses FOR UPDATE and FOR NO KEY UPDATE are caught by UPDATE.
_WRITE_WORD_RE = re.compile(
    r"(?<![\w$.])(?:INSERT|UPDATE|DELETE|MERGE|INTO|COPY|FOR\s+(?:KEY\s+)?SHARE)(?![\w$])"
)
# A function call, in reversed text: "(", blanks, then the (reversed) name. Of a
# schema-qualified name only the last part is captured.
_REVERSED_CALL_RE = re.compile(r"\(\s*([\w$]+)")
# Fast path: a quoted identifier followed by "(" (a call of a quoted function name).
_QUOTED_CALL_HINT_RE = re.compile(r'"\s*\(')
# Slow path: whatever opens a literal, a quoted identifier or a comment.
_SPECIAL_RE = re.compile(r"""['"$]|--|/\*""")
_DOLLAR_TAG_RE = re.compile(r"\$(?:[A-Za-z_\x80-\U0010ffff][\w\x80-\U0010ffff]*)?\$")
_BLOCK_COMMENT_RE = re.compile(r"/\*|\*/")
_E_STRING_REST_RE = re.compile(r"(?:[^'\\]|\\.|'')*'", re.DOTALL)

_IDENT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_$")
_STRING_PLACEHOLDER = " 0 "
_IDENT_PLACEHOLDER = " _q_ "


def _is_side_effect_function(name: str) -> bool:
    """Whether the lower-case function name ``name`` is a known side-effect function."""
    return (
        name in SIDE_EFFECT_FUNCTIONS
        or name in _registered_functions
        or name.startswith(SIDE_EFFECT_FUNCTION_PREFIXES)
    )


def _is_ident_char(ch: str) -> bool:
    return ch in _IDENT_CHARS or (ch >= "\x80" and (ch.isalnum() or ch == "_"))


def _quote_end(sql: str, start: int, quote: str) -> int:
    """Index of the closing ``quote`` of the literal opened at ``start`` (doubled = escaped)."""
    end = start + 1
    while True:
        end = sql.find(quote, end)
        if end < 0 or not sql.startswith(quote, end + 1):
            return end
        end += 2


def _strip(sql: str) -> str | None:
    """``sql`` with literals, quoted identifiers and comments blanked out.

    A quoted identifier becomes a neutral word, unless it names a side-effect function: then
    the name is kept (unquoted) so that a call to it is still seen. Returns ``None`` for an
    unterminated literal, quoted identifier or block comment.
    """
    out: list[str] = []
    pos = 0
    search = _SPECIAL_RE.search
    while True:
        m = search(sql, pos)
        if m is None:
            out.append(sql[pos:])
            return "".join(out)
        start = m.start()
        tok = m.group()
        if tok == "'":
            out.append(sql[pos:start])
            if (
                start > 0
                and sql[start - 1] in "eE"
                and (start < 2 or not _is_ident_char(sql[start - 2]))
            ):
                # E'...': backslash escapes as well as ''.
                em = _E_STRING_REST_RE.match(sql, start + 1)
                if em is None:
                    return None
                pos = em.end()
            else:
                end = _quote_end(sql, start, "'")
                if end < 0:
                    return None
                pos = end + 1
            out.append(_STRING_PLACEHOLDER)
        elif tok == '"':
            out.append(sql[pos:start])
            end = _quote_end(sql, start, '"')
            if end < 0:
                return None
            # Quoted names are case-sensitive; also matching the lower-cased name errs to WRITE.
            name = sql[start + 1 : end].lower()
            out.append(f" {name} " if _is_side_effect_function(name) else _IDENT_PLACEHOLDER)
            pos = end + 1
        elif tok == "$":
            dm: re.Match[str] | None = None
            if start == 0 or not _is_ident_char(sql[start - 1]):
                dm = _DOLLAR_TAG_RE.match(sql, start)
            if dm is None:
                # Part of an identifier (a$b), a positional parameter ($1) or a lone "$".
                out.append(sql[pos : start + 1])
                pos = start + 1
                continue
            out.append(sql[pos:start])
            tag = dm.group()
            end = sql.find(tag, dm.end())
            if end < 0:
                return None
            out.append(_STRING_PLACEHOLDER)
            pos = end + len(tag)
        elif tok == "--":
            out.append(sql[pos:start])
            out.append(" ")
            end = sql.find("\n", start)
            if end < 0:
                return "".join(out)
            pos = end
        else:  # "/*": block comments nest in PostgreSQL.
            out.append(sql[pos:start])
            depth = 1
            end = start + 2
            while depth:
                cm = _BLOCK_COMMENT_RE.search(sql, end)
                if cm is None:
                    return None
                depth += 1 if cm.group() == "/*" else -1
                end = cm.end()
            out.append(" ")
            pos = end


def _statement_is_read(stmt: str) -> bool | None:
    """Whether one blanked-out statement starts like a read; ``None`` if it is empty."""
    m = _LEAD_RE.match(stmt)
    if m is None:
        return None if not stmt.strip() else False
    word = m.group(1).upper()
    if word == "EXPLAIN":
        em = _EXPLAIN_RE.match(stmt)
        m = _LEAD_RE.match(stmt, em.end()) if em is not None else None
        if m is None:
            return False
        word = m.group(1).upper()
    return word in _READ_STARTERS


def _classify_uncached(sql: str) -> QueryKind:
    if "'" in sql or "$" in sql or "--" in sql or "/*" in sql:
        stripped = _strip(sql)
        if stripped is None:
            return _WRITE
        code = stripped
    elif '"' in sql:
        # Fast path: only quoted identifiers to blank out (typical peewee SQL).
        if sql.count('"') % 2:
            return _WRITE  # an unterminated quoted identifier
        parts = sql.split('"')  # odd indexes: quoted identifiers
        if _QUOTED_CALL_HINT_RE.search(sql) is not None:
            for i in range(1, len(parts), 2):
                if parts[i + 1].lstrip().startswith("(") and _is_side_effect_function(
                    parts[i].lower()
                ):
                    return _WRITE
        code = _IDENT_PLACEHOLDER.join(parts[::2])
    else:
        code = sql

    any_statement = False
    for stmt in code.split(";") if ";" in code else (code,):
        is_read = _statement_is_read(stmt)
        if is_read is None:
            continue
        if not is_read:
            return _WRITE
        any_statement = True
    if not any_statement:
        return _WRITE
    upper = code.upper()
    # Cheap substring checks first; the regex then insists on whole words.
    if (
        "INSERT" in upper
        or "UPDATE" in upper
        or "DELETE" in upper
        or "MERGE" in upper
        or "INTO" in upper
        or "COPY" in upper
        or "SHARE" in upper
    ) and _WRITE_WORD_RE.search(upper) is not None:
        return _WRITE
    if "(" in code:
        # Scanning the reversed text lets the regex jump from "(" to "(".
        for reversed_name in _REVERSED_CALL_RE.findall(code[::-1]):
            if _is_side_effect_function(reversed_name[::-1].lower()):
                return _WRITE
    return _READ


def classify_sql(sql: str) -> QueryKind:
    """Classify SQL text: :attr:`QueryKind.READ` only for a plain read, otherwise ``WRITE``.

    The rules are in the module docstring. Results are cached per SQL text.
    """
    kind = _cache.get(sql)
    if kind is not None:
        return kind
    kind = _classify_uncached(sql)
    if len(sql) <= _CACHE_MAX_SQL_LEN:
        if len(_cache) >= _CACHE_MAX_ENTRIES:
            _cache.clear()
        _cache[sql] = kind
    return kind


def classify_query(query: object, sql: str) -> QueryKind:
    """Classify a peewee query object (or DDL context, or string) whose compiled SQL is ``sql``.

    ``Insert``/``Update``/``Delete`` and their model variants are writes, and so is a select
    with a locking clause; everything else is classified from ``sql`` by :func:`classify_sql`.
    """
    if isinstance(query, (peewee.Insert, peewee.Update, peewee.Delete)):
        return _WRITE
    if isinstance(query, peewee.SelectBase) and getattr(query, "_for_update", None):
        # peewee stores True, a string such as "FOR SHARE", or a ForUpdate node.
        return _WRITE
    return classify_sql(sql)


def register_side_effect_function(name: str) -> None:
    """Make calls to the function ``name`` classify as writes (e.g. a user function that writes).

    The name matches unqualified and case-insensitively: after ``"app.bump_counter"`` a call
    to any function called ``bump_counter`` is a write. Clears the classification cache.
    Raises ``ValueError`` if ``name`` is not a function name.
    """
    bare = name.strip().rsplit(".", 1)[-1].strip().strip('"').lower()
    if not re.fullmatch(r"[^\W\d]\w*(?:\$\w*)*", bare):
        raise ValueError(f"not a function name: {name!r}")
    _registered_functions.add(bare)
    _cache.clear()


def clear_classification_cache() -> None:
    """Empty the per-SQL-text classification cache."""
    _cache.clear()
