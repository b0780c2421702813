"""areplica: replica-aware asyncio routing for peewee + peewee-async on PostgreSQL."""

from .errors import (
    AreplicaError,
    ClosedError,
    ConfigurationError,
    ConsistencyTimeoutError,
    NodeUnavailableError,
    NoPrimaryError,
    NoReplicaAvailableError,
    PoolTimeoutError,
    ReadOnlyScopeError,
    ReadTimeoutError,
    TopologyError,
)
from .manager import ReplicaManager
from .node import NodeStatus

__version__ = "0.1.0"

__all__ = [
    "AreplicaError",
    "ClosedError",
    "ConfigurationError",
    "ConsistencyTimeoutError",
    "NoPrimaryError",
    "NoReplicaAvailableError",
    "NodeStatus",
    "NodeUnavailableError",
    "PoolTimeoutError",
    "ReadOnlyScopeError",
    "ReadTimeoutError",
    "ReplicaManager",
    "TopologyError",
    "__version__",
]
