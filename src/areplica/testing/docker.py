"""A PostgreSQL primary and streaming replicas in Docker containers, on testcontainers.

:class:`DockerTopology` offers :class:`~areplica.testing.topology.LocalTopology`'s interface
where it makes sense (no proxies, no pids, no data directory on this machine), for machines
that have a Docker engine but no PostgreSQL binaries, or to test against another major
version (``image="postgres:17"``). It needs ``testcontainers`` 4.x (``pip install
'areplica[docker]'``), imported only when a topology is created.

.. warning::

   **Untested against a real engine.** No Docker engine runs on areplica's development
   machines: this module is checked only by unit tests that need no engine (the interface,
   the generated scripts, the container settings through fakes). Report what breaks.

How it works: one Docker network; the primary runs the official image's entrypoint with a
first-start script that lets replication connections in; a physical replication slot per
replica is created over SQL; each replica's first start waits for the primary with
``pg_isready`` and clones it with ``pg_basebackup -R -S slot`` before the image's own
entrypoint starts the server. :meth:`hang` and :meth:`resume` are ``docker pause`` and
``unpause``; :meth:`kill` is ``docker kill`` (SIGKILL); :meth:`stop` is ``docker stop``.
Containers left behind by a crashed test run are removed by testcontainers' reaper.
"""

from __future__ import annotations

import contextlib
import importlib
import secrets
import shlex
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote

from ..errors import ConfigurationError
from ._support import (
    REPLAY_TARGET_SQL,
    TopologyLifecycle,
    poll_until,
    replay_target,
    run_sql,
    set_apply_delay,
)

__all__ = ["DockerTopology", "primary_script", "replica_script", "server_command"]

PRIMARY = "primary"
PORT = 5432  # inside the containers
_TIMEOUT = 120.0  # image pulls and first starts can be slow

_SETTINGS = {
    "wal_level": "replica",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "hot_standby": "on",
    "hot_standby_feedback": "on",
    "fsync": "off",  # throwaway test servers: speed over durability, as LocalTopology
    "full_page_writes": "off",
    "wal_keep_size": "256MB",
    "wal_retrieve_retry_interval": "200ms",
    "max_connections": "200",
}


def server_command(name: str) -> str:
    """``docker-entrypoint.sh postgres -c ...``: the official entrypoint, test settings."""
    settings = {**_SETTINGS, "cluster_name": name}
    args = ["docker-entrypoint.sh", "postgres"]
    for key, value in settings.items():
        args += ["-c", f"{key}={value}"]
    return shlex.join(args)


def primary_script(name: str = PRIMARY) -> str:
    """The primary's ``bash -c`` script: allow replication connections, then start.

    The image runs ``/docker-entrypoint-initdb.d`` only on a first start (an empty PGDATA),
    so the ``pg_hba.conf`` line is added once.
    """
    # Sourced by the image's entrypoint, which has set POSTGRES_HOST_AUTH_METHOD by then.
    hba = (
        'echo "host replication all all ${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}"'
        ' >> "$PGDATA/pg_hba.conf"'
    )
    return (
        "set -Eeuo pipefail\n"
        f"printf '%s\\n' {shlex.quote(hba)} > /docker-entrypoint-initdb.d/10-areplica.sh\n"
        f"exec {server_command(name)}\n"
    )


def replica_script(name: str, slot: str, user: str, primary_host: str = PRIMARY) -> str:
    """A replica's ``bash -c`` script: first start clones the primary, then start.

    The password comes from the container's ``PGPASSWORD``, never from this text.
    """
    host, q_user, q_slot = shlex.quote(primary_host), shlex.quote(user), shlex.quote(slot)
    return (
        "set -Eeuo pipefail\n"
        'if [ ! -s "$PGDATA/PG_VERSION" ]; then\n'
        '    mkdir -p "$PGDATA"\n'
        '    if [ "$(id -u)" = 0 ]; then chown postgres:postgres "$PGDATA"; fi\n'
        '    chmod 0700 "$PGDATA"\n'
        f"    until pg_isready -q -h {host} -p {PORT}; do sleep 0.2; done\n"
        f'    gosu postgres pg_basebackup -h {host} -p {PORT} -U {q_user} -D "$PGDATA"'
        f" -X stream -R -S {q_slot} -c fast -w\n"
        "fi\n"
        f"exec {server_command(name)}\n"
    )


def _testcontainers() -> tuple[Any, Any]:
    """testcontainers' ``DockerContainer`` and ``Network``, or a ConfigurationError."""
    try:
        container = importlib.import_module("testcontainers.core.container")
        network = importlib.import_module("testcontainers.core.network")
    except ImportError:
        raise ConfigurationError(
            "DockerTopology needs testcontainers 4.x and a Docker engine: "
            "pip install 'areplica[docker]' (or pip install 'testcontainers>=4')",
            option="testcontainers",
        ) from None
    return container.DockerContainer, network.Network


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DockerTopology(TopologyLifecycle):
    """A primary and ``replicas`` streaming replicas in containers of ``image``.

    ``image`` is an official ``postgres`` image, 13 or newer. Nodes are ``"primary"``,
    ``"replica-1"``, ... as in LocalTopology. With ``fixed_ports`` (the default) each node's
    port 5432 is published on a port of this machine chosen up front, so a node keeps its DSN
    across :meth:`stop`/:meth:`kill` and :meth:`start_node`; with a remote Docker engine pass
    ``fixed_ports=False`` (ports may then change on a restart: call :meth:`dsn` again). The
    superuser's password is ``password``, or a random one (it is in every DSN). Use ``with
    DockerTopology() as topo:`` or ``async with``, or :meth:`start` and :meth:`close`.
    """

    def __init__(
        self,
        replicas: int = 2,
        image: str = "postgres:16",
        *,
        user: str = "postgres",
        dbname: str = "postgres",
        password: str | None = None,
        fixed_ports: bool = True,
    ) -> None:
        if replicas < 0:
            raise ValueError("replicas must be >= 0")
        self._container_cls, self._network_cls = _testcontainers()
        self.replicas = replicas
        self.image = image
        self.user = user
        self.dbname = dbname
        self.fixed_ports = fixed_ports
        self._password = password or secrets.token_urlsafe(16)
        self._names = [PRIMARY] + [f"replica-{i}" for i in range(1, replicas + 1)]
        self._source = PRIMARY  # the node replicas follow (changes on promote())
        self._upstream: dict[str, str | None] = {n: PRIMARY for n in self._names[1:]}
        self._containers: dict[str, Any] = {}
        self._address: dict[str, tuple[str, int]] = {}
        self._hung: set[str] = set()
        self._network: Any = None
        self._state = "new"

    def __repr__(self) -> str:
        return f"<DockerTopology {self._state} image={self.image!r} replicas={self.replicas}>"

    @property
    def nodes(self) -> list[str]:
        """The node names: ``["primary", "replica-1", ...]``."""
        return list(self._names)

    @property
    def pg_version(self) -> int:
        """The PostgreSQL major version the servers run."""
        return int(self._query(self._source, "SHOW server_version_num")[0][0]) // 10000

    # ---------------------------------------------------------------- life cycle

    def start(self) -> None:
        """Start every container; return once every replica is a standby and has replayed."""
        if self._state != "new":
            raise RuntimeError(f"this topology is {self._state}; create a new one")
        self._state = "started"
        try:
            self._network = self._network_cls()
            self._network.create()
            self._run(PRIMARY, primary_script(PRIMARY), {})
            self._wait_ready(PRIMARY, "SELECT 1")
            for name in self._names[1:]:
                slot_sql = "SELECT pg_create_physical_replication_slot(%s, true)"
                self._query(PRIMARY, slot_sql, (self._slot(name),))
                script = replica_script(name, self._slot(name), self.user)
                self._run(name, script, {"PGPASSWORD": self._password})
            for name in self._names[1:]:
                self._wait_ready(name, "SELECT pg_is_in_recovery()")
            self.wait_replicated(_TIMEOUT)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Remove every container (and its data) and the network. Idempotent."""
        if self._state == "closed":
            return
        self._state = "closed"
        for container in self._containers.values():
            with contextlib.suppress(Exception):
                container.stop()  # testcontainers: docker rm -f -v
        if self._network is not None:
            with contextlib.suppress(Exception):
                self._network.remove()

    def _slot(self, name: str) -> str:
        return f"areplica_replica_{name.rsplit('-', 1)[1]}"

    def _run(self, name: str, script: str, env: dict[str, str]) -> None:
        container = (
            self._container_cls(self.image)
            .with_env("POSTGRES_USER", self.user)
            .with_env("POSTGRES_PASSWORD", self._password)
            .with_env("POSTGRES_DB", self.dbname)
            .with_network(self._network)
            .with_network_aliases(name)
            .with_command(["bash", "-c", script])
        )
        for key, value in env.items():
            container.with_env(key, value)
        if self.fixed_ports:
            container.with_bind_ports(PORT, _free_port())
        else:
            container.with_exposed_ports(PORT)
        self._containers[name] = container
        container.start()
        self._locate(name)

    def _locate(self, name: str) -> None:
        container = self._containers[name]
        host = container.get_container_host_ip()
        self._address[name] = (host, int(container.get_exposed_port(PORT)))

    # ---------------------------------------------------------------- addresses

    def _node(self, name: str) -> Any:
        if name not in self._names:
            raise KeyError(f"no node {name!r}; nodes are {self._names}")
        if self._state != "started" or name not in self._containers:
            raise RuntimeError(f"the topology is {self._state}: {name} has no container")
        return self._containers[name].get_wrapped_container()

    def container(self, node: str) -> Any:
        """``node``'s testcontainers ``DockerContainer`` (for logs, exec, ...)."""
        self._node(node)
        return self._containers[node]

    def dsn(self, node: str) -> str:
        """A libpq URL for ``node``, as published on the Docker host."""
        self._node(node)
        host, port = self._address[node]
        auth = f"{quote(self.user, safe='')}:{quote(self._password, safe='')}"
        return f"postgresql://{auth}@{host}:{port}/{quote(self.dbname, safe='')}"

    def direct_dsn(self, node: str) -> str:
        """The same as :meth:`dsn` (there are no proxies here)."""
        return self.dsn(node)

    def port(self, node: str) -> int:
        """The port ``node`` is published on (not what ``inet_server_port()`` says: 5432)."""
        self._node(node)
        return self._address[node][1]

    # ---------------------------------------------------------------- faults

    def running(self, node: str) -> bool:
        """Whether ``node``'s container runs (a paused, hung one counts)."""
        wrapped = self._node(node)
        wrapped.reload()
        return wrapped.status in ("running", "paused")

    def kill(self, node: str) -> None:
        """SIGKILL ``node``'s server (``docker kill``); wait until its container exited."""
        wrapped = self._node(node)
        if node in self._hung:
            self.resume(node)
        wrapped.kill()
        self._poll(lambda: not self.running(node), 30, f"{node} to exit")

    def hang(self, node: str) -> None:
        """``docker pause``: connections stay open, nothing answers."""
        self._node(node).pause()
        self._hung.add(node)

    def resume(self, node: str) -> None:
        """``docker unpause`` (undoes :meth:`hang`)."""
        self._node(node).unpause()
        self._hung.discard(node)

    def stop(self, node: str) -> None:
        """``docker stop`` (a fast shutdown: the image's stop signal is SIGINT)."""
        wrapped = self._node(node)
        if node in self._hung:
            self.resume(node)
        if self.running(node):
            wrapped.stop(timeout=60)

    def start_node(self, node: str) -> None:
        """Start ``node``'s container again (after :meth:`stop` or :meth:`kill`)."""
        wrapped = self._node(node)
        if self.running(node):
            return
        wrapped.start()
        if not self.fixed_ports:
            self._locate(node)
        self._wait_ready(node, "SELECT 1")

    def promote(self, node: str) -> None:
        """``pg_promote()`` on ``node``; return once it has left recovery."""
        if self._upstream.get(node) is None:
            raise RuntimeError(f"{node} is not a replica")
        self._query(node, "SELECT pg_promote(true, 60)")
        self._poll(
            lambda: not self._query(node, "SELECT pg_is_in_recovery()")[0][0],
            _TIMEOUT,
            f"{node} to leave recovery",
        )
        self._upstream[node] = None
        self._source = node

    def set_apply_delay(self, node: str, ms: int) -> None:
        """Make replica ``node`` replay commits ``ms`` milliseconds late (0: no delay)."""
        if self._upstream.get(node) is None:
            raise RuntimeError(f"{node} is not a replica")
        set_apply_delay(self._query, node, ms)

    def wait_replicated(self, timeout: float = 30, source: str | None = None) -> None:
        """Wait until every running replica of the primary has replayed all its WAL.

        "The primary" is ``source``, by default the node replicas follow.
        """
        primary = source or self._source
        if primary in self._hung or not self.running(primary):
            raise RuntimeError(f"{primary} (the primary) is not running")
        target = replay_target(self._query(primary, REPLAY_TARGET_SQL)[0])
        deadline = time.monotonic() + timeout
        sql = "SELECT pg_last_wal_replay_lsn() - pg_lsn '0/0'"
        for name, upstream in self._upstream.items():
            if upstream != primary or name in self._hung or not self.running(name):
                continue

            def replayed(name: str = name) -> bool:
                return int(self._query(name, sql)[0][0]) >= target

            self._poll(
                replayed, max(0.0, deadline - time.monotonic()), f"{name} to replay to {target}"
            )

    # ---------------------------------------------------------------- SQL and waiting

    def _query(self, node: str, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self._node(node)
        return run_sql(self.dsn(node), sql, params)

    def _wait_ready(self, node: str, sql: str) -> None:
        """Until ``sql`` answers true over TCP (the image's init server listens on a socket)."""
        self._poll(lambda: bool(self._query(node, sql)[0][0]), _TIMEOUT, f"{node} to answer")

    @staticmethod
    def _poll(predicate: Callable[[], bool], timeout: float, what: str) -> None:
        poll_until(predicate, timeout, what, interval=0.05)
