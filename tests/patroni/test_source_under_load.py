"""PatroniSource against a real Patroni 4.1 while the machine is busy (issue 17).

Patroni writes its headers and its body separately; a client that took one read for the
whole answer failed 58-103 fetches of 300 on a busy machine, and ``connect()`` raised
``NoPrimaryError`` on a healthy cluster. Here every CPU spins while 1,000 fetches and
100 ``connect()``/``close()`` cycles run: none may fail. A fetch counts as failed only
when an independent client (``urllib`` in a thread), asking at the same moment, got a
valid answer: a Patroni that did not answer anyone is not the source's fault.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest

from areplica import ReplicaManager
from areplica.sources import PatroniSource, parse_cluster
from areplica.testing.patroni import PatroniTopology

pytestmark = [pytest.mark.patroni, pytest.mark.timeout(900)]

FETCHES = 1000
CYCLES = 100
TIMEOUT = 2.0  # the manager's default health_timeout


@pytest.fixture
def busy_cpu() -> Iterator[int]:
    """One spinning process per CPU for the test's duration; yields how many."""
    count = os.cpu_count() or 2
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield count
    finally:
        for spinner in spinners:
            spinner.kill()
        for spinner in spinners:
            spinner.wait(timeout=30)


def independent_fetch(urls: list[str], timeout: float) -> bool:
    """Whether plain urllib got a valid ``/cluster`` answer from any endpoint, in order."""
    deadline = time.monotonic() + timeout
    for url in urls:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            with urllib.request.urlopen(url + "/cluster", timeout=left) as answer:
                parse_cluster(json.loads(answer.read()))
                return True
        except Exception:
            continue
    return False


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def test_a_thousand_fetches_on_a_busy_machine(
    healthy_patroni: PatroniTopology, busy_cpu: int
) -> None:
    topo = healthy_patroni
    source = PatroniSource(topo.rest_urls, name="load", timeout=TIMEOUT)
    failed: list[int] = []  # the source failed, the independent client did not
    nobody: list[int] = []  # neither got an answer
    independent_failed = 0
    durations: list[float] = []
    began = time.monotonic()
    try:
        for number in range(FETCHES):
            started = time.monotonic()
            view, independent = await asyncio.gather(
                source.fetch(), asyncio.to_thread(independent_fetch, topo.rest_urls, TIMEOUT)
            )
            durations.append(time.monotonic() - started)
            independent_failed += not independent
            if view is None:
                (failed if independent else nobody).append(number)
            else:
                assert {m.name for m in view.members} >= set(topo.members)
    finally:
        await source.close()
    elapsed = time.monotonic() - began
    print(
        f"\n{FETCHES} fetches with {busy_cpu} CPU spinners in {elapsed:.1f}s: "
        f"{len(failed)} failed where urllib got an answer, {len(nobody)} where it did not "
        f"(urllib failed {independent_failed}); source fetches {source.fetches}, failures "
        f"{source.failures}; fetch+urllib p50 {percentile(durations, 0.5) * 1000:.0f} ms, "
        f"p99 {percentile(durations, 0.99) * 1000:.0f} ms, max {max(durations) * 1000:.0f} ms"
    )
    assert failed == []
    assert max(durations) <= TIMEOUT + 1.0  # nothing held a round past its timeout
    assert len(nobody) <= FETCHES // 100, "Patroni itself stopped answering"


async def test_a_hundred_connects_on_a_busy_machine(
    healthy_patroni: PatroniTopology, busy_cpu: int
) -> None:
    topo = healthy_patroni
    failures: list[str] = []
    durations: list[float] = []
    began = time.monotonic()
    for _ in range(CYCLES):
        mgr = ReplicaManager(patroni=topo.rest_urls, dsn=topo.dsn("n1"), pool_size=2)
        started = time.monotonic()
        try:
            await mgr.connect()
            roles = sorted(s.role for s in mgr.status())
            if roles != ["primary", "replica", "replica"]:
                failures.append(f"roles {roles}")
        except Exception as exc:
            failures.append(f"{type(exc).__name__}: {exc}"[:300])
        finally:
            await mgr.close()
        durations.append(time.monotonic() - started)
    elapsed = time.monotonic() - began
    print(
        f"\n{CYCLES} connect()/close() cycles with {busy_cpu} CPU spinners in {elapsed:.1f}s: "
        f"{len(failures)} failed; p50 {percentile(durations, 0.5):.2f}s, "
        f"max {max(durations):.2f}s"
    )
    assert failures == []
