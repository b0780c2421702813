"""PgBouncer in front of one node of a :class:`~areplica.testing.LocalTopology`, for tests.

:class:`PgBouncer` runs ``pgbouncer CONF`` in the foreground (a
:class:`~areplica.testing.daemon.Daemon`) as the user the servers run as (PgBouncer refuses
to run as root), on a free port of 127.0.0.1, with one pool per database and user towards
the node's own port. Clients log in as the topology's user: trusted when the topology has no
password, else with MD5 (PgBouncer logs in to the server with the password it holds, by
SCRAM where the server asks for it). That user is an admin of PgBouncer's console, so
:meth:`PgBouncer.show` reads ``SHOW POOLS``, ``SHOW SERVERS``, ``SHOW CLIENTS``...

It stops with the topology (or on :meth:`~PgBouncer.close`, or as a context manager);
:meth:`~PgBouncer.stop` (SIGTERM: immediate shutdown) and :meth:`~PgBouncer.kill`
(SIGKILL) end the process, by its pid, and :meth:`~PgBouncer.start` runs it again on the
same port. The password is written to PgBouncer's ``auth_file`` (mode 0600), never logged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import psycopg2
from psycopg2.extensions import make_dsn, parse_dsn

from .daemon import Daemon, DaemonUnavailable, find_program
from .processes import HOST

if TYPE_CHECKING:
    from .topology import LocalTopology

__all__ = ["PgBouncer", "PgBouncerUnavailable", "PoolMode"]

PoolMode = Literal["session", "transaction", "statement"]
_MODES = ("session", "transaction", "statement")
_WORD = re.compile(r"[A-Za-z_]+")


class PgBouncerUnavailable(DaemonUnavailable):
    """PgBouncer is missing, or did not start; the message says why."""


def _quoted(value: str) -> str:
    """A string in PgBouncer's ``auth_file`` syntax."""
    return '"' + value.replace('"', '""') + '"'


class PgBouncer(Daemon):
    """PgBouncer in front of ``node`` of ``topology`` (see the module docstring).

    ``mode``: the pool mode; ``pool_size``: server connections per pool
    (``default_pool_size``): more clients than that wait in line; ``max_client_conn``:
    clients it accepts at all; ``settings``: more ``[pgbouncer]`` settings, raw.
    ``executable``: found on PATH (or in ``/usr/sbin``) when not given.
    """

    program = "pgbouncer"
    unavailable = PgBouncerUnavailable  # stop_signal: SIGTERM, PgBouncer's immediate shutdown

    def __init__(
        self,
        topology: LocalTopology,
        node: str,
        *,
        name: str | None = None,
        mode: PoolMode = "transaction",
        pool_size: int = 5,
        max_client_conn: int = 100,
        settings: Mapping[str, str | int] | None = None,
        executable: str | None = None,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, not {mode!r}")
        if pool_size < 1 or max_client_conn < 1:
            raise ValueError("pool_size and max_client_conn must be >= 1")
        found = executable or find_program("pgbouncer")
        if found is None:
            raise PgBouncerUnavailable(
                "pgbouncer not found on PATH nor in /usr/sbin (Debian: apt-get install pgbouncer)"
            )
        super().__init__(
            found, name=name or f"pgbouncer-{node}", user=topology.os_user, attach=topology.on_close
        )
        self.node = node
        self.mode = mode
        self.pool_size = pool_size
        self.max_client_conn = max_client_conn
        self.settings = dict(settings or {})
        self.server_port = topology.port(node)
        self._conninfo = parse_dsn(topology.direct_dsn(node))

    # ---------------------------------------------------------------- addresses

    @property
    def port(self) -> int:
        """The port PgBouncer listens on (once started)."""
        try:
            return self.ports["listen"]
        except KeyError:
            raise RuntimeError(f"{self.name} is not started") from None

    @property
    def dsn(self) -> str:
        """A libpq DSN through PgBouncer: the topology's user, password and database."""
        return str(make_dsn(**{**self._conninfo, "host": HOST, "port": self.port}))

    @property
    def admin_dsn(self) -> str:
        """A libpq DSN for PgBouncer's admin console (the ``pgbouncer`` database)."""
        return str(make_dsn(self.dsn, dbname="pgbouncer"))

    # ---------------------------------------------------------------- configuration

    def _configure(self, folder: Path) -> list[str]:
        user = str(self._conninfo["user"])
        password = self._conninfo.get("password")
        userlist = self._write("userlist.txt", f"{_quoted(user)} {_quoted(password or '')}\n")
        settings: dict[str, str | int] = {
            "listen_addr": HOST,
            "listen_port": self._port("listen"),
            "unix_socket_dir": "",
            "auth_type": "md5" if password else "trust",
            "auth_file": str(userlist),
            "admin_users": user,
            "pool_mode": self.mode,
            "default_pool_size": self.pool_size,
            "max_client_conn": self.max_client_conn,
            "ignore_startup_parameters": "extra_float_digits,options",
            "server_login_retry": 1,
            **self.settings,
        }
        lines = [
            "[databases]",
            f"* = host={HOST} port={self.server_port}",
            "",
            "[pgbouncer]",
            *(f"{key} = {value}" for key, value in settings.items()),
        ]
        conf = self._write("pgbouncer.ini", "\n".join(lines) + "\n")
        return [self.executable, str(conf)]

    # ---------------------------------------------------------------- its view

    def show(self, what: str) -> list[dict[str, Any]]:
        """``SHOW <what>`` on the admin console (``POOLS``, ``SERVERS``, ...): one dict a row."""
        if not _WORD.fullmatch(what):
            raise ValueError(f"not a SHOW command: {what!r}")
        conn = psycopg2.connect(self.admin_dsn, connect_timeout=5)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f"SHOW {what}")
                names = [column[0] for column in cur.description or ()]
                return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        finally:
            conn.close()

    def pool(self) -> dict[str, Any]:
        """The ``SHOW POOLS`` row of the topology's database and user ({} before any use)."""
        database, user = self._conninfo.get("dbname"), self._conninfo.get("user")
        for row in self.show("POOLS"):
            if row.get("database") == database and row.get("user") == user:
                return row
        return {}
