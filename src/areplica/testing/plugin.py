"""pytest fixtures for code that uses areplica (loaded through the ``pytest11`` entry point).

- ``areplica_topology`` (session): a real primary and ``--areplica-replicas`` streaming
  replicas started by ``LocalTopology``; stopped and removed at the end of the session.
- ``areplica_manager`` (function): a connected ``ReplicaManager`` over that topology with
  short health intervals, closed after the test.
- ``areplica_transaction`` (function): ``areplica_manager`` inside a
  ``TransactionTestCase``: everything the test does through it (in any task) runs in one
  primary transaction, rolled back after the test.

The topology needs PostgreSQL binaries (see ``LocalTopology``). The two async fixtures need
pytest-asyncio (1.0 or newer) and work in its *strict* and *auto* modes alike: they are
pytest-asyncio fixtures, registered at configure time to run in the event loop of the tests
that use them (``asyncio_default_test_loop_scope``, ``"function"`` when unset); a manager
made in one loop cannot serve a test running in another. A test marked with another
``loop_scope`` that asks for them fails at once, saying so.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import pytest

from ..manager import ReplicaManager
from .topology import LocalTopology, SetupError
from .transaction import TransactionTestCase

_LOOP_SCOPES = ("function", "class", "module", "package", "session")
_F = TypeVar("_F", bound=Callable[..., Any])


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


def pytest_configure(config: pytest.Config) -> None:
    """Register the async fixtures in the tests' event loop (when pytest-asyncio is there)."""
    try:
        import pytest_asyncio
    except ImportError:  # pragma: no cover - without pytest-asyncio only the topology works
        return
    fixtures = _async_fixtures(pytest_asyncio.fixture, default_test_loop_scope(config))
    config.pluginmanager.register(fixtures, "areplica-async-fixtures")


def default_test_loop_scope(config: pytest.Config) -> str:
    """The loop scope of tests without a marker: ``asyncio_default_test_loop_scope``."""
    try:
        scope = config.getini("asyncio_default_test_loop_scope")
    except ValueError:  # an older pytest-asyncio: tests run in a loop per function
        scope = None
    return str(scope) if scope in _LOOP_SCOPES else "function"


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


def _check_loop(request: pytest.FixtureRequest, fixture: str, loop_scope: str) -> None:
    """Fail clearly when the test runs in another event loop than the fixture."""
    marker = request.node.get_closest_marker("asyncio")
    wanted = (marker.kwargs.get("loop_scope") or marker.kwargs.get("scope")) if marker else None
    if wanted is not None and wanted != loop_scope:
        pytest.fail(
            f"{fixture} runs in the {loop_scope!r} event loop (asyncio_default_test_loop_scope)"
            f" but {request.node.nodeid} asks for the {wanted!r} one: a manager cannot serve "
            "a test in another loop; drop the test's loop_scope or set "
            f"asyncio_default_test_loop_scope = {wanted!r}",
            pytrace=False,
        )


def _async_fixtures(fixture: Any, loop_scope: str) -> object:
    """The async fixtures, as pytest-asyncio fixtures of ``loop_scope`` (strict mode too)."""
    in_loop: Callable[[_F], _F] = fixture(loop_scope=loop_scope)

    class AsyncFixtures:
        """areplica's async fixtures (a plugin object: registered by ``pytest_configure``)."""

        def __repr__(self) -> str:
            return f"<areplica async fixtures, loop_scope={loop_scope!r}>"

        @in_loop
        async def areplica_manager(
            self, request: pytest.FixtureRequest, areplica_topology: LocalTopology
        ) -> AsyncIterator[ReplicaManager]:
            """A connected manager over ``areplica_topology``; closed after the test."""
            _check_loop(request, "areplica_manager", loop_scope)
            driver = str(request.config.getoption("--areplica-driver"))
            async with manager_for(areplica_topology, driver=driver) as mgr:
                yield mgr

        @in_loop
        async def areplica_transaction(
            self, areplica_manager: ReplicaManager
        ) -> AsyncIterator[ReplicaManager]:
            """``areplica_manager`` with the whole test in one primary transaction, rolled
            back."""
            async with TransactionTestCase(areplica_manager.database):
                yield areplica_manager

    return AsyncFixtures()
