"""Bad input: clear errors from areplica.errors, naming the option or the node, no password."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Iterator

import pytest

from areplica import (
    ConfigurationError,
    NoPrimaryError,
    ReplicaManager,
    TopologyError,
)
from areplica.testing.topology import LocalTopology
from tests.conftest import caught_up, proxy

SECRET = "Sup3r-S3cret-pw"


def with_password(dsn: str) -> str:
    return dsn.replace("postgres@", f"postgres:{SECRET}@", 1)


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"pool_size": 0}, "pool_size"),
        ({"pool_size": "10"}, "pool_size"),
        ({"policy": "fastest"}, "policy"),
        ({"consistency": "strong"}, "consistency"),
        ({"weights": {"replica-9": 1}}, "weights"),
        ({"weights": {"replica-1": -1}}, "weights"),
        ({"max_lag": -1}, "max_lag"),
        ({"health_interval": 0}, "health_interval"),
        ({"health_timeout": "soon"}, "health_timeout"),
        ({"fail_after": 1.5}, "fail_after"),
        ({"read_retries": -1}, "read_retries"),
        ({"causal_wait": -2}, "causal_wait"),
        ({"fallback_to_primary": "yes"}, "fallback_to_primary"),
        ({"driver": "asyncpg"}, "driver"),
        ({"pool_sise": 3}, "pool_sise"),
        ({"slow_factor": 1}, "slow_factor"),
    ],
)
def test_bad_options_raise_configuration_error(kwargs: dict[str, object], option: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        ReplicaManager("postgresql://u@h/db", ["postgresql://u@r/db"], **kwargs)  # type: ignore[arg-type]
    assert info.value.option == option
    assert option in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "bad",
    [
        f"postgresql://app:{SECRET}@db:notaport/app",
        f"host=db password={SECRET} nonsense",
        f"host=db password={SECRET} port=70000",
        "",
    ],
)
def test_malformed_dsn_is_named_and_masked(bad: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        ReplicaManager(bad)
    assert info.value.option is not None and "primary" in info.value.option
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)
    assert info.value.__cause__ is None or SECRET not in str(info.value.__cause__)
    with pytest.raises(ConfigurationError) as info:
        ReplicaManager("postgresql://u@h/db", {"r1": bad})
    assert "r1" in str(info.value) and SECRET not in str(info.value)


def test_constructor_does_no_io_and_repr_masks() -> None:
    mgr = ReplicaManager(
        f"postgresql://app:{SECRET}@10.255.255.1:5432/app",
        [f"postgresql://app:{SECRET}@10.255.255.2/app"],
    )
    assert SECRET not in repr(mgr) and SECRET not in repr(mgr.status())
    assert [s.state for s in mgr.status()] == ["down", "down"]
    assert all("***" in s.dsn for s in mgr.status())


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and never answers (a hung server)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.fixture
def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return int(port)


@pytest.mark.integration
@pytest.mark.parametrize("driver", ["aiopg", "psycopg"])
async def test_unreachable_primary_raises_no_primary_error_in_time(
    silent_port: int, closed_port: int, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for port in (silent_port, closed_port):
        mgr = ReplicaManager(
            f"postgresql://app:{SECRET}@127.0.0.1:{port}/app", health_timeout=1.0, driver=driver
        )
        started = time.monotonic()
        with pytest.raises(NoPrimaryError) as info:
            await mgr.connect()
        assert time.monotonic() - started < 1.0 + 1.0
        text = str(info.value)
        assert "primary" in text and str(port) in text and "***" in text
        assert SECRET not in text and SECRET not in repr(info.value)
        await mgr.close()
    assert SECRET not in caplog.text


@pytest.mark.integration
async def test_no_member_out_of_recovery_is_a_topology_error(topology: LocalTopology) -> None:
    mgr = ReplicaManager(topology.dsn("replica-1"), [topology.dsn("replica-2")])
    with pytest.raises(TopologyError) as info:
        await mgr.connect()
    assert info.value.node == "primary" and "standbys" in str(info.value)
    assert not isinstance(info.value, NoPrimaryError)
    await mgr.close()
    # One server listed twice is one member: refused before any I/O.
    with pytest.raises(ConfigurationError) as dup:
        ReplicaManager(topology.dsn("primary"), {"oops": topology.dsn("primary")})
    assert "same server" in str(dup.value)


@pytest.mark.integration
async def test_unreachable_replica_is_not_fatal(
    topology: LocalTopology,
    schema: None,
    closed_port: int,
    caplog: pytest.LogCaptureFixture,
    ports: dict[str, int],
) -> None:
    caplog.set_level(logging.INFO, logger="areplica")
    mgr = ReplicaManager(
        with_password(topology.dsn("primary")),
        {
            "good": with_password(topology.dsn("replica-1")),
            "gone": f"postgresql://postgres:{SECRET}@127.0.0.1:{closed_port}/postgres",
        },
        health_interval=0.2,
    )
    async with mgr:
        proxy.initialize(mgr.database)
        status = {s.name: s for s in mgr.status()}
        assert status["gone"].state == "down" and status["good"].state == "up"
        assert status["gone"].last_error
        assert "unreachable" in caplog.text and "gone" in caplog.text
        await caught_up(mgr, topology)
        for _ in range(10):
            rows = await mgr.execute_sql("SELECT inet_server_port()")
            assert rows == [(ports["replica-1"],)]
        text = repr(mgr) + repr(mgr.status()) + caplog.text
        assert SECRET not in text
    assert SECRET not in caplog.text


async def test_use_before_connect_and_after_close() -> None:
    from areplica import ClosedError, NoPrimaryError

    mgr = ReplicaManager("postgresql://u@127.0.0.1:1/db")
    with pytest.raises(ClosedError):
        await mgr.execute_sql("SELECT 1")
    await mgr.close()
    await mgr.close()  # idempotent
    with pytest.raises(NoPrimaryError):  # connect() reopens; nothing listens on port 1
        await mgr.connect()
    await asyncio.sleep(0)
