"""Which server a member's address leads to: one, a new one, or several at once.

Every pooled connection reads its server's identity when it opens (``pool.IDENTITY_SQL``);
``ServerWatch`` judges those identities for one member (pure: no I/O).
"""

from __future__ import annotations

import logging
from typing import Literal

__all__ = ["ACCEPT_AFTER", "ServerKey", "ServerWatch", "describe"]

logger = logging.getLogger("areplica")

#: What tells two servers apart: (system identifier, postmaster start time, port). The
#: same for every connection to one running server, different for any two servers (and for
#: one server after a restart).
ServerKey = tuple[int, float, int]
#: Judgments in a row (each of several fresh connections) finding one server before a
#: refused member is accepted again.
ACCEPT_AFTER = 10


def describe(key: ServerKey) -> str:
    """A server key for messages: port and start time (the system identifier is shared)."""
    import datetime

    started = datetime.datetime.fromtimestamp(key[1], datetime.timezone.utc)
    return f"port {key[2]} up since {started:%H:%M:%S.%f}"[:-3]


class ServerWatch:
    """Which server a member's address leads to: one, a new one, or several at once.

    Every connection of the member (pooled or probe) says which server it reached when it
    opens. The first fixes the member's server. A later one on another server is not used
    (``opened()`` says so) and puts the member in question: the probe then opens fresh
    connections at the same time and ``judge()``s what they reached:

    - several servers at once: the address is a load balancer (or a DNS name) over several
      servers; the member is *refused* (it serves nothing, the message says what to list
      instead) until ``ACCEPT_AFTER`` judgments in a row find one server;
    - one server, another than before: the server changed over time (a restart, a virtual
      IP or a service that follows the leader): it is the member's server from now on, and
      connections to the old one are discarded, as after a restart.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.current: ServerKey | None = None
        self.refusal: str | None = None
        #: A server other than ``current`` that a new connection reached.
        self.questioned: ServerKey | None = None
        self._agreeing = 0

    def __repr__(self) -> str:
        return f"<ServerWatch {self.label} current={self.current} refused={bool(self.refusal)}>"

    def reset(self) -> None:
        """Forget everything (the manager reopens)."""
        self.current = self.questioned = self.refusal = None
        self._agreeing = 0

    def opened(self, key: ServerKey) -> bool:
        """A new connection reached ``key``: True when it may be used."""
        if self.refusal is not None:
            return False
        if self.current is None:
            self.current = key
            return True
        if key == self.current:
            return True
        self.questioned = key
        return False

    @property
    def unsettled(self) -> bool:
        """True when fresh connections must tell (a mismatch seen, or refused)."""
        return self.questioned is not None or self.refusal is not None

    def judge(self, keys: set[ServerKey]) -> Literal["same", "changed", "several"]:
        """What fresh connections open at the same time reached says what the address is."""
        self.questioned = None
        if len(keys) > 1:
            self._agreeing = 0
            shown = "; ".join(describe(key) for key in sorted(keys, key=lambda k: (k[2], k[1])))
            self.refusal = (
                "its address leads to several servers at once: list each server as a "
                "member (replicas=[...] or members=[...]) or give a discovery source "
                "(patroni=...), not a load-balanced address; a member must be one server, "
                f"or reads could miss what their session wrote ({shown})"
            )
            return "several"
        (key,) = keys
        if self.refusal is not None:
            self._agreeing += len(keys)
            if self._agreeing < ACCEPT_AFTER:
                return "several"
            self.refusal = None
            logger.warning(
                "%s: its address leads to one server again (%s)", self.label, describe(key)
            )
        if key != self.current:
            previous, self.current = self.current, key
            if previous is not None:
                logger.warning(
                    "%s: the server behind its address changed (was %s, now %s); connections "
                    "to the old one are discarded",
                    self.label,
                    describe(previous),
                    describe(key),
                )
                return "changed"
        return "same"

    def mismatch(self, key: ServerKey) -> str:
        """Why a new connection on ``key`` is not used."""
        if self.refusal is not None:
            return f"{self.label} is refused: {self.refusal}"
        current = describe(self.current) if self.current is not None else "none"
        return (
            f"{self.label}: a new connection reached another server ({describe(key)}) than "
            f"the member's ({current}); not used until the probes tell whether the server "
            "changed or the address leads to several servers"
        )
