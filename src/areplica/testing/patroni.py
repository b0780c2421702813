"""A real Patroni cluster on loopback ports, for tests: one etcd and Patroni members.

:class:`PatroniTopology` starts one etcd (v3 API) and three Patroni members (``n1``, ``n2``,
``n3``) in one temporary directory, each with its own PostgreSQL port and REST API port on
127.0.0.1, and waits until one of them leads and the others stream from it. Then it can do
what happens to a Patroni cluster in production: a :meth:`~PatroniTopology.switchover` or a
manual :meth:`~PatroniTopology.failover` (timed, so a test can compare the outage its
application saw with Patroni's own), a :meth:`~PatroniTopology.crash` of a member (SIGKILL
of its Patroni and its PostgreSQL), a :meth:`~PatroniTopology.restart`, a member added or
removed at runtime, and tags (``noloadbalance``, ``nofailover``) changed by a reload.

Programs are found in this order:

- Patroni: ``patroni=...``, ``$AREPLICA_PATRONI``, ``patroni`` next to ``sys.executable``
  (the running virtualenv), then ``patroni`` on ``PATH``;
- etcd: ``etcd=...``, ``$AREPLICA_ETCD``, then ``etcd`` on ``PATH`` (Debian: ``etcd-server``);
- PostgreSQL: like :class:`~areplica.testing.LocalTopology` (``pg_bin=...``,
  ``$AREPLICA_PG_BIN``, ``pg_config --bindir``, ...).

When one is missing or unusable, :meth:`~PatroniTopology.start` raises
:class:`PatroniUnavailable` with a one-line reason, before starting anything, so a pytest
fixture can skip with it.

Run as root, etcd, Patroni and PostgreSQL run as the ``postgres`` user (``$AREPLICA_PG_USER``
names another one), like LocalTopology's servers; that user must be able to run the
``patroni`` script, i.e. reach its interpreter (a virtualenv made from ``/usr/bin/python3``
and readable by all works; one whose interpreter lives under ``/root`` does not).

Every process is stopped by its pid (Patroni's from its ``Popen``, PostgreSQL's from its
``postmaster.pid``), never by name; processes, the directory and their cleanup belong to a
:class:`~areplica.testing.processes.ProcessOwner`. Passwords are generated per topology and
appear only in :meth:`~PatroniTopology.dsn` and the members' files (mode 0600); they are
masked in every error message.

The class is assembled from parts: :mod:`._patroni_base` (a member's record, one HTTP
request, what every part relies on) and :mod:`.patroni_roles` (switchover, failover, crash
and restart, membership and tags); this module finds the programs, configures and starts
etcd and the members, and reads Patroni's view.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psycopg2
from psycopg2.extensions import make_dsn

from ._patroni_base import Member, NoAnswer, Switchover, http_call
from ._support import REPLAY_TARGET_SQL, replay_target, run_sql
from .patroni_roles import PatroniRoles
from .postgres import find_pg_bin, run_as
from .processes import HOST, Postmaster, ProcessOwner, ServiceAccount, Spawned, free_port, tail

__all__ = ["PatroniTopology", "PatroniUnavailable", "Switchover"]

log = logging.getLogger(__name__)

SUPERUSER = "postgres"
REPLICATION_USER = "replicator"
# What Patroni needs in bin_dir besides what LocalTopology needs.
PATRONI_PROGRAMS = ("initdb", "pg_ctl", "postgres", "pg_basebackup", "pg_rewind", "pg_controldata")
_MASK = "***"


class PatroniUnavailable(RuntimeError):
    """etcd, Patroni or PostgreSQL is missing here, or the service user cannot run it.

    The message is one line saying what is missing and how to get it, for ``pytest.skip``.
    """


# --------------------------------------------------------------------------------------
# Finding the programs


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _find_program(
    program: str, explicit: str | os.PathLike[str] | None, env_var: str, near_python: bool
) -> Path | None:
    """The program to use, or None when not found; a named but unusable one is an error."""
    for how, value in (
        (f"{program}=", explicit),
        (f"{env_var}=", os.environ.get(env_var, "").strip()),
    ):
        if value:
            path = Path(value)
            if not _executable(path):
                raise PatroniUnavailable(f"{how}{str(path)!r} is not an executable file")
            return path
    if near_python:
        beside = Path(sys.executable).parent / program
        if _executable(beside):
            return beside
    found = shutil.which(program)
    return Path(found) if found else None


def _shebang(script: Path) -> str | None:
    with contextlib.suppress(OSError), script.open("rb") as f:
        first = f.readline(512)
        if first.startswith(b"#!"):
            return first[2:].decode(errors="replace").strip()
    return None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# --------------------------------------------------------------------------------------
# The topology


class PatroniTopology(PatroniRoles):
    """etcd and ``members`` Patroni members (``n1``, ``n2``, ...) on 127.0.0.1, for tests.

    Use as ``with PatroniTopology() as cluster:`` or ``async with PatroniTopology() as
    cluster:``, or call :meth:`start` and :meth:`close`. Everything is also killed and the
    directory removed if the object is garbage collected or the interpreter exits first.

    ``tags`` gives members their Patroni tags from the start, e.g. ``{"n3":
    {"nofailover": True}}``; ``parameters`` adds PostgreSQL settings (cluster-wide, through
    the DCS). ``ttl``, ``loop_wait`` and ``retry_timeout`` are Patroni's (it raises ``ttl``
    below 20 to 20; ``loop_wait + 2 * retry_timeout`` must not exceed ``ttl``).

    Every member trusts connections from 127.0.0.1; :meth:`dsn` still carries the
    superuser's (generated) password, as an application's DSN would.
    """

    def __init__(
        self,
        members: int = 3,
        *,
        tags: Mapping[str, Mapping[str, Any]] | None = None,
        parameters: Mapping[str, Any] | None = None,
        pg_bin: str | os.PathLike[str] | None = None,
        patroni: str | os.PathLike[str] | None = None,
        etcd: str | os.PathLike[str] | None = None,
        password: str | None = None,
        ttl: int = 20,
        loop_wait: int = 1,
        retry_timeout: int = 5,
        start_timeout: float = 180.0,
        name: str | None = None,
    ) -> None:
        if members < 1:
            raise ValueError("members must be >= 1")
        if loop_wait < 1 or retry_timeout < 1 or loop_wait + 2 * retry_timeout > max(ttl, 20):
            raise ValueError(
                "need loop_wait >= 1, retry_timeout >= 1 and loop_wait + 2 * "
                "retry_timeout <= ttl (ttl counts as at least 20)"
            )
        if start_timeout <= 0:
            raise ValueError("start_timeout must be > 0")
        names = [f"n{i}" for i in range(1, members + 1)]
        unknown = sorted(set(tags or {}) - set(names))
        if unknown:
            raise ValueError(f"tags for unknown members {unknown}; members are {names}")
        self.name = name or f"areplica-{secrets.token_hex(4)}"
        self._initial = names
        self._initial_tags = {k: dict(v) for k, v in (tags or {}).items()}
        self._parameters = dict(parameters or {})
        self._pg_bin = pg_bin
        self._patroni_arg = patroni
        self._etcd_arg = etcd
        self._password = password or secrets.token_urlsafe(18)
        self._replication_password = secrets.token_urlsafe(18)
        self.ttl, self.loop_wait, self.retry_timeout = ttl, loop_wait, retry_timeout
        self.start_timeout = start_timeout
        self._owner = ProcessOwner(f"PatroniTopology {self.name}")
        self._finalizer = weakref.finalize(self, self._owner.close)
        self._members = {}
        self._etcd_process: Spawned | None = None
        self._started = False
        self._lock = threading.RLock()  # one topology change at a time
        self._patroni: Path | None = None
        self._etcd: Path | None = None
        self._bin_dir: Path | None = None
        self._etcd_port: int | None = None
        self.startup_seconds: float | None = None
        self.last_switchover = None

    def __repr__(self) -> str:
        state = "closed" if self._owner.closed else "started" if self._started else "new"
        return f"<PatroniTopology {self.name!r} {state} members={self.members}>"

    # ---------------------------------------------------------------- properties

    @property
    def members(self) -> list[str]:
        """The member names, in the order they were created (crashed ones included)."""
        if self._members:
            return list(self._members)
        return list(self._initial)

    @property
    def rest_urls(self) -> list[str]:
        """Every member's REST API base URL (``http://127.0.0.1:PORT``)."""
        return [self.rest_url(name) for name in self.members]

    @property
    def etcd_url(self) -> str:
        """The etcd client URL."""
        if self._etcd_port is None:
            raise RuntimeError("the topology is not running")
        return f"http://{HOST}:{self._etcd_port}"

    @property
    def directory(self) -> Path:
        """The temporary directory holding etcd and every member (removed by :meth:`close`)."""
        if self._owner.directory is None or self._owner.closed:
            raise RuntimeError("the topology is not running")
        return self._owner.directory

    @property
    def bin_dir(self) -> Path:
        """The folder of the PostgreSQL binaries Patroni uses."""
        if self._bin_dir is None:
            raise RuntimeError("the topology is not started")
        return self._bin_dir

    # ---------------------------------------------------------------- finding programs

    def check(self) -> None:
        """Raise :class:`PatroniUnavailable` (one line) unless everything needed is here.

        Finds etcd, Patroni and PostgreSQL, and, when root, checks that the service user can
        run them. Starts nothing; :meth:`start` calls it first.
        """
        try:
            etcd = _find_program("etcd", self._etcd_arg, "AREPLICA_ETCD", near_python=False)
            if etcd is None:
                raise PatroniUnavailable(
                    "etcd not found on PATH: install it (Debian: apt-get install etcd-server) "
                    "or set AREPLICA_ETCD"
                )
            patroni = _find_program(
                "patroni", self._patroni_arg, "AREPLICA_PATRONI", near_python=True
            )
            if patroni is None:
                raise PatroniUnavailable(
                    f"patroni not found next to {sys.executable} nor on PATH: pip install "
                    "'patroni[etcd3,psycopg3]' or set AREPLICA_PATRONI"
                )
            try:
                bin_dir = find_pg_bin(self._pg_bin)
            except RuntimeError as exc:
                raise PatroniUnavailable(_one_line(str(exc))) from None
            missing = [p for p in PATRONI_PROGRAMS if not _executable(bin_dir / p)]
            if missing:
                raise PatroniUnavailable(
                    f"{bin_dir} lacks {', '.join(missing)}, which Patroni needs"
                )
            try:
                account = ServiceAccount(run_as(), Path(tempfile.gettempdir()))
            except RuntimeError as exc:
                raise PatroniUnavailable(_one_line(str(exc))) from None
            user = account.name or "the current user"
            if not account.can_run(etcd):
                raise PatroniUnavailable(f"{etcd} --version fails when run by {user}")
            if not account.can_run(patroni):
                interpreter = _shebang(patroni) or "its interpreter"
                raise PatroniUnavailable(
                    f"{patroni} cannot be run by {user} (is {interpreter} and its virtualenv "
                    "reachable by that user?): install Patroni in a virtualenv made from a "
                    "system Python and readable by all (mode 755), or set AREPLICA_PATRONI"
                )
        except PatroniUnavailable:
            raise
        except (OSError, subprocess.SubprocessError) as exc:
            raise PatroniUnavailable(_one_line(f"cannot check for Patroni: {exc}")) from None
        self._etcd, self._patroni, self._bin_dir = etcd, patroni, bin_dir

    # ---------------------------------------------------------------- life cycle

    def start(self) -> None:
        """Start etcd and every member; return once one leads and the others stream.

        Raises :class:`PatroniUnavailable` (having started nothing) when a program is
        missing. On any other failure, whatever was started is stopped and removed.
        """
        with self._lock:
            if self._owner.closed:
                raise RuntimeError("this topology was closed; create a new one")
            if self._started:
                raise RuntimeError("this topology is started already")
            self.check()
            self._started = True
            began = time.monotonic()
            try:
                account = self._owner.open("areplica-patroni-", run_as(), sockets=True)
                if account.as_other_user:
                    self._bin_dir = self._reachable(account, self.bin_dir)
                self._start_etcd()
                for name in self._initial:
                    self._launch(self._new_member(name, self._initial_tags.get(name, {})))
                self.wait_healthy(timeout=self.start_timeout)
                self.wait_replicated(timeout=self.start_timeout)
            except BaseException:
                self._finalizer()
                raise
            self.startup_seconds = time.monotonic() - began
            log.debug(
                "Patroni cluster %s started in %.1fs in %s",
                self.name,
                self.startup_seconds,
                self.directory,
            )

    def close(self) -> None:
        """Kill every member (Patroni, then PostgreSQL) and etcd by pid, remove the directory.

        Idempotent. PostgreSQL gets an immediate shutdown (SIGQUIT); what is left of any
        process after 10 s is SIGKILLed.
        """
        self._finalizer()

    # ---------------------------------------------------------------- setup steps

    def _reachable(self, account: ServiceAccount, bin_dir: Path) -> Path:
        dest = self.directory / "pginstall"
        reachable = account.reachable(bin_dir, ("postgres",), dest)
        if reachable is None:
            raise PatroniUnavailable(
                f"the PostgreSQL binaries in {bin_dir} cannot be run by {account.name!r}, "
                f"even after linking them into {dest}"
            )
        return reachable

    def _env(self) -> dict[str, str]:
        """The runner's environment, without Patroni's and etcd's own variables nor proxies."""
        env = self._owner.need_account().env()
        for key in list(env):
            upper = key.upper()
            if upper.startswith(("PATRONI_", "ETCD")) or upper.endswith("_PROXY"):
                del env[key]
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _start_etcd(self) -> None:
        if self._etcd is None:
            raise RuntimeError("etcd was not found (check() first)")
        env = self._env()
        machine = platform.machine().lower()
        if machine not in ("x86_64", "amd64"):
            # etcd 3.4 refuses other architectures unless told it may (3.5 knows arm64).
            env["ETCD_UNSUPPORTED_ARCH"] = {"aarch64": "arm64"}.get(machine, machine)
        log_path = self.directory / "etcd.log"
        last = ""
        for _attempt in range(5):
            client, peer = free_port(), free_port()
            client_url, peer_url = f"http://{HOST}:{client}", f"http://{HOST}:{peer}"
            data = self.directory / "etcd"
            shutil.rmtree(data, ignore_errors=True)
            self._etcd_process = etcd = self._owner.spawn(
                "etcd",
                [
                    str(self._etcd),
                    "--name=default",
                    f"--data-dir={data}",
                    f"--listen-client-urls={client_url}",
                    f"--advertise-client-urls={client_url}",
                    f"--listen-peer-urls={peer_url}",
                    f"--initial-advertise-peer-urls={peer_url}",
                    f"--initial-cluster=default={peer_url}",
                    "--initial-cluster-state=new",
                    f"--initial-cluster-token={self.name}",
                    "--logger=zap",
                    "--log-outputs=stderr",
                ],
                log_path,
                env=env,
            )
            deadline = time.monotonic() + 60
            while etcd.running and time.monotonic() < deadline:
                with contextlib.suppress(OSError, ValueError):
                    status, body = http_call("GET", f"{client_url}/health", timeout=2)
                    if status == 200 and isinstance(body, dict) and body.get("health") == "true":
                        self._etcd_port = client
                        return
                time.sleep(0.05)
            last = etcd.log_tail()
            etcd.kill()
            self._etcd_process = None
            if "address already in use" not in last.lower():
                break
        raise RuntimeError(f"etcd did not start:\n{self._mask(last)}")

    def _new_member(self, name: str, tags: Mapping[str, Any]) -> Member:
        home = self._owner.need_account().make_dir(self.directory / name)
        member = Member(
            name=name,
            home=home,
            pg_port=free_port(),
            rest_port=free_port(),
            server=self._owner.track(Postmaster(name, home / "data")),
            tags=dict(tags),
        )
        self._members[name] = member
        self._write_config(member)
        return member

    def _config(self, m: Member) -> dict[str, Any]:
        parameters: dict[str, Any] = {
            "wal_level": "replica",
            "hot_standby": "on",
            "wal_log_hints": "on",  # pg_rewind: the old leader rejoins after a failover
            "max_connections": 100,
            "max_wal_senders": 10,
            "max_replication_slots": 10,
            "wal_keep_size": "128MB",
            "hot_standby_feedback": "on",
            # Not "off": an asynchronous commit is acknowledged before its WAL is written.
            "synchronous_commit": "on",
            "fsync": "off",
            "full_page_writes": "on",  # pg_rewind refuses to work without it
            "shared_buffers": "32MB",
            "unix_socket_directories": str(self.directory),
            # Replicas reconnect quickly to a new leader (default: 5s).
            "wal_retrieve_retry_interval": "200ms",
            "logging_collector": "on",
            "log_directory": "log",
        }
        parameters.update(self._parameters)
        auth = {
            "superuser": {"username": SUPERUSER, "password": self._password},
            "replication": {
                "username": REPLICATION_USER,
                "password": self._replication_password,
            },
        }
        return {
            "scope": self.name,
            "name": m.name,
            "log": {"level": "INFO"},
            "restapi": {
                "listen": f"{HOST}:{m.rest_port}",
                "connect_address": f"{HOST}:{m.rest_port}",
            },
            "etcd3": {"hosts": [f"{HOST}:{self._etcd_port}"]},
            "bootstrap": {
                "dcs": {
                    "ttl": self.ttl,
                    "loop_wait": self.loop_wait,
                    "retry_timeout": self.retry_timeout,
                    "maximum_lag_on_failover": 16 * 1024 * 1024,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "use_slots": True,
                        "parameters": parameters,
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}, "no-sync"],
            },
            "postgresql": {
                "listen": f"{HOST}:{m.pg_port}",
                "connect_address": f"{HOST}:{m.pg_port}",
                "data_dir": str(m.data),
                "bin_dir": str(self.bin_dir),
                "pgpass": str(m.home / "pgpass"),
                "authentication": auth,
                "pg_hba": [
                    "local all all trust",
                    "local replication all trust",
                    f"host all all {HOST}/32 trust",
                    f"host replication all {HOST}/32 trust",
                ],
                "parameters": {"unix_socket_directories": str(self.directory)},
                "basebackup": [{"checkpoint": "fast"}, "no-sync"],
                "remove_data_directory_on_rewind_failure": True,
                "remove_data_directory_on_diverged_timelines": True,
            },
            "watchdog": {"mode": "off"},
            "tags": dict(m.tags),
        }

    def _write_config(self, m: Member) -> None:
        """Write ``patroni.yml`` (JSON is YAML) atomically, readable by the service user only."""
        text = json.dumps(self._config(m), indent=2)
        self._owner.need_account().write_private(m.config, text)

    def _launch(self, m: Member) -> None:
        if self._patroni is None:
            raise RuntimeError("patroni was not found (check() first)")
        m.patroni = self._owner.spawn(
            f"Patroni {m.name}",
            [str(self._patroni), str(m.config)],
            m.log,
            env=self._env(),
            stop_signal=signal.SIGKILL,  # for good: a live Patroni would restart PostgreSQL
        )
        m.down = False

    # ---------------------------------------------------------------- addresses

    def _member(self, name: str) -> Member:
        if self._owner.closed:
            raise RuntimeError(f"{self.name} is closed")
        try:
            return self._members[name]
        except KeyError:
            if not self._started:
                raise RuntimeError(f"{self.name} is not started") from None
            raise KeyError(f"no member {name!r}; members are {self.members}") from None

    def dsn(self, member: str, dbname: str = "postgres") -> str:
        """A libpq DSN for ``member``'s PostgreSQL as the superuser, password included."""
        return str(
            make_dsn(
                host=HOST,
                port=self._member(member).pg_port,
                user=SUPERUSER,
                password=self._password,
                dbname=dbname,
            )
        )

    def port(self, member: str) -> int:
        """The port ``member``'s PostgreSQL listens on (what ``inet_server_port()`` says)."""
        return self._member(member).pg_port

    def rest_url(self, member: str) -> str:
        """``member``'s Patroni REST API base URL."""
        return self._member(member).rest_url

    def log_file(self, member: str) -> Path:
        """``member``'s Patroni log (PostgreSQL's own logs are in its ``data/log``)."""
        return self._member(member).log

    def pids(self, member: str) -> list[int]:
        """``member``'s live processes: Patroni (and children), postmaster (and children)."""
        return self._member(member).pids()

    def all_pids(self) -> list[int]:
        """Every live process this topology started: etcd, Patroni and PostgreSQL."""
        etcd = self._etcd_process
        pids = [etcd.pid] if etcd is not None and etcd.running else []
        for member in self._members.values():
            pids += member.pids()
        return pids

    def query(
        self, member: str, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()
    ) -> list[tuple[Any, ...]]:
        """Run one statement straight on ``member`` (autocommit) and return its rows."""
        return run_sql(
            self.dsn(member), sql, params, connect_timeout=5, application_name="areplica-patroni"
        )

    # ---------------------------------------------------------------- Patroni's view

    def cluster(self) -> dict[str, Any]:
        """``GET /cluster`` of the first member whose REST API answers (parsed JSON)."""
        self._member_names_or_raise()
        errors: list[str] = []
        members = sorted(self._members.values(), key=lambda m: (m.down, m.name))
        for m in members:
            if m.patroni_pid() is None:
                continue
            try:
                status, body = http_call("GET", f"{m.rest_url}/cluster", timeout=3)
            except OSError as exc:
                errors.append(f"{m.name}: {exc}")
                continue
            if status == 200 and isinstance(body, dict):
                return body
            errors.append(f"{m.name}: HTTP {status}")
        raise NoAnswer(f"no Patroni REST API answered GET /cluster ({'; '.join(errors)})")

    def _member_names_or_raise(self) -> None:
        if self._owner.closed:
            raise RuntimeError(f"{self.name} is closed")
        if not self._members:
            raise RuntimeError(f"{self.name} is not started")

    def leader(self) -> str | None:
        """The name of the member holding Patroni's leader key now (None if nobody does)."""
        for name, entry in self._entries(self.cluster()).items():
            if entry.get("role") in ("leader", "standby_leader"):
                return name
        return None

    def wait_leader(self, timeout: float = 60.0, exclude: Iterable[str] = ()) -> str:
        """Wait for a ``running`` leader (not one of ``exclude``) that accepts writes."""
        excluded = set(exclude)
        found: list[str] = []

        def ready() -> bool:
            name = self.leader()
            if name is None or name in excluded:
                return False
            entry = self._entries(self.cluster()).get(name, {})
            if entry.get("state") != "running":
                return False
            if self.query(name, "SELECT pg_is_in_recovery()")[0][0]:
                return False
            found[:] = [name]
            return True

        self._poll(
            ready,
            timeout,
            "a running leader" + (f" other than {sorted(excluded)}" if excluded else ""),
        )
        return found[0]

    def tags(self, member: str) -> dict[str, Any]:
        """The tags ``member`` has in its configuration (what :meth:`set_tags` set)."""
        return dict(self._member(member).tags)

    # ---------------------------------------------------------------- waiting

    def _poll(
        self,
        predicate: Callable[[], bool],
        timeout: float,
        what: str,
        interval: float = 0.05,
    ) -> None:
        """Poll until true; transient errors (SQL, HTTP, no answer) count as "not yet".

        Fails at once, rather than at the timeout, when etcd or a Patroni that should be
        running has exited.
        """
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while True:
            self._check_processes()
            try:
                if predicate():
                    return
            except (psycopg2.Error, OSError, NoAnswer) as exc:
                last = exc
            if time.monotonic() > deadline:
                detail = f" (last error: {_one_line(str(last))})" if last else ""
                raise TimeoutError(
                    self._mask(
                        f"{self.name}: timed out after {timeout:.0f}s waiting for {what}"
                        f"{detail}\n{self._diagnostics()}"
                    )
                )
            time.sleep(interval)

    def _check_processes(self) -> None:
        etcd = self._etcd_process
        if etcd is not None and not etcd.running:
            log_path = self.directory / "etcd.log"
            raise RuntimeError(
                self._mask(f"{self.name}: etcd exited\n--- {log_path}:\n{tail(log_path)}")
            )
        for m in self._expected_up():
            if m.patroni is not None and not m.patroni.running:
                raise RuntimeError(
                    self._mask(
                        f"{self.name}: Patroni of {m.name} exited (code "
                        f"{m.patroni.returncode})\n--- {m.log}:\n{tail(m.log)}"
                    )
                )

    def _diagnostics(self) -> str:
        """Patroni's view and every member's log tail, for a timeout's message."""
        lines: list[str] = []
        try:
            for name, entry in self._entries(self.cluster()).items():
                lines.append(
                    f"  {name}: role={entry.get('role')} state={entry.get('state')}"
                    f" lag={entry.get('lag', '-')} tags={entry.get('tags', {})}"
                )
        except (OSError, NoAnswer, RuntimeError) as exc:
            lines.append(f"  GET /cluster failed: {_one_line(str(exc))}")
        for m in self._members.values():
            state = "down" if m.down else "up" if m.patroni_pid() else "Patroni exited"
            lines.append(f"--- {m.name} ({state}) {m.log}:\n{tail(m.log, limit=1500)}")
        return "Patroni's /cluster:\n" + "\n".join(lines)

    def _mask(self, text: str) -> str:
        for secret in (self._password, self._replication_password):
            text = text.replace(secret, _MASK)
        return text

    def _expected_up(self) -> list[Member]:
        return [m for m in self._members.values() if not m.down]

    def _streams_from(self, leader: str, replicas: Sequence[str]) -> bool:
        """Whether every one of ``replicas`` streams from ``leader`` (server and Patroni)."""
        if not replicas:
            return True
        entries = self._entries(self.cluster())
        if any(entries.get(name, {}).get("state") != "streaming" for name in replicas):
            return False
        rows = self.query(
            leader,
            "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'",
        )
        return set(replicas) <= {row[0] for row in rows}

    def wait_healthy(self, timeout: float = 60.0) -> str:
        """Wait until a leader accepts writes and every member not crashed streams from it.

        Returns the leader's name. Crashed members (see :meth:`crash`) are not waited for.
        """
        with self._lock:
            deadline = time.monotonic() + timeout
            leader = self.wait_leader(timeout)
            others = [m.name for m in self._expected_up() if m.name != leader]
            self._poll(
                lambda: self._streams_from(leader, others),
                max(1.0, deadline - time.monotonic()),
                f"{others} streaming from {leader}",
            )
            return leader

    def wait_replicated(self, timeout: float = 30.0) -> None:
        """Wait until every streaming replica replayed all WAL the leader has written."""
        leader = self.wait_leader(timeout)
        target = replay_target(self.query(leader, REPLAY_TARGET_SQL)[0])
        entries = self._entries(self.cluster())
        replicas = [
            m.name
            for m in self._expected_up()
            if m.name != leader and entries.get(m.name, {}).get("state") == "streaming"
        ]
        deadline = time.monotonic() + timeout
        sql = "SELECT pg_last_wal_replay_lsn() - pg_lsn '0/0'"
        for name in replicas:

            def replayed(name: str = name) -> bool:
                value = self.query(name, sql)[0][0]
                return value is not None and int(value) >= target

            self._poll(
                replayed,
                max(0.5, deadline - time.monotonic()),
                f"{name} to replay up to {target}",
                interval=0.02,
            )
