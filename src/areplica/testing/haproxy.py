"""HAProxy in TCP mode in front of PostgreSQL servers: a load balancer, or Patroni's setup.

:class:`HAProxy` runs ``haproxy -db -f CONF`` (a :class:`~areplica.testing.daemon.Daemon`)
with one or more TCP listeners, each spreading new connections over its backends. A backend
is checked every ``inter`` seconds, by a TCP connection to its PostgreSQL port or, with
``http_check``, by ``GET <path>`` on another port (Patroni's REST API: ``/primary`` answers
200 on the leader only, ``/replica`` on streaming replicas); it is marked down after
``fall`` failed checks (its open sessions are cut) and up again after ``rise`` good ones.

- :meth:`HAProxy.for_patroni`: Patroni's sample layout, a write listener checked with
  ``GET /primary`` and a read listener checked with ``GET /replica`` (benchmark scenario 7).
- :class:`LoadBalancer`: nodes of a :class:`~areplica.testing.LocalTopology` (its standbys,
  say) behind one address, round robin per connection, as a Kubernetes Service in front of
  replica pods; a killed backend is skipped (failed connects are redispatched, failed checks
  mark it down).
"""

from __future__ import annotations

import contextlib
import csv
import io
import re
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from psycopg2.extensions import make_dsn, parse_dsn

from .daemon import Daemon, DaemonUnavailable, find_program
from .processes import HOST

if TYPE_CHECKING:
    from .topology import LocalTopology

__all__ = [
    "READ",
    "WRITE",
    "Backend",
    "HAProxy",
    "HAProxyUnavailable",
    "Listener",
    "LoadBalancer",
    "find_executable",
    "version",
]

WRITE = "pg_write"  # Patroni's write listener: GET /primary
READ = "pg_read"  # Patroni's read listener: GET /replica
BALANCED = "pg"  # the one listener of a LoadBalancer


class HAProxyUnavailable(DaemonUnavailable):
    """HAProxy is missing or could not start; the message says why."""


@dataclass(frozen=True)
class Backend:
    """One server behind a listener: its PostgreSQL port, and the port HTTP checks go to
    (Patroni's REST API; None: checks connect to ``pg_port``)."""

    name: str
    pg_port: int
    rest_port: int | None = None
    host: str = HOST


@dataclass(frozen=True)
class Listener:
    """One TCP address of HAProxy and the backends it spreads connections over.

    ``http_check``: ``GET`` this path on each backend's ``rest_port`` and expect 200 (None:
    a TCP connection to its PostgreSQL port is the check). ``balance``: HAProxy's algorithm
    (None: its default, round robin). ``redispatch``: a connection that fails to reach its
    backend is retried on another one.
    """

    name: str
    backends: tuple[Backend, ...]
    http_check: str | None = None
    balance: str | None = "roundrobin"
    redispatch: bool = False


def find_executable() -> str | None:
    """The ``haproxy`` executable (PATH, then Debian's ``/usr/sbin/haproxy``), or None."""
    return find_program("haproxy")


def version(executable: str) -> str | None:
    """``haproxy -v``'s version number, e.g. ``2.6.12``."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            [executable, "-v"], capture_output=True, text=True, timeout=15, check=False
        )
        match = re.search(r"version (\d+\.\d+(?:\.\d+)?)", out.stdout + out.stderr)
        if match:
            return match.group(1)
    return None


class HAProxy(Daemon):
    """One HAProxy with TCP ``listeners`` (see the module docstring).

    ``inter``, ``fall`` and ``rise`` go to ``default-server`` of every listener (check every
    ``inter`` seconds; down after ``fall`` failed checks, up after ``rise`` good ones);
    ``maxconn`` caps the connections to each backend. ``executable``: found on PATH (or in
    ``/usr/sbin``) when not given. ``user`` and ``attach``: see
    :class:`~areplica.testing.daemon.Daemon`.
    """

    program = "haproxy"
    unavailable = HAProxyUnavailable  # stop_signal: SIGTERM, a hard stop closing everything

    def __init__(
        self,
        listeners: Sequence[Listener],
        *,
        executable: str | None = None,
        inter: float = 1.0,
        fall: int = 2,
        rise: int = 1,
        maxconn: int = 200,
        name: str = "haproxy",
        user: str | None = None,
        attach: Callable[[Callable[[], None]], None] | None = None,
    ) -> None:
        if not listeners or not all(listener.backends for listener in listeners):
            raise ValueError("HAProxy needs listeners, each with at least one backend")
        if len({listener.name for listener in listeners}) != len(listeners):
            raise ValueError("listener names must differ")
        found = executable or find_executable()
        if found is None:
            raise HAProxyUnavailable(
                "haproxy not found on PATH nor in /usr/sbin (Debian: apt-get install haproxy)"
            )
        super().__init__(found, name=name, user=user, attach=attach)
        self.listeners = list(listeners)
        self.inter, self.fall, self.rise, self.maxconn = inter, fall, rise, maxconn
        self.config_text = ""

    @classmethod
    def for_patroni(cls, backends: Sequence[Backend], **options: Any) -> HAProxy:
        """Patroni's sample layout: writes checked with ``GET /primary``, reads with
        ``GET /replica`` (round robin), each on every backend's REST port."""
        servers = tuple(backends)
        return cls(
            [
                Listener(WRITE, servers, http_check="/primary", balance=None),
                Listener(READ, servers, http_check="/replica"),
            ],
            **options,
        )

    def port(self, listener: str) -> int:
        """The port of ``listener`` (once started)."""
        try:
            return self.ports[listener]
        except KeyError:
            raise KeyError(f"{self.name}: no started listener {listener!r}") from None

    @property
    def write_port(self) -> int:
        """The port of :data:`WRITE` (:meth:`for_patroni`)."""
        return self.port(WRITE)

    @property
    def read_port(self) -> int:
        """The port of :data:`READ` (:meth:`for_patroni`)."""
        return self.port(READ)

    # ---------------------------------------------------------------- configuration

    def config(self, admin_socket: Path) -> str:
        """The configuration, with the ports chosen and the check timings of this object."""
        lines = [
            "global",
            f"    maxconn {4 * self.maxconn}",
            f"    stats socket {admin_socket} mode 600 level admin",
            "",
            "defaults",
            "    mode tcp",
            "    retries 2",
            "    timeout client 30m",
            "    timeout connect 4s",
            "    timeout server 30m",
            "    timeout check 5s",
        ]
        for listener in self.listeners:
            lines += ["", *self._listen_section(listener)]
        return "\n".join(lines) + "\n"

    def _listen_section(self, listener: Listener) -> list[str]:
        default_server = (
            f"default-server inter {round(self.inter * 1000)}ms fall {self.fall} "
            f"rise {self.rise} on-marked-down shutdown-sessions"
        )
        lines = [f"listen {listener.name}", f"    bind {HOST}:{self.ports[listener.name]}"]
        if listener.balance is not None:
            lines.append(f"    balance {listener.balance}")
        if listener.redispatch:
            lines.append("    option redispatch")
        if listener.http_check is not None:
            lines += [
                f"    option httpchk GET {listener.http_check}",
                "    http-check expect status 200",
            ]
        lines.append(f"    {default_server}")
        for b in listener.backends:
            check = "check"
            if listener.http_check is not None and b.rest_port is not None:
                check = f"check port {b.rest_port}"
            lines.append(f"    server {b.name} {b.host}:{b.pg_port} maxconn {self.maxconn} {check}")
        return lines

    def _configure(self, folder: Path) -> list[str]:
        for listener in self.listeners:
            self._port(listener.name)
        self.config_text = self.config(folder / "admin.sock")
        conf = self._write("haproxy.cfg", self.config_text)
        self._check_config(conf)
        return [self.executable, "-db", "-f", str(conf)]

    def _check_config(self, conf: Path) -> None:
        try:
            self._need_owner().need_account().run(
                [self.executable, "-c", "-q", "-f", str(conf)], timeout=30
            )
        except (OSError, RuntimeError) as exc:
            lines = str(exc).strip().splitlines()[-3:]
            raise HAProxyUnavailable(
                f"haproxy rejected its configuration: {' | '.join(lines)}"
            ) from None

    # ---------------------------------------------------------------- its view

    def _command(self, command: str, timeout: float = 5.0) -> str:
        """One command on the admin socket; its whole answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.folder / "admin.sock"))
            sock.sendall(command.encode() + b"\n")
            chunks: list[bytes] = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def server_states(self) -> dict[str, dict[str, str]]:
        """``{listener: {backend: status}}`` from ``show stat`` (``UP``, ``DOWN``, ...)."""
        text = self._command("show stat").lstrip("# ")
        out: dict[str, dict[str, str]] = {listener.name: {} for listener in self.listeners}
        for row in csv.DictReader(io.StringIO(text)):
            proxy, server = row.get("pxname"), row.get("svname")
            if proxy in out and server not in ("FRONTEND", "BACKEND", None):
                out[proxy][str(server)] = str(row.get("status", "")).split(" ")[0]
        return out

    def up(self) -> dict[str, set[str]]:
        """The backends each listener would send a new connection to now."""
        return {
            proxy: {name for name, status in servers.items() if status == "UP"}
            for proxy, servers in self.server_states().items()
        }

    def wait_states(self, expected: Mapping[str, set[str]], timeout: float = 30.0) -> float:
        """Wait until the UP backends of each listener are exactly ``expected``; seconds."""
        began = time.monotonic()
        deadline = began + timeout
        seen: dict[str, set[str]] = {}
        while True:
            if not self.running:
                raise HAProxyUnavailable(f"haproxy is not running: {self.log_tail()}")
            with contextlib.suppress(OSError):
                seen = self.up()
                if all(seen.get(k) == v for k, v in expected.items()):
                    return time.monotonic() - began
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name}: UP servers {seen} did not become {dict(expected)} "
                    f"within {timeout}s"
                )
            time.sleep(0.05)


class LoadBalancer(HAProxy):
    """``nodes`` of a LocalTopology behind one address, round robin per connection.

    What an application sees behind a Kubernetes Service over replica pods: each new
    connection goes to the next backend; a backend that refuses connections is skipped at
    once (the connection is redispatched) and marked down after ``fall`` failed TCP checks,
    ``inter`` seconds apart (0.5 here). ``options`` are :class:`HAProxy`'s (``inter``,
    ``fall``, ``rise``, ``maxconn``, ``executable``). HAProxy runs as the user the servers
    run as, and stops with the topology (or on :meth:`close`).
    """

    def __init__(
        self,
        topology: LocalTopology,
        nodes: Sequence[str],
        *,
        name: str = "load-balancer",
        **options: Any,
    ) -> None:
        if not nodes:
            raise ValueError("a load balancer needs at least one node")
        backends = tuple(Backend(node, topology.port(node)) for node in nodes)
        listener = Listener(BALANCED, backends, redispatch=True)
        options.setdefault("inter", 0.5)
        super().__init__(
            [listener], name=name, user=topology.os_user, attach=topology.on_close, **options
        )
        self.nodes = list(nodes)
        # Who connects, and to which database: the topology's, at the balancer's address.
        self._conninfo = parse_dsn(topology.direct_dsn(nodes[0]))

    @property
    def address(self) -> tuple[str, int]:
        """The ``(host, port)`` clients connect to."""
        return HOST, self.port(BALANCED)

    @property
    def dsn(self) -> str:
        """A libpq DSN for the balancer's address (the topology's user, password, database)."""
        return str(make_dsn(**{**self._conninfo, "host": HOST, "port": self.port(BALANCED)}))

    def backends_up(self) -> set[str]:
        """The nodes HAProxy would send a new connection to now."""
        return self.up()[BALANCED]

    def wait_backends(self, nodes: set[str], timeout: float = 30.0) -> float:
        """Wait until exactly ``nodes`` are up in HAProxy's view; seconds waited."""
        return self.wait_states({BALANCED: set(nodes)}, timeout)
