"""Pgpool-II as a benchmark peer: install it if missing, run it in the foreground, stop it.

It runs as ``pgpool -n -f CONF -F PCP_CONF -a HBA_CONF`` in a temporary folder of its own
(configuration, pid file, sockets, log), in its own process group, and is stopped by the
pid it was started with (SIGINT: fast shutdown, then SIGKILL to that process group if it
lingers). Nothing is ever looked up or signalled by name.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg2

__all__ = ["Pgpool", "PgpoolUnavailable", "ensure_installed"]


class PgpoolUnavailable(RuntimeError):
    """Pgpool-II could not be installed or started; the message says why."""


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


def ensure_installed(log: Any = print) -> str:
    """The ``pgpool`` executable, installing Debian's ``pgpool2`` package when missing."""
    found = shutil.which("pgpool") or (
        "/usr/sbin/pgpool" if os.access("/usr/sbin/pgpool", os.X_OK) else None
    )
    if found:
        return found
    if os.geteuid() != 0:
        raise PgpoolUnavailable("pgpool is not installed and installing it needs root")
    if shutil.which("apt-get") is None:
        raise PgpoolUnavailable("pgpool is not installed and there is no apt-get")
    log("  pgpool missing: apt-get install -y pgpool2")
    try:
        done = _run(["apt-get", "install", "-y", "pgpool2"], timeout=600)
        if done.returncode != 0:
            log("  apt-get install failed; apt-get update, then again")
            _run(["apt-get", "update"], timeout=600)
            done = _run(["apt-get", "install", "-y", "pgpool2"], timeout=600)
    except (OSError, subprocess.SubprocessError) as exc:
        raise PgpoolUnavailable(f"apt-get install pgpool2 failed: {exc}") from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise PgpoolUnavailable(f"apt-get install pgpool2 failed: {' | '.join(tail)}")
    found = shutil.which("pgpool") or (
        "/usr/sbin/pgpool" if os.access("/usr/sbin/pgpool", os.X_OK) else None
    )
    if not found:
        raise PgpoolUnavailable("pgpool2 installed but no pgpool executable was found")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def version(executable: str) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = _run([executable, "--version"], timeout=15)
        match = re.search(r"(\d+\.\d+(?:\.\d+)?)", out.stdout + out.stderr)
        if match:
            return match.group(1)
    return None


class Pgpool:
    """One Pgpool-II in streaming-replication mode in front of ``backends``.

    ``backends`` are ``(host, port, weight)``: the primary first (weight 0 keeps every
    load-balanced read off it), then the standbys.
    """

    def __init__(
        self,
        executable: str,
        backends: list[tuple[str, int, float]],
        *,
        num_init_children: int = 32,
        max_pool: int = 4,
    ) -> None:
        self.executable = executable
        self.backends = backends
        self.num_init_children = num_init_children
        self.max_pool = max_pool
        self.port = 0
        self.tmpdir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.settings: dict[str, str] = {}

    def __enter__(self) -> Pgpool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _config(self, tmp: Path) -> dict[str, str]:
        def q(value: str) -> str:
            return "'" + value.replace("'", "''") + "'"

        conf = {
            "backend_clustering_mode": q("streaming_replication"),
            "listen_addresses": q("127.0.0.1"),
            "port": str(self.port),
            "unix_socket_directories": q(str(tmp)),
            "pcp_listen_addresses": q(""),
            "pcp_port": str(_free_port()),
            "pcp_socket_dir": q(str(tmp)),
            "wd_ipc_socket_dir": q(str(tmp)),
            "enable_pool_hba": "off",
            "num_init_children": str(self.num_init_children),
            "max_pool": str(self.max_pool),
            "load_balance_mode": "on",
            "statement_level_load_balance": "on",
            "sr_check_user": q("postgres"),
            "health_check_period": "0",
            "pid_file_name": q(str(tmp / "pgpool.pid")),
            "logdir": q(str(tmp)),
        }
        for index, (host, port, weight) in enumerate(self.backends):
            conf[f"backend_hostname{index}"] = q(host)
            conf[f"backend_port{index}"] = str(port)
            conf[f"backend_weight{index}"] = str(weight)
            conf[f"backend_flag{index}"] = q("ALLOW_TO_FAILOVER")
        return conf

    def start(self, timeout: float = 30.0) -> None:
        """Write the configuration, start pgpool, wait until it answers ``show pool_nodes``."""
        self.tmpdir = Path(tempfile.mkdtemp(prefix="bench-pgpool-"))
        atexit.register(self.stop)
        tmp = self.tmpdir
        self.port = _free_port()
        self.settings = self._config(tmp)
        conf = tmp / "pgpool.conf"
        conf.write_text("".join(f"{k} = {v}\n" for k, v in self.settings.items()))
        (tmp / "pcp.conf").write_text("")
        (tmp / "pool_hba.conf").write_text("")
        (tmp / "pool_passwd").write_text("")
        log = (tmp / "pgpool.log").open("wb")
        try:
            self.proc = subprocess.Popen(
                [
                    self.executable,
                    "-n",
                    "-f",
                    str(conf),
                    "-F",
                    str(tmp / "pcp.conf"),
                    "-a",
                    str(tmp / "pool_hba.conf"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=tmp,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PgpoolUnavailable(
                    f"pgpool exited with {self.proc.returncode}: {self.log_tail()}"
                )
            try:
                nodes = self.pool_nodes()
                if (
                    len(nodes) == len(self.backends)
                    and all(n.get("status") in ("up", "waiting") for n in nodes)
                    and nodes[0].get("role") == "primary"
                ):
                    return
            except psycopg2.Error as exc:
                last = exc
            time.sleep(0.1)
        raise PgpoolUnavailable(
            f"pgpool did not answer within {timeout}s ({last}): {self.log_tail()}"
        )

    def log_tail(self, limit: int = 600) -> str:
        if self.tmpdir is None:
            return ""
        with contextlib.suppress(OSError):
            text = (self.tmpdir / "pgpool.log").read_text(errors="replace")
            return " | ".join(text.strip().splitlines()[-5:])[-limit:]
        return ""

    def pool_nodes(self) -> list[dict[str, Any]]:
        """``show pool_nodes`` through pgpool: one dict per backend."""
        conn = psycopg2.connect(self.dsn, connect_timeout=5, application_name="areplica-bench")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("show pool_nodes")
                names = [d[0] for d in cur.description or ()]
                return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        finally:
            conn.close()

    def select_counts(self) -> dict[str, int]:
        """Select counts per backend port (pgpool's own tally of balanced reads)."""
        return {str(n["port"]): int(n["select_cnt"]) for n in self.pool_nodes()}

    def stop(self) -> None:
        """Stop pgpool by its pid and remove its folder. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGINT)  # fast shutdown
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                # Its children share the process group it was started in (its pid).
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
        if proc is not None:
            # Children that outlived the parent's shutdown (same process group).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        tmp, self.tmpdir = self.tmpdir, None
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
