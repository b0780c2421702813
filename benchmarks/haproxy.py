"""HAProxy as a benchmark peer: Patroni's REST health checks in front of its members.

The setup Patroni users deploy instead of a replica-aware client: one listener for writes
whose servers are every member, checked with ``GET /primary`` on the member's Patroni REST
port (only the leader answers 200), and one for reads checked with ``GET /replica``
(``balance roundrobin``). A server that fails ``fall`` checks in a row is marked down and,
with ``on-marked-down shutdown-sessions``, its open sessions are cut; ``rise`` good checks
bring it back.

HAProxy runs in the foreground (``haproxy -db -f CONF``) from a configuration generated in
a temporary folder of its own (configuration, admin socket, log), in its own process group,
and is stopped by the pid it was started with (SIGTERM: hard stop, then SIGKILL to that
process group if it lingers). Nothing is ever looked up or signalled by name.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Backend",
    "HAProxy",
    "HAProxyUnavailable",
    "find_executable",
    "version",
    "wait_listening",
]

HOST = "127.0.0.1"
WRITE = "pg_write"  # the listener (HAProxy proxy) for writes: GET /primary
READ = "pg_read"  # the listener for reads: GET /replica


class HAProxyUnavailable(RuntimeError):
    """HAProxy is missing or could not start; the message says why."""


@dataclass(frozen=True)
class Backend:
    """One Patroni member: its PostgreSQL port and its REST API port (the check port)."""

    name: str
    pg_port: int
    rest_port: int
    host: str = HOST


def find_executable() -> str | None:
    """The ``haproxy`` executable (PATH, then Debian's ``/usr/sbin/haproxy``), or None."""
    found = shutil.which("haproxy")
    if found:
        return found
    return "/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None


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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_listening(host: str, port: int, timeout: float = 10.0) -> None:
    """Return once a TCP connection to ``host:port`` succeeds; ``TimeoutError`` otherwise."""
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as exc:
            last = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s ({last})")
        time.sleep(0.05)


class HAProxy:
    """One HAProxy with a write listener and a read listener over ``backends``.

    ``inter``, ``fall`` and ``rise`` go to ``default-server`` of both listeners (check every
    ``inter`` seconds; down after ``fall`` failed checks, up after ``rise`` good ones).
    """

    def __init__(
        self,
        executable: str,
        backends: list[Backend],
        *,
        inter: float = 1.0,
        fall: int = 2,
        rise: int = 1,
        maxconn: int = 200,
        name: str = "haproxy",
    ) -> None:
        if not backends:
            raise ValueError("HAProxy needs at least one backend")
        self.executable = executable
        self.backends = list(backends)
        self.inter = inter
        self.fall = fall
        self.rise = rise
        self.maxconn = maxconn
        self.name = name
        self.write_port = 0
        self.read_port = 0
        self.tmpdir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.config_text = ""

    def __repr__(self) -> str:
        state = "running" if self.pid is not None else "stopped"
        return (
            f"<HAProxy {self.name!r} {state} write={self.write_port} read={self.read_port} "
            f"pid={self.pid}>"
        )

    def __enter__(self) -> HAProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    @property
    def _socket(self) -> Path:
        if self.tmpdir is None:
            raise RuntimeError(f"{self.name} is not started")
        return self.tmpdir / "admin.sock"

    def config(self, admin_socket: Path) -> str:
        """The configuration: Patroni's sample layout, with the check timings of this object."""
        inter_ms = round(self.inter * 1000)
        default_server = (
            f"default-server inter {inter_ms}ms fall {self.fall} rise {self.rise} "
            "on-marked-down shutdown-sessions"
        )
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
        for proxy, port, check, extra in (
            (WRITE, self.write_port, "/primary", []),
            (READ, self.read_port, "/replica", ["    balance roundrobin"]),
        ):
            lines += [
                "",
                f"listen {proxy}",
                f"    bind {HOST}:{port}",
                *extra,
                f"    option httpchk GET {check}",
                "    http-check expect status 200",
                f"    {default_server}",
            ]
            lines += [
                f"    server {b.name} {b.host}:{b.pg_port} maxconn {self.maxconn} "
                f"check port {b.rest_port}"
                for b in self.backends
            ]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 15.0) -> None:
        """Write the configuration, check it, start HAProxy, wait until both ports listen."""
        if self.proc is not None:
            raise RuntimeError(f"{self.name} is started already")
        self.tmpdir = Path(tempfile.mkdtemp(prefix="bench-haproxy-"))
        atexit.register(self.stop)
        tmp = self.tmpdir
        self.write_port = _free_port()
        self.read_port = _free_port()
        while self.read_port == self.write_port:
            self.read_port = _free_port()
        self.config_text = self.config(tmp / "admin.sock")
        conf = tmp / "haproxy.cfg"
        conf.write_text(self.config_text)
        try:
            checked = subprocess.run(
                [self.executable, "-c", "-q", "-f", str(conf)],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise HAProxyUnavailable(f"{self.executable} -c failed: {exc}") from exc
        if checked.returncode != 0:
            tail = " | ".join((checked.stderr or checked.stdout).strip().splitlines()[-3:])
            raise HAProxyUnavailable(f"haproxy rejected its configuration: {tail}")
        log = (tmp / "haproxy.log").open("wb")
        try:
            self.proc = subprocess.Popen(
                [self.executable, "-db", "-f", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=tmp,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        for port in (self.write_port, self.read_port):
            try:
                wait_listening(HOST, port, max(0.5, deadline - time.monotonic()))
            except TimeoutError as exc:
                raise HAProxyUnavailable(f"{exc}: {self.log_tail()}") from None
            if self.proc.poll() is not None:
                raise HAProxyUnavailable(
                    f"haproxy exited with {self.proc.returncode}: {self.log_tail()}"
                )

    def log_tail(self, limit: int = 600) -> str:
        if self.tmpdir is None:
            return ""
        with contextlib.suppress(OSError):
            text = (self.tmpdir / "haproxy.log").read_text(errors="replace")
            return " | ".join(text.strip().splitlines()[-5:])[-limit:]
        return ""

    def _command(self, command: str, timeout: float = 5.0) -> str:
        """One command on the admin socket; its whole answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self._socket))
            sock.sendall(command.encode() + b"\n")
            chunks: list[bytes] = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def server_states(self) -> dict[str, dict[str, str]]:
        """``{listener: {server: status}}`` from ``show stat`` (``UP``, ``DOWN``, ...)."""
        text = self._command("show stat").lstrip("# ")
        out: dict[str, dict[str, str]] = {WRITE: {}, READ: {}}
        for row in csv.DictReader(io.StringIO(text)):
            proxy, server = row.get("pxname"), row.get("svname")
            if proxy in out and server not in ("FRONTEND", "BACKEND", None):
                out[proxy][str(server)] = str(row.get("status", "")).split(" ")[0]
        return out

    def up(self) -> dict[str, set[str]]:
        """The servers each listener would send a new connection to now."""
        return {
            proxy: {name for name, status in servers.items() if status == "UP"}
            for proxy, servers in self.server_states().items()
        }

    def wait_states(self, expected: Mapping[str, set[str]], timeout: float = 30.0) -> float:
        """Wait until the UP servers of each listener are exactly ``expected``; seconds waited."""
        began = time.monotonic()
        deadline = began + timeout
        seen: dict[str, set[str]] = {}
        while True:
            if self.proc is None or self.proc.poll() is not None:
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

    def stop(self) -> None:
        """Stop HAProxy by its pid and remove its folder. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)  # hard stop: close everything now
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                # Started with start_new_session: its process group is its pid.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
        tmp, self.tmpdir = self.tmpdir, None
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
