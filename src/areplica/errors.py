"""The areplica exception tree.

::

    AreplicaError
    ├── ConfigurationError (also ValueError)        bad option, bad DSN, unknown node name
    ├── TopologyError (also peewee.OperationalError) the servers are not what they should be
    │   ├── NoPrimaryError                           no reachable node accepts writes right now
    │   └── NoReplicaAvailableError                  no eligible replica, fallback disabled
    ├── NodeUnavailableError (also peewee.OperationalError) one named node cannot serve
    │   ├── PoolTimeoutError                         no pooled connection freed up in time
    │   └── ReadTimeoutError                         a read outlived ``read_timeout``
    ├── ReadOnlyScopeError                           a write inside ``mgr.replica()``
    ├── ConsistencyTimeoutError (also peewee.OperationalError) no node reached a token in time
    └── ClosedError (also peewee.OperationalError)  the manager is closed (or closing)

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
    "PoolTimeoutError",
    "ReadOnlyScopeError",
    "ReadTimeoutError",
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


class PoolTimeoutError(NodeUnavailableError):
    """Every connection of a node's pool stayed busy for ``pool_timeout``; nothing was sent.

    A full pool is load, not a dead node: it never takes the node down. A read waits for
    another node instead; a write raises this error.
    """

    def __init__(self, message: str, *, node: str | None = None, timeout: float | None = None):
        super().__init__(message, node=node)
        self.timeout = timeout


class ReadTimeoutError(NodeUnavailableError):
    """A read ran longer than ``read_timeout`` on a node; it was cancelled on the server.

    It is retried on another node (up to ``read_retries``). One slow query is no proof that
    a node is dead: it never takes the node down.
    """

    def __init__(self, message: str, *, node: str | None = None, timeout: float | None = None):
        super().__init__(message, node=node)
        self.timeout = timeout


class ReadOnlyScopeError(AreplicaError):
    """A write was attempted inside ``mgr.replica()``; nothing was sent to any server."""


class ConsistencyTimeoutError(AreplicaError, peewee.OperationalError):
    """No node reached the session's causal token within the allowed time."""

    def __init__(self, message: str, *, token: str | None = None, timeout: float | None = None):
        super().__init__(message)
        self.token = token
        self.timeout = timeout


class ClosedError(AreplicaError, peewee.OperationalError):
    """The manager is not open: ``close()`` was called (or ``connect()`` never was).

    Also raised by a query that ``close()`` interrupted after its grace period. It is a
    ``peewee.OperationalError``, as peewee-async's errors for a closed pool are, so
    reconnect-and-retry code written for peewee-async keeps working.
    """
