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

The class is assembled from parts, each in its module: :mod:`._local_base` (a node's
record, running SQL on a node, waiting), :mod:`.local_faults` (processes, replay delay and
network faults) and :mod:`.local_history` (roles and histories); this module creates,
starts and addresses the servers.

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
import shlex
import shutil
import signal
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from psycopg2.extensions import make_dsn

from ._local_base import PRIMARY as PRIMARY  # demo and older callers import it from here
from ._local_base import (
    START_TIMEOUT,
    Node,
    conf_value,
    replication_proxy,
    set_auto_conf,
    slot_name,
)
from ._support import REPLAY_TARGET_SQL, replay_target
from .local_history import LocalHistory
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

_PORT_ATTEMPTS = 6


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


class LocalTopology(LocalHistory):
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
        self._nodes = {}
        self._proxies = None
        self._replication_ports = {}  # standby -> its replication proxy
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
            self.wait_replicated(timeout=START_TIMEOUT)
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

    def _new_node(self, name: str) -> Node:
        home = self._account.make_dir(self.directory / name)
        server = Postmaster(name, home / "data")
        node = Node(name, home, _free_port(), server, log=home / "postgres.log")
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
            self._replication_ports[name] = proxies.add(replication_proxy(name), HOST, primary.port)

    def _settings(self) -> dict[str, str]:
        settings = {
            "listen_addresses": conf_value(HOST),
            "unix_socket_directories": conf_value(str(self.directory)),
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
            self._create_slot(node, slot_name(name))

    def _start_replica(self, name: str) -> None:
        node = self._new_node(name)
        node.upstream = PRIMARY
        node.slot = slot_name(name)
        self._base_backup(node, self._nodes[PRIMARY], "-R", "-S", node.slot)
        if name in self._replication_ports:
            conninfo = make_dsn(
                host=HOST,
                port=self._replication_ports[name],
                user=self.user,
                password=self._password,
            )
            set_auto_conf(node.data, {"primary_conninfo": str(conninfo)}, self._account)
        self._pg_ctl_start(node, first=True)

    def _base_backup(self, node: Node, source: Node, *options: str) -> None:
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

    def _pg_ctl_start(self, node: Node, first: bool = False) -> None:
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
                        str(START_TIMEOUT),
                        "-D",
                        str(node.data),
                        "-l",
                        str(node.log),
                        "-o",
                        options,
                    ],
                    timeout=START_TIMEOUT + 30,
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

    def _wait_streaming(self, names: Sequence[str], timeout: float = START_TIMEOUT) -> None:
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

    # ---------------------------------------------------------------- addresses

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

    # ---------------------------------------------------------------- processes and replay

    def pids(self, node: str) -> list[int]:
        """``node``'s live processes, postmaster first, then its children (empty if down)."""
        return self._node(node, closed_ok=True).server.pids()

    def running(self, node: str) -> bool:
        """Whether ``node``'s postmaster is alive (hung counts as running)."""
        return self._node(node, closed_ok=True).server.pid() is not None

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

    def _followers(self, source: str) -> list[Node]:
        """Running, unhung nodes streaming from ``source``, directly or through such nodes."""
        found: list[Node] = []
        upstreams = [source]
        while upstreams:
            upstream = upstreams.pop()
            for n in self._nodes.values():
                if n.upstream == upstream and not n.hung and n.server.pid() is not None:
                    found.append(n)
                    upstreams.append(n.name)
        return found
