"""WAL positions and causal tokens (pure logic, no I/O).

A PostgreSQL WAL position (LSN) prints as two hex numbers, ``"16/B374D848"``: the high and low
32 bits of a 64-bit byte position. areplica keeps LSNs as ints and hands them to users as
tokens: the LSN's text form, safe in a header or a cookie.
"""

from __future__ import annotations

import re

__all__ = ["format_lsn", "parse_lsn"]

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
