"""Timeline history: which WAL positions are on the primary's history (pure logic, no I/O).

A promotion starts a new timeline and writes a history file (``pg_wal/0000000N.history``) that
lists every ancestor timeline and the WAL position where the next one branched off it::

    1	0/3000158	no recovery target specified
    2	0/5000060	no recovery target specified

(timeline 3's file: timeline 1 is valid up to 0/3000158, timeline 2 up to 0/5000060.) A
standby is on the primary's history when it receives the primary's timeline, or an ancestor
timeline at a position before that ancestor's branch point. A standby past that point, or on
a timeline the primary's history does not name, replays WAL the primary never wrote: it is
*diverged* and serves nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .consistency import parse_lsn

__all__ = ["History", "parse_history"]


@dataclass(frozen=True)
class History:
    """A timeline and where each of its ancestors branched off (``{ancestor: position}``)."""

    timeline: int
    branches: dict[int, int] = field(default_factory=dict)
    #: False when the history file could not be read: only the timeline itself is known.
    complete: bool = True

    def follows(self, timeline: int | None, position: int | None) -> bool:
        """True when a standby on ``timeline`` at ``position`` is on this history."""
        if timeline is None or timeline == self.timeline:
            return True
        branch = self.branches.get(timeline)
        if branch is None:
            return False  # a later timeline, a sibling fork, or (incomplete) unknown
        return position is not None and position <= branch

    def surviving(self, timeline: int | None, position: int) -> int | None:
        """The part of a position on ``timeline`` that this history kept.

        ``position`` itself when it is on this history; the branch point when it lies
        beyond it on an ancestor timeline (what was written after it was lost in a
        failover); ``None`` when the history says nothing of ``timeline``.
        """
        if timeline is None or timeline == self.timeline:
            return position
        branch = self.branches.get(timeline)
        if branch is None:
            return None
        return min(position, branch)


def parse_history(timeline: int, text: str) -> History:
    """A ``History`` from the text of timeline ``timeline``'s history file.

    Lines are ``parent-timeline <TAB> branch-position <TAB> reason``; blank lines and ``#``
    comments are skipped; a malformed line raises ``ValueError``.
    """
    branches: dict[int, int] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 2)
        if len(parts) < 2:
            raise ValueError(f"not a timeline history line: {line[:80]!r}")
        parent = int(parts[0])
        if not 0 < parent < timeline:
            raise ValueError(f"timeline {parent} cannot be an ancestor of {timeline}")
        branches[parent] = parse_lsn(parts[1])
    return History(timeline, branches)
