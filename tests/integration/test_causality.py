"""Read-your-writes that follows the program (the README's table "Which writes a read sees").

One standby replays 3 s late (``recovery_min_apply_delay``), the other is healthy: a read that
misses the writes it must see lands on the late one about half the time and finds nothing.
Every row of the table has a test here; each counts stale reads from the server's answer
(the row is there or not) and where reads went (``inet_server_port()``).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from areplica import ReplicaManager
from areplica.consistency import parse_token
from areplica.contrib.fastapi import AreplicaMiddleware, lifespan
from areplica.testing.topology import LocalTopology
from tests.conftest import Counter, make_manager, proxy, sql_on

pytestmark = pytest.mark.integration

LATE_MS = 3000
Write = Callable[[str], Awaitable[int]]


@pytest.fixture(scope="module")
def late(topology: LocalTopology, schema: None) -> Iterator[LocalTopology]:
    """replica-1 replays 3 s late; replica-2 is healthy."""
    topology.set_apply_delay("replica-1", LATE_MS)
    try:
        yield topology
    finally:
        topology.set_apply_delay("replica-1", 0)
        topology.wait_replicated()


@pytest.fixture
async def mgr(late: LocalTopology, driver: str) -> AsyncIterator[ReplicaManager]:
    sql_on(late, "primary", "TRUNCATE counter RESTART IDENTITY")
    manager = make_manager(late, driver=driver, causal_wait=0.5)
    async with manager:
        proxy.initialize(manager.database)
        yield manager


def assert_late(topology: LocalTopology) -> None:
    """The setup lags: a row just written on the primary is not on replica-1 yet.

    A label of its own each time: replica-1 replays the next test's ``TRUNCATE`` 3 s late,
    so a shared label's old row could still be there and match the primary's count.
    """
    label = f"late-check-{uuid.uuid4().hex}"
    sql_on(topology, "primary", "INSERT INTO counter (label) VALUES (%s)", (label,))
    count = "SELECT count(*) FROM counter WHERE label = %s"
    assert sql_on(topology, "replica-1", count, (label,)) == [(0,)]
    assert sql_on(topology, "primary", count, (label,)) == [(1,)]


def ports(topology: LocalTopology) -> dict[int, str]:
    return {topology.port(name): name for name in topology.nodes}


async def write_row(mgr: ReplicaManager, label: str) -> int:
    """Insert a row; return the WAL position the writing task now requires."""
    await mgr.create(Counter, label=label)
    token = mgr.token
    assert token is not None
    return parse_token(token)


async def read_row(mgr: ReplicaManager, label: str) -> tuple[bool, int]:
    """(found, the port of the server that answered)."""
    rows = await mgr.execute_sql(
        "SELECT inet_server_port(), (SELECT count(*) FROM counter WHERE label = %s)", (label,)
    )
    assert rows is not None
    return rows[0][1] == 1, int(rows[0][0])


# ---------------------------------------------------------------------- constructs


async def via_await_task(write: Write, label: str) -> None:
    await asyncio.create_task(write(label))


async def via_task_later(write: Write, label: str) -> None:
    task = asyncio.create_task(write(label))
    await asyncio.sleep(0.01)  # the child runs (and finishes) before it is awaited
    await task


async def via_wait_for(write: Write, label: str) -> None:
    await asyncio.wait_for(write(label), 10)  # 3.10/3.11: a task; 3.12+: the caller's


async def via_gather(write: Write, label: str) -> None:
    await asyncio.gather(write(label))


async def via_shield(write: Write, label: str) -> None:
    await asyncio.shield(write(label))


async def via_as_completed(write: Write, label: str) -> None:
    for next_done in asyncio.as_completed([write(label)]):
        await next_done


async def via_wait(write: Write, label: str) -> None:
    await asyncio.wait([asyncio.create_task(write(label))])


async def via_taskgroup(write: Write, label: str) -> None:
    async with asyncio.TaskGroup() as group:  # type: ignore[attr-defined]
        group.create_task(write(label))


async def via_timeout(write: Write, label: str) -> None:
    async with asyncio.timeout(10):  # type: ignore[attr-defined]
        await asyncio.create_task(write(label))


CONSTRUCTS: dict[str, Callable[[Write, str], Awaitable[None]]] = {
    "await task": via_await_task,
    "create_task, await later": via_task_later,
    "wait_for": via_wait_for,
    "gather": via_gather,
    "shield": via_shield,
    "as_completed": via_as_completed,
    "wait": via_wait,
}
if sys.version_info >= (3, 11):
    CONSTRUCTS["TaskGroup"] = via_taskgroup
    CONSTRUCTS["asyncio.timeout"] = via_timeout


async def construct_then_read(
    mgr: ReplicaManager, construct: str, label: str
) -> tuple[bool, int, bool]:
    """Write through the construct, read back: (found, port, token covers the write)."""
    written: list[int] = []

    async def write(label: str) -> int:
        position = await write_row(mgr, label)
        written.append(position)
        return position

    await CONSTRUCTS[construct](write, label)
    covered = mgr.token is not None and parse_token(mgr.token) >= written[0]
    found, port = await read_row(mgr, label)
    return found, port, covered


# ---------------------------------------------------------------------- callers


async def in_fresh_context(body: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``body`` in a task created from an empty context (a server's request task)."""
    loop = asyncio.get_running_loop()
    task = contextvars.Context().run(loop.create_task, body())
    return await task


async def run_matrix(mgr: ReplicaManager, caller: str, late: LocalTopology) -> list[str]:
    """Every construct, 3 times, from ``caller``; returns the stale cases."""
    stale: list[str] = []

    async def all_constructs() -> None:
        for construct in CONSTRUCTS:
            for attempt in range(3):
                label = f"{caller}/{construct}/{attempt}"
                found, port, covered = await construct_then_read(mgr, construct, label)
                if not found or not covered:
                    stale.append(f"{label} found={found} covered={covered} port={port}")

    if caller == "no session":
        await in_fresh_context(all_constructs)
    elif caller == "session":
        async with mgr.session():
            await all_constructs()
    else:
        await all_constructs()
    return stale


@pytest.mark.parametrize("caller", ["no session", "session", "test task"])
async def test_awaited_writes_are_read_back(
    mgr: ReplicaManager, late: LocalTopology, caller: str
) -> None:
    """Each construct x caller, 3 tries each: 0 stale reads of awaited writes."""
    stale = await run_matrix(mgr, caller, late)
    assert stale == []
    assert_late(late)


async def test_from_the_connecting_task(late: LocalTopology, driver: str) -> None:
    """The task that called connect() itself: no session of its own, and correct."""
    sql_on(late, "primary", "TRUNCATE counter RESTART IDENTITY")
    manager = make_manager(late, driver=driver, causal_wait=0.5)

    async def connecting_task() -> list[str]:
        await manager.connect()
        try:
            proxy.initialize(manager.database)
            assert manager.token is None  # connect() opened no session with a position
            return await run_matrix(manager, "connecting task", late)
        finally:
            await manager.close()

    assert await in_fresh_context(connecting_task) == []


async def test_inside_a_middleware_request(late: LocalTopology, driver: str) -> None:
    """Every construct inside a request served through the FastAPI middleware."""
    sql_on(late, "primary", "TRUNCATE counter RESTART IDENTITY")
    manager = make_manager(late, driver=driver, causal_wait=0.5)
    app = FastAPI(lifespan=lifespan(manager))
    app.add_middleware(AreplicaMiddleware, manager=manager)

    @app.post("/construct/{name}/{attempt}")
    async def construct(name: str, attempt: int) -> dict[str, Any]:
        label = f"request/{name}/{attempt}"
        found, port, covered = await construct_then_read(manager, name, label)
        return {"found": found, "covered": covered, "port": port}

    async with app.router.lifespan_context(app):
        proxy.initialize(manager.database)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            stale = []
            for name in CONSTRUCTS:
                for attempt in range(3):
                    client.cookies.clear()
                    answer = (await client.post(f"/construct/{name}/{attempt}")).json()
                    if not (answer["found"] and answer["covered"]):
                        stale.append((name, attempt, answer))
    assert stale == []


# ---------------------------------------------------------------------- step by step


def run_in_thread(target: Callable[[], Any]) -> Any:
    """Run ``target`` in a thread of its own (it drives an event loop of its own)."""
    out: dict[str, Any] = {}

    def main() -> None:
        try:
            out["value"] = target()
        except BaseException as exc:  # handed to the test
            out["error"] = exc

    thread = threading.Thread(target=main)
    thread.start()
    thread.join(120)
    if "error" in out:
        raise out["error"]
    return out["value"]


def steps_with(run: Callable[[Awaitable[Any]], Any], late: LocalTopology, driver: str) -> int:
    """Connect, then write and read back in separate steps; returns stale reads."""
    manager = make_manager(late, driver=driver, causal_wait=0.5)
    run(manager.connect())
    proxy.initialize(manager.database)
    stale = 0
    try:
        for i in range(5):
            run(write_row(manager, f"step-{i}"))
            found, _ = run(read_row(manager, f"step-{i}"))
            stale += not found
    finally:
        run(manager.close())
    return stale


async def test_run_until_complete_steps(late: LocalTopology, driver: str) -> None:
    """``loop.run_until_complete`` per step (each step a task in a copy of the context)."""
    sql_on(late, "primary", "TRUNCATE counter RESTART IDENTITY")

    def steps() -> int:
        loop = asyncio.new_event_loop()
        try:
            return steps_with(loop.run_until_complete, late, driver)
        finally:
            loop.close()

    assert await asyncio.to_thread(run_in_thread, steps) == 0


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.Runner is 3.11+")
async def test_asyncio_runner_steps(late: LocalTopology, driver: str) -> None:
    """``asyncio.Runner``: one context reused across steps."""
    sql_on(late, "primary", "TRUNCATE counter RESTART IDENTITY")

    def steps() -> int:
        with asyncio.Runner() as runner:  # type: ignore[attr-defined]
            return steps_with(runner.run, late, driver)

    assert await asyncio.to_thread(run_in_thread, steps) == 0


async def test_session_block_then_read_after_it(mgr: ReplicaManager) -> None:
    """What a ``mgr.session()`` block wrote is seen by its task after the block."""
    for i in range(5):
        async with mgr.session():
            await write_row(mgr, f"block-{i}")
        found, _ = await read_row(mgr, f"block-{i}")
        assert found


@pytest.fixture
async def written(mgr: ReplicaManager) -> str:
    """A pytest-asyncio fixture that writes (the test then reads)."""
    await write_row(mgr, "from-fixture")
    return "from-fixture"


async def test_a_fixture_write_is_read_by_the_test(mgr: ReplicaManager, written: str) -> None:
    found, _ = await read_row(mgr, written)
    assert found


# ---------------------------------------------------------------------- isolation


async def fan_out(
    mgr: ReplicaManager, late: LocalTopology, tag: str
) -> tuple[list[str], collections.Counter[str]]:
    """The caller writes, then gathers 300 tasks: every third writes and reads back."""
    names = ports(late)
    where: collections.Counter[str] = collections.Counter()
    stale: list[str] = []
    await write_row(mgr, f"{tag}/parent")

    async def child(i: int) -> None:
        if i % 3 == 0:
            label = f"{tag}/{i}"
            await write_row(mgr, label)
            found, _ = await read_row(mgr, label)
            if not found:
                stale.append(label)
            return
        found, port = await read_row(mgr, f"{tag}/parent")
        if not found:
            stale.append(f"{tag}/parent by {i}")
        where[names[port]] += 1

    await asyncio.gather(*(child(i) for i in range(300)))
    return stale, where


@pytest.mark.parametrize("parent", ["test task", "session", "request task"])
async def test_fan_out_keeps_reads_on_standbys(
    mgr: ReplicaManager, late: LocalTopology, parent: str
) -> None:
    """300 gathered tasks, 5 times: 0 stale, >= 95% of read-only reads on a standby."""
    for rep in range(5):
        tag = f"{parent}/{rep}"
        if parent == "session":
            async with mgr.session():
                stale, where = await fan_out(mgr, late, tag)
        elif parent == "request task":
            stale, where = await in_fresh_context(lambda tag=tag: fan_out(mgr, late, tag))
        else:
            stale, where = await fan_out(mgr, late, tag)
        reads = sum(where.values())
        on_standbys = reads - where["primary"]
        print(f"\n{tag}: {dict(where)}")
        assert stale == []
        assert on_standbys >= 0.95 * reads, dict(where)


async def test_siblings_do_not_drag_each_other(mgr: ReplicaManager, late: LocalTopology) -> None:
    """Readers running beside a writer (not awaiting it) need nothing: the late standby
    serves them too, and none goes to the primary.

    The README's rows for children and siblings: the test task reads first, so the readers
    and the writer are children of a live parent; a child sees what its parent had when it
    first queried, never a sibling's later writes. (Had the test task never queried, all
    of them would be top-level tasks, and a reader would require the writer's writes once it
    finished: the top-level row. That case is test_awaited_writes_are_read_back's.)
    """
    names = ports(late)
    where: collections.Counter[str] = collections.Counter()
    assert (await read_row(mgr, "nothing"))[0] is False  # the parent's cell: nothing required

    async def writer() -> None:
        for i in range(20):
            await write_row(mgr, f"sibling-{i}")

    async def reader() -> None:
        for _ in range(10):
            _, port = await read_row(mgr, "nothing")
            where[names[port]] += 1

    await asyncio.gather(writer(), *(reader() for _ in range(20)))
    assert where["primary"] == 0
    assert where["replica-1"] > 0, dict(where)  # the late one: nobody required a position


async def test_middleware_requests_are_independent(late: LocalTopology, driver: str) -> None:
    """10 clients, 10% writes: reads stay on standbys; each client's next read sees its write."""
    sql_on(late, "primary", "TRUNCATE counter RESTART IDENTITY")
    manager = make_manager(late, driver=driver, causal_wait=0.5)
    app = FastAPI(lifespan=lifespan(manager))
    app.add_middleware(AreplicaMiddleware, manager=manager)
    names = ports(late)

    @app.post("/rows/{label}")
    async def add(label: str) -> dict[str, str]:
        await manager.create(Counter, label=label)
        return {"label": label}

    @app.get("/rows/{label}")
    async def get(label: str) -> dict[str, Any]:
        found, port = await read_row(manager, label)
        return {"found": found, "port": port}

    where: collections.Counter[str] = collections.Counter()
    stale: list[str] = []

    async def client_loop(client: httpx.AsyncClient, c: int) -> None:
        last = "nothing"
        for i in range(40):
            if i % 10 == 3:
                last = f"client-{c}-{i}"
                assert (await client.post(f"/rows/{last}")).status_code == 200
            answer = (await client.get(f"/rows/{last}")).json()
            where[names[answer["port"]]] += 1
            if last != "nothing" and not answer["found"]:
                stale.append(last)

    async with app.router.lifespan_context(app):
        proxy.initialize(manager.database)
        transport = httpx.ASGITransport(app=app)
        clients = [httpx.AsyncClient(transport=transport, base_url="http://t") for _ in range(10)]
        try:
            await asyncio.gather(*(client_loop(client, c) for c, client in enumerate(clients)))
        finally:
            for client in clients:
                await client.aclose()
    reads = sum(where.values())
    print(f"\nmiddleware: {dict(where)}")
    assert stale == []
    assert reads - where["primary"] >= 0.95 * reads, dict(where)
    assert where["replica-1"] > 0  # reads that needed no position went to the late one too
