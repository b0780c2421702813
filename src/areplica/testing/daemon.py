"""One long-running program in front of the servers: the wrapper PgBouncer, HAProxy and the
benchmarks' Pgpool-II share.

A :class:`Daemon` runs its program in the foreground, in a session of its own, from a
configuration it writes into a temporary folder of its own (with the program's log), on
free ports of 127.0.0.1 (picked again when one was taken meanwhile). It is stopped, or
killed, by the pid it was started with, never by name; it can be started again on the same
ports. :meth:`~Daemon.close` (also run when it is garbage collected, at interpreter exit,
or with the topology it is attached to) stops it and removes the folder.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import psycopg2

from ._support import TopologyLifecycle
from .processes import ProcessOwner, Spawned, free_port, wait_listening

__all__ = ["Daemon", "DaemonUnavailable", "find_program"]

_PORT_ATTEMPTS = 5


class DaemonUnavailable(RuntimeError):
    """The program is missing, rejected its configuration, or did not start; says why."""


def find_program(name: str) -> str | None:
    """``name`` on PATH, else in ``/usr/sbin`` or ``/sbin`` (Debian's daemons), or None."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which(name, path=path)


class Daemon(TopologyLifecycle):
    """A long-running program with a folder of its own, stopped by its pid.

    A subclass says what to run: :meth:`_configure` writes the configuration into the folder
    (on ports it takes with :meth:`_port`) and returns the command line; :meth:`_ready` says
    when the program serves (by default: once every port accepts TCP connections).

    ``user`` is the operating-system user to run it as (None: ourselves); the folder is
    theirs. ``attach`` (e.g. a topology's ``on_close``) is handed the cleanup on the first
    start, so that the daemon stops with what it is attached to. Use as a context manager
    (sync or async), or call :meth:`start` and :meth:`close`; :meth:`stop` and :meth:`kill`
    end the process only, and :meth:`start` runs it again with the same configuration.
    """

    #: The program's name: its folder's prefix, its log's name, its messages'.
    program = "daemon"
    #: What :meth:`start` raises when the program does not start.
    unavailable: type[DaemonUnavailable] = DaemonUnavailable
    #: How :meth:`stop` asks it to stop, and how long it is given before SIGKILL.
    stop_signal = signal.SIGTERM
    stop_timeout = 10.0

    def __init__(
        self,
        executable: str,
        *,
        name: str | None = None,
        user: str | None = None,
        attach: Callable[[Callable[[], None]], None] | None = None,
    ) -> None:
        self.executable = executable
        self.name = name or self.program
        self.user = user
        self._attach = attach
        self.ports: dict[str, int] = {}
        self._args: list[str] = []
        self._owner: ProcessOwner | None = None
        self._finalizer: weakref.finalize[[], Daemon] | None = None
        self._process: Spawned | None = None

    def __repr__(self) -> str:
        state = "closed" if self.closed else "running" if self.running else "stopped"
        ports = " ".join(f"{k}={v}" for k, v in self.ports.items())
        return f"<{type(self).__name__} {self.name!r} {state} pid={self.pid} {ports}>".replace(
            "  ", " "
        )

    # ---------------------------------------------------------------- state

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran (it cannot start again)."""
        return self._owner is not None and self._owner.closed

    @property
    def running(self) -> bool:
        """Whether the process runs."""
        return self._process is not None and self._process.running

    @property
    def pid(self) -> int | None:
        """The pid of the running process (None when it does not run)."""
        return self._process.pid if self._process is not None and self.running else None

    @property
    def folder(self) -> Path:
        """The folder holding its configuration and log (removed by :meth:`close`)."""
        if self._owner is None or self._owner.directory is None or self.closed:
            raise RuntimeError(f"{self.name} is not started")
        return self._owner.directory

    @property
    def log_path(self) -> Path:
        """The program's output."""
        return self.folder / f"{self.program}.log"

    def log_tail(self, limit: int = 600) -> str:
        """The last lines the program wrote, on one line."""
        if self._process is None:
            return ""
        return " | ".join(self._process.log_tail(limit * 4).splitlines()[-5:])[-limit:]

    # ---------------------------------------------------------------- what subclasses say

    def _configure(self, folder: Path) -> list[str]:
        """Write the configuration into ``folder``; the command line to run."""
        raise NotImplementedError

    def _ready(self) -> bool:
        """Whether the program serves: every port accepts a TCP connection."""
        return all(wait_listening(port, 0.0) for port in self.ports.values())

    def _port(self, key: str) -> int:
        """A free port for ``key`` (picked once per configuration)."""
        self.ports[key] = free_port()
        return self.ports[key]

    def _write(self, name: str, text: str) -> Path:
        """Write a file of the configuration, readable by the program's user only."""
        return self._need_owner().need_account().write_private(self.folder / name, text)

    # ---------------------------------------------------------------- life cycle

    def _need_owner(self) -> ProcessOwner:
        if self._owner is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._owner

    def _open(self) -> ProcessOwner:
        """Create the owner of the folder and the processes (first start only)."""
        owner = self._owner = ProcessOwner(f"{type(self).__name__} {self.name}")
        self._finalizer = weakref.finalize(self, owner.close)
        if self._attach is not None:
            self._attach(owner.close)  # the owner only: what it closes never refers to us
        owner.open(f"areplica-{self.program}-", _user_entry(self.user))
        return owner

    def start(self, timeout: float = 30.0) -> None:
        """Start the program; return once it serves. Raises :attr:`unavailable` otherwise.

        The first start writes the configuration (on other ports if one was taken
        meanwhile); a start after :meth:`stop` or :meth:`kill` reuses it. A failed first
        start removes everything.
        """
        if self.closed:
            raise RuntimeError(f"{self.name} was closed; create a new one")
        if self.running:
            raise RuntimeError(f"{self.name} is started already")
        first = self._owner is None
        try:
            owner = self._open() if first else self._need_owner()
            for attempt in range(_PORT_ATTEMPTS if first else 1):
                if first:
                    self._args = self._configure(self.folder)
                if self._spawn_and_wait(owner, timeout):
                    return
                taken = "address already in use" in self.log_tail(4000).lower()
                if not (first and taken and attempt < _PORT_ATTEMPTS - 1):
                    raise self._failed(timeout)
        except BaseException:
            if first:
                self.close()
            raise

    def _spawn_and_wait(self, owner: ProcessOwner, timeout: float) -> bool:
        process = self._process = owner.spawn(
            self.name,
            self._args,
            self.log_path,
            stop_signal=self.stop_signal,
            stop_timeout=self.stop_timeout,
        )
        deadline = time.monotonic() + timeout
        while process.running:
            try:
                if self._ready():
                    return True
            except (OSError, psycopg2.Error):
                pass  # not yet
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        process.kill()
        return False

    def _failed(self, timeout: float) -> DaemonUnavailable:
        process = self._process
        code = process.returncode if process is not None else None
        how = f"exited with {code}" if code not in (None, -signal.SIGKILL) else "did not serve"
        return self.unavailable(
            f"{self.name} ({self.executable}) {how} within {timeout}s: {self.log_tail()}"
        )

    def stop(self, timeout: float | None = None) -> None:
        """Stop the process by its pid (``stop_signal``, then SIGKILL); keep the folder."""
        if self._process is not None:
            self._process.stop(timeout)

    def kill(self) -> None:
        """SIGKILL the process (and its children) by pid, at once; keep the folder."""
        if self._process is not None:
            self._process.kill()

    def close(self) -> None:
        """Stop the process and remove the folder. Idempotent."""
        if self._finalizer is not None:
            self._finalizer()


def _user_entry(name: str | None) -> pwd.struct_passwd | None:
    return pwd.getpwnam(name) if name is not None else None
