"""Membership hysteresis: what a member source's answer may change, and when (pure).

A member source (Patroni's ``GET /cluster``) is trusted for what it lists, not for what it
leaves out. An answer that omits a member may be a member leaving, or a DCS hiccup, a
Patroni restart, a lost key: removing a member on one such answer drops a live primary, and
re-adding it a second later makes it start ``down`` and wait ``recover_after`` good probes.
So :class:`MemberTracker` applies these rules (no I/O; the caller supplies the probes'
facts and the clock):

========================================  ==================================================
situation                                 outcome
========================================  ==================================================
listed, not yet a member                  ``add`` (its role comes from its probes)
listed                                    its flags apply: ``paused`` when the source says it
                                          is not serving (stopping, stopped, demoting,
                                          starting), ``no_reads`` when tagged noloadbalance;
                                          its count of missed answers goes back to 0
missing from a trusted answer             kept; counted (answers in a row, since when)
missing from >= ``min_answers`` (3)       ``remove`` (drain, then remove)
answers in a row spanning >=
``min_absence`` (2 x health_interval)
missing, and not answering probes         ``remove`` at once
missing, but it is the primary            kept while it answers as the only primary
(reachable, the only one)                 (logged once at INFO)
listed again before removal               nothing to do: it never left, its state and
                                          counters in the health loop are untouched
answer lists no members                   implausible: WARNING once per episode; no removal,
                                          missing counts frozen
no leader listed, and the primary         implausible: WARNING once per episode; no removal,
answers probes (cluster not paused)       missing counts frozen; listed members' flags apply
no leader listed, no primary answers      a failover (or a paused cluster): INFO once per
(or the cluster is paused)                episode; no removal, missing counts frozen
no answer at all (fetch failed)           the caller does not call :meth:`update`: nothing
                                          changes, nothing is counted
========================================  ==================================================

The manager calls :meth:`MemberTracker.update` once per answer (see its docstring).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "ListedMember",
    "MemberFlags",
    "MemberTracker",
    "MembershipUpdate",
]

logger = logging.getLogger("areplica")


class ListedMember(Protocol):
    """A member as a source lists it (``sources.PatroniMember`` is one)."""

    @property
    def name(self) -> str:
        """The member's name in the source (Patroni's member name)."""

    @property
    def serving(self) -> bool:
        """The source says it serves (Patroni: running or streaming)."""

    @property
    def noloadbalance(self) -> bool:
        """Tagged to take no reads."""

    @property
    def is_leader(self) -> bool:
        """The source lists it as the leader."""


@dataclass(frozen=True)
class MemberFlags:
    """What the source says about a listed member: applied at once, every answer.

    ``paused``: take no new queries (the source says it is not serving).
    ``no_reads``: read weight 0 (tagged ``noloadbalance``); writes are the probes' call.
    """

    paused: bool = False
    no_reads: bool = False


@dataclass(frozen=True)
class MembershipUpdate:
    """What one answer changes.

    ``add``: listed members the caller does not have yet, in the source's order.
    ``remove``: members to drain and remove; ``why`` says why, one line each.
    ``flags``: every listed member's flags.
    ``kept``: members missing from this answer but kept, with the number of answers in a
    row they have been missing from.
    ``suspect``: why this answer removed nobody whatever it left out (``None`` when it was
    trusted).
    """

    add: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()
    flags: Mapping[str, MemberFlags] = field(default_factory=dict)
    kept: Mapping[str, int] = field(default_factory=dict)
    why: Mapping[str, str] = field(default_factory=dict)
    suspect: str | None = None


@dataclass
class _Absence:
    answers: int
    since: float


class MemberTracker:
    """Decides, answer by answer, which members a source adds, flags and removes.

    ``interval``: the health interval (seconds between answers). A member missing from
    ``min_answers`` trusted answers in a row that span at least ``min_absence`` seconds
    (default ``2 * interval``) is removed; see the module docstring for every rule.
    Pure: no I/O, no clock of its own (the caller passes ``now``).
    """

    def __init__(
        self,
        name: str,
        *,
        interval: float,
        min_answers: int = 3,
        min_absence: float | None = None,
    ) -> None:
        if isinstance(min_answers, bool) or not isinstance(min_answers, int) or min_answers < 1:
            raise ValueError(f"min_answers: expected an integer >= 1, got {min_answers!r}")
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval <= 0:
            raise ValueError(f"interval: expected seconds > 0, got {interval!r}")
        self.name = name
        self.interval = float(interval)
        self.min_answers = min_answers
        self.min_absence = 2.0 * self.interval if min_absence is None else float(min_absence)
        self._absent: dict[str, _Absence] = {}
        self._episode: str | None = None  # the kind of suspect answers we are in, if any
        self._shielded: set[str] = set()  # primaries kept although missing (logged once)

    def __repr__(self) -> str:
        return f"<MemberTracker {self.name} missing={self.missing}>"

    @property
    def missing(self) -> dict[str, int]:
        """Members missing from the latest answers, kept so far: answers missed in a row."""
        return {name: absence.answers for name, absence in self._absent.items()}

    def forget(self, name: str) -> None:
        """The caller removed ``name`` by other means: drop what was counted about it."""
        self._absent.pop(name, None)
        self._shielded.discard(name)

    def reset(self) -> None:
        """Forget everything (a manager reopened: members are discovered afresh)."""
        self._absent.clear()
        self._shielded.clear()
        self._episode = None

    def update(
        self,
        listed: Iterable[ListedMember],
        *,
        present: Collection[str],
        answering: Collection[str],
        primary: str | None,
        now: float,
        paused: bool = False,
    ) -> MembershipUpdate:
        """Apply one answer of the source.

        ``listed``: the members the answer lists. ``present``: the source's members the
        caller has now (the names the source gives them). ``answering``: members whose
        latest probe succeeded. ``primary``: the member the probes see as the primary, when
        it is reachable and no other member is a primary, else ``None``. ``now``: a
        monotonic clock. ``paused``: the source says the cluster is in maintenance mode.

        Call it once per answer the source gave, never for a failed fetch: a failed fetch
        is no evidence that any member left.
        """
        members: dict[str, ListedMember] = {}
        for member in listed:
            members.setdefault(member.name, member)
        flags = {
            name: MemberFlags(paused=not m.serving, no_reads=bool(m.noloadbalance))
            for name, m in members.items()
        }
        present_set = set(present)
        add = tuple(name for name in members if name not in present_set)
        for name in members:
            self._absent.pop(name, None)
            self._shielded.discard(name)
        for name in list(self._absent):  # the caller removed it meanwhile
            if name not in present_set:
                self.forget(name)

        suspect, implausible = self._judge(members, primary, paused)
        self._log_episode(suspect, implausible)

        gone = [name for name in present_set if name not in members]
        gone.sort()
        remove: list[str] = []
        why: dict[str, str] = {}
        kept: dict[str, int] = {}
        answering_set = set(answering)
        for name in gone:
            absence = self._absent.get(name)
            if suspect is not None:  # no evidence either way: frozen
                kept[name] = absence.answers if absence is not None else 0
                continue
            if absence is None:
                absence = self._absent[name] = _Absence(0, now)
            absence.answers += 1
            reason = None
            if name not in answering_set:
                reason = "no longer listed, and its probes fail"
            elif absence.answers >= self.min_answers and now - absence.since >= self.min_absence:
                reason = f"not listed in {absence.answers} answers over {now - absence.since:.1f}s"
            if reason is not None and name == primary:
                if name not in self._shielded:
                    self._shielded.add(name)
                    logger.info(
                        "%s: %s is no longer listed but answers as the only primary: kept",
                        self.name,
                        name,
                    )
                reason = None
            if reason is None:
                kept[name] = absence.answers
            else:
                remove.append(name)
                why[name] = reason
                self.forget(name)
        return MembershipUpdate(
            add=add, remove=tuple(remove), flags=flags, kept=kept, why=why, suspect=suspect
        )

    def _judge(
        self, members: Mapping[str, ListedMember], primary: str | None, paused: bool
    ) -> tuple[str | None, bool]:
        """(why this answer may remove nobody, whether that is implausible) or (None, False)."""
        if not members:
            return "the answer lists no members", True
        if any(m.is_leader for m in members.values()):
            return None, False
        if primary is not None and not paused:
            return f"no leader listed while {primary} answers as the primary", True
        if paused:
            return "no leader listed (the cluster is paused)", False
        return "no leader listed (a failover under way)", False

    def _log_episode(self, suspect: str | None, implausible: bool) -> None:
        """One line when an episode of suspect answers starts or changes kind, one when it
        ends."""
        kind = None if suspect is None else ("implausible" if implausible else "leaderless")
        if kind == self._episode:
            return
        if kind is None:
            logger.info("%s: the member source's answers are complete again", self.name)
        elif implausible:
            logger.warning("%s: ignoring what the member source leaves out: %s", self.name, suspect)
        else:
            logger.info("%s: %s; no member is removed meanwhile", self.name, suspect)
        self._episode = kind
