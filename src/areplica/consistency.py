"""WAL positions and causal tokens (pure logic, no I/O).

A PostgreSQL WAL position (LSN) prints as two hex numbers, ``"16/B374D848"``: the high and low
32 bits of a 64-bit byte position. areplica keeps LSNs as ints and hands them to users as
tokens: the LSN's text form, safe in a header or a cookie.
"""

from __future__ import annotations

import re

__all__ = ["WAL_POSITION_SQL", "format_lsn", "parse_lsn", "token_position"]

#: The primary's position a read-your-writes token records. The *insert* position, not
#: ``pg_current_wal_lsn()`` (the write position): under ``synchronous_commit = off`` a commit
#: returns before its WAL is written, so the write position can still be before the commit
#: record, and a replica that reached it would serve a read without the write.
WAL_POSITION_SQL = "SELECT pg_current_wal_insert_lsn()::text"


_LSN = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")


def parse_lsn(text: str) -> int:
    """``"16/B374D848"`` -> its byte position; raises ``ValueError`` when malformed."""
    match = _LSN.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"not a WAL position: {text!r:.40}")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(lsn: int) -> str:
    """A byte position -> PostgreSQL's text form."""
    if lsn < 0 or lsn >= 1 << 64:
        raise ValueError(f"not a WAL position: {lsn}")
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def token_position(lsn: int, block_size: int = 8192, segment_size: int = 16 << 20) -> int:
    """The position a replica's replay must reach to cover everything before ``lsn``.

    The insert position of an idle primary may sit just past a WAL page header (24 bytes,
    40 at a segment start) where no record can end: a replica that replayed everything
    reports the page start, so the token counts from there.
    """
    if lsn % segment_size == 40:
        return lsn - 40
    if lsn % block_size == 24:
        return lsn - 24
    return lsn
