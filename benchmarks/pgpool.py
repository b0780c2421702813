"""Pgpool-II as a benchmark peer: install it if missing, run it in the foreground, stop it.

It runs as ``pgpool -n -f CONF -F PCP_CONF -a HBA_CONF`` in a temporary folder of its own
(configuration, pid file, sockets, log), in its own process group: a
:class:`~areplica.testing.daemon.Daemon`, stopped by the pid it was started with (SIGINT:
fast shutdown, then SIGKILL to that process group if it lingers). Nothing is ever looked up
or signalled by name.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import psycopg2

from areplica.testing.daemon import Daemon, DaemonUnavailable, find_program

__all__ = ["Pgpool", "PgpoolUnavailable", "ensure_installed"]


class PgpoolUnavailable(DaemonUnavailable):
    """Pgpool-II could not be installed or started; the message says why."""


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


def ensure_installed(log: Any = print) -> str:
    """The ``pgpool`` executable, installing Debian's ``pgpool2`` package when missing."""
    found = find_program("pgpool")
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
    found = find_program("pgpool")
    if not found:
        raise PgpoolUnavailable("pgpool2 installed but no pgpool executable was found")
    return found


def version(executable: str) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = _run([executable, "--version"], timeout=15)
        match = re.search(r"(\d+\.\d+(?:\.\d+)?)", out.stdout + out.stderr)
        if match:
            return match.group(1)
    return None


def _quoted(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class Pgpool(Daemon):
    """One Pgpool-II in streaming-replication mode in front of ``backends``.

    ``backends`` are ``(host, port, weight)``: the primary first (weight 0 keeps every
    load-balanced read off it), then the standbys.
    """

    program = "pgpool"
    unavailable = PgpoolUnavailable
    stop_signal = signal.SIGINT  # fast shutdown
    stop_timeout = 15.0

    def __init__(
        self,
        executable: str,
        backends: list[tuple[str, int, float]],
        *,
        num_init_children: int = 32,
        max_pool: int = 4,
    ) -> None:
        super().__init__(executable)
        self.backends = backends
        self.num_init_children = num_init_children
        self.max_pool = max_pool
        self.settings: dict[str, str] = {}

    @property
    def port(self) -> int:
        return self.ports.get("port", 0)

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _config(self, tmp: Path) -> dict[str, str]:
        conf = {
            "backend_clustering_mode": _quoted("streaming_replication"),
            "listen_addresses": _quoted("127.0.0.1"),
            "port": str(self._port("port")),
            "unix_socket_directories": _quoted(str(tmp)),
            "pcp_listen_addresses": _quoted(""),
            "pcp_port": str(self._port("pcp")),
            "pcp_socket_dir": _quoted(str(tmp)),
            "wd_ipc_socket_dir": _quoted(str(tmp)),
            "enable_pool_hba": "off",
            "num_init_children": str(self.num_init_children),
            "max_pool": str(self.max_pool),
            "load_balance_mode": "on",
            "statement_level_load_balance": "on",
            "sr_check_user": _quoted("postgres"),
            "health_check_period": "0",
            "pid_file_name": _quoted(str(tmp / "pgpool.pid")),
            "logdir": _quoted(str(tmp)),
        }
        for index, (host, port, weight) in enumerate(self.backends):
            conf[f"backend_hostname{index}"] = _quoted(host)
            conf[f"backend_port{index}"] = str(port)
            conf[f"backend_weight{index}"] = str(weight)
            conf[f"backend_flag{index}"] = _quoted("ALLOW_TO_FAILOVER")
        return conf

    def _configure(self, folder: Path) -> list[str]:
        self.settings = self._config(folder)
        conf = self._write("pgpool.conf", "".join(f"{k} = {v}\n" for k, v in self.settings.items()))
        for name in ("pcp.conf", "pool_hba.conf", "pool_passwd"):
            self._write(name, "")
        return [
            self.executable,
            "-n",
            "-f",
            str(conf),
            "-F",
            str(folder / "pcp.conf"),
            "-a",
            str(folder / "pool_hba.conf"),
        ]

    def _ready(self) -> bool:
        """Whether ``show pool_nodes`` lists every backend up, the primary first."""
        nodes = self.pool_nodes()
        return (
            len(nodes) == len(self.backends)
            and all(n.get("status") in ("up", "waiting") for n in nodes)
            and nodes[0].get("role") == "primary"
        )

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
