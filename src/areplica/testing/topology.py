"""A real PostgreSQL primary with real streaming replicas on loopback ports, for tests.

:class:`LocalTopology` runs ``initdb`` for a primary, takes a ``pg_basebackup`` per replica
(each with its own physical replication slot), starts every server on a free port of
127.0.0.1 inside one temporary directory, and can then break things on purpose: kill, hang
(SIGSTOP), stop, restart or promote a node, delay replay on a replica, and, with
``proxies=True``, delay, blackhole or cut the TCP traffic in front of any node. For history
and high-availability tests it adds standbys at runtime (cascading from another standby
too), forks the history (a standby promoted while its primary keeps writing), rebuilds a
standby from another node with ``pg_basebackup`` and rewinds an old primary with
``pg_rewind`` into a standby of the new one.

Binaries, and the user servers run as when we are root, are found by
:mod:`areplica.testing.postgres` (``find_pg_bin``, ``service_user``). Binaries that user
cannot reach (e.g. in a virtualenv under ``/root``) are first linked or copied into the
topology's temporary directory.

Whatever stops the machine from running a topology at all (no binaries, no user to run them
as, a temporary path too long for a socket) raises :class:`SetupError`, a ``RuntimeError``
with a one-line message saying what to do.

Everything lives in one ``tempfile.mkdtemp()`` directory, under ``$AREPLICA_TMPDIR`` when set
(e.g. ``/dev/shm``: much faster on disks where creating files is slow, at the price of RAM).
Processes, the directory and their cleanup belong to a
:class:`~areplica.testing.processes.ProcessOwner`: every process is stopped by the pid it
wrote in its ``postmaster.pid``, never by name.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import signal
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg2
from psycopg2.extensions import make_dsn

from ._support import REPLAY_TARGET_SQL, TopologyLifecycle, replay_target, run_sql
from .postgres import find_pg_bin, pg_major_version, run_as, service_user
from .processes import (
    HOST,
    Postmaster,
    ProcessOwner,
    ServiceAccount,
    SetupError,
    file_size,
    stop_servers,
    tail,
)
from .processes import alive as _alive  # also the name older callers import
from .processes import free_port as _free_port  # looked up here, so that tests can replace it
from .proxy import ProxyProcess, ProxyThread

__all__ = [
    "LocalTopology",
    "SetupError",
    "find_pg_bin",
    "pg_major_version",
    "remove_detached",
    "run_as",
    "service_user",
]

log = logging.getLogger(__name__)

PRIMARY = "primary"

_START_TIMEOUT = 60  # seconds, for pg_ctl -w and the waits of start()
_PORT_ATTEMPTS = 6


def _conf_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


_NODE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,40}")


def _slot_name(node: str) -> str:
    """The physical replication slot ``node`` streams through, on the node it follows."""
    return "areplica_" + node.replace("-", "_")


# --------------------------------------------------------------------------------------
# The topology


@dataclass
class _Node:
    name: str
    home: Path  # the node's folder: data/ and postgres.log
    port: int
    server: Postmaster  # working in home/data
    log: Path  # home/postgres.log
    upstream: str | None = None  # the node it streams from (None on a primary)
    slot: str | None = None
    proxy_port: int | None = None
    hung: bool = False

    @property
    def data(self) -> Path:
        return self.server.data


def _looks_detached(root: Path) -> bool:
    """An ``areplica-*`` folder holding ``primary/data/PG_VERSION``."""
    return (
        root.is_dir()
        and root.name.startswith("areplica-")
        and (root / PRIMARY / "data" / "PG_VERSION").is_file()
    )


def remove_detached(directory: str | os.PathLike[str], timeout: float = 15.0) -> list[str]:
    """Stop every server of a detached topology (``demo --keep``) and remove its directory.

    Each server is found by the pid in its ``NODE/data/postmaster.pid`` (checked against
    /proc: a live process working in that data directory), asked for a fast shutdown
    (SIGINT), then an immediate one (SIGQUIT), then SIGKILLed with its children; nothing is
    ever signalled by name. Returns the names of the nodes that were running. Raises
    :class:`SetupError` when ``directory`` does not look like a LocalTopology directory (an
    ``areplica-*`` folder with ``primary/data/PG_VERSION``): nothing else is ever removed.
    """
    root = Path(directory).resolve()
    if not _looks_detached(root):
        raise SetupError(
            f"{str(directory)!r} is not the directory of a kept areplica topology "
            "(an areplica-* folder holding primary/data): nothing was stopped or removed"
        )
    servers = [
        Postmaster(home.name, home / "data")
        for home in sorted(root.iterdir())
        if (home / "data" / "PG_VERSION").is_file()
    ]
    everything = [pid for s in servers for pid in s.pids()]
    stopped = stop_servers(servers, [(signal.SIGINT, timeout), (signal.SIGQUIT, 5.0)])
    survivors = [p for p in everything if _alive(p)]
    if survivors:
        raise RuntimeError(f"processes {survivors} of {root} survived SIGKILL; nothing removed")
    shutil.rmtree(root)
    return stopped


class LocalTopology(TopologyLifecycle):
    """A real PostgreSQL primary and ``replicas`` streaming replicas, for tests and demos.

    Every server listens on a free port of 127.0.0.1, with its data, socket and log inside
    one temporary directory, trusting local connections (or, with ``password``, asking
    SCRAM/MD5 passwords over TCP). Nodes are called ``"primary"``, ``"replica-1"``, ...

    With ``proxies=True`` an asyncio TCP proxy runs in front of every node (in a thread of its
    own); :meth:`dsn` then points at the proxy, and :meth:`delay`, :meth:`blackhole`,
    :meth:`cut` and :meth:`heal` inject network faults. :meth:`direct_dsn` always reaches
    the server itself.

    ``replication_proxies=True`` makes each replica created at start stream from the primary
    through a proxy of its own, so that :meth:`delay` (and the other faults) with
    ``replication=True`` act on replication alone; :meth:`replication_proxy_port` is its
    port. Standbys that :meth:`add_replica`, :meth:`rebuild` or :meth:`rewind` configure
    later stream directly. ``proxy_process=True`` runs the proxies in a child process
    (:class:`~areplica.testing.proxy.ProxyProcess`) instead of a thread of this one, so
    that forwarding shares no interpreter lock with the code under test (benchmarks).

    ``rewindable=True`` runs every server with ``wal_log_hints = on`` and
    ``full_page_writes = on`` (off otherwise, for speed), which :meth:`rewind` needs from
    before the histories diverge; it also lets base backups be taken from a standby.

    Use as ``with LocalTopology() as topo:`` or ``async with LocalTopology() as topo:``, or
    call :meth:`start` and :meth:`close`. Servers are also stopped and the directory removed
    if the object is garbage collected or the interpreter exits without :meth:`close`.
    """

    def __init__(
        self,
        replicas: int = 2,
        pg_bin: str | os.PathLike[str] | None = None,
        proxies: bool = False,
        user: str = "postgres",
        dbname: str = "postgres",
        password: str | None = None,
        rewindable: bool = False,
        replication_proxies: bool = False,
        proxy_process: bool = False,
    ) -> None:
        if replicas < 0:
            raise ValueError("replicas must be >= 0")
        if not user or not dbname:
            raise ValueError("user and dbname must not be empty")
        self.replicas = replicas
        self.user = user
        self.dbname = dbname
        self.proxies = proxies
        self.rewindable = rewindable
        self.replication_proxies = replication_proxies
        self.proxy_process = proxy_process
        self._pg_bin = pg_bin
        self._password = password
        self._names = [PRIMARY] + [f"replica-{i}" for i in range(1, replicas + 1)]
        self._source = PRIMARY  # the node replicas follow (changes on promote())
        self._nodes: dict[str, _Node] = {}
        self._proxies: ProxyThread | ProxyProcess | None = None
        self._replication_ports: dict[str, int] = {}  # standby -> its replication proxy
        self._owner = ProcessOwner("LocalTopology")
        self._finalizer = weakref.finalize(self, self._owner.close)
        self._started = False
        self._pg_version: int | None = None
        self._bin_dir: Path | None = None
        self.startup_seconds: float | None = None

    def __repr__(self) -> str:
        state = "closed" if self._owner.closed else "started" if self._started else "new"
        return f"<LocalTopology {state} replicas={self.replicas} proxies={self.proxies}>"

    # ---------------------------------------------------------------- properties

    @property
    def nodes(self) -> list[str]:
        """The node names: ``["primary", "replica-1", ...]``."""
        return list(self._names)

    @property
    def pg_version(self) -> int:
        """The PostgreSQL major version in use (e.g. 15 or 18)."""
        if self._pg_version is None:
            self._pg_version = pg_major_version(self.bin_dir)
        return self._pg_version

    @property
    def bin_dir(self) -> Path:
        """The folder of the PostgreSQL binaries in use (a private copy when relocated)."""
        if self._bin_dir is None:
            self._bin_dir = find_pg_bin(self._pg_bin)
        return self._bin_dir

    @property
    def directory(self) -> Path:
        """The temporary directory holding every node (removed by :meth:`close`)."""
        if self._owner.directory is None or self._owner.closed:
            raise RuntimeError("the topology is not running")
        return self._owner.directory

    @property
    def os_user(self) -> str | None:
        """The operating-system user the servers run as (None: the current user)."""
        return self._account.name

    # ---------------------------------------------------------------- life cycle

    def start(self) -> None:
        """Create and start every node; return once every replica streams and has replayed.

        On any failure, whatever was started is stopped and removed before re-raising.
        """
        if self._owner.closed:
            raise RuntimeError("this topology was closed; create a new one")
        if self._started:
            raise RuntimeError("this topology is started already")
        self._started = True
        began = time.monotonic()
        try:
            bin_dir = find_pg_bin(self._pg_bin) if self._bin_dir is None else self._bin_dir
            account = self._owner.open("areplica-", run_as(), sockets=True)
            if account.as_other_user:
                bin_dir = self._reachable(account, bin_dir)
            self._bin_dir = bin_dir
            if self._pg_version is None:
                self._pg_version = pg_major_version(bin_dir)
            if self.pg_version < 12:
                raise SetupError(f"PostgreSQL {self.pg_version} is too old (12 or newer needed)")
            self._start_primary()
            if self.replication_proxies:
                self._start_replication_proxies()
            if self.replicas:
                with ThreadPoolExecutor(max_workers=min(self.replicas, 4)) as pool:
                    list(pool.map(self._start_replica, self._names[1:]))
                self._wait_streaming(self._names[1:])
            if self.proxies:
                self._start_proxies()
            self.wait_replicated(timeout=_START_TIMEOUT)
        except BaseException:
            self._finalizer()
            raise
        self.startup_seconds = time.monotonic() - began
        log.debug("topology started in %.2fs in %s", self.startup_seconds, self.directory)

    def detach(self) -> Path:
        """Leave the servers running past this object and the interpreter (``demo --keep``).

        Nothing will stop them or remove their directory (returned) any more: do it with
        :func:`remove_detached` (``areplica down DIR``). Proxies cannot outlive the process,
        so a topology with proxies cannot be detached.
        """
        if self._proxies is not None:
            raise RuntimeError("a topology with proxies cannot be detached")
        self._finalizer.detach()
        return self._owner.detach()

    def close(self) -> None:
        """Stop proxies and servers, and remove the temporary directory. Idempotent.

        Servers get an immediate shutdown (SIGQUIT to the postmaster); whatever is left of
        them then is SIGKILLed by pid.
        """
        self._finalizer()

    def on_close(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when the topology closes, before its servers stop.

        What is attached to the topology (a PgBouncer, a load balancer) stops with it. The
        callback must not refer to the topology, or a forgotten topology could never be
        garbage collected.
        """
        self._owner.on_close(callback)

    # ---------------------------------------------------------------- setup steps

    def _reachable(self, account: ServiceAccount, bin_dir: Path) -> Path:
        dest = self.directory / "pginstall"
        reachable = account.reachable(bin_dir, ("postgres", "pg_basebackup"), dest)
        if reachable is None:
            raise SetupError(
                f"the PostgreSQL binaries in {bin_dir} cannot be run by the user "
                f"{account.name!r}, even after linking them into {dest}"
            )
        return reachable

    @property
    def _account(self) -> ServiceAccount:
        return self._owner.need_account()

    def _client_env(self) -> dict[str, str]:
        """PGPASSWORD for a client program (never in its argv); servers never get it."""
        return {"PGPASSWORD": self._password} if self._password is not None else {}

    def _new_node(self, name: str) -> _Node:
        home = self._account.make_dir(self.directory / name)
        server = Postmaster(name, home / "data")
        node = _Node(name, home, _free_port(), server, log=home / "postgres.log")
        self._nodes[name] = node
        return node

    def _proxy_runner(self) -> ProxyThread | ProxyProcess:
        """The thread (or child process) running this topology's proxies, started once."""
        if self._proxies is None:
            proxies = self._proxies = ProxyProcess() if self.proxy_process else ProxyThread()
            self._owner.on_close(proxies.close)
            proxies.start()
        return self._proxies

    def _start_proxies(self) -> None:
        proxies = self._proxy_runner()
        for node in self._nodes.values():
            node.proxy_port = proxies.add(node.name, HOST, node.port)

    def _start_replication_proxies(self) -> None:
        """A proxy towards the primary for each replica to come (their conninfo names it)."""
        proxies = self._proxy_runner()
        primary = self._nodes[PRIMARY]
        for name in self._names[1:]:
            self._replication_ports[name] = proxies.add(
                _replication_proxy(name), HOST, primary.port
            )

    def _settings(self) -> dict[str, str]:
        settings = {
            "listen_addresses": _conf_value(HOST),
            "unix_socket_directories": _conf_value(str(self.directory)),
            "wal_level": "replica",
            "max_wal_senders": str(max(10, self.replicas + 4)),
            "max_replication_slots": str(max(10, self.replicas + 4)),
            "hot_standby": "on",
            "hot_standby_feedback": "on",
            "fsync": "off",
            # Not "off": an asynchronous commit is acknowledged before its WAL is even written
            # to the OS, so a SIGKILLed primary loses acknowledged writes, and
            # pg_current_wal_lsn() (what read-your-writes waits for) lags behind commits.
            # With fsync off, a synchronous commit costs one write(), no disk flush.
            "synchronous_commit": "on",
            "full_page_writes": "off",
            "shared_buffers": "32MB",
            "max_connections": "200",
            "max_standby_streaming_delay": "30s",
            "logging_collector": "off",
            # Replicas reconnect quickly to a restarted primary (default: 5s).
            "wal_retrieve_retry_interval": "'200ms'",
        }
        if self.rewindable:  # what pg_rewind needs (wal_log_hints: or data checksums)
            settings.update(full_page_writes="on", wal_log_hints="on")
        if self.pg_version >= 13:
            settings["wal_keep_size"] = "'256MB'"
        else:
            settings["wal_keep_segments"] = "16"
        return settings

    def _start_primary(self) -> None:
        node = self._new_node(PRIMARY)
        account = self._account
        args = [
            str(self.bin_dir / "initdb"),
            "-D",
            str(node.data),
            "-U",
            self.user,
            "-A",
            "trust",
            "--auth-local=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]
        pwfile = node.home / "pwfile"
        try:
            if self._password is not None:
                account.write_private(pwfile, self._password + "\n")
                args.append(f"--pwfile={pwfile}")
            account.run(args)
        finally:
            pwfile.unlink(missing_ok=True)
        with (node.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# areplica LocalTopology\n")
            for key, value in self._settings().items():
                conf.write(f"{key} = {value}\n")
        method = "trust"
        if self._password is not None:
            method = "scram-sha-256" if self.pg_version >= 14 else "md5"
        (node.data / "pg_hba.conf").write_text(
            "# areplica LocalTopology\n"
            "local all all trust\n"
            "local replication all trust\n"
            f"host all all {HOST}/32 {method}\n"
            f"host replication all {HOST}/32 {method}\n"
        )
        self._pg_ctl_start(node, first=True)
        if self.dbname not in ("postgres", "template1"):
            self._query(
                PRIMARY,
                f'CREATE DATABASE "{self.dbname.replace(chr(34), chr(34) * 2)}"',
                dbname="postgres",
            )
        for name in self._names[1:]:
            self._create_slot(node, _slot_name(name))

    def _start_replica(self, name: str) -> None:
        node = self._new_node(name)
        node.upstream = PRIMARY
        node.slot = _slot_name(name)
        self._base_backup(node, self._nodes[PRIMARY], "-R", "-S", node.slot)
        if name in self._replication_ports:
            conninfo = make_dsn(
                host=HOST,
                port=self._replication_ports[name],
                user=self.user,
                password=self._password,
            )
            _set_auto_conf(node.data, {"primary_conninfo": str(conninfo)}, self._account)
        self._pg_ctl_start(node, first=True)

    def _base_backup(self, node: _Node, source: _Node, *options: str) -> None:
        """``pg_basebackup`` of ``source`` into ``node``'s data directory (must not exist)."""
        self._account.run(
            [
                str(self.bin_dir / "pg_basebackup"),
                "-h",
                HOST,
                "-p",
                str(source.port),
                "-U",
                self.user,
                "-D",
                str(node.data),
                "-X",
                "stream",
                *options,
                "-c",
                "fast",
                "--no-sync",
                "-w",
            ],
            env=self._client_env(),
        )

    def _pg_ctl_start(self, node: _Node, first: bool = False) -> None:
        """``pg_ctl start``; on a first start, retry on another port if this one was taken."""
        for attempt in range(_PORT_ATTEMPTS):
            logged = file_size(node.log)
            options = f"-p {node.port} -c cluster_name={shlex.quote(node.name)}"
            self._owner.track(node.server)  # something may run from now on: close() looks
            try:
                self._account.run(
                    [
                        str(self.bin_dir / "pg_ctl"),
                        "start",
                        "-w",
                        "-t",
                        str(_START_TIMEOUT),
                        "-D",
                        str(node.data),
                        "-l",
                        str(node.log),
                        "-o",
                        options,
                    ],
                    timeout=_START_TIMEOUT + 30,
                )
            except RuntimeError as exc:
                text = tail(node.log, logged)
                taken = "Address already in use" in text or "could not bind" in text
                if first and taken and attempt < _PORT_ATTEMPTS - 1:
                    node.port = _free_port()
                    continue
                raise RuntimeError(f"{node.name} did not start: {exc}\n--- log:\n{text}") from None
            node.server.pid()  # remember its pid
            return

    def _wait_streaming(self, names: Sequence[str], timeout: float = _START_TIMEOUT) -> None:
        slots = {self._nodes[n].slot for n in names}
        sql = (
            "SELECT s.slot_name FROM pg_replication_slots s"
            " JOIN pg_stat_replication r ON r.pid = s.active_pid WHERE r.state = 'streaming'"
        )
        self._poll(
            lambda: slots <= {row[0] for row in self._query(self._source, sql)},
            timeout,
            f"replicas {sorted(names)} streaming",
        )

    # ---------------------------------------------------------------- SQL and waiting

    def _query(
        self,
        node: str,
        sql: str,
        params: Sequence[Any] | Mapping[str, Any] = (),
        dbname: str | None = None,
        connect_timeout: int = 5,
    ) -> list[tuple[Any, ...]]:
        return run_sql(
            self._dsn(self._node(node).port, dbname),
            sql,
            params,
            connect_timeout=connect_timeout,
            application_name="areplica-topology",
        )

    @staticmethod
    def _poll(
        predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.02
    ) -> None:
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while True:
            try:
                if predicate():
                    return
            except psycopg2.Error as exc:
                last = exc
            if time.monotonic() > deadline:
                detail = f" (last error: {str(last).strip()})" if last else ""
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}{detail}")
            time.sleep(interval)

    # ---------------------------------------------------------------- addresses

    def _node(self, name: str, closed_ok: bool = False) -> _Node:
        if name not in self._names:
            raise KeyError(f"no node {name!r}; nodes are {self._names}")
        if self._owner.closed and not closed_ok:
            raise RuntimeError("the topology is closed")
        try:
            return self._nodes[name]
        except KeyError:
            raise RuntimeError(f"{name} was not created (is the topology started?)") from None

    def _dsn(self, port: int, dbname: str | None = None) -> str:
        auth = quote(self.user, safe="")
        if self._password is not None:
            auth += ":" + quote(self._password, safe="")
        return f"postgresql://{auth}@{HOST}:{port}/{quote(dbname or self.dbname, safe='')}"

    def dsn(self, node: str) -> str:
        """A libpq URL for ``node`` (through its proxy when ``proxies=True``)."""
        n = self._node(node)
        return self._dsn(n.proxy_port if n.proxy_port is not None else n.port)

    def direct_dsn(self, node: str) -> str:
        """A libpq URL for ``node``'s server itself, never through a proxy."""
        return self._dsn(self._node(node).port)

    def port(self, node: str) -> int:
        """The port ``node``'s server listens on (what ``inet_server_port()`` answers)."""
        return self._node(node).port

    def proxy_port(self, node: str) -> int | None:
        """The port of ``node``'s proxy (None without proxies)."""
        return self._node(node).proxy_port

    def replication_proxy_port(self, node: str) -> int | None:
        """The port of the proxy standby ``node`` streams through (None: it streams directly)."""
        self._node(node)
        return self._replication_ports.get(node)

    def data_dir(self, node: str) -> Path:
        """``node``'s data directory."""
        return self._node(node).data

    def log_file(self, node: str) -> Path:
        """``node``'s server log."""
        return self._node(node).log

    # ---------------------------------------------------------------- processes

    def pids(self, node: str) -> list[int]:
        """``node``'s live processes, postmaster first, then its children (empty if down)."""
        return self._node(node, closed_ok=True).server.pids()

    def running(self, node: str) -> bool:
        """Whether ``node``'s postmaster is alive (hung counts as running)."""
        return self._node(node, closed_ok=True).server.pid() is not None

    def kill(self, node: str) -> None:
        """SIGKILL ``node``'s postmaster and its children (only those pids); wait until gone."""
        n = self._node(node)
        if not n.server.kill():
            raise RuntimeError(f"{node} is not running")
        n.hung = False

    def hang(self, node: str) -> None:
        """SIGSTOP every process of ``node``: connections stay open, nothing answers."""
        n = self._node(node)
        n.server.hang()
        n.hung = True

    def resume(self, node: str) -> None:
        """SIGCONT every process of ``node`` (undoes :meth:`hang`)."""
        n = self._node(node)
        n.server.resume()
        n.hung = False

    def stop(self, node: str) -> None:
        """``pg_ctl stop -m fast``; nothing if ``node`` is not running."""
        n = self._node(node)
        if n.hung:
            self.resume(node)
        if n.server.pid() is None:
            return
        self._pg_ctl("stop", n, "-m", "fast", "-w", "-t", str(_START_TIMEOUT))

    def start_node(self, node: str) -> None:
        """``pg_ctl start`` ``node`` again on its port (after :meth:`stop` or :meth:`kill`)."""
        n = self._node(node)
        if n.server.pid() is not None:
            return
        n.server.clear_stale(self.directory, n.port)
        self._pg_ctl_start(n)

    def promote(self, node: str) -> None:
        """``pg_ctl promote`` ``node``; return once ``pg_is_in_recovery()`` is false there.

        The promoted node becomes the one :meth:`wait_replicated` measures against; the other
        replicas keep following the node they followed.
        """
        self._promote(self._node(node))
        self._source = node

    def _promote(self, n: _Node) -> None:
        if n.upstream is None:
            raise RuntimeError(f"{n.name} is not a replica")
        self._pg_ctl("promote", n, "-w", "-t", str(_START_TIMEOUT))
        self._poll(
            lambda: not self._query(n.name, "SELECT pg_is_in_recovery()")[0][0],
            _START_TIMEOUT,
            f"{n.name} to leave recovery",
        )
        n.upstream = None

    def _pg_ctl(self, action: str, n: _Node, *args: str) -> None:
        self._account.run(
            [str(self.bin_dir / "pg_ctl"), action, "-D", str(n.data), *args],
            timeout=_START_TIMEOUT + 30,
        )

    def set_apply_delay(self, node: str, ms: int) -> None:
        """Make replica ``node`` replay commits ``ms`` milliseconds late (0: no delay).

        Returns once the new ``recovery_min_apply_delay`` is in force.
        """
        n = self._node(node)
        if n.upstream is None:
            raise RuntimeError(f"{node} is not a replica")
        if ms < 0:
            raise ValueError("ms must be >= 0")
        if ms:
            self._query(node, "ALTER SYSTEM SET recovery_min_apply_delay = %s", (f"{int(ms)}ms",))
        else:
            self._query(node, "ALTER SYSTEM RESET recovery_min_apply_delay")
        self._query(node, "SELECT pg_reload_conf()")
        sql = "SELECT setting FROM pg_settings WHERE name = 'recovery_min_apply_delay'"
        self._poll(
            lambda: int(self._query(node, sql)[0][0]) == int(ms),
            10.0,
            f"recovery_min_apply_delay = {int(ms)}ms on {node}",
        )

    def wait_replicated(self, timeout: float = 30, source: str | None = None) -> None:
        """Wait until every running replica has replayed all WAL the primary has written.

        "The primary" is ``source``, by default the node replicas follow (the last promoted
        one, if any); its replicas are those streaming from it, directly or through other
        standbys (cascading). Replicas that are down, hung, behind one that is, or that
        follow another node are skipped. Raises TimeoutError.
        """
        primary = self._node(source or self._source)
        if primary.server.pid() is None or primary.hung:
            raise RuntimeError(f"{primary.name} (the primary) is not running")
        target = replay_target(self._query(primary.name, REPLAY_TARGET_SQL)[0])
        replicas = self._followers(primary.name)
        deadline = time.monotonic() + timeout
        sql = "SELECT pg_last_wal_replay_lsn() - pg_lsn '0/0'"
        for n in replicas:

            def replayed(name: str = n.name) -> bool:
                return bool(self._query(name, sql)[0][0] >= target)

            self._poll(
                replayed,
                max(0.0, deadline - time.monotonic()),
                f"{n.name} to replay up to {target}",
                interval=0.01,
            )

    def _followers(self, source: str) -> list[_Node]:
        """Running, unhung nodes streaming from ``source``, directly or through such nodes."""
        found: list[_Node] = []
        upstreams = [source]
        while upstreams:
            upstream = upstreams.pop()
            for n in self._nodes.values():
                if n.upstream == upstream and not n.hung and n.server.pid() is not None:
                    found.append(n)
                    upstreams.append(n.name)
        return found

    # ---------------------------------------------------------------- history and HA

    def add_replica(self, name: str, upstream: str | None = None) -> str:
        """Add a standby ``name`` streaming from ``upstream`` (a primary or another standby).

        Without ``upstream``, from the node replicas follow. The standby gets a slot on its
        upstream, a base backup (see :meth:`rebuild` for where from), the topology's settings
        and a proxy when ``proxies=True``. Returns its name once it streams.
        """
        if not _NODE_NAME.fullmatch(name):
            raise ValueError(f"node names are lowercase letters, digits, '-' and '_': {name!r}")
        if name in self._names:
            raise ValueError(f"there is a node {name!r} already")
        source = self._running_node(upstream or self._source)
        node = self._new_node(name)
        self._names.append(name)
        self._clone(node, source, first=True)
        if self.proxies and self._proxies is not None:
            node.proxy_port = self._proxies.add(name, HOST, node.port)
        return name

    def rebuild(self, node: str, source: str) -> None:
        """Wipe ``node``'s data and clone it anew from ``source``; it then streams from there.

        ``node`` is stopped first (whatever it was: a standby, an old primary, a killed
        node); its slot on the node it followed is dropped. The base backup comes from
        ``source`` itself when it is a primary or the topology is ``rewindable``; else from
        the primary ``source`` streams from, since PostgreSQL refuses a backup from a standby
        that replayed WAL written with ``full_page_writes = off``. Standbys that streamed
        from ``node`` lose their slot on it: rebuild them too.
        """
        n, upstream = self._node(node), self._running_node(source)
        self._check_can_follow(n, upstream)
        self._take_down(n)
        shutil.rmtree(n.data)
        self._clone(n, upstream, first=False)
        self._reroot()

    def rewind(self, node: str, source: str) -> None:
        """``pg_rewind`` ``node`` (an old primary) onto ``source``'s history; then it streams
        from ``source``.

        ``node`` is stopped first if it runs (a killed one is recovered by ``pg_rewind``
        itself, PostgreSQL 13 or newer). Its writes after the histories diverged are lost,
        as in production. Standbys that followed ``node`` past that point diverged too:
        rebuild them. Needs ``rewindable=True``.
        """
        if not self.rewindable:
            raise RuntimeError("rewind() needs a topology created with rewindable=True")
        n, upstream = self._node(node), self._running_node(source)
        self._check_can_follow(n, upstream)
        self._take_down(n)
        # pg_rewind reads the source's timeline from its control file, which a promoted
        # node updates only at its first checkpoint: without one, "no rewind required".
        self._query(upstream.name, "CHECKPOINT")
        self._account.run(
            [
                str(self.bin_dir / "pg_rewind"),
                "-D",
                str(n.data),
                "--source-server",
                str(make_dsn(host=HOST, port=upstream.port, user=self.user, dbname="postgres")),
                "--no-sync",
            ],
            timeout=_START_TIMEOUT * 3,
            env=self._client_env(),
        )
        n.slot = _slot_name(n.name)
        self._create_slot(upstream, n.slot)
        self._follow(n, upstream, first=False)
        self._reroot()

    def fork(self, node: str) -> None:
        """Promote standby ``node`` while the node it streams from keeps running: a split brain.

        Both then accept writes, on diverging timelines (the promoted one on the next
        timeline). The other standbys keep following the old node: their
        ``primary_conninfo`` names its port, and it never sends them the new timeline, so
        they stay on its history. Unlike :meth:`promote`, the old node remains the one
        :meth:`wait_replicated` measures against. ``node``'s slot on the old node is dropped.
        """
        n = self._node(node)
        old = self._nodes[n.upstream] if n.upstream is not None else None
        slot = n.slot
        self._promote(n)
        if old is not None and slot is not None:
            self._drop_slot(old, slot)
        n.slot = None

    def timeline(self, node: str) -> int:
        """The timeline ``node`` writes WAL on (a primary) or receives it on (a standby)."""
        sql = (
            "SELECT CASE WHEN pg_is_in_recovery() THEN coalesce("
            "(SELECT received_tli FROM pg_stat_wal_receiver),"
            " (pg_control_checkpoint()).timeline_id)"
            " ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int"
            " END"
        )
        return int(self._query(node, sql)[0][0])

    def _running_node(self, name: str) -> _Node:
        n = self._node(name)
        if n.server.pid() is None or n.hung:
            raise RuntimeError(f"{name} is not running")
        return n

    def _check_can_follow(self, n: _Node, upstream: _Node) -> None:
        """Refuse a loop: ``upstream`` must not be ``n`` nor stream from it."""
        name: str | None = upstream.name
        while name is not None:
            if name == n.name:
                raise ValueError(f"{upstream.name} streams from {n.name}: it cannot follow it")
            name = self._nodes[name].upstream

    def _take_down(self, n: _Node) -> None:
        """Stop ``n`` (fast), drop its slot upstream, clear what a killed server left."""
        self.stop(n.name)
        if n.upstream is not None and n.slot is not None:
            self._drop_slot(self._nodes[n.upstream], n.slot)
        n.upstream = n.slot = None
        n.server.clear_stale(self.directory, n.port)

    def _clone(self, node: _Node, upstream: _Node, first: bool) -> None:
        """Make ``node`` (no data yet) a standby of ``upstream`` and start it."""
        node.slot = _slot_name(node.name)
        self._create_slot(upstream, node.slot)
        if upstream.upstream is None or self.rewindable:
            self._base_backup(node, upstream, "-S", node.slot)
        else:
            self._base_backup(node, self._nodes[self._root(upstream.name)])
        self._follow(node, upstream, first)

    def _follow(self, node: _Node, upstream: _Node, first: bool) -> None:
        """Configure ``node`` as a standby of ``upstream``, start it, wait until it streams."""
        conninfo = make_dsn(host=HOST, port=upstream.port, user=self.user, password=self._password)
        self._replication_ports.pop(node.name, None)  # streams directly from now on
        _set_auto_conf(
            node.data,
            {"primary_conninfo": str(conninfo), "primary_slot_name": node.slot or ""},
            self._account,
        )
        signal_file = node.data / "standby.signal"
        signal_file.touch()
        self._account.chown(signal_file)
        node.upstream = upstream.name
        self._pg_ctl_start(node, first=first)
        # On the upstream's timeline: a rewound node streams the old one up to the switch
        # first, then waits while its receiver restarts on the new one.
        wanted = [("streaming", upstream.port, self.timeline(upstream.name))]
        self._poll(
            lambda: self._query(node.name, _RECEIVER_SQL) == wanted,
            _START_TIMEOUT,
            f"{node.name} streaming from {upstream.name}",
        )

    def _create_slot(self, n: _Node, slot: str) -> None:
        self._query(
            n.name,
            "SELECT pg_create_physical_replication_slot(%s, true) WHERE NOT EXISTS"
            " (SELECT FROM pg_replication_slots WHERE slot_name = %s)",
            (slot, slot),
        )

    def _drop_slot(self, n: _Node, slot: str) -> None:
        """Drop ``slot`` on ``n`` once its walsender is gone; nothing if ``n`` is down."""
        if n.server.pid() is None or n.hung:
            return
        drop = (
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
            " WHERE slot_name = %s AND NOT active"
        )
        exists = "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s"

        def dropped() -> bool:
            self._query(n.name, drop, (slot,))
            return self._query(n.name, exists, (slot,)) == [(0,)]

        self._poll(dropped, _START_TIMEOUT, f"slot {slot} dropped on {n.name}")

    def _root(self, name: str) -> str:
        """The primary at the top of ``name``'s chain of upstreams."""
        while (upstream := self._nodes[name].upstream) is not None:
            name = upstream
        return name

    def _reroot(self) -> None:
        """After a node became a standby: replicas follow the primary at the top of its chain."""
        self._source = self._root(self._source)

    # ---------------------------------------------------------------- proxy faults

    def _proxy(self) -> ProxyThread | ProxyProcess:
        if self._proxies is None:
            raise RuntimeError("no proxies: create the topology with proxies=True")
        return self._proxies

    def _proxy_name(self, node: str, replication: bool) -> str:
        """The name of ``node``'s client proxy, or of the proxy it streams through."""
        n = self._node(node)
        if not replication:
            if n.proxy_port is None:
                raise RuntimeError("no proxies: create the topology with proxies=True")
            return node
        if node not in self._replication_ports:
            raise RuntimeError(
                f"{node} does not stream through a proxy: create the topology with "
                "replication_proxies=True (standbys configured later stream directly)"
            )
        return _replication_proxy(node)

    def delay(self, node: str, ms: float, *, replication: bool = False) -> None:
        """Add ``ms`` milliseconds to every chunk crossing ``node``'s proxy, both ways.

        ``replication=True``: the proxy standby ``node`` streams through instead.
        """
        self._proxy().delay(self._proxy_name(node, replication), ms)

    def blackhole(self, node: str, *, replication: bool = False) -> None:
        """``node``'s proxy accepts and keeps connections but forwards nothing (until heal)."""
        self._proxy().blackhole(self._proxy_name(node, replication))

    def cut(self, node: str, *, replication: bool = False) -> None:
        """Reset every connection through ``node``'s proxy now; new ones work as usual."""
        self._proxy().cut(self._proxy_name(node, replication))

    def heal(self, node: str, *, replication: bool = False) -> None:
        """``node``'s proxy forwards normally again (no delay, no blackhole)."""
        self._proxy().heal(self._proxy_name(node, replication))


_RECEIVER_SQL = "SELECT status, sender_port, received_tli FROM pg_stat_wal_receiver"


def _replication_proxy(node: str) -> str:
    """The name of the proxy standby ``node`` streams through."""
    return f"{node}/replication"


def _set_auto_conf(data: Path, settings: Mapping[str, str], account: ServiceAccount) -> None:
    """Set ``settings`` in ``postgresql.auto.conf`` (replacing earlier lines of theirs).

    A cloned or rewound data directory brings its source's settings there (a standby's
    ``primary_conninfo``, say): the new ones must replace them, not follow them.
    """
    path = data / "postgresql.auto.conf"
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [ln for ln in lines if ln.split("=", 1)[0].strip() not in settings]
    kept += [f"{key} = {_conf_value(value)}" for key, value in settings.items()]
    path.write_text("\n".join(kept) + "\n")
    account.chown(path)
