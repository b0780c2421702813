"""What the parts of :class:`~areplica.testing.topology.LocalTopology` share.

``LocalTopology`` is assembled from three layers: :class:`LocalCore` (here: a node's record,
the state every part reads, running SQL on a node and waiting for a condition),
:class:`~areplica.testing.local_faults.LocalFaults` (what tests break on purpose: processes,
replay delay, the network in front of a node) and
:class:`~areplica.testing.local_history.LocalHistory` (roles and histories: promote, fork,
rewind, rebuild, add a standby). ``LocalTopology`` itself creates, starts and addresses the
servers, and implements the setup steps declared abstract here.
"""

from __future__ import annotations

import re
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ._support import TopologyLifecycle, poll_until, run_sql
from .processes import HOST, Postmaster, ProcessOwner, ServiceAccount
from .proxy import ProxyProcess, ProxyThread

PRIMARY = "primary"

START_TIMEOUT = 60  # seconds, for pg_ctl -w and the waits of start()

NODE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,40}")

#: What a standby's WAL receiver reports: (status, the port it streams from, its timeline).
RECEIVER_SQL = "SELECT status, sender_port, received_tli FROM pg_stat_wal_receiver"


def conf_value(value: str) -> str:
    """``value`` quoted for ``postgresql.conf``."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def slot_name(node: str) -> str:
    """The physical replication slot ``node`` streams through, on the node it follows."""
    return "areplica_" + node.replace("-", "_")


def replication_proxy(node: str) -> str:
    """The name of the proxy standby ``node`` streams through."""
    return f"{node}/replication"


def set_auto_conf(data: Path, settings: Mapping[str, str], account: ServiceAccount) -> None:
    """Set ``settings`` in ``postgresql.auto.conf`` (replacing earlier lines of theirs).

    A cloned or rewound data directory brings its source's settings there (a standby's
    ``primary_conninfo``, say): the new ones must replace them, not follow them.
    """
    path = data / "postgresql.auto.conf"
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [ln for ln in lines if ln.split("=", 1)[0].strip() not in settings]
    kept += [f"{key} = {conf_value(value)}" for key, value in settings.items()]
    path.write_text("\n".join(kept) + "\n")
    account.chown(path)


@dataclass
class Node:
    """One server of a LocalTopology."""

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


class LocalCore(TopologyLifecycle):
    """The state and helpers every part of ``LocalTopology`` uses (see the module)."""

    user: str
    dbname: str
    proxies: bool
    rewindable: bool
    _password: str | None
    _names: list[str]
    _source: str  # the node replicas follow (changes on promote())
    _nodes: dict[str, Node]
    _proxies: ProxyThread | ProxyProcess | None
    _replication_ports: dict[str, int]  # standby -> its replication proxy
    _owner: ProcessOwner

    # ---------------------------------------------------------------- setup steps

    @property
    @abstractmethod
    def directory(self) -> Path:
        """The temporary directory holding every node."""

    @property
    @abstractmethod
    def bin_dir(self) -> Path:
        """The folder of the PostgreSQL binaries in use."""

    @abstractmethod
    def _new_node(self, name: str) -> Node:
        """A node record with a folder and a free port (nothing runs yet)."""

    @abstractmethod
    def _base_backup(self, node: Node, source: Node, *options: str) -> None:
        """``pg_basebackup`` of ``source`` into ``node``'s data directory."""

    @abstractmethod
    def _pg_ctl_start(self, node: Node, first: bool = False) -> None:
        """``pg_ctl start`` ``node`` and wait until it accepts connections."""

    # ---------------------------------------------------------------- SQL, waiting, addresses

    @property
    def _account(self) -> ServiceAccount:
        return self._owner.need_account()

    def _client_env(self) -> dict[str, str]:
        """PGPASSWORD for a client program (never in its argv); servers never get it."""
        return {"PGPASSWORD": self._password} if self._password is not None else {}

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
        poll_until(predicate, timeout, what, interval)

    def _node(self, name: str, closed_ok: bool = False) -> Node:
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

    def _pg_ctl(self, action: str, n: Node, *args: str) -> None:
        self._account.run(
            [str(self.bin_dir / "pg_ctl"), action, "-D", str(n.data), *args],
            timeout=START_TIMEOUT + 30,
        )
