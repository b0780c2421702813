"""Timeline histories and tokens that carry their timeline (pure logic)."""

from __future__ import annotations

import pytest

from areplica.consistency import LSN_MASK, format_token, parse_lsn, parse_token, position
from areplica.history import History, parse_history

# Timeline 3's history file: timeline 1 kept up to 0/3000158, timeline 2 up to 0/5000060.
THREE = "1\t0/3000158\tno recovery target specified\n\n2\t0/5000060\tno recovery target specified\n"


def test_parse_history() -> None:
    history = parse_history(3, THREE)
    assert history.timeline == 3 and history.complete
    assert history.branches == {1: parse_lsn("0/3000158"), 2: parse_lsn("0/5000060")}


@pytest.mark.parametrize("bad", ["1", "x\t0/1", "3\t0/1", "0\t0/1", "1\tnot-an-lsn"])
def test_malformed_history_lines_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_history(3, bad)


@pytest.mark.parametrize(
    ("timeline", "position_", "follows"),
    [
        (3, "0/9000000", True),  # the primary's own timeline, any position
        (None, "0/9000000", True),  # unknown timeline (no WAL receiver yet): not judged
        (2, "0/5000060", True),  # an ancestor, at its branch point
        (2, "0/5000000", True),  # an ancestor, before it
        (2, "0/5000061", False),  # an ancestor, past it: WAL the primary never wrote
        (1, "0/3000158", True),
        (1, "0/4000000", False),
        (4, "0/1000000", False),  # a newer timeline: a primary we do not follow
        (5, "0/1000000", False),
    ],
)
def test_follows(timeline: int | None, position_: str, follows: bool) -> None:
    assert parse_history(3, THREE).follows(timeline, parse_lsn(position_)) is follows


def test_an_unreadable_history_only_knows_its_own_timeline() -> None:
    history = History(3, complete=False)
    assert history.follows(3, 1)
    assert not history.follows(2, 1)  # cannot tell: serves nothing until it switches


def test_surviving_positions() -> None:
    history = parse_history(3, THREE)
    kept = history.surviving(2, parse_lsn("0/6000000"))
    assert kept == parse_lsn("0/5000060")  # lost past the branch: satisfied there
    assert history.surviving(2, 5) == 5
    assert history.surviving(3, 99) == 99
    assert history.surviving(7, 99) is None


def test_tokens_carry_their_timeline_and_old_ones_still_parse() -> None:
    pos = position(2, parse_lsn("16/B374D848"))
    assert format_token(pos) == "2/16/B374D848"
    assert parse_token("2/16/B374D848") == pos
    old = parse_token("16/B374D848")  # a token of an older version: timeline unknown
    assert old >> 64 == 0 and old & LSN_MASK == parse_lsn("16/B374D848")
    assert format_token(old) == "16/B374D848"


def test_a_newer_timeline_supersedes_any_older_position() -> None:
    lost = position(1, parse_lsn("0/9000000"))  # written on timeline 1 past its branch
    newer = position(2, parse_lsn("0/5000000"))
    assert max(lost, newer) == newer


@pytest.mark.parametrize(
    "bad", ["", "0/0/0", "1/2/3/4", "G/0/1", "123456789/0/1", " 1 /0/1", "x" * 65]
)
def test_malformed_tokens_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_token(bad)
