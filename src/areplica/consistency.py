"""WAL positions and causal tokens (pure logic, no I/O).

A PostgreSQL WAL position (LSN) prints as two hex numbers, ``"16/B374D848"``: the high and low
32 bits of a 64-bit byte position. areplica keeps LSNs as ints and hands them to users as
tokens: the LSN's text form, safe in a header or a cookie.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict

__all__ = [
    "LSN_MASK",
    "MAX_TOKEN_LENGTH",
    "WAL_POSITION_SQL",
    "WarnOnce",
    "format_lsn",
    "format_token",
    "parse_lsn",
    "parse_token",
    "position",
    "token_position",
]

#: The primary's position a read-your-writes token records. The *insert* position, not
#: ``pg_current_wal_lsn()`` (the write position): under ``synchronous_commit = off`` a commit
#: returns before its WAL is written, so the write position can still be before the commit
#: record, and a replica that reached it would serve a read without the write.
WAL_POSITION_SQL = "SELECT pg_current_wal_insert_lsn()::text"


_LSN = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")

#: Longer tokens are refused before any parsing ("FFFFFFFF/FFFFFFFF" is 17 characters; the
#: rest is room for blanks around it).
MAX_TOKEN_LENGTH = 64


_TOKEN = re.compile(r"(?:([0-9A-Fa-f]{1,8})/)?([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")
#: A *position* is ``timeline << 64 | lsn``: ordered first by timeline, so that a position on a
#: newer timeline supersedes any on an older one (whose writes past the branch were lost).
LSN_MASK = (1 << 64) - 1


def position(timeline: int | None, lsn: int) -> int:
    """The position of ``lsn`` on ``timeline`` (0: an unknown timeline)."""
    return ((timeline or 0) << 64) | lsn


def format_token(pos: int) -> str:
    """A position as a token: ``"TL/HI/LO"`` (hex), or ``"HI/LO"`` when the timeline is unknown."""
    timeline, lsn = pos >> 64, pos & LSN_MASK
    return f"{timeline:X}/{format_lsn(lsn)}" if timeline else format_lsn(lsn)


def parse_token(text: str) -> int:
    """A token -> its position; ``"HI/LO"`` (older versions) means an unknown timeline.

    Raises ``ValueError`` when malformed; anything longer than :data:`MAX_TOKEN_LENGTH` is
    refused before it is stripped or matched.
    """
    if not isinstance(text, str):
        raise ValueError(f"not a causal token: a {type(text).__name__}")
    if len(text) > MAX_TOKEN_LENGTH:
        raise ValueError(f"not a causal token: {len(text)} characters, {_preview(text)}...")
    match = _TOKEN.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a causal token: {_preview(text)}")
    timeline = int(match.group(1), 16) if match.group(1) else 0
    if match.group(1) and not timeline:
        raise ValueError(f"not a causal token: timeline 0 in {_preview(text)}")
    return position(timeline, (int(match.group(2), 16) << 32) | int(match.group(3), 16))


def parse_lsn(text: str) -> int:
    """``"16/B374D848"`` -> its byte position; raises ``ValueError`` when malformed.

    Tokens come from clients: anything longer than :data:`MAX_TOKEN_LENGTH` is refused before
    it is stripped or matched, and a message quotes at most a short prefix of it.
    """
    if not isinstance(text, str):
        raise ValueError(f"not a WAL position: a {type(text).__name__}")
    if len(text) > MAX_TOKEN_LENGTH:
        raise ValueError(f"not a WAL position: {len(text)} characters, {_preview(text)}...")
    match = _LSN.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a WAL position: {_preview(text)}")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def _preview(text: str) -> str:
    """A short quoted prefix of a client's text, for a message (at most 40 characters)."""
    shown = repr(text[:20])
    return shown if len(shown) <= 40 else shown[:36] + "...'"


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


class WarnOnce:
    """Which (client, kind) pairs were warned about already, in bounded memory.

    ``kind`` is a stable category (``"malformed"``, ``"clamped"``), never a message: one log
    line per client and kind, however many different bad tokens the client sends. Keys are
    8-byte BLAKE2b digests, so neither the client's text nor anything it sent is kept; the
    least recently seen pairs are forgotten beyond ``maxsize`` (then warned about again).
    Not thread-safe: one event loop uses it.
    """

    def __init__(self, maxsize: int = 1024) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"maxsize: expected an int >= 1, got {maxsize!r}")
        self.maxsize = maxsize
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    def should_warn(self, client: str | None, kind: str) -> bool:
        """True the first time ``(client, kind)`` is seen (or again once it was evicted)."""
        key = self._key(client, kind)
        if key in self._seen:
            self._seen.move_to_end(key)
            return False
        self._seen[key] = None
        if len(self._seen) > self.maxsize:
            self._seen.popitem(last=False)
        return True

    def clear(self) -> None:
        """Forget every pair."""
        self._seen.clear()

    def __len__(self) -> int:
        return len(self._seen)

    def __repr__(self) -> str:
        return f"<WarnOnce {len(self._seen)}/{self.maxsize}>"

    @staticmethod
    def _key(client: str | None, kind: str) -> bytes:
        digest = hashlib.blake2b(digest_size=8)
        kind_bytes = kind.encode("utf-8", "surrogatepass")
        digest.update(len(kind_bytes).to_bytes(8, "big") + kind_bytes)
        # None and "" are different clients; the tag byte keeps them apart.
        if client is None:
            digest.update(b"\x00")
        else:
            digest.update(b"\x01" + client.encode("utf-8", "surrogatepass"))
        return digest.digest()
