"""The health loop without a server: a round that raises does not kill the task."""

from __future__ import annotations

import asyncio
import logging

import pytest

from areplica.cluster import Cluster
from areplica.health import HealthMonitor, HealthSettings


def monitor_for(name: str, interval: float = 1.0, timeout: float = 2.0) -> HealthMonitor:
    settings = HealthSettings(
        name=name,
        interval=interval,
        timeout=timeout,
        fail_after=3,
        recover_after=2,
        max_lag=None,
        max_lag_bytes=None,
        slow_factor=None,
    )
    return HealthMonitor(Cluster(name), settings, [])


async def test_a_failing_round_is_logged_and_the_loop_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="areplica")
    monitor = monitor_for("loop", interval=0.01)
    calls = 0

    async def flaky_round(only: object = None) -> None:
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise RuntimeError(f"boom {calls}")

    monitor.round = flaky_round  # type: ignore[method-assign]
    monitor.start()
    for _ in range(200):
        if calls >= 6:
            break
        await asyncio.sleep(0.01)
    assert calls >= 6
    assert caplog.text.count("health round failed") == 3
    await monitor.stop()
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "loop-health"]


async def test_stop_cancels_a_stuck_round() -> None:
    monitor = monitor_for("stuck", timeout=0.1)
    entered = asyncio.Event()

    async def stuck_round(only: object = None) -> None:
        entered.set()
        await asyncio.sleep(3600)

    monitor.round = stuck_round  # type: ignore[method-assign]
    monitor.start()
    await entered.wait()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await monitor.stop()
    assert loop.time() - started < 2.0
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "stuck-health"]
