"""The areplica exception tree.

::

    AreplicaError
    ├── ConfigurationError (also ValueError)        bad option, bad DSN, unknown node name
    ├── TopologyError (also peewee.OperationalError) the servers are not what they should be
    │   ├── NoPrimaryError                           no reachable node accepts writes right now
    │   └── NoReplicaAvailableError                  no eligible replica, fallback disabled
    ├── NodeUnavailableError (also peewee.OperationalError) one named node cannot serve
    ├── ReadOnlyScopeError                           a write inside ``mgr.replica()``
    ├── ConsistencyTimeoutError (also peewee.OperationalError) no node reached a token in time
    └── ClosedError                                  the manager is closed (or never opened)

Availability errors also subclass ``peewee.OperationalError`` so that handlers written for
peewee keep catching them. SQL errors (``IntegrityError`` and friends) are never wrapped.
Every message names the node it is about with its password masked.
"""

from __future__ import annotations

import peewee

__all__ = [
    "AreplicaError",
    "ClosedError",
    "ConfigurationError",
    "ConsistencyTimeoutError",
    "NoPrimaryError",
    "NoReplicaAvailableError",
    "NodeUnavailableError",
    "ReadOnlyScopeError",
    "TopologyError",
]


class AreplicaError(Exception):
    """Base class of every error areplica raises itself."""


class ConfigurationError(AreplicaError, ValueError):
    """An option, a DSN or a node name is not acceptable; ``option`` names which."""

    def __init__(self, message: str, *, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


class TopologyError(AreplicaError, peewee.OperationalError):
    """The servers are not in the roles the configuration says (or no role fits)."""

    def __init__(self, message: str, *, node: str | None = None) -> None:
        super().__init__(message)
        self.node = node


class NoPrimaryError(TopologyError):
    """No reachable node accepts writes right now; the write was not sent anywhere."""


class NoReplicaAvailableError(TopologyError):
    """No replica may serve this read and ``fallback_to_primary`` is off."""


class NodeUnavailableError(AreplicaError, peewee.OperationalError):
    """A named node cannot serve (down, removed, or its connection failed)."""

    def __init__(self, message: str, *, node: str | None = None) -> None:
        super().__init__(message)
        self.node = node


class ReadOnlyScopeError(AreplicaError):
    """A write was attempted inside ``mgr.replica()``; nothing was sent to any server."""


class ConsistencyTimeoutError(AreplicaError, peewee.OperationalError):
    """No node reached the session's causal token within the allowed time."""

    def __init__(self, message: str, *, token: str | None = None, timeout: float | None = None):
        super().__init__(message)
        self.token = token
        self.timeout = timeout


class ClosedError(AreplicaError):
    """The manager is not open: ``connect()`` was not called, or ``close()`` was."""
