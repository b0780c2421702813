"""Load-balancing policies: pick one replica among the eligible ones (pure logic).

A policy is a callable taking the eligible candidates (a non-empty sequence of objects with
``name``, ``in_flight``, ``latency_ms`` and ``weight``) and returning one of them.

- ``round_robin``: in turn; with ``weights``, smooth weighted round robin (nginx's), so a node
  of weight 2 gets exactly twice the reads of a node of weight 1, evenly interleaved.
- ``random``: uniform, or weighted by ``weights``.
- ``least_busy``: the fewest queries in flight, ties broken by the lowest probe latency.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

__all__ = ["POLICIES", "Candidate", "LeastBusy", "Policy", "RandomChoice", "RoundRobin"]


class Candidate(Protocol):
    """What a policy may read of a node."""

    @property
    def name(self) -> str: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def latency_ms(self) -> float | None: ...
    @property
    def weight(self) -> float: ...


C = TypeVar("C", bound=Candidate)
Policy = Callable[[Sequence[C]], C]


class RoundRobin:
    """In turn; weighted smoothly when any candidate's weight differs from the others."""

    def __init__(self) -> None:
        self._counter = itertools.count()
        self._current: dict[str, float] = {}

    def __call__(self, candidates: Sequence[C]) -> C:
        if len(candidates) == 1:
            return candidates[0]
        first = candidates[0].weight
        if all(c.weight == first for c in candidates):
            return candidates[next(self._counter) % len(candidates)]
        total = 0.0
        best: C | None = None
        best_value = 0.0
        current = self._current
        for c in candidates:
            value = current.get(c.name, 0.0) + c.weight
            current[c.name] = value
            total += c.weight
            if best is None or value > best_value:
                best, best_value = c, value
        assert best is not None  # candidates is non-empty
        current[best.name] = best_value - total
        return best


class RandomChoice:
    """Uniformly at random, or weighted by each candidate's weight."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def __call__(self, candidates: Sequence[C]) -> C:
        if len(candidates) == 1:
            return candidates[0]
        weights = [c.weight for c in candidates]
        if len(set(weights)) == 1:
            return self._rng.choice(candidates)
        return self._rng.choices(candidates, weights=weights)[0]


class LeastBusy:
    """The fewest in-flight queries; ties go to the lowest probe latency, then in turn."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def __call__(self, candidates: Sequence[C]) -> C:
        if len(candidates) == 1:
            return candidates[0]
        low = min(c.in_flight for c in candidates)
        idle = [c for c in candidates if c.in_flight == low]
        if len(idle) == 1:
            return idle[0]
        known = [c for c in idle if c.latency_ms is not None]
        if known:
            fastest = min(c.latency_ms for c in known if c.latency_ms is not None)
            # Latencies within 10% of the fastest count as a tie: rotate among them.
            idle = [c for c in known if c.latency_ms is not None and c.latency_ms <= fastest * 1.1]
        return idle[next(self._counter) % len(idle)]


POLICIES: dict[str, Callable[[], Callable[[Sequence[Candidate]], Candidate]]] = {
    "round_robin": RoundRobin,
    "random": RandomChoice,
    "least_busy": LeastBusy,
}
