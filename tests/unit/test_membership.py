"""MemberTracker: every rule of membership hysteresis, as tables of answers (no server).

A scenario is a list of rounds, one per answer of the source, ``interval`` (1 s) apart
unless a round says otherwise. Each round gives what the source listed and what the probes
saw (who answers, who is the primary), and what the tracker must decide.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from areplica.membership import MemberFlags, MembershipUpdate, MemberTracker
from areplica.sources import PatroniMember, parse_cluster

ALL = ("a", "b", "c")


@dataclass(frozen=True)
class M:
    """A listed member: ``M("a", leader=True)``."""

    name: str
    leader: bool = False
    serving: bool = True
    noloadbalance: bool = False

    @property
    def is_leader(self) -> bool:
        return self.leader


def listing(*names: str, leader: str | None = "a") -> list[M]:
    return [M(n, leader=(n == leader)) for n in names]


@dataclass
class Round:
    """One answer: what was listed, what the probes saw, and what must follow."""

    listed: Sequence[M]
    add: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()
    answering: Sequence[str] = ALL
    primary: str | None = "a"
    paused: bool = False
    dt: float = 1.0  # seconds since the round before
    suspect: bool = False


@dataclass
class Scenario:
    rounds: list[Round]
    present: list[str] = field(default_factory=lambda: list(ALL))
    interval: float = 1.0


def play(scenario: Scenario) -> list[MembershipUpdate]:
    """Run the rounds, applying adds and removes as the manager would; check each round."""
    tracker = MemberTracker("t", interval=scenario.interval)
    present = list(scenario.present)
    now = 100.0
    updates = []
    for number, r in enumerate(scenario.rounds, start=1):
        now += r.dt
        update = tracker.update(
            r.listed,
            present=present,
            answering=[n for n in r.answering if n in present or n in {m.name for m in r.listed}],
            primary=r.primary,
            now=now,
            paused=r.paused,
        )
        assert (update.add, update.remove, update.suspect is not None) == (
            r.add,
            r.remove,
            r.suspect,
        ), f"round {number}: {update}"
        present += list(update.add)
        present = [n for n in present if n not in update.remove]
        updates.append(update)
    return updates


SCENARIOS = {
    # ---- listed members: added once, flags every answer
    "a new member is added once": Scenario(
        [Round(listing("a", "b", "c", "d"), add=("d",)), Round(listing("a", "b", "c", "d"))]
    ),
    "members in the first answer are added in the source's order": Scenario(
        [Round(listing("c", "a", "b"), add=("c", "a", "b"))], present=[]
    ),
    # ---- a member the source stops listing
    "missing from 3 answers over 2 intervals: removed": Scenario(
        [
            Round(listing("a", "b")),
            Round(listing("a", "b")),
            Round(listing("a", "b"), remove=("c",)),
            Round(listing("a", "b")),
        ]
    ),
    "missing from 3 answers in under 2 intervals: not yet": Scenario(
        [
            Round(listing("a", "b"), dt=0.5),
            Round(listing("a", "b"), dt=0.5),
            Round(listing("a", "b"), dt=0.5),  # 1.0 s since the first miss
            Round(listing("a", "b"), dt=0.5),  # 1.5 s
            Round(listing("a", "b"), dt=0.5, remove=("c",)),  # 2.0 s, 5 answers
        ]
    ),
    "missing from 2 answers over a long time: not yet": Scenario(
        [
            Round(listing("a", "b")),
            Round(listing("a", "b"), dt=60.0),
            Round(listing("a", "b"), dt=1.0, remove=("c",)),
        ]
    ),
    "missing and not answering probes: removed at once": Scenario(
        [Round(listing("a", "b"), answering=("a", "b"), remove=("c",))]
    ),
    "not answering but listed: kept (the health loop deals with it)": Scenario(
        [Round(listing("a", "b", "c"), answering=("a", "b")) for _ in range(5)]
    ),
    "back after a short absence: the count starts again": Scenario(
        [
            Round(listing("a", "b")),
            Round(listing("a", "b")),
            Round(listing("a", "b", "c")),  # back: never removed, no re-add
            Round(listing("a", "b")),
            Round(listing("a", "b")),
            Round(listing("a", "b"), remove=("c",)),
        ]
    ),
    "flapping every other answer: never removed, never re-added": Scenario(
        [Round(listing("a", "b") if i % 2 else listing("a", "b", "c")) for i in range(20)]
    ),
    "flapping every 0.5 s at a 0.25 s interval: never removed": Scenario(
        [
            Round(listing("a", "b") if (i // 2) % 2 else listing("a", "b", "c"), dt=0.25)
            for i in range(40)
        ],
        interval=0.25,
    ),
    "several members leave at once": Scenario(
        [
            Round(listing("a")),
            Round(listing("a")),
            Round(listing("a"), remove=("b", "c")),
        ]
    ),
    # ---- the primary
    "the primary is never removed while it answers": Scenario(
        [Round(listing("b", "c", leader="b"), primary="a") for _ in range(10)]
    ),
    "the primary not answering any more: removed": Scenario(
        [
            Round(listing("b", "c", leader="b"), primary="a"),
            Round(listing("b", "c", leader="b"), primary="a"),
            Round(listing("b", "c", leader="b"), primary="a"),
            Round(listing("b", "c", leader="b"), primary=None, answering=("b", "c"), remove=("a",)),
        ]
    ),
    "the old primary, once another is the primary: removed": Scenario(
        [
            Round(listing("b", "c", leader="b"), primary="a"),
            Round(listing("b", "c", leader="b"), primary="a"),
            Round(listing("b", "c", leader="b"), primary="a"),
            Round(listing("b", "c", leader="b"), primary="b", remove=("a",)),
        ]
    ),
    "the leader omitted every other second: nobody removed": Scenario(
        [
            Round(
                listing("b", "c", leader=None) if i % 2 else listing("a", "b", "c"),
                suspect=bool(i % 2),
            )
            for i in range(12)
        ]
    ),
    # ---- empty or implausible answers
    "an empty answer removes nobody": Scenario([Round([], suspect=True) for _ in range(10)]),
    "an empty answer while nothing answers removes nobody": Scenario(
        [Round([], suspect=True, answering=(), primary=None) for _ in range(10)]
    ),
    "no leader listed while the primary answers removes nobody": Scenario(
        [Round(listing("b", leader=None), suspect=True) for _ in range(10)]
    ),
    "no leader listed during a failover removes nobody, even the dead": Scenario(
        [
            Round(listing("b", "c", leader=None), primary=None, answering=("b", "c"), suspect=True)
            for _ in range(10)
        ]
    ),
    "no leader listed in a paused cluster removes nobody": Scenario(
        [Round(listing("b", leader=None), paused=True, suspect=True) for _ in range(10)]
    ),
    "implausible answers freeze the count": Scenario(
        [
            Round(listing("a", "b")),
            Round(listing("a", "b")),
            Round([], suspect=True),
            Round([], suspect=True),
            Round(listing("a", "b"), remove=("c",)),  # the third trusted answer without it
        ]
    ),
    "a new member listed in an implausible answer is still added": Scenario(
        [Round(listing("d", leader=None), add=("d",), suspect=True)]
    ),
    "after the failover, the dead old primary goes": Scenario(
        [
            Round(listing("b", "c", leader=None), primary=None, answering=("b", "c"), suspect=True),
            Round(listing("b", "c", leader="b"), primary="b", answering=("b", "c"), remove=("a",)),
        ]
    ),
}


@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_rules(scenario: Scenario) -> None:
    play(scenario)


def test_flags_apply_to_listed_members_in_every_answer() -> None:
    tracker = MemberTracker("t", interval=1.0)
    listed = [
        M("a", leader=True),
        M("b", serving=False),  # stopping, stopped, demoting, starting
        M("c", noloadbalance=True),
        M("d", serving=False, noloadbalance=True),
    ]
    expected = {
        "a": MemberFlags(paused=False, no_reads=False),
        "b": MemberFlags(paused=True, no_reads=False),
        "c": MemberFlags(paused=False, no_reads=True),
        "d": MemberFlags(paused=True, no_reads=True),
    }
    update = tracker.update(listed, present=["a"], answering=["a"], primary="a", now=1.0)
    assert update.flags == expected and update.add == ("b", "c", "d")
    # In an implausible answer (no leader while the primary answers) the flags still apply.
    update = tracker.update(listed[1:], present="abcd", answering="abcd", primary="a", now=2.0)
    assert update.suspect is not None and update.remove == ()
    assert update.flags == {k: v for k, v in expected.items() if k != "a"}
    assert update.kept == {"a": 0}


def test_kept_and_why_tell_the_caller_what_happened() -> None:
    tracker = MemberTracker("t", interval=1.0)
    listed = listing("a", "b")
    kept = [
        tracker.update(listed, present=ALL, answering=ALL, primary="a", now=t).kept
        for t in (1.0, 2.0)
    ]
    assert kept == [{"c": 1}, {"c": 2}]
    assert tracker.missing == {"c": 2}
    update = tracker.update(listed, present=ALL, answering=ALL, primary="a", now=3.0)
    assert update.remove == ("c",) and update.why == {"c": "not listed in 3 answers over 2.0s"}
    assert tracker.missing == {}
    update = tracker.update(listed, present=ALL, answering=["a", "b"], primary="a", now=4.0)
    assert update.why == {"c": "no longer listed, and its probes fail"}


def test_duplicate_names_count_once() -> None:
    tracker = MemberTracker("t", interval=1.0)
    update = tracker.update(
        [M("a", leader=True), M("b"), M("b", serving=False)],
        present=[],
        answering=[],
        primary=None,
        now=1.0,
    )
    assert update.add == ("a", "b") and update.flags["b"] == MemberFlags()


def test_a_member_the_caller_removed_itself_is_forgotten() -> None:
    tracker = MemberTracker("t", interval=1.0)
    for t in (1.0, 2.0):
        tracker.update(listing("a", "b"), present=ALL, answering=ALL, primary="a", now=t)
    assert tracker.missing == {"c": 2}
    # The caller removed "c" (remove_member()); later it is a member again: counted afresh.
    tracker.update(listing("a", "b"), present=["a", "b"], answering=ALL, primary="a", now=3.0)
    assert tracker.missing == {}
    for t in (4.0, 5.0):
        update = tracker.update(listing("a", "b"), present=ALL, answering=ALL, primary="a", now=t)
        assert update.remove == ()
    assert tracker.missing == {"c": 2}


def test_reset_and_forget() -> None:
    tracker = MemberTracker("t", interval=1.0)
    for t in (1.0, 2.0):
        tracker.update(listing("a"), present=ALL, answering=ALL, primary="a", now=t)
    tracker.forget("b")
    assert tracker.missing == {"c": 2}
    tracker.reset()
    assert tracker.missing == {}
    update = tracker.update(listing("a"), present=ALL, answering=ALL, primary="a", now=3.0)
    assert update.remove == () and update.kept == {"b": 1, "c": 1}


def test_custom_thresholds() -> None:
    tracker = MemberTracker("t", interval=1.0, min_answers=1, min_absence=0.0)
    update = tracker.update(listing("a"), present=ALL, answering=ALL, primary="a", now=1.0)
    assert update.remove == ("b", "c")
    with pytest.raises(ValueError):
        MemberTracker("t", interval=0)
    with pytest.raises(ValueError):
        MemberTracker("t", interval=1.0, min_answers=0)


def test_one_warning_per_episode_of_implausible_answers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="areplica")
    tracker = MemberTracker("t", interval=1.0)
    now = 0.0

    def answer(listed: list[M], primary: str | None = "a") -> None:
        nonlocal now
        now += 1.0
        tracker.update(listed, present=ALL, answering=ALL, primary=primary, now=now)

    def lines(level: int) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == level]

    for _ in range(5):
        answer([])
    assert lines(logging.WARNING) == [
        "t: ignoring what the member source leaves out: the answer lists no members"
    ]
    answer(listing("a", "b", "c"))  # the episode ends
    for _ in range(3):
        answer(listing("b", "c", leader=None))
    assert len(lines(logging.WARNING)) == 2
    assert "no leader listed while a answers as the primary" in lines(logging.WARNING)[1]
    answer(listing("a", "b", "c"))
    # A failover (no primary answers): INFO, once.
    for _ in range(3):
        answer(listing("b", "c", leader=None), primary=None)
    assert len(lines(logging.WARNING)) == 2
    failover = [line for line in lines(logging.INFO) if "failover" in line]
    assert failover == [
        "t: no leader listed (a failover under way); no member is removed meanwhile"
    ]
    assert sum("complete again" in line for line in lines(logging.INFO)) == 2
    assert not any(r.exc_info for r in caplog.records)


def test_the_kept_primary_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="areplica")
    tracker = MemberTracker("t", interval=1.0)
    for t in range(1, 10):
        tracker.update(
            listing("b", "c", leader="b"), present=ALL, answering=ALL, primary="a", now=t
        )
    kept = [r for r in caplog.records if "answers as the only primary" in r.getMessage()]
    assert len(kept) == 1


def test_patroni_views_feed_the_tracker() -> None:
    view = parse_cluster(
        {
            "members": [
                {"name": "n1", "role": "leader", "state": "running", "host": "h"},
                {"name": "n2", "role": "replica", "state": "starting", "host": "h"},
                {"name": "n3", "role": "replica", "state": "streaming", "host": "h",
                 "tags": {"noloadbalance": True}},
            ],
            "pause": True,
        }
    )  # fmt: skip
    members: tuple[PatroniMember, ...] = view.members
    update = MemberTracker("t", interval=1.0).update(
        members, present=["n1"], answering=["n1"], primary="n1", now=1.0, paused=view.paused
    )
    assert update.add == ("n2", "n3")
    assert update.flags == {
        "n1": MemberFlags(),
        "n2": MemberFlags(paused=True),
        "n3": MemberFlags(no_reads=True),
    }
