"""The benchmarks' bookkeeping: per-round ratios, where the time goes, goals of older results."""

from __future__ import annotations

import math

from benchmarks import report
from benchmarks.common import LoadResult, TimeSplit, library_timings, paired


def test_paired_ratios_median_and_spread() -> None:
    p = paired([2.0, 3.0, 8.0], [1.0, 2.0, 4.0])
    assert p["median"] == 2.0
    assert (p["min"], p["max"]) == (1.5, 2.0)
    assert p["rounds"] == [2.0, 1.5, 2.0]
    assert report._spread(p) == "2.000x (1.500x..2.000x)"
    assert report._ge(p, 2.0) is True
    assert report._le(p, 1.9) is False


def test_time_split_shares_of_request_time() -> None:
    split = TimeSplit()
    load = LoadResult(ok=9, errors=1, busy_s=2.0)
    before = {"slot_wait_s": 1.0, "catch_up_s": 0.0, "query_s": 0.0, "reads": 5}
    after = {"slot_wait_s": 1.5, "catch_up_s": 0.2, "query_s": 1.0, "reads": 15}
    split.add(load, before, after, ({"read": 0.0}, {"read": 0}), ({"read": 1.8}, {"read": 10}))
    out = split.summary()
    assert out["requests"] == 10
    assert out["mean_request_us"] == 200_000.0
    lib = out["library"]
    assert lib["shares"]["slot_wait"] == 0.25
    assert lib["shares"]["catch_up"] == 0.1
    assert lib["shares"]["query"] == 0.5
    assert lib["shares"]["write"] == 0.0
    assert math.isclose(lib["shares"]["other"], 0.15)
    assert lib["counts"]["reads"] == 10
    assert out["calls"]["read"] == {"share": 0.9, "mean_us": 180_000.0, "count": 10}


def test_time_split_without_library_timings() -> None:
    class Old:  # a manager of a library without timings()
        pass

    assert library_timings(Old()) is None
    split = TimeSplit()
    split.add(LoadResult(ok=1, busy_s=1.0), None, None)
    assert split.summary()["library"] is None


def test_goals_of_older_results_say_so() -> None:
    old = {"by_driver": {"aiopg": {"causal": {"write_throughput_vs_eventual": 0.9}}}}
    rows = report.goals({"scenarios": {"5_consistency": old}})
    assert len(rows) == 1
    assert "older format" in rows[0]["medians"]
    assert rows[0]["met"] is None
