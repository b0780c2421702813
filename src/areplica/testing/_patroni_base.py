"""What the parts of :class:`~areplica.testing.patroni.PatroniTopology` share.

``PatroniTopology`` is assembled from two layers: :class:`PatroniCore` (here: a member's
record, one HTTP request, and the state and queries every part relies on, declared here and
implemented by ``PatroniTopology``) and
:class:`~areplica.testing.patroni_roles.PatroniRoles` (what tests do to the cluster: switch
over, fail over, crash and restart members, add and remove them, change their tags).
``PatroniTopology`` itself finds the programs, writes the configurations, starts etcd and
the members, and reads Patroni's view.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._support import TopologyLifecycle
from .processes import HOST, Postmaster, Spawned

#: Patroni's boolean tags: a false one is absent from ``GET /cluster``.
BOOL_TAGS = frozenset({"clonefrom", "nofailover", "noloadbalance", "nosync", "nostream"})


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


@dataclass
class Member:
    """One Patroni member and its PostgreSQL."""

    name: str
    home: Path  # data/, patroni.yml, patroni.log
    pg_port: int
    rest_port: int
    server: Postmaster
    tags: dict[str, Any] = field(default_factory=dict)
    patroni: Spawned | None = None  # the Patroni last started
    down: bool = False  # crashed (or stopped) on purpose: not expected to be healthy

    @property
    def data(self) -> Path:
        return self.server.data

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
        if self.patroni is None or not self.patroni.running:
            return None
        return self.patroni.pid

    def pids(self) -> list[int]:
        """Patroni and its children, then the postmaster and its children (live ones)."""
        pids = self.patroni.pids() if self.patroni is not None else []
        return pids + [p for p in self.server.pids() if p not in pids]

    def kill(self) -> None:
        """SIGKILL Patroni (first, so it restarts nothing) and PostgreSQL, by pid."""
        if self.patroni is not None:
            self.patroni.kill()
        self.server.kill(timeout=15.0)


OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class NoAnswer(Exception):
    """A REST API or etcd did not answer as expected (yet)."""


def http_call(method: str, url: str, body: Any = None, timeout: float = 5.0) -> tuple[int, Any]:
    """(status, parsed JSON or text) of one request; 4xx and 5xx are answers too."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with OPENER.open(request, timeout=timeout) as response:
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


class PatroniCore(TopologyLifecycle):
    """The state and queries every part of ``PatroniTopology`` uses (see the module)."""

    name: str
    last_switchover: Switchover | None
    _members: dict[str, Member]
    _lock: threading.RLock  # one topology change at a time

    @staticmethod
    def _entries(cluster: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        return {str(m.get("name")): m for m in cluster.get("members", [])}

    @property
    @abstractmethod
    def directory(self) -> Path:
        """The temporary directory holding etcd and every member."""

    @property
    @abstractmethod
    def etcd_url(self) -> str:
        """etcd's client URL."""

    @abstractmethod
    def rest_url(self, member: str) -> str:
        """``member``'s Patroni REST API."""

    @abstractmethod
    def query(
        self, member: str, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()
    ) -> list[tuple[Any, ...]]:
        """Run one statement on ``member``'s PostgreSQL."""

    @abstractmethod
    def cluster(self) -> dict[str, Any]:
        """Patroni's ``GET /cluster``."""

    @abstractmethod
    def leader(self) -> str | None:
        """The member leading now, if any."""

    @abstractmethod
    def wait_leader(self, timeout: float = 60.0, exclude: Iterable[str] = ()) -> str:
        """The leader, once there is one that accepts writes."""

    @abstractmethod
    def _member(self, name: str) -> Member:
        """The member called ``name`` (an error names the others)."""

    @abstractmethod
    def _member_names_or_raise(self) -> None:
        """Raise unless the topology is started and open."""

    @abstractmethod
    def _streams_from(self, leader: str, replicas: Sequence[str]) -> bool:
        """Whether every one of ``replicas`` streams from ``leader``."""

    @abstractmethod
    def _poll(
        self,
        predicate: Callable[[], bool],
        timeout: float,
        what: str,
        interval: float = 0.05,
    ) -> None:
        """Wait until ``predicate()``; ``TimeoutError`` with diagnostics."""

    @abstractmethod
    def _new_member(self, name: str, tags: Mapping[str, Any]) -> Member:
        """A member's record, folder and configuration (nothing runs yet)."""

    @abstractmethod
    def _write_config(self, m: Member) -> None:
        """Write ``m``'s Patroni configuration."""

    @abstractmethod
    def _launch(self, m: Member) -> None:
        """Start ``m``'s Patroni."""
