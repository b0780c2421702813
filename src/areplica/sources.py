"""Member sources: where a cluster's members come from besides the static list.

``PatroniSource`` reads Patroni's REST API (``GET /cluster``) from the first endpoint that
answers. Patroni knows the members, their roles and states before probes can see them:
a member it reports as stopping, stopped, demoting or starting takes no new queries at
once (``serving`` is false), one tagged ``noloadbalance`` takes no reads, and members
appear and leave at run time. Probes stay authoritative for server facts (recovery,
timeline, WAL positions, identity): Patroni's view never makes a node a primary.

The HTTP client is a few lines on asyncio streams (HTTP/1.0, ``Connection: close``): the
core has no HTTP dependency.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import urllib.parse
from dataclasses import dataclass
from typing import Any

from ._compat import timeout as _timeout

__all__ = ["PatroniMember", "PatroniSource", "PatroniView"]

logger = logging.getLogger("areplica")

_SERVING = frozenset({"running", "streaming", "in archive recovery"})
_LEADER_ROLES = frozenset({"leader", "master", "primary", "standby_leader"})
_MAX_BODY = 1 << 20


@dataclass(frozen=True)
class PatroniMember:
    """One member as Patroni reports it."""

    name: str
    host: str
    port: int
    role: str
    state: str
    noloadbalance: bool = False
    nofailover: bool = False

    @property
    def serving(self) -> bool:
        """Patroni says it is up (not stopping, stopped, demoting or starting)."""
        return self.state in _SERVING


@dataclass(frozen=True)
class PatroniView:
    """What ``GET /cluster`` said."""

    members: tuple[PatroniMember, ...]

    @property
    def leader(self) -> PatroniMember | None:
        return next((m for m in self.members if m.role in _LEADER_ROLES), None)

    @property
    def switching(self) -> bool:
        """No running leader right now: a switchover or failover is under way."""
        leader = self.leader
        return leader is None or not leader.serving


def parse_cluster(data: Any) -> PatroniView:
    """Parse a ``GET /cluster`` body (pure; raises ``ValueError`` when malformed)."""
    if not isinstance(data, dict) or not isinstance(data.get("members"), list):
        raise ValueError("not a Patroni /cluster document")
    members = []
    for item in data["members"]:
        if not isinstance(item, dict) or "name" not in item or "host" not in item:
            continue
        tags = item.get("tags") or {}
        members.append(
            PatroniMember(
                name=str(item["name"]),
                host=str(item["host"]),
                port=int(item.get("port", 5432)),
                role=str(item.get("role", "")),
                state=str(item.get("state", "")),
                noloadbalance=bool(tags.get("noloadbalance", False)),
                nofailover=bool(tags.get("nofailover", False)),
            )
        )
    return PatroniView(tuple(members))


class PatroniSource:
    """Reads the member list from one of several Patroni REST endpoints."""

    def __init__(self, urls: list[str], *, name: str, timeout: float) -> None:
        for url in urls:
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                from .errors import ConfigurationError

                raise ConfigurationError(
                    f"patroni: expected http(s)://host:port URLs, got {url!r:.80}",
                    option="patroni",
                )
        self.urls = list(urls)
        self.name = name
        self.timeout = timeout
        self.last: PatroniView | None = None
        self._failing = False

    def __repr__(self) -> str:
        return f"<PatroniSource {self.name} {self.urls}>"

    async def fetch(self) -> PatroniView | None:
        """The cluster as the first answering endpoint sees it; ``None`` if none answers."""
        errors = []
        for index, url in enumerate(self.urls):
            try:
                async with _timeout(self.timeout):
                    body = await _get(url.rstrip("/") + "/cluster")
                view = parse_cluster(json.loads(body))
            except Exception as exc:
                errors.append(f"{url}: {type(exc).__name__}: {exc}"[:200])
                continue
            if index:  # ask the one that answered first next time
                self.urls.insert(0, self.urls.pop(index))
            if self._failing:
                logger.warning("%s: Patroni answers again (%s)", self.name, url)
            self._failing = False
            self.last = view
            return view
        if not self._failing:
            logger.warning("%s: no Patroni endpoint answered: %s", self.name, "; ".join(errors))
        self._failing = True
        return None


async def _get(url: str) -> bytes:
    parts = urllib.parse.urlsplit(url)
    secure = parts.scheme == "https"
    host = parts.hostname or "localhost"
    port = parts.port or (443 if secure else 80)
    context = ssl.create_default_context() if secure else None
    reader, writer = await asyncio.open_connection(host, port, ssl=context)
    try:
        path = parts.path or "/"
        writer.write(
            f"GET {path} HTTP/1.0\r\nHost: {host}\r\nAccept: application/json\r\n"
            "Connection: close\r\n\r\n".encode("ascii")
        )
        await writer.drain()
        raw = await reader.read(_MAX_BODY)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass
    head, _, body = raw.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1:2]
    if status != [b"200"]:
        raise ConnectionError(f"HTTP {status[0].decode() if status else '?'} from {url}")
    return body
