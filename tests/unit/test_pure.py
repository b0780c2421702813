"""Pure logic without a server: policies, the health state machine, DSNs, LSNs, exports."""

from __future__ import annotations

import collections
import importlib
import random
from dataclasses import dataclass

import pytest

import areplica
from areplica.consistency import format_lsn, parse_lsn
from areplica.dsn import mask_dsn, parse
from areplica.errors import ConfigurationError
from areplica.health import HealthState
from areplica.policies import LeastBusy, RandomChoice, RoundRobin


@dataclass
class Cand:
    name: str
    in_flight: int = 0
    latency_ms: float | None = 1.0
    weight: float = 1.0


def test_all_is_sorted_complete_and_importable() -> None:
    assert areplica.__all__ == sorted(areplica.__all__)
    for name in areplica.__all__:
        assert getattr(areplica, name) is not None
    public = {n for n in dir(areplica) if not n.startswith("_") and n[0].isupper()}
    assert public <= set(areplica.__all__)
    for module in ("errors", "dsn", "policies", "health", "consistency", "routing", "node"):
        mod = importlib.import_module(f"areplica.{module}")
        for name in getattr(mod, "__all__", []):
            assert hasattr(mod, name), f"{module}.{name}"


def test_round_robin_alternates() -> None:
    rr = RoundRobin()
    nodes = [Cand("a"), Cand("b")]
    picks = collections.Counter(rr(nodes).name for _ in range(100))
    assert picks == {"a": 50, "b": 50}
    assert rr([nodes[1]]).name == "b"


def test_weighted_round_robin_is_exact_and_interleaved() -> None:
    rr = RoundRobin()
    nodes = [Cand("a", weight=3), Cand("b", weight=1)]
    seq = [rr(nodes).name for _ in range(8)]
    assert collections.Counter(seq) == {"a": 6, "b": 2}
    assert "bb" not in "".join(seq)  # smooth: never twice in a row for the light one
    zero = [Cand("a", weight=1), Cand("b", weight=0)]
    assert {rr(zero).name for _ in range(20)} == {"a"}


def test_random_choice_respects_weights() -> None:
    choice = RandomChoice(random.Random(1))
    nodes = [Cand("a", weight=9), Cand("b", weight=1)]
    picks = collections.Counter(choice(nodes).name for _ in range(2000))
    assert 1700 < picks["a"] < 1900
    uniform = collections.Counter(choice([Cand("a"), Cand("b")]).name for _ in range(2000))
    assert 900 < uniform["a"] < 1100


def test_least_busy_prefers_idle_then_fast() -> None:
    lb = LeastBusy()
    assert lb([Cand("a", in_flight=3), Cand("b", in_flight=1)]).name == "b"
    assert lb([Cand("a", latency_ms=5.0), Cand("b", latency_ms=1.0)]).name == "b"
    tie = collections.Counter(
        lb([Cand("a", latency_ms=1.0), Cand("b", latency_ms=1.05)]).name for _ in range(10)
    )
    assert tie == {"a": 5, "b": 5}
    assert lb([Cand("a", latency_ms=None), Cand("b", latency_ms=None)]).name in {"a", "b"}


def machine(**kw: object) -> HealthState:
    args: dict[str, object] = {
        "fail_after": 3,
        "recover_after": 2,
        "max_lag": 10.0,
        "max_lag_bytes": None,
        "state": "up",
    }
    args.update(kw)
    return HealthState(**args)  # type: ignore[arg-type]


def test_state_machine_fail_after_and_recover_after() -> None:
    m = machine()
    assert [m.failure() for _ in range(3)] == ["up", "up", "down"]
    assert m.success(0.0, 0) == "down"
    assert m.failure() == "down"  # a failure resets the good streak
    assert m.success(0.0, 0) == "down"
    assert m.success(0.0, 0) == "up"
    m.failure()
    assert m.success(0.0, 0) == "up" and m.failures == 0  # a success resets the bad streak
    assert m.force_down() == "down"


def test_state_machine_lag_hysteresis() -> None:
    m = machine()
    assert m.success(11.0, 100) == "lagging"
    assert m.success(9.0, 100) == "lagging"  # under the limit, not under half of it
    assert m.success(4.9, 100) == "up"
    bytes_only = machine(max_lag=None, max_lag_bytes=1000)
    assert bytes_only.success(999.0, 1001) == "lagging"
    assert bytes_only.success(0.0, 499) == "up"
    down = machine(state="down")
    down.success(50.0, 1)
    assert down.success(50.0, 1) == "lagging"  # readmitted, but behind
    assert machine().success(0.0, 0, slow=True) == "lagging"


def test_lsn_round_trip() -> None:
    assert parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert format_lsn(parse_lsn("0/3000060")) == "0/3000060"
    for bad in ("", "16", "x/y", "1/2/3", "123456789/0", None):
        with pytest.raises(ValueError):
            parse_lsn(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        format_lsn(-1)


def test_dsn_masking() -> None:
    d = parse("postgresql://app:p%40ss@db:6432/app?sslmode=require&application_name=x")
    assert d.params["password"] == "p@ss" and d.params["sslmode"] == "require"
    assert "p@ss" not in d.masked and "***" in d.masked and "p@ss" not in repr(d)
    assert d.port == 6432 and d.host == "db"
    assert "secret" not in mask_dsn("postgresql://u:secret@h:bad/db")
    assert "secret" not in mask_dsn("host=h password='secret' port=x")
    with pytest.raises(ConfigurationError):
        parse("postgresql://u@h:99999/db")


def test_lag_seconds_from_history_and_replay_age() -> None:
    from areplica.cluster import Cluster, Identity
    from areplica.health import HealthMonitor, HealthSettings
    from areplica.probe import ProbeResult

    settings = HealthSettings("lag", 1.0, 1.0, 3, 2, None, None, None)
    monitor = HealthMonitor(Cluster("lag"), settings, [])

    def standby(lsn: int, replay_age: float) -> ProbeResult:
        identity = Identity(True, 1, 1, None)
        return ProbeResult(True, lsn, 10_000.0 - replay_age, 10_000.0, 1.0, identity)

    # Behind since before the oldest position we saw (at startup): the history cannot
    # tell, so the age of the last replayed commit is the lag.
    monitor._history.append((99.0, 1200))
    assert monitor._lag_seconds(standby(1100, replay_age=54.0), now=99.5) == pytest.approx(54.0)
    monitor._history.clear()
    for t, lsn in [(99.0, 1000), (100.0, 1000), (101.0, 2000), (102.0, 3000)]:
        monitor._history.append((t, lsn))
    # The primary first passed 1500 at t=101: a replica replayed to 1500 is ~1.5 s behind
    # at t=102.5, unless its last replayed commit is more recent than that.
    assert monitor._lag_seconds(standby(1500, 60.0), now=102.5) == pytest.approx(1.5)
    assert monitor._lag_seconds(standby(1500, 0.2), now=102.5) == pytest.approx(0.2)
    # An idle primary that wrote one record long after its last commit: not an hour of lag.
    assert monitor._lag_seconds(standby(2999, 3600.0), now=102.1) == pytest.approx(0.1)
    # Caught up with everything in the history: no lag.
    assert monitor._lag_seconds(standby(3000, 3600.0), now=110.0) == 0.0
