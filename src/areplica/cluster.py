"""``Cluster``: the members of one PostgreSQL cluster, their identity and discovered roles.

A member is one server. Its role is never configured: each health round the probes say
which members are in recovery, which cluster they belong to (``pg_control_system()``'s
system identifier) and on which timeline they are, and ``observe()`` turns that into roles:

- the cluster is the system identifier of its primary (the first one seen); a member of
  another cluster is *refused*: it never serves a query, and it is logged as an error;
- two entries that turn out to be one server (same system identifier, postmaster start
  time and port) are one member: the later entry is refused as a duplicate;
- a member whose address leads to several servers at once (a load balancer over standbys:
  its connections, opened at the same time, reach different servers) is refused, with what
  to list instead (``ServerWatch`` in ``servers.py`` decides, from every connection's server);
- the primary is the one member out of recovery on the highest timeline. A member out of
  recovery on a lower timeline is a former primary that has not been demoted yet: it
  serves nothing. Two members out of recovery on the same highest timeline are a split
  brain: writes are refused until one of them is a standby again;
- every other member of the cluster that answers is a standby and may serve reads.

A switchover or failover therefore moves roles without evictions: the old primary comes
back as a standby and reads again; the promoted standby takes writes.

The cluster is pure state plus that logic; probing is ``health.py``'s, routing the
manager's. Nothing outside this module assigns its fields.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from .errors import ConfigurationError
from .node import Node

__all__ = ["Cluster", "Identity"]

logger = logging.getLogger("areplica")


@dataclass(frozen=True)
class Identity:
    """What a probe says a server is."""

    in_recovery: bool
    system_id: int | None
    timeline: int | None
    #: (system identifier, postmaster start time, port): the same for two addresses of
    #: one server, different for any two servers.
    server: tuple[int, float, int] | None


class Cluster:
    """The members of one cluster, keyed by name, with the current primary."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._members: dict[str, Node] = {}
        self.primary: Node | None = None
        self.system_id: int | None = None
        self.split_brain = False
        self._refused: dict[Node, str] = {}
        self._first = True  # no primary found yet since the start (or a reset)

    def __repr__(self) -> str:
        primary = self.primary.name if self.primary else None
        return f"<Cluster {self.name} primary={primary} members={list(self._members)}>"

    def __iter__(self) -> Iterator[Node]:
        return iter(list(self._members.values()))

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, name: object) -> bool:
        return name in self._members

    def reset(self) -> None:
        """Forget discovered roles and identity (the manager reopens)."""
        self.primary = None
        self.system_id = None
        self.split_brain = False
        self._refused.clear()
        self._first = True
        for node in self._members.values():
            node.in_recovery = node.system_id = node.timeline = node.server = None
            node.servers.reset()

    def get(self, name: str) -> Node | None:
        return self._members.get(name)

    @property
    def names(self) -> list[str]:
        return list(self._members)

    def add(self, node: Node) -> None:
        """Add a member; a second entry for one name or one address is refused."""
        if node.name in self._members:
            raise ConfigurationError(f"{self.name}: duplicate member name {node.name!r}")
        for other in self._members.values():
            if other.dsn.address == node.dsn.address:
                raise ConfigurationError(
                    f"{self.name}: {node.label} and {other.label} are the same server "
                    "(one entry per server: roles are discovered, so a server is listed once)"
                )
        self._members[node.name] = node

    def remove(self, name: str) -> Node | None:
        node = self._members.pop(name, None)
        if node is not None:
            self._refused.pop(node, None)
            if self.primary is node:
                self.primary = None
        return node

    def refused(self, node: Node) -> str | None:
        """Why ``node`` serves nothing (another cluster, a duplicate), or ``None``."""
        return self._refused.get(node)

    def readers(self) -> list[Node]:
        """Members that may serve replica reads: the cluster's standbys."""
        return [
            node
            for node in self._members.values()
            if node is not self.primary
            and node.role == "replica"
            and node.in_recovery is not False
            and not node.retired
            and node not in self._refused
        ]

    def observe(self, seen: Mapping[Node, Identity | BaseException]) -> None:
        """Apply one round of probe answers: identity, duplicates, then roles."""
        for node, identity in seen.items():
            if isinstance(identity, Identity):
                node.in_recovery = identity.in_recovery
                node.timeline = identity.timeline
                node.system_id = identity.system_id
                node.server = identity.server
        self._check_identity(seen)
        self._discover_roles(seen)

    def _check_identity(self, seen: Mapping[Node, Identity | BaseException]) -> None:
        if self.system_id is None:
            writers = [
                n
                for n, i in seen.items()
                if isinstance(i, Identity) and not i.in_recovery and i.system_id is not None
            ]
            if writers:
                best = max(writers, key=lambda n: n.timeline or 0)
                self.system_id = best.system_id
        servers: dict[tuple[int, float, int], Node] = {}
        for node in self._members.values():
            reason = None
            if (
                self.system_id is not None
                and node.system_id is not None
                and node.system_id != self.system_id
            ):
                reason = (
                    f"it belongs to another cluster (system identifier {node.system_id}, "
                    f"this cluster's is {self.system_id})"
                )
            elif node.servers.refusal is not None:
                reason = node.servers.refusal
            elif node.server is not None:
                first = servers.setdefault(node.server, node)
                if first is not node:
                    reason = f"it is the same server as member {first.name!r}"
            if reason is None:
                if self._refused.pop(node, None) is not None:
                    logger.warning("%s: %s is accepted again", self.name, node.label)
            elif self._refused.get(node) != reason:
                self._refused[node] = reason
                logger.error("%s: refusing member %s: %s", self.name, node.label, reason)
            if reason is not None and node is self.primary:
                self.primary = None

    def _discover_roles(self, seen: Mapping[Node, Identity | BaseException]) -> None:
        current = self.primary
        writers = [
            n
            for n in self._members.values()
            if n.in_recovery is False
            and n not in self._refused
            and not isinstance(seen.get(n), BaseException)
            and (n in seen or n is current)
        ]
        top = max((n.timeline or 0 for n in writers), default=0)
        leaders = [n for n in writers if (n.timeline or 0) == top]
        if len(leaders) > 1:
            if not self.split_brain:
                logger.error(
                    "%s: split brain: %s are all out of recovery on timeline %s; refusing "
                    "writes until one is a standby again",
                    self.name,
                    ", ".join(n.label for n in leaders),
                    top,
                )
            self.split_brain = True
            return
        if self.split_brain:
            logger.warning("%s: split brain resolved", self.name)
        self.split_brain = False
        for stale in writers:
            if stale not in leaders and stale.role == "primary":
                logger.warning(
                    "%s: %s is out of recovery on timeline %s, behind the primary's %s: a "
                    "former primary; it serves nothing until it is a standby again",
                    self.name,
                    stale.label,
                    stale.timeline,
                    top,
                )
                stale.role = "replica"  # it reads nothing: readers() needs recovery
        for node in self._members.values():
            if node.in_recovery is True and node.role != "replica":
                if node is current:
                    logger.warning(
                        "%s: primary %s is in recovery now (demoted); it reads as a standby",
                        self.name,
                        node.label,
                    )
                node.role = "replica"
        if leaders:
            new = leaders[0]
            if new is not current:
                # The first primary found is no news (a start, a reopen): INFO. Any later
                # one is a role change an operator should see: WARNING.
                logger.log(
                    logging.INFO if self._first else logging.WARNING,
                    "%s: %s is the primary (timeline %s%s)",
                    self.name,
                    new.label,
                    new.timeline,
                    f"; was {current.name}" if current is not None else "",
                )
            new.role = "primary"
            self.primary = new
            self._first = False
        elif current is not None and current.in_recovery is True:
            self.primary = None
