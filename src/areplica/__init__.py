"""areplica: replica-aware asyncio routing for peewee + peewee-async on PostgreSQL.

Module map. One line per module: its layer, its name, what it owns. A module imports only
from lower layers (and from its own layer without a cycle); nothing reaches into another
module's private state. ``tests/unit/test_layers.py`` checks this table against the code.

    0  errors        the exception tree
    0  _compat       version shims: timeouts that never swallow a caller's cancel
    0  consistency   WAL positions and tokens (pure)
    0  dsn           DSN parsing, multi-host expansion, password masking (pure)
    0  routing       query classification: read or write (pure)
    0  policies      load-balancing policies (pure)
    0  results       result handling of a cursor (fetches), ``get()``'s query
    0  history       timeline histories: which positions are on the primary's (pure)
    1  drivers       aiopg and psycopg adapters: connect, close, cancel, error meanings
    1  options       every option: default, validation, environment parsing
    1  servers       which server a member's address leads to: one, a new one, several
    2  pool          one node's connection pool: open, check, recycle, slots, deadlines
    2  node          one server: role, state, counters, status, its pool
    3  cluster       the members, identity, discovered roles
    0  membership    which members a source's answer adds, flags and removes (pure)
    4  sources       member sources: Patroni REST (aiohttp)
    4  probe         a node's probe: its dedicated connection, one round trip, what it saw
    4  health        lag, the state machine, the background health task over the probes
    5  core          what every query path shares: options, cluster, lifecycle, counters
    6  sessions      causal cells that follow the program, tokens in and out, vetting; scopes
    6  replay        reads waiting for standbys to replay a position: one poller per node
    7  writes        the write path: writable primary, primary_wait, the write's token
    8  reads         the read path: candidates, catch-up, slot waits, retry, fallback
    8  transactions  bound connections: atomic()/transaction(), savepoints, adoption
    9  engine        the one door: compile, classify, dispatch to the paths above
   10  database      RoutingDatabase: the peewee-async database object, over the engine
   10  queries       the peewee-async 0.x Manager methods over Engine.execute
   11  manager       ReplicaManager: construction, lifecycle, membership, public API
   12  metrics       the Prometheus collector
   12  cli           the areplica command
   12  demo          areplica demo
   12  contrib       FastAPI and aiohttp integration
   12  testing       test topologies, the test transaction, the pytest plugin
"""

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
