"""ProbeConnection without a server: the server's latency, and a hang costs one timeout.

A fake driver stands in for PostgreSQL: its connections answer the probe query (slowly the
first time, as when a pooler must open a server connection for it), or never (a hung
server behind a pooler, which still accepts connections itself).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import pytest

from areplica import dsn as dsn_mod
from areplica.drivers import get_driver
from areplica.node import Node
from areplica.probe import ProbeConnection

ROW = (True, "0/3000000", None, time.time(), 7, 1, 1000.0, 5433, 1)


class FakeCursor:
    def __init__(self, conn: FakeConn) -> None:
        self.conn = conn
        self.row: Any = None

    async def __aenter__(self) -> FakeCursor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def execute(self, sql: str, params: Any = None) -> None:
        self.conn.queries.append(sql)
        if self.conn.hang:
            await asyncio.Event().wait()  # no answer, ever
        if len(self.conn.queries) == 1:
            await asyncio.sleep(self.conn.first_delay)  # a pooler opening a server connection
        self.row = ROW if "pg_is_in_recovery" in sql else (1,)

    async def fetchone(self) -> Any:
        return self.row


class FakeConn:
    def __init__(self, hang: bool, first_delay: float) -> None:
        self.hang = hang
        self.first_delay = first_delay
        self.queries: list[str] = []
        self.closed = False

    def cursor(self) -> FakeCursor:
        return FakeCursor(self)


def node_with(hang: bool = False, first_delay: float = 0.0) -> tuple[Node, list[FakeConn]]:
    opened: list[FakeConn] = []

    async def connect(conninfo: str, timeout: float) -> FakeConn:
        conn = FakeConn(hang, first_delay)
        opened.append(conn)
        return conn

    async def close(conn: FakeConn) -> None:
        conn.closed = True

    driver = dataclasses.replace(
        get_driver("aiopg"), connect=connect, close=close, is_closed=lambda c: c.closed
    )
    node = Node(
        "replica-1",
        dsn_mod.parse("postgresql://u@h:5433/db", option="test"),
        role="replica",
        driver=driver,
        pool_size=2,
        connect_timeout=1.0,
    )
    node.state = "up"
    return node, opened


async def test_latency_is_the_servers_not_a_poolers_connection_set_up() -> None:
    node, opened = node_with(first_delay=0.2)
    probe = ProbeConnection(node)
    result = await probe.probe(2.0)
    assert result.latency_ms < 50, result.latency_ms  # 200 ms of set-up, not the server's
    assert opened[0].queries[-1] == "SELECT 1"  # timed again, trivially
    await probe.close()


async def test_a_hung_server_costs_one_timeout_then_probes_fail_at_once() -> None:
    node, opened = node_with(hang=True)
    probe = ProbeConnection(node)
    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError, match=r"no answer within 0\.2s"):
        await probe.probe(0.2)
    assert 0.15 < time.monotonic() - started < 1.0
    for _ in range(3):  # the next rounds: no second timeout to wait for
        started = time.monotonic()
        with pytest.raises(asyncio.TimeoutError, match="still none"):
            await probe.probe(0.2)
        assert time.monotonic() - started < 0.05
    assert len(opened) == 1  # no reconnect while the first query waits
    # Down: readmission needs a fresh connection; the waiting query is abandoned.
    node.state = "down"
    with pytest.raises(asyncio.TimeoutError):
        await probe.probe(0.2)
    assert len(opened) == 2 and opened[0].closed
    await probe.close()
    assert all(conn.closed for conn in opened)
