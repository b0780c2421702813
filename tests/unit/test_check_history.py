"""``Sessions.check_history``: what of a task's own position a failover kept (pure logic).

A task wrote on a primary that has since been replaced. The rule (the README's token
table, under "Consistency modes"): a position on the new primary's history stands; one past
where that history left its timeline names writes lost in a fork, and is satisfied at the
branch point, counted in ``lost_tokens`` and logged once per client. The cluster, the
monitor and the core are stand-ins: only the judgement is under test here (the integration
tests show it against real failovers).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest

from areplica.consistency import position
from areplica.core import Counters
from areplica.history import History
from areplica.sessions import Cell, Sessions

# Timeline 2 left timeline 1 at 0/5000000; timeline 3 left timeline 2 at 0/7000000.
HISTORY = History(timeline=3, branches={1: 0x5000000, 2: 0x7000000})


def sessions(
    *, timeline: int | None = 3, history: History | None = HISTORY, monitor: bool = True
) -> tuple[Sessions, Counters]:
    counters = Counters()
    primary = None if timeline is None else SimpleNamespace(timeline=timeline)
    core: Any = SimpleNamespace(
        name="areplica",
        options=SimpleNamespace(consistency="causal"),
        cluster=SimpleNamespace(primary=primary),
        monitor=SimpleNamespace(history=history) if monitor else None,
        counters=counters,
    )
    return Sessions(core), counters


CASES = [
    # (what, the cell's position, what it requires after, lost)
    ("no timeline known (an old token)", position(None, 0x9000000), position(None, 0x9000000), 0),
    ("the primary's own timeline", position(3, 0x9000000), position(3, 0x9000000), 0),
    ("an ancestor, before its branch", position(1, 0x4000000), position(1, 0x4000000), 0),
    ("an ancestor, at its branch", position(1, 0x5000000), position(1, 0x5000000), 0),
    ("an ancestor, past its branch (fork)", position(1, 0x6000000), position(1, 0x5000000), 1),
    ("the parent, past its branch (fork)", position(2, 0x7000100), position(2, 0x7000000), 1),
    ("a timeline the history does not name", position(4, 0x1), position(4, 0x1), 0),
]


@pytest.mark.parametrize(("what", "pos", "after", "lost"), CASES, ids=[c[0] for c in CASES])
def test_a_position_is_judged_on_the_primarys_history(
    what: str, pos: int, after: int, lost: int, caplog: pytest.LogCaptureFixture
) -> None:
    judge, counters = sessions()
    cell = Cell(None, None, pos=pos)
    with caplog.at_level(logging.WARNING, logger="areplica"):
        judge.check_history(cell)
    assert cell.pos == after
    assert counters.lost_tokens == lost
    assert ("lost in a failover" in caplog.text) == bool(lost)


@pytest.mark.parametrize(
    "setup",
    [
        {"timeline": None},  # no primary known (mid-failover): nothing to judge against
        {"history": None},  # the history not read yet
        {"monitor": False},  # no health monitor (closed)
        {"history": History(timeline=3, complete=False)},  # unreadable: only its timeline
    ],
    ids=["no primary", "no history", "no monitor", "unreadable history"],
)
def test_a_position_stands_when_the_history_cannot_tell(setup: dict[str, Any]) -> None:
    judge, counters = sessions(**setup)
    cell = Cell(None, None, pos=position(1, 0x6000000))
    judge.check_history(cell)
    assert cell.pos == position(1, 0x6000000)
    assert counters.lost_tokens == 0


def test_a_fork_is_logged_once_per_client_but_counted_each_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    judge, counters = sessions()
    with caplog.at_level(logging.WARNING, logger="areplica"):
        for _ in range(3):
            cell = Cell(None, None, pos=position(1, 0x6000000))
            cell.client = "client-a"
            judge.check_history(cell)
            assert cell.pos == position(1, 0x5000000)
            judge.check_history(cell)  # judged again: nothing more was lost
    assert counters.lost_tokens == 3
    assert caplog.text.count("lost in a failover") == 1
