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
``postmaster.pid``), never by name. Passwords are generated per topology and appear only in
:meth:`~PatroniTopology.dsn` and the members' files (mode 0600); they are masked in every
error message.
"""

from __future__ import annotations

import atexit
import base64
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
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
from psycopg2.extensions import make_dsn

from ._support import TopologyLifecycle, run_sql
from .topology import (
    HOST,
    _alive,
    _children,
    _free_port,
    _release_shared_memory,
    _relocate_install,
    _Runner,
    _segment_bytes,
    _shared_memory,
    _signal,
    _tail,
    _wait_gone,
    _wait_stopped,
    find_pg_bin,
)

__all__ = ["PatroniTopology", "PatroniUnavailable", "Switchover"]

log = logging.getLogger(__name__)

SUPERUSER = "postgres"
REPLICATION_USER = "replicator"
# What Patroni needs in bin_dir besides what LocalTopology needs.
PATRONI_PROGRAMS = ("initdb", "pg_ctl", "postgres", "pg_basebackup", "pg_rewind", "pg_controldata")
# Boolean tags Patroni leaves out of /cluster when they are false.
_BOOL_TAGS = frozenset({"clonefrom", "nofailover", "noloadbalance", "nosync", "nostream"})
_MASK = "***"


class PatroniUnavailable(RuntimeError):
    """etcd, Patroni or PostgreSQL is missing here, or the service user cannot run it.

    The message is one line saying what is missing and how to get it, for ``pytest.skip``.
    """


@dataclass(frozen=True)
class Switchover:
    """What a :meth:`PatroniTopology.switchover` or :meth:`~PatroniTopology.failover` did.

    ``seconds`` runs from the request to Patroni until the new leader is ``running`` in
    ``GET /cluster`` and answers ``pg_is_in_recovery() = false``: the longest a client can
    have been unable to write because of Patroni. ``settled_seconds`` runs until the old
    leader streams from the new one again.
    """

    action: str
    old_leader: str
    new_leader: str
    seconds: float
    settled_seconds: float


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
# Members and what must be released


@dataclass
class _Member:
    name: str
    home: Path  # data/, patroni.yml, patroni.log
    pg_port: int
    rest_port: int
    tags: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None  # the running Patroni
    down: bool = False  # crashed (or stopped) on purpose: not expected to be healthy
    seen: set[int] = field(default_factory=set)  # every postmaster pid seen
    # Shared memory a SIGKILLed server left (SysV keys, /dev/shm files).
    leftovers: tuple[set[int], set[str]] | None = None

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def config(self) -> Path:
        return self.home / "patroni.yml"

    @property
    def log(self) -> Path:
        return self.home / "patroni.log"

    @property
    def rest_url(self) -> str:
        return f"http://{HOST}:{self.rest_port}"

    def patroni_pid(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None
        return self.proc.pid

    def postmaster_pid(self) -> int | None:
        """The live postmaster of this member (from postmaster.pid, checked in /proc)."""
        candidates: list[int] = []
        with contextlib.suppress(OSError, ValueError, IndexError):
            candidates.append(int((self.data / "postmaster.pid").read_text().split()[0]))
        candidates.extend(sorted(self.seen))
        data = os.path.realpath(self.data)
        for pid in candidates:
            if not _alive(pid):
                continue
            try:
                if os.readlink(f"/proc/{pid}/cwd") != data:
                    continue  # a reused pid: not our server
            except PermissionError:
                pass  # cannot tell; a live pid from our own pid file is trusted
            except OSError:
                continue
            self.seen.add(pid)
            return pid
        return None

    def pids(self) -> list[int]:
        """Patroni and its children, then the postmaster and its children (live ones)."""
        pids: list[int] = []
        for pid in (self.patroni_pid(), self.postmaster_pid()):
            if pid is not None:
                pids += [p for p in (pid, *_children(pid)) if p not in pids]
        return pids

    def kill(self) -> None:
        """SIGKILL Patroni (first, so it restarts nothing) and PostgreSQL, by pid."""
        patroni = self.patroni_pid()
        victims: list[int] = []
        if patroni is not None:
            os.kill(patroni, signal.SIGSTOP)  # it forks nothing more while we look
            _wait_stopped(patroni)
            victims += [patroni, *_children(patroni)]
            _signal(victims, signal.SIGKILL)
        postmaster = self.postmaster_pid()
        if postmaster is not None:
            os.kill(postmaster, signal.SIGSTOP)
            _wait_stopped(postmaster)
            server = [postmaster, *_children(postmaster)]
            self.leftovers = _shared_memory(server)
            _signal(server[1:], signal.SIGKILL)
            _signal(server[:1], signal.SIGKILL)
            victims += server
        if not _wait_gone(victims, 15.0):
            raise RuntimeError(f"{self.name}: processes {victims} survived SIGKILL")
        self.reap()

    def reap(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)


class _Resources:
    """What must be released: kept apart from the topology so a finalizer can hold it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.closed = False
        self.tmpdir: Path | None = None
        self.etcd: subprocess.Popen[bytes] | None = None
        self.members: dict[str, _Member] = {}

    def all_pids(self) -> list[int]:
        pids: list[int] = []
        if self.etcd is not None and self.etcd.poll() is None:
            pids.append(self.etcd.pid)
        for member in self.members.values():
            pids += member.pids()
        return pids

    def cleanup(self) -> None:
        """Kill every member and etcd (by pid), remove the directory. Idempotent."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.cleanup)
        try:
            self._stop_members()
            self._stop_etcd()
        finally:
            if self.tmpdir is not None:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
                self.tmpdir = None

    def _stop_members(self) -> None:
        members = list(self.members.values())
        # Patroni first and for good: a live Patroni would start its PostgreSQL again.
        patronis: list[int] = []
        for m in members:
            pid = m.patroni_pid()
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
                _wait_stopped(pid)
                patronis += [pid, *_children(pid)]
        _signal(patronis, signal.SIGKILL)
        _wait_gone(patronis, 10.0)
        for m in members:
            m.reap()
        # Then PostgreSQL: an immediate shutdown (SIGQUIT) also frees its shared memory.
        servers = {m.name: m.pids() for m in members}
        for m in members:
            if not servers[m.name] and m.leftovers is not None:
                _release_shared_memory(*m.leftovers)  # crashed and never restarted
        postmasters = [pids[0] for pids in servers.values() if pids]
        _signal(postmasters, signal.SIGCONT)
        _signal(postmasters, signal.SIGQUIT)
        everything = [pid for pids in servers.values() for pid in pids]
        if _wait_gone(everything, 10.0):
            return
        shared: list[tuple[set[int], set[str]]] = []
        for m in members:
            left = m.pids()
            if left:
                _signal(left[:1], signal.SIGSTOP)
                shared.append(_shared_memory(left))
            _signal(left, signal.SIGKILL)
            everything += left
        _signal([p for p in everything if _alive(p)], signal.SIGKILL)
        _wait_gone(everything, 10.0)
        for keys, files in shared:
            _release_shared_memory(keys, files)

    def _stop_etcd(self) -> None:
        if self.etcd is None:
            return
        if self.etcd.poll() is None:
            self.etcd.terminate()
            try:
                self.etcd.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.etcd.kill()
                self.etcd.wait(timeout=10)
        self.etcd = None


# --------------------------------------------------------------------------------------
# HTTP, without proxies from the environment


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class _NoAnswer(Exception):
    """A REST API or etcd did not answer as expected (yet)."""


def _http(method: str, url: str, body: Any = None, timeout: float = 5.0) -> tuple[int, Any]:
    """(status, parsed JSON or text) of one request; 4xx and 5xx are answers too."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            status, raw = int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        try:
            status, raw = int(exc.code), exc.read()
        finally:
            exc.close()
    text = raw.decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text.strip()


# --------------------------------------------------------------------------------------
# The topology


class PatroniTopology(TopologyLifecycle):
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
        self._res = _Resources()
        self._finalizer = weakref.finalize(self, self._res.cleanup)
        self._started = False
        self._lock = threading.RLock()  # one topology change at a time
        self._runner: _Runner | None = None
        self._patroni: Path | None = None
        self._etcd: Path | None = None
        self._bin_dir: Path | None = None
        self._etcd_port: int | None = None
        self.startup_seconds: float | None = None
        self.last_switchover: Switchover | None = None

    def __repr__(self) -> str:
        state = "closed" if self._res.closed else "started" if self._started else "new"
        return f"<PatroniTopology {self.name!r} {state} members={self.members}>"

    # ---------------------------------------------------------------- properties

    @property
    def members(self) -> list[str]:
        """The member names, in the order they were created (crashed ones included)."""
        if self._res.members:
            return list(self._res.members)
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
        if self._res.tmpdir is None:
            raise RuntimeError("the topology is not running")
        return self._res.tmpdir

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
                runner = _Runner(Path(tempfile.gettempdir()))
            except RuntimeError as exc:
                raise PatroniUnavailable(_one_line(str(exc))) from None
            user = runner.user_name or "the current user"
            if not runner.can_run(etcd):
                raise PatroniUnavailable(f"{etcd} --version fails when run by {user}")
            if not runner.can_run(patroni):
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
            if self._res.closed:
                raise RuntimeError("this topology was closed; create a new one")
            if self._started:
                raise RuntimeError("this topology is started already")
            self.check()
            self._started = True
            began = time.monotonic()
            res = self._res
            try:
                base = os.environ.get("AREPLICA_TMPDIR", "").strip() or None
                res.tmpdir = Path(tempfile.mkdtemp(prefix="areplica-patroni-", dir=base))
                if len(str(res.tmpdir)) + len("/.s.PGSQL.65535.lock") > 107:
                    raise RuntimeError(
                        f"{res.tmpdir} is too long a path for PostgreSQL's Unix socket: "
                        "set AREPLICA_TMPDIR (or TMPDIR) to a shorter folder"
                    )
                atexit.register(res.cleanup)
                runner = self._runner = _Runner(res.tmpdir)
                runner.chown(res.tmpdir)
                if runner.as_other_user and not runner.can_run(self.bin_dir / "postgres"):
                    self._bin_dir = self._relocate(self.bin_dir, res.tmpdir / "pginstall")
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
                res.tmpdir,
            )

    def close(self) -> None:
        """Kill every member (Patroni, then PostgreSQL) and etcd by pid, remove the directory.

        Idempotent. PostgreSQL gets an immediate shutdown (SIGQUIT); what is left of any
        process after 10 s is SIGKILLed.
        """
        self._finalizer()

    # ---------------------------------------------------------------- setup steps

    def _relocate(self, bin_dir: Path, dest: Path) -> Path:
        runner = self._need_runner()
        relocated = _relocate_install(bin_dir, dest)
        if not runner.can_run(relocated / "postgres"):
            raise PatroniUnavailable(
                f"the PostgreSQL binaries in {bin_dir} cannot be run by {runner.user_name!r}, "
                f"even after linking them into {dest}"
            )
        return relocated

    def _need_runner(self) -> _Runner:
        if self._runner is None or self._res.tmpdir is None:
            raise RuntimeError("the topology is not running")
        return self._runner

    def _env(self) -> dict[str, str]:
        """The runner's environment, without Patroni's and etcd's own variables nor proxies."""
        env = self._need_runner().env()
        for key in list(env):
            upper = key.upper()
            if upper.startswith(("PATRONI_", "ETCD")) or upper.endswith("_PROXY"):
                del env[key]
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _spawn(
        self, args: Sequence[str], log_path: Path, env: Mapping[str, str]
    ) -> subprocess.Popen[bytes]:
        """Start a long-running program as the service user, its output into ``log_path``."""
        runner = self._need_runner()
        options: dict[str, Any] = {}
        if runner.uid is not None:
            options.update(user=runner.uid, group=runner.gid, extra_groups=[])
        with log_path.open("ab") as out:
            runner.chown(log_path)
            return subprocess.Popen(
                list(args),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=str(self.directory),
                env=dict(env),
                start_new_session=True,  # a Ctrl-C of the test run must not reach it first
                **options,
            )

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
            client, peer = _free_port(), _free_port()
            client_url, peer_url = f"http://{HOST}:{client}", f"http://{HOST}:{peer}"
            data = self.directory / "etcd"
            shutil.rmtree(data, ignore_errors=True)
            logged = log_path.stat().st_size if log_path.exists() else 0
            self._res.etcd = proc = self._spawn(
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
                env,
            )
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(OSError, ValueError):
                    status, body = _http("GET", f"{client_url}/health", timeout=2)
                    if status == 200 and isinstance(body, dict) and body.get("health") == "true":
                        self._etcd_port = client
                        return
                time.sleep(0.05)
            last = _tail(log_path, logged)
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            self._res.etcd = None
            if "address already in use" not in last.lower():
                break
        raise RuntimeError(f"etcd did not start:\n{self._mask(last)}")

    def _new_member(self, name: str, tags: Mapping[str, Any]) -> _Member:
        home = self.directory / name
        home.mkdir(mode=0o700)
        self._need_runner().chown(home)
        member = _Member(
            name=name, home=home, pg_port=_free_port(), rest_port=_free_port(), tags=dict(tags)
        )
        self._res.members[name] = member
        self._write_config(member)
        return member

    def _config(self, m: _Member) -> dict[str, Any]:
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

    def _write_config(self, m: _Member) -> None:
        """Write ``patroni.yml`` (JSON is YAML) atomically, readable by the service user only."""
        tmp = m.config.with_name(m.config.name + ".new")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self._config(m), f, indent=2)
        self._need_runner().chown(tmp)
        os.replace(tmp, m.config)

    def _launch(self, m: _Member) -> None:
        if self._patroni is None:
            raise RuntimeError("patroni was not found (check() first)")
        m.proc = self._spawn([str(self._patroni), str(m.config)], m.log, self._env())
        m.down = False

    # ---------------------------------------------------------------- addresses

    def _member(self, name: str) -> _Member:
        if self._res.closed:
            raise RuntimeError(f"{self.name} is closed")
        try:
            return self._res.members[name]
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
        return self._res.all_pids()

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
        members = sorted(self._res.members.values(), key=lambda m: (m.down, m.name))
        for m in members:
            if m.patroni_pid() is None:
                continue
            try:
                status, body = _http("GET", f"{m.rest_url}/cluster", timeout=3)
            except OSError as exc:
                errors.append(f"{m.name}: {exc}")
                continue
            if status == 200 and isinstance(body, dict):
                return body
            errors.append(f"{m.name}: HTTP {status}")
        raise _NoAnswer(f"no Patroni REST API answered GET /cluster ({'; '.join(errors)})")

    def _member_names_or_raise(self) -> None:
        if self._res.closed:
            raise RuntimeError(f"{self.name} is closed")
        if not self._res.members:
            raise RuntimeError(f"{self.name} is not started")

    @staticmethod
    def _entries(cluster: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        return {str(m.get("name")): m for m in cluster.get("members", [])}

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
            except (psycopg2.Error, OSError, _NoAnswer) as exc:
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
        etcd = self._res.etcd
        if etcd is not None and etcd.poll() is not None:
            log_path = self.directory / "etcd.log"
            raise RuntimeError(
                self._mask(f"{self.name}: etcd exited\n--- {log_path}:\n{_tail(log_path)}")
            )
        for m in self._expected_up():
            if m.proc is not None and m.proc.poll() is not None:
                raise RuntimeError(
                    self._mask(
                        f"{self.name}: Patroni of {m.name} exited (code {m.proc.returncode})\n"
                        f"--- {m.log}:\n{_tail(m.log)}"
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
        except (OSError, _NoAnswer, RuntimeError) as exc:
            lines.append(f"  GET /cluster failed: {_one_line(str(exc))}")
        for m in self._res.members.values():
            state = "down" if m.down else "up" if m.patroni_pid() else "Patroni exited"
            lines.append(f"--- {m.name} ({state}) {m.log}:\n{_tail(m.log, limit=1500)}")
        return "Patroni's /cluster:\n" + "\n".join(lines)

    def _mask(self, text: str) -> str:
        for secret in (self._password, self._replication_password):
            text = text.replace(secret, _MASK)
        return text

    def _expected_up(self) -> list[_Member]:
        return [m for m in self._res.members.values() if not m.down]

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
        # Every commit is written out (synchronous_commit is on), so the write position
        # covers them all. A position just past a page header, where no replay can end,
        # counts from the page start.
        row = self.query(
            leader,
            "SELECT pg_current_wal_lsn() - pg_lsn '0/0',"
            " current_setting('wal_block_size')::int,"
            " current_setting('wal_segment_size', true)",
        )[0]
        target, block = int(row[0]), int(row[1])
        if target % block == 24:  # short page header
            target -= 24
        elif target % block == 40 and target % _segment_bytes(row[2]) == 40:  # long header
            target -= 40
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

    # ---------------------------------------------------------------- switchover, failover

    def switchover(self, candidate: str | None = None, *, timeout: float = 90.0) -> Switchover:
        """Ask Patroni (``POST /switchover``) to hand leadership to ``candidate``.

        Without ``candidate``, the first streaming replica without ``nofailover``. Returns
        once the candidate leads and accepts writes *and* the old leader streams from it
        again; the result (also in :attr:`last_switchover`) holds how long each took.
        """
        return self._hand_over("switchover", candidate, timeout)

    def failover(self, candidate: str | None = None, *, timeout: float = 90.0) -> Switchover:
        """Ask Patroni for a manual failover (``POST /failover``) to ``candidate``.

        Patroni requires a candidate for a failover; without one, the first streaming
        replica without ``nofailover`` is named. Returns like :meth:`switchover`. For an
        unplanned failover, :meth:`crash` the leader and :meth:`wait_leader` with
        ``exclude=[old]`` (Patroni waits ``ttl`` seconds for the leader key to expire).
        """
        return self._hand_over("failover", candidate, timeout)

    def _pick_candidate(self, entries: Mapping[str, Mapping[str, Any]], leader: str) -> str:
        for name in sorted(entries):
            entry = entries[name]
            if name == leader or entry.get("state") != "streaming":
                continue
            if entry.get("tags", {}).get("nofailover"):
                continue
            if name in self._res.members and not self._res.members[name].down:
                return name
        raise RuntimeError(f"{self.name}: no streaming replica can take over from {leader}")

    def _hand_over(self, action: str, candidate: str | None, timeout: float) -> Switchover:
        with self._lock:
            self._member_names_or_raise()
            old = self.wait_leader(timeout)
            entries = self._entries(self.cluster())
            if candidate is None:
                candidate = self._pick_candidate(entries, old)
            else:
                self._member(candidate)
                if candidate == old:
                    raise ValueError(f"{candidate} is the leader already")
            body = (
                {"leader": old, "candidate": candidate}
                if action == "switchover"
                else {"candidate": candidate}
            )
            answer: dict[str, Any] = {}

            def request() -> None:
                try:
                    answer["response"] = _http(
                        "POST", f"{self.rest_url(old)}/{action}", body, timeout=timeout
                    )
                except Exception as exc:  # reported by the poll below
                    answer["error"] = exc

            began = time.monotonic()
            thread = threading.Thread(target=request, name=f"{self.name}-{action}", daemon=True)
            thread.start()

            def promoted() -> bool:
                if "error" in answer:
                    raise RuntimeError(
                        f"{action} {old} -> {candidate}: POST failed: {answer['error']}"
                    )
                status, text = answer.get("response", (None, ""))
                if status is not None and (
                    status in (400, 412) or (status == 503 and "failed" in str(text).lower())
                ):
                    raise RuntimeError(
                        f"{action} {old} -> {candidate} refused by Patroni: HTTP {status} {text}"
                    )
                entry = self._entries(self.cluster()).get(candidate, {})
                if entry.get("role") != "leader" or entry.get("state") != "running":
                    return False
                return not self.query(candidate, "SELECT pg_is_in_recovery()")[0][0]

            try:
                self._poll(promoted, timeout, f"{candidate} to lead after the {action}")
                seconds = time.monotonic() - began
                remaining = max(1.0, timeout - seconds)
                self._poll(
                    lambda: self._streams_from(candidate, [old]),
                    remaining,
                    f"{old} streaming from {candidate} after the {action}",
                )
                settled = time.monotonic() - began
            finally:
                # Patroni answers within about a second of the new leader taking the key.
                thread.join(timeout=30)
            result = Switchover(action, old, candidate, seconds, settled)
            self.last_switchover = result
            log.info(
                "%s: %s %s -> %s: leader in %.2fs, settled in %.2fs",
                self.name,
                action,
                old,
                candidate,
                seconds,
                settled,
            )
            return result

    # ---------------------------------------------------------------- faults and membership

    def crash(self, member: str) -> None:
        """SIGKILL ``member``'s Patroni and its PostgreSQL (only those pids); wait until gone.

        A crashed leader keeps Patroni's leader key until ``ttl`` runs out; then a replica
        takes over (see :meth:`wait_leader`). :meth:`restart` brings the member back.
        """
        with self._lock:
            m = self._member(member)
            m.down = True
            m.kill()

    def restart(self, member: str, *, timeout: float = 120.0) -> None:
        """Start ``member``'s Patroni again (after :meth:`crash`); wait until it is healthy.

        Returns once the member leads (``running``) or streams from the leader.
        """
        with self._lock:
            m = self._member(member)
            if m.patroni_pid() is not None:
                raise RuntimeError(f"{member}'s Patroni is running; crash() it first")
            if m.postmaster_pid() is None:
                self._clear_stale(m)
            self._launch(m)
            self._wait_member(m, timeout)

    def _clear_stale(self, m: _Member) -> None:
        """Remove what a killed server left: lock files naming dead pids, shared memory.

        PostgreSQL takes a dead but unreaped (zombie) postmaster for a live one and would
        refuse to start; nothing of this member runs (checked by the caller).
        """
        if m.leftovers is not None:
            _release_shared_memory(*m.leftovers)
            m.leftovers = None
        with contextlib.suppress(FileNotFoundError):
            (m.data / "postmaster.pid").unlink()
        lock = self.directory / f".s.PGSQL.{m.pg_port}.lock"
        with contextlib.suppress(OSError, ValueError, IndexError):
            if not _alive(int(lock.read_text().split()[0])):
                lock.unlink()
                (self.directory / f".s.PGSQL.{m.pg_port}").unlink(missing_ok=True)

    def _wait_member(self, m: _Member, timeout: float) -> None:
        deadline = time.monotonic() + timeout

        def healthy() -> bool:
            entries = self._entries(self.cluster())
            leader = next((n for n, e in entries.items() if e.get("role") == "leader"), None)
            if leader is None:
                return False
            if leader == m.name:
                return entries[leader].get("state") == "running"
            return self._streams_from(leader, [m.name])

        self._poll(healthy, max(1.0, deadline - time.monotonic()), f"{m.name} to rejoin")

    def add_member(
        self,
        name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        *,
        timeout: float = 120.0,
    ) -> str:
        """Start one more member at runtime (a replica, cloned from the leader); return its name.

        Without ``name``, the next free ``nN``. Returns once it streams from the leader.
        """
        with self._lock:
            self._member_names_or_raise()
            if name is None:
                i = len(self._res.members) + 1
                while f"n{i}" in self._res.members:
                    i += 1
                name = f"n{i}"
            if name in self._res.members:
                raise ValueError(f"{self.name} has a member {name!r} already")
            if not name or not all(c.isalnum() or c in "-_" for c in name):
                raise ValueError(f"member names are letters, digits, '-' and '_': {name!r}")
            m = self._new_member(name, tags or {})
            self._launch(m)
            self._wait_member(m, timeout)
            return name

    def remove_member(self, member: str, *, timeout: float = 60.0) -> None:
        """Stop a replica member for good and drop it from Patroni's view and the directory.

        Patroni keeps a stopped member's key until its lease ends (``ttl``); this deletes it
        from etcd so ``GET /cluster`` forgets the member at once. The leader cannot be
        removed: :meth:`switchover` first.
        """
        with self._lock:
            m = self._member(member)
            if self.leader() == member:
                raise RuntimeError(f"{member} is the leader; switchover() first")
            m.down = True
            pid = m.patroni_pid()
            if pid is not None:
                os.kill(pid, signal.SIGTERM)  # Patroni stops its PostgreSQL (fast) and exits
                with contextlib.suppress(subprocess.TimeoutExpired):
                    if m.proc is not None:
                        m.proc.wait(timeout=timeout)
            if m.pids():
                m.kill()
            key = f"/service/{self.name}/members/{member}".encode()
            status, body = _http(
                "POST",
                f"{self.etcd_url}/v3/kv/deleterange",
                {"key": base64.b64encode(key).decode()},
            )
            if status != 200:
                raise RuntimeError(f"etcd refused to delete {key.decode()}: {status} {body}")
            self._poll(
                lambda: member not in self._entries(self.cluster()),
                timeout,
                f"{member} to leave /cluster",
            )
            del self._res.members[member]
            shutil.rmtree(m.home, ignore_errors=True)

    def set_tags(self, member: str, tags: Mapping[str, Any], *, timeout: float = 30.0) -> None:
        """Make ``tags`` the member's Patroni tags: rewrite its YAML and reload (SIGHUP).

        Returns once ``GET /cluster`` shows them (false boolean tags show as absent). On a
        crashed member, the tags apply when it is restarted.
        """
        with self._lock:
            m = self._member(member)
            before, m.tags = m.tags, dict(tags)
            self._write_config(m)
            pid = m.patroni_pid()
            if pid is None:
                return
            os.kill(pid, signal.SIGHUP)

            def shown() -> bool:
                current = self._entries(self.cluster()).get(member, {}).get("tags", {})
                for key in set(before) | set(m.tags):
                    if key in _BOOL_TAGS and not m.tags.get(key):
                        if current.get(key):
                            return False
                    elif key not in m.tags:
                        if key in current:  # a custom tag that was dropped
                            return False
                    elif current.get(key) != m.tags[key]:
                        return False
                return True

            self._poll(shown, timeout, f"tags {m.tags} on {member}")
