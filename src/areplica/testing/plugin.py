"""pytest fixtures for code that uses areplica (loaded through the ``pytest11`` entry point).

- ``areplica_topology`` (session): a real primary and ``--areplica-replicas`` streaming
  replicas started by ``LocalTopology``; stopped and removed at the end of the session.
- ``areplica_manager`` (function): a connected ``ReplicaManager`` over that topology with
  short health intervals, closed after the test.
- ``areplica_transaction`` (function): ``areplica_manager`` inside a
  ``TransactionTestCase``: everything the test does through it (in any task) runs in one
  primary transaction, rolled back after the test.

Both need PostgreSQL binaries (see ``LocalTopology``); the manager fixture needs
pytest-asyncio.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import pytest

from ..manager import ReplicaManager
from .topology import LocalTopology, SetupError
from .transaction import TransactionTestCase

_F = TypeVar("_F", bound=Callable[..., Any])

try:
    import pytest_asyncio

    _fixture: Any = pytest_asyncio.fixture
except ImportError:  # pragma: no cover - without pytest-asyncio only the topology works
    _fixture = pytest.fixture


def _async_fixture(function: _F) -> _F:
    """pytest-asyncio's fixture decorator (plain pytest's when it is missing)."""
    decorated: _F = _fixture(function)
    return decorated


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("areplica")
    group.addoption(
        "--areplica-replicas",
        type=int,
        default=int(os.environ.get("AREPLICA_TEST_REPLICAS", "2")),
        help="replicas in the areplica_topology fixture (default 2)",
    )
    group.addoption(
        "--areplica-driver",
        default=os.environ.get("AREPLICA_TEST_DRIVER", "aiopg"),
        choices=("aiopg", "psycopg"),
        help="driver of the areplica_manager fixture (default aiopg)",
    )


@pytest.fixture(scope="session")
def areplica_topology(request: pytest.FixtureRequest) -> Iterator[LocalTopology]:
    """A running LocalTopology for the whole test session."""
    replicas = int(request.config.getoption("--areplica-replicas"))
    topology = LocalTopology(replicas=replicas)
    problem: str | None = None
    try:
        topology.start()
    except SetupError as exc:
        problem = str(exc)
    if problem is not None:
        # What to fix on this machine, in one line: a traceback (or the chained exception,
        # had this been raised inside the except block) would only bury it.
        pytest.fail(f"areplica_topology: {problem}", pytrace=False)
    try:
        yield topology
    finally:
        topology.close()


def manager_for(topology: LocalTopology, **options: Any) -> ReplicaManager:
    """A (not yet connected) manager over every node of ``topology``, with test timings."""
    options.setdefault("health_interval", 0.2)
    options.setdefault("health_timeout", 1.0)
    replicas = {name: topology.dsn(name) for name in topology.nodes if name != "primary"}
    return ReplicaManager(topology.dsn("primary"), replicas, **options)


@_async_fixture
async def areplica_manager(
    request: pytest.FixtureRequest, areplica_topology: LocalTopology
) -> AsyncIterator[ReplicaManager]:
    """A connected manager over ``areplica_topology``; closed after the test."""
    driver = str(request.config.getoption("--areplica-driver"))
    async with manager_for(areplica_topology, driver=driver) as mgr:
        yield mgr


@_async_fixture
async def areplica_transaction(
    areplica_manager: ReplicaManager,
) -> AsyncIterator[ReplicaManager]:
    """``areplica_manager`` with the whole test in one primary transaction, rolled back."""
    async with TransactionTestCase(areplica_manager.database):
        yield areplica_manager
