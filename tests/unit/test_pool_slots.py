"""Connection slots of a NodePool, without a server: first come first served, one wake per
freed slot, waits over several pools, timeouts and cancels that never lose or leak a slot.

Only the slot accounting is exercised here (no connection is opened); the pools' behaviour
against real servers is in tests/integration (lifecycle storm, pool waits, faults).
"""

from __future__ import annotations

import asyncio
import random

import pytest

from areplica.drivers import get_driver
from areplica.errors import NodeUnavailableError
from areplica.pool import NodePool, take_slot


def make_pool(name: str, size: int) -> NodePool:
    return NodePool(name, get_driver("aiopg"), "host=unused", size=size, timeout=1.0)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_freed_slot_goes_to_the_first_waiter_and_wakes_no_one_else() -> None:
    pool = make_pool("a", 1)
    assert await take_slot((pool,), None) is pool
    assert pool.saturated
    woken: list[int] = []

    async def wait(i: int) -> None:
        assert await take_slot((pool,), None) is pool
        woken.append(i)

    tasks = [asyncio.create_task(wait(i)) for i in range(50)]
    await settle()
    assert woken == [] and len(pool._waiters) == 50
    pool.free_slot()
    await settle()
    assert woken == [0], "one freed slot wakes exactly one waiter, the first"
    # A newcomer does not jump the queue: the slot of the next release is not its.
    late = asyncio.create_task(take_slot((pool,), None))
    await settle()
    assert not late.done()
    for _ in range(50):
        pool.free_slot()
        await settle()
    assert woken == list(range(50))
    assert late.done() and late.result() is pool
    pool.free_slot()
    assert pool._free == 1 and not pool._waiters
    await asyncio.gather(*tasks)


async def test_a_wait_over_several_pools_takes_the_first_freed_and_leaves_no_trace() -> None:
    a, b = make_pool("a", 1), make_pool("b", 1)
    await take_slot((a,), None)
    await take_slot((b,), None)
    waiter = asyncio.create_task(take_slot((a, b), None))
    await settle()
    assert len(a._waiters) == len(b._waiters) == 1
    b.free_slot()
    assert await waiter is b
    assert not a._waiters and not b._waiters
    a.free_slot()  # nobody waits: back to the pool
    assert a._free == 1 and b._free == 0


async def test_a_timed_out_wait_returns_none_and_loses_no_slot() -> None:
    pool = make_pool("a", 1)
    await take_slot((pool,), None)
    assert await take_slot((pool,), 0.05) is None
    assert not pool._waiters
    pool.free_slot()
    assert pool._free == 1


async def test_a_slot_handed_to_a_cancelled_waiter_goes_to_the_next() -> None:
    pool = make_pool("a", 1)
    await take_slot((pool,), None)
    first = asyncio.create_task(take_slot((pool,), None))
    second = asyncio.create_task(take_slot((pool,), None))
    await settle()
    pool.free_slot()  # handed to `first`...
    first.cancel()  # ...which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await second is pool, "the slot passed on to the next waiter"
    pool.free_slot()
    assert pool._free == 1 and not pool._waiters


async def test_closing_a_pool_wakes_its_waiters_and_acquire_raises() -> None:
    pool = make_pool("a", 1)
    await take_slot((pool,), None)
    waiters = [asyncio.create_task(pool.acquire()) for _ in range(3)]
    await settle()
    await pool.close()
    for task in waiters:
        with pytest.raises(NodeUnavailableError, match="closed"):
            await task


async def test_random_cancels_and_timeouts_keep_every_slot() -> None:
    rng = random.Random(7)
    pools = [make_pool("a", 3), make_pool("b", 2)]

    async def user() -> None:
        choice = tuple(rng.sample(pools, rng.choice((1, 2))))
        got = await take_slot(choice, rng.choice((None, 0.001, 0.01)))
        if got is not None:
            try:
                await asyncio.sleep(rng.random() * 0.005)
            finally:
                got.free_slot()

    async def wait_for(task: asyncio.Task[None], limit: float) -> None:
        try:
            await asyncio.wait_for(task, limit)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            pass

    for _ in range(5):
        tasks = [asyncio.create_task(user()) for _ in range(200)]
        await asyncio.sleep(0)
        for task in tasks:
            if rng.random() < 0.3:
                task.cancel()
        await asyncio.gather(*(wait_for(t, rng.random() * 0.01 + 0.001) for t in tasks))
        await asyncio.gather(*tasks, return_exceptions=True)
        await settle()
        assert [p._free for p in pools] == [3, 2], "every slot came back"
        assert all(not p._waiters for p in pools)
