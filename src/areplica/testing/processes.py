"""Starting, watching, stopping and owning the processes of the test harness.

:class:`ProcessOwner` owns one temporary directory and everything started for it: programs
it spawned (:class:`Spawned`, known by the pid ``Popen`` returned), PostgreSQL servers
(:class:`Postmaster`, known by the pid in their ``postmaster.pid``) and whatever else must be
closed with it (proxies, daemons). Its :meth:`~ProcessOwner.close` (which the owning object
also runs on a failed start, when it is garbage collected, and at interpreter exit as a
backstop) stops all of them, frees the shared memory of servers that were SIGKILLed, and
removes the directory.

:class:`ServiceAccount` runs programs as the unprivileged user the servers run as when we
are root (PostgreSQL and PgBouncer refuse to run as root), or as ourselves otherwise.

Every signal goes to a pid this harness started, or read from a pid file of its own and
checked in ``/proc``; nothing is ever looked up or signalled by name.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import pwd
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._install import relocate_install

__all__ = [
    "HOST",
    "Postmaster",
    "ProcessOwner",
    "ServiceAccount",
    "SetupError",
    "SharedMemory",
    "Spawned",
    "alive",
    "children",
    "file_size",
    "free_port",
    "freeze",
    "proc_state",
    "send",
    "stop_servers",
    "tail",
    "wait_gone",
    "wait_listening",
    "wait_stopped",
    "working_directory",
]

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
#: Room a PostgreSQL socket name takes after its directory ("/.s.PGSQL.65535.lock").
_SOCKET_NAME_ROOM = len("/.s.PGSQL.65535.lock")
_SOCKET_PATH_MAX = 107


class SetupError(RuntimeError):
    """This machine cannot run the topology as it is; the one-line message says what to do.

    The ``areplica`` command and the pytest plugin print it without a traceback.
    """


# --------------------------------------------------------------------------------------
# Processes, read from /proc


def proc_state(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of a live process, or None when gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    if len(fields) < 2 or fields[0] in ("Z", "X", "x"):
        return None
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting to be reaped is not)."""
    return proc_state(pid) is not None


def children(pid: int) -> list[int]:
    """The live children of ``pid``, sorted."""
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            state = proc_state(int(entry))
            if state is not None and state[1] == pid:
                found.append(int(entry))
    return sorted(found)


def working_directory(pid: int) -> str | None:
    """``pid``'s working directory; "" when we may not look, None when it is gone."""
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except PermissionError:
        return ""
    except OSError:
        return None


def send(pids: Iterable[int], sig: signal.Signals) -> None:
    """Send ``sig`` to each of ``pids``; one that is gone already is skipped."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def wait_gone(pids: Sequence[int], timeout: float) -> bool:
    """Wait until none of ``pids`` is alive; False if some still are after ``timeout``."""
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Wait until ``pid`` is in the stopped state (SIGSTOP is delivered asynchronously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = proc_state(pid)
        if state is None or state[0] in ("T", "t"):
            return
        time.sleep(0.002)


def freeze(pid: int) -> list[int]:
    """SIGSTOP ``pid`` (so that it forks nothing more); return it and its children."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGSTOP)
    wait_stopped(pid)
    return [pid, *children(pid)]


# --------------------------------------------------------------------------------------
# Ports

# Ports handed out by this process, so that two servers never get the same one.
_ports_lock = threading.Lock()
_ports_given: set[int] = set()


def free_port() -> int:
    """A free TCP port of 127.0.0.1 that this process has not handed out before."""
    with _ports_lock:
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((HOST, 0))
                port: int = s.getsockname()[1]
            if port not in _ports_given:
                _ports_given.add(port)
                return port
    raise RuntimeError("no free port on 127.0.0.1")


def wait_listening(port: int, timeout: float, host: str = HOST) -> bool:
    """Whether a TCP connection to ``host:port`` succeeds within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


# --------------------------------------------------------------------------------------
# Files


def tail(path: Path, start: int = 0, limit: int = 4000) -> str:
    """The end of a log file (at most ``limit`` bytes, none before ``start``)."""
    try:
        with path.open("rb") as f:
            f.seek(max(start, path.stat().st_size - limit))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


def file_size(path: Path) -> int:
    """The size of ``path`` (0 when missing): where a new run's log lines will start."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _tmp_parent() -> str | None:
    """``$AREPLICA_TMPDIR`` when set (e.g. /dev/shm), else the system's temporary folder."""
    return os.environ.get("AREPLICA_TMPDIR", "").strip() or None


# --------------------------------------------------------------------------------------
# Shared memory a SIGKILLed PostgreSQL server leaves behind

_DSM_CONTROL_MAGIC = 0x9A503D32


@dataclass(frozen=True)
class SharedMemory:
    """SysV segment keys and POSIX (``/dev/shm``) segment files of a server."""

    keys: frozenset[int] = frozenset()
    files: frozenset[str] = frozenset()

    @classmethod
    def mapped_by(cls, pids: Sequence[int]) -> SharedMemory:
        """What ``pids`` map (from /proc/PID/maps), with the DSM segments listed in control."""
        keys: set[int] = set()
        files: set[str] = set()
        for pid in pids:
            try:
                maps = Path(f"/proc/{pid}/maps").read_text()
            except OSError:
                continue
            for line in maps.splitlines():
                parts = line.split(None, 5)
                name = parts[5] if len(parts) == 6 else ""
                if name.startswith("/SYSV"):
                    with contextlib.suppress(ValueError):
                        keys.add(int(name[5:13], 16))
                elif name.startswith("/dev/shm/PostgreSQL."):
                    files.add(name.split()[0])
        for name in list(files):
            files |= _dsm_segments(name)
        return cls(frozenset(keys), frozenset(files))

    def release(self) -> None:
        """Remove the files, and the SysV segments nobody is attached to any more."""
        for name in self.files:
            with contextlib.suppress(OSError):
                os.unlink(name)
        if self.keys:
            _remove_unattached_segments(self.keys)


def _dsm_segments(control: str) -> set[str]:
    """Segment files listed in a DSM control segment (also those nobody maps right now).

    The layout is PostgreSQL's ``dsm_control_header``: magic, nitems, maxitems, then items
    starting with (handle, refcnt); items are 40 bytes since 14, 24 before. Anything that
    does not add up is ignored.
    """
    try:
        with open(control, "rb") as f:
            data = f.read()
    except OSError:
        return set()
    if len(data) < 16:
        return set()
    magic, nitems, maxitems = struct.unpack_from("=III", data, 0)
    if magic != _DSM_CONTROL_MAGIC or not 0 < maxitems or nitems > maxitems:
        return set()
    item_size = (len(data) - 16) // maxitems
    if item_size not in (24, 40) or 16 + item_size * maxitems != len(data):
        return set()
    found: set[str] = set()
    for i in range(nitems):
        handle, refcnt = struct.unpack_from("=II", data, 16 + i * item_size)
        if refcnt:
            found.add(f"/dev/shm/PostgreSQL.{handle}")
    return found


def _remove_unattached_segments(keys: frozenset[int]) -> None:
    try:
        table = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
        libc = ctypes.CDLL(None, use_errno=True)
    except (OSError, AttributeError):
        return
    for row in table:
        fields = row.split()
        with contextlib.suppress(ValueError, IndexError):
            key, shmid, nattch = int(fields[0]) & 0xFFFFFFFF, int(fields[1]), int(fields[6])
            if key in keys and nattch == 0:
                libc.shmctl(ctypes.c_int(shmid), ctypes.c_int(0), None)  # IPC_RMID


# --------------------------------------------------------------------------------------
# Running programs as the service user


class ServiceAccount:
    """Runs programs as ``user`` (we are root: the servers' unprivileged user) or as ourselves.

    Programs get ``home`` as their working directory (and as ``HOME`` when run as ``user``),
    ``LC_ALL=C``, and our environment without libpq's ``PG*`` variables.
    """

    def __init__(self, user: pwd.struct_passwd | None, home: Path) -> None:
        self.user = user
        self.home = home

    def __repr__(self) -> str:
        return f"<ServiceAccount {self.name or 'current user'} home={str(self.home)!r}>"

    @property
    def name(self) -> str | None:
        """The user's name (None: programs run as the current user)."""
        return self.user.pw_name if self.user is not None else None

    @property
    def as_other_user(self) -> bool:
        """Whether programs run as another user than ours."""
        return self.user is not None

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Our environment without libpq's PG* variables, plus ``extra``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        if self.as_other_user:
            env["HOME"] = str(self.home)
        env.update(extra or {})
        return env

    def chown(self, path: Path) -> None:
        """Give ``path`` to the user (nothing when programs run as ourselves)."""
        if self.user is not None:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def make_dir(self, path: Path, mode: int = 0o700) -> Path:
        """Create the folder ``path``, the user's."""
        path.mkdir(mode=mode)
        self.chown(path)
        return path

    def write_private(self, path: Path, text: str) -> Path:
        """Write ``path`` atomically, mode 0600, readable by the user only."""
        tmp = path.with_name(path.name + ".new")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        self.chown(tmp)
        os.replace(tmp, path)
        return path

    def _as_user(self) -> dict[str, Any]:
        if self.user is None:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}

    def run(
        self,
        args: Sequence[str],
        timeout: float = 120.0,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a program to its end; raise RuntimeError (with its output) when it fails.

        ``env`` adds variables (e.g. ``PGPASSWORD`` for a client program: never in argv).
        """
        try:
            done = subprocess.run(
                list(args),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                env=self.env(env),
                cwd=str(self.home),
                **self._as_user(),
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"{Path(args[0]).name} took more than {timeout}s") from exc
        if done.returncode != 0:
            output = "\n".join(p for p in (done.stdout.strip(), done.stderr.strip()) if p)
            raise RuntimeError(
                f"{Path(args[0]).name} failed (exit {done.returncode}): "
                f"{shlex.join(args)}\n{output}"
            )
        return done

    def spawn(
        self, args: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a long-running program, its output appended to ``log_path``.

        It gets a session (and process group) of its own: a Ctrl-C of the test run does not
        reach it before the harness stops it.
        """
        with log_path.open("ab") as out:
            self.chown(log_path)
            return subprocess.Popen(
                list(args),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=str(self.home),
                env=dict(env) if env is not None else self.env(),
                start_new_session=True,
                **self._as_user(),
            )

    def can_run(self, program: Path) -> bool:
        """Whether ``program --version`` works for the user."""
        try:
            done = subprocess.run(
                [str(program), "--version"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=30,
                check=False,
                env=self.env(),
                cwd=str(self.home),
                **self._as_user(),
            )
        except (OSError, subprocess.SubprocessError):
            return False
        return done.returncode == 0

    def reachable(self, bin_dir: Path, programs: Sequence[str], dest: Path) -> Path | None:
        """A folder with ``bin_dir``'s ``programs`` that the user can run, or None.

        ``bin_dir`` itself when it can; else a copy (hard links where allowed) of its
        installation made under ``dest``.
        """
        if all(self.can_run(bin_dir / p) for p in programs):
            return bin_dir
        relocated = relocate_install(bin_dir, dest)
        if not all(self.can_run(relocated / p) for p in programs):
            return None
        log.debug("binaries from %s made reachable in %s", bin_dir, relocated)
        return relocated


# --------------------------------------------------------------------------------------
# What the harness started


class Spawned:
    """A long-running program the harness started, known by its pid (never by its name).

    ``stop_signal`` asks it to stop, and what is left of the process group it leads after
    ``stop_timeout`` seconds is SIGKILLed; SIGKILL kills it and its children at once (so it
    starts nothing more), and nothing else.

    Once it has exited it is left unreaped (a zombie) until :meth:`stop`: meanwhile its pid,
    which is also its process group's id, cannot be given to another process, so signalling
    that group can only reach what it started.
    """

    def __init__(
        self,
        name: str,
        popen: subprocess.Popen[bytes],
        log_path: Path,
        *,
        stop_signal: signal.Signals = signal.SIGTERM,
        stop_timeout: float = 10.0,
    ) -> None:
        self.name = name
        self.popen = popen
        self.log_path = log_path
        self.log_start = 0
        self.stop_signal = stop_signal
        self.stop_timeout = stop_timeout

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited ({self.popen.returncode})"
        return f"<Spawned {self.name!r} pid={self.pid} {state}>"

    @property
    def pid(self) -> int:
        """The pid it was started with."""
        return self.popen.pid

    @property
    def running(self) -> bool:
        """Whether it has not exited yet."""
        return self.returncode is None

    @property
    def returncode(self) -> int | None:
        """Its exit status (-N: killed by signal N; None while it runs), without reaping it."""
        if self.popen.returncode is not None:
            return self.popen.returncode
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped already
            return self.popen.poll()
        if info is None:
            return None
        killed = info.si_code in (os.CLD_KILLED, os.CLD_DUMPED)
        return -info.si_status if killed else info.si_status

    def pids(self) -> list[int]:
        """It and its children, when it runs."""
        return [self.pid, *children(self.pid)] if self.running else []

    def log_tail(self, limit: int = 4000) -> str:
        """The end of what it wrote since it started."""
        return tail(self.log_path, self.log_start, limit)

    def send_signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to it (by its pid), if it runs."""
        if self.running:
            send([self.pid], sig)

    def wait(self, timeout: float) -> bool:
        """Whether it exits within ``timeout`` seconds (left unreaped, see the class)."""
        deadline = time.monotonic() + timeout
        while self.running:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def stop(self, timeout: float | None = None) -> None:
        """Stop it by its pid (``stop_signal``, then SIGKILL to its process group); reap it."""
        if self.stop_signal == signal.SIGKILL:
            self.kill()  # its tree only: what it started in a session of its own lives on
        else:
            if self.running:
                self.send_signal(self.stop_signal)
                self.wait(self.stop_timeout if timeout is None else timeout)
            self._kill_group()  # it, if it lingers, and children that outlived it
        self._reap()

    def kill(self, timeout: float = 15.0) -> list[int]:
        """SIGKILL it and its children (stopped first, so none forks); return their pids."""
        if not self.running:
            return []
        victims = freeze(self.pid)
        send(victims, signal.SIGKILL)
        if not wait_gone(victims, timeout):
            raise RuntimeError(f"{self.name}: processes {victims} survived SIGKILL")
        # A zombie whose other threads still exit is not waitable yet: wait until it is.
        self.wait(5.0)
        return victims

    def _kill_group(self) -> None:
        """SIGKILL its process group (its id is its pid: started with start_new_session)."""
        if self.popen.returncode is not None:
            return  # reaped: the id may name another process group by now
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def _reap(self) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)


@dataclass
class Postmaster:
    """A PostgreSQL server's processes, found by the pid in its ``postmaster.pid``.

    A pid counts only while it is alive and works in ``data`` (checked in /proc), so a pid
    reused by another program is never taken for the server. ``leftovers`` is what a
    SIGKILLed server left in shared memory, freed when it starts again or at close.
    """

    name: str
    data: Path
    seen: list[int] = field(default_factory=list)  # postmaster pids seen, newest first
    leftovers: SharedMemory | None = None

    def pid(self) -> int | None:
        """The live postmaster's pid, or None."""
        candidates: list[int] = []
        with contextlib.suppress(OSError, ValueError, IndexError):
            candidates.append(int((self.data / "postmaster.pid").read_text().split()[0]))
        candidates += self.seen
        data = os.path.realpath(self.data)
        for pid in candidates:
            if not alive(pid):
                continue
            cwd = working_directory(pid)
            # "": we may not look; a live pid from our own pid file is trusted.
            if cwd is None or (cwd and cwd != data):
                continue  # gone meanwhile, or a reused pid: not our server
            if pid in self.seen:
                self.seen.remove(pid)
            self.seen.insert(0, pid)
            return pid
        return None

    def pids(self) -> list[int]:
        """The postmaster, then its children (empty when it is down)."""
        pid = self.pid()
        return [] if pid is None else [pid, *children(pid)]

    def kill(self, timeout: float = 10.0) -> list[int]:
        """SIGKILL the server (children first), keep its shared memory to free; the pids.

        Empty when it was not running.
        """
        pid = self.pid()
        if pid is None:
            return []
        pids = freeze(pid)
        self.leftovers = SharedMemory.mapped_by(pids)
        send(pids[1:], signal.SIGKILL)
        send(pids[:1], signal.SIGKILL)
        if not wait_gone(pids, timeout):
            raise RuntimeError(f"{self.name}: processes {pids} survived SIGKILL")
        return pids

    def hang(self) -> list[int]:
        """SIGSTOP every process of the server (postmaster first); return them."""
        pid = self.pid()
        if pid is None:
            raise RuntimeError(f"{self.name} is not running")
        pids = freeze(pid)
        send(pids[1:], signal.SIGSTOP)
        for child in pids[1:]:
            wait_stopped(child)
        return pids

    def resume(self) -> None:
        """SIGCONT every process of the server (children first)."""
        pids = self.pids()
        send(pids[1:], signal.SIGCONT)
        send(pids[:1], signal.SIGCONT)

    def clear_stale(self, socket_dir: Path, port: int) -> None:
        """Before a restart: free what a killed server left, remove its stale lock files.

        PostgreSQL takes a dead but unreaped (zombie) postmaster for a live one and would
        refuse to start; the caller has checked that nothing of this server runs.
        """
        self.release_leftovers()
        with contextlib.suppress(FileNotFoundError):
            (self.data / "postmaster.pid").unlink()
        lock = socket_dir / f".s.PGSQL.{port}.lock"
        with contextlib.suppress(OSError, ValueError, IndexError):
            if not alive(int(lock.read_text().split()[0])):
                lock.unlink()
                (socket_dir / f".s.PGSQL.{port}").unlink(missing_ok=True)

    def release_leftovers(self) -> None:
        """Free the shared memory a SIGKILLed server left (once)."""
        leftovers, self.leftovers = self.leftovers, None
        if leftovers is not None:
            leftovers.release()


def stop_servers(
    servers: Sequence[Postmaster], steps: Sequence[tuple[signal.Signals, float]]
) -> list[str]:
    """Stop PostgreSQL servers by their postmasters' pids; the names of those that ran.

    Each ``(signal, seconds)`` step is sent to the postmasters still alive, until every
    process of theirs is gone (SIGINT: fast shutdown, SIGQUIT: immediate, which also frees
    shared memory). Whatever is left then is SIGKILLed by pid, and the shared memory it
    held freed, as is that of servers killed earlier and never restarted.
    """
    running = {s.name: (s, s.pids()) for s in servers}
    for server, pids in running.values():
        if not pids:
            server.release_leftovers()
    running = {name: (s, pids) for name, (s, pids) in running.items() if pids}
    everything = [pid for _s, pids in running.values() for pid in pids]
    send(everything, signal.SIGCONT)  # a SIGSTOPped server would act on nothing else
    postmasters = [pids[0] for _s, pids in running.values()]
    for sig, seconds in steps:
        send([p for p in postmasters if alive(p)], sig)
        if wait_gone(everything, seconds):
            return sorted(running)
    for server, _pids in running.values():
        with contextlib.suppress(RuntimeError):  # what survives is SIGKILLed again below
            server.kill()
    send([p for p in everything if alive(p)], signal.SIGKILL)
    wait_gone(everything, 10.0)
    for server, _pids in running.values():
        server.release_leftovers()
    return sorted(running)


# --------------------------------------------------------------------------------------
# The owner


class ProcessOwner:
    """Owns one temporary directory and every process and resource started for it.

    :meth:`open` creates the directory; from then on :meth:`close` also runs at interpreter
    exit. The object that owns this one (a topology, a daemon) runs :meth:`close` from its
    own ``close()``, on a failed start, and from a ``weakref.finalize`` (this object never
    refers back to it, so that it can be collected).

    :meth:`close` runs the callbacks of :meth:`on_close` and stops the programs of
    :meth:`spawn`, newest first; then it stops every :meth:`track`-ed PostgreSQL server
    (immediate shutdown, then SIGKILL by pid), and removes the directory. Idempotent.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self.closed = False
        self._detached = False
        self.directory: Path | None = None
        self.account: ServiceAccount | None = None
        self._stack: list[Spawned | Callable[[], None]] = []
        self._servers: list[Postmaster] = []

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open" if self.directory else "new"
        return f"<ProcessOwner {self.name!r} {state} {self.directory or ''}>"

    def open(
        self, prefix: str, user: pwd.struct_passwd | None, *, sockets: bool = False
    ) -> ServiceAccount:
        """Create the directory (under ``$AREPLICA_TMPDIR`` when set) and the account.

        ``sockets``: PostgreSQL's Unix sockets go there, so its path must be short enough.
        """
        if self.closed:
            raise RuntimeError(f"{self.name} was closed")
        if self.directory is not None:
            raise RuntimeError(f"{self.name} is open already")
        self.directory = Path(tempfile.mkdtemp(prefix=prefix, dir=_tmp_parent()))
        atexit.register(self.close)
        if sockets and len(str(self.directory)) + _SOCKET_NAME_ROOM > _SOCKET_PATH_MAX:
            raise SetupError(
                f"{self.directory} is too long a path for PostgreSQL's Unix socket: "
                "set AREPLICA_TMPDIR (or TMPDIR) to a shorter folder"
            )
        self.account = ServiceAccount(user, self.directory)
        self.account.chown(self.directory)
        return self.account

    def need_account(self) -> ServiceAccount:
        """The account (RuntimeError before :meth:`open` or after :meth:`close`)."""
        if self.account is None or self.closed:
            raise RuntimeError(f"{self.name} is not running")
        return self.account

    def spawn(
        self,
        name: str,
        args: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
        stop_timeout: float = 10.0,
    ) -> Spawned:
        """Start a long-running program as the account's user; it is stopped by close()."""
        log_start = file_size(log_path)
        popen = self.need_account().spawn(args, log_path, env)
        spawned = Spawned(name, popen, log_path, stop_signal=stop_signal, stop_timeout=stop_timeout)
        spawned.log_start = log_start
        with self._lock:
            self._stack.append(spawned)
        return spawned

    def track(self, server: Postmaster) -> Postmaster:
        """Stop ``server`` at close (once it may be running); returns it."""
        with self._lock:
            if server not in self._servers:
                self._servers.append(server)
        return server

    def on_close(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` at close, before the servers stop (newest first)."""
        with self._lock:
            self._stack.append(callback)

    def detach(self) -> Path:
        """Leave everything running past this object and the interpreter; the directory."""
        if self.directory is None:
            raise RuntimeError(f"{self.name} is not running")
        with self._lock:
            self._detached = True
        atexit.unregister(self.close)
        return self.directory

    def close(self) -> None:
        """Stop everything, free the shared memory left, remove the directory. Idempotent."""
        with self._lock:
            if self.closed or self._detached:
                return
            self.closed = True
            stack, self._stack = self._stack, []
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        try:
            for item in reversed(stack):
                self._close_one(item)
            stop_servers(self._servers, [(signal.SIGQUIT, 10.0)])
        finally:
            if self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)

    def _close_one(self, item: Spawned | Callable[[], None]) -> None:
        try:
            if isinstance(item, Spawned):
                item.stop()
            else:
                item()
        except Exception:  # the rest must be stopped all the same
            log.exception("%s: closing %r failed", self.name, item)
