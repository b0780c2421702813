"""Every option of a manager: its default, its validation and its environment form.

``Options`` is one frozen object built once at construction; every other module reads its
settings from it. A bad value raises ``ConfigurationError`` naming the option, before any
I/O. ``Options.from_env()`` parses ``AREPLICA_<OPTION>`` variables by the same table, so an
option documented here is accepted the same way in code and in the environment (the README's
option table is checked against this module by a test).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigurationError
from .policies import POLICIES

__all__ = ["CONSISTENCY_MODES", "MEMBER_OPTIONS", "Consistency", "Options"]

Consistency = Literal["causal", "sticky", "eventual"]
CONSISTENCY_MODES: tuple[Consistency, ...] = ("causal", "sticky", "eventual")
#: The keyword arguments that name members rather than tune behaviour.
MEMBER_OPTIONS = ("primary", "replicas", "members", "patroni", "dsn")

PolicyArg = str | Callable[[Sequence[Any]], Any]


# What each kind of option accepts: (test, what the error message says was expected).
def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _policy(value: Any) -> bool:
    return value in POLICIES if isinstance(value, str) else callable(value)


_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seconds": (lambda v: _number(v) and v > 0, "a positive number of seconds"),
    "seconds0": (lambda v: _number(v) and v >= 0, "seconds >= 0"),
    "count": (lambda v: _integer(v) and v > 0, "a positive integer"),
    "count0": (lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    "bool": (lambda v: isinstance(v, bool), "a bool"),
    "weight0": (lambda v: _number(v) and v >= 0, "a weight >= 0"),
    "factor": (lambda v: _number(v) and v > 1, "a multiple > 1 or None"),
    "name": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "driver": (lambda v: isinstance(v, str), "a driver name"),
    "consistency": (lambda v: v in CONSISTENCY_MODES, f"one of {CONSISTENCY_MODES}"),
    "policy": (_policy, f"one of {sorted(POLICIES)} or a callable"),
    "weights": (lambda v: isinstance(v, Mapping), "a {member: weight} mapping"),
}


def _spec(kind: str, *, nullable: bool = False) -> dict[str, Any]:
    return {"kind": kind, "nullable": nullable}


@dataclass(frozen=True)
class Options:
    """A manager's options, validated (see the README's option table for each meaning)."""

    name: str = field(default="areplica", metadata=_spec("name"))
    driver: str = field(default="aiopg", metadata=_spec("driver"))
    pool_size: int = field(default=10, metadata=_spec("count"))
    policy: PolicyArg = field(default="round_robin", metadata=_spec("policy"))
    weights: Mapping[str, float] | None = field(
        default=None, metadata=_spec("weights", nullable=True)
    )
    consistency: Consistency = field(default="causal", metadata=_spec("consistency"))
    sticky_for: float = field(default=5.0, metadata=_spec("seconds"))
    causal_wait: float = field(default=0.05, metadata=_spec("seconds0"))
    max_lag: float | None = field(default=30.0, metadata=_spec("seconds", nullable=True))
    max_lag_bytes: int | None = field(default=None, metadata=_spec("count", nullable=True))
    health_interval: float = field(default=1.0, metadata=_spec("seconds"))
    health_timeout: float = field(default=2.0, metadata=_spec("seconds"))
    fail_after: int = field(default=3, metadata=_spec("count"))
    recover_after: int = field(default=2, metadata=_spec("count"))
    read_timeout: float | None = field(default=30.0, metadata=_spec("seconds", nullable=True))
    pool_timeout: float | None = field(default=30.0, metadata=_spec("seconds", nullable=True))
    max_lifetime: float | None = field(default=3600.0, metadata=_spec("seconds", nullable=True))
    max_idle: float | None = field(default=600.0, metadata=_spec("seconds", nullable=True))
    close_timeout: float = field(default=5.0, metadata=_spec("seconds0"))
    #: ``None``: 5 s with a Patroni source, else 0 (``resolved_primary_wait``).
    primary_wait: float | None = field(default=None, metadata=_spec("seconds0", nullable=True))
    read_retries: int = field(default=2, metadata=_spec("count0"))
    fallback_to_primary: bool = field(default=True, metadata=_spec("bool"))
    slow_factor: float | None = field(default=10.0, metadata=_spec("factor", nullable=True))
    primary_weight: float = field(default=0.0, metadata=_spec("weight0"))

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            _check(spec.name, value, spec.metadata)
            if spec.metadata["kind"] in ("seconds", "seconds0", "weight0", "factor"):
                if value is not None:
                    object.__setattr__(self, spec.name, float(value))
        if self.weights is not None:
            for member, weight in self.weights.items():
                if not _KINDS["weight0"][0](weight):
                    raise ConfigurationError(
                        f"weights: weight of {member!r} must be a number >= 0, got {weight!r}",
                        option="weights",
                    )

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every option's name, in the documented order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every option's default."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    @classmethod
    def build(cls, options: Mapping[str, Any]) -> Options:
        """Options from keyword arguments; an unknown name is a ``ConfigurationError``."""
        known = set(cls.names())
        unknown = sorted(name for name in options if name not in known)
        if unknown:
            allowed = ", ".join((*MEMBER_OPTIONS, *cls.names()))
            raise ConfigurationError(
                f"unknown option {unknown[0]!r}; the options are {allowed}", option=unknown[0]
            )
        return cls(**options)

    def resolved_primary_wait(self, *, with_source: bool) -> float:
        """How long a write waits for a primary: the option, else 5 s with a member source."""
        if self.primary_wait is not None:
            return self.primary_wait
        return 5.0 if with_source else 0.0

    @classmethod
    def from_env(
        cls, prefix: str = "AREPLICA_", environ: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """The options set as ``{prefix}<OPTION>`` variables, parsed (not yet validated).

        ``{prefix}WEIGHTS`` is ``name=weight,name=weight``; ``none`` clears an option that
        may be ``None``; booleans are ``true/false/yes/no/on/off/1/0``.
        """
        env = os.environ if environ is None else environ
        out: dict[str, Any] = {}
        for spec in dataclasses.fields(cls):
            raw = env.get(f"{prefix}{spec.name.upper()}")
            if raw is not None:
                out[spec.name] = _parse_env(spec.name, raw, spec.metadata, prefix)
        return out


def _check(option: str, value: Any, spec: Mapping[str, Any]) -> None:
    if value is None and spec["nullable"]:
        return
    test, expected = _KINDS[spec["kind"]]
    if not test(value):
        raise ConfigurationError(f"{option}: expected {expected}, got {value!r}", option=option)


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _parse_env(option: str, raw: str, spec: Mapping[str, Any], prefix: str) -> Any:
    text = raw.strip()
    kind = spec["kind"]
    if spec["nullable"] and text.lower() in ("none", "null", ""):
        return None
    if kind == "bool":
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigurationError(f"{option}: expected true or false, got {raw!r}", option=option)
    if kind == "weights":
        try:
            pairs = (part.split("=", 1) for part in text.split(","))
            return {name.strip(): float(weight) for name, weight in pairs}
        except ValueError:
            raise ConfigurationError(
                f"{prefix}WEIGHTS: expected name=weight,name=weight", option="weights"
            ) from None
    if kind in ("count", "count0"):
        try:
            return int(text)
        except ValueError:
            raise ConfigurationError(
                f"{option}: expected an integer, got {raw!r}", option=option
            ) from None
    if kind in ("seconds", "seconds0", "weight0", "factor"):
        try:
            return float(text)
        except ValueError:
            raise ConfigurationError(
                f"{option}: expected a number, got {raw!r}", option=option
            ) from None
    return text
