"""Fault injection of :class:`~areplica.testing.topology.LocalTopology`.

What tests break on purpose: a node's processes (kill, hang, stop, start again), a replica's
replay (a delay), and, with ``proxies=True``, the network in front of a node or of a
standby's replication stream (delay, blackhole, cut, heal). Every process is signalled by
the pid it wrote in its ``postmaster.pid``, never by name.
"""

from __future__ import annotations

from ._local_base import START_TIMEOUT, LocalCore, replication_proxy
from ._support import set_apply_delay
from .proxy import ProxyProcess, ProxyThread


class LocalFaults(LocalCore):
    """Break a node's processes, its replay or its network (see the module)."""

    # ---------------------------------------------------------------- processes

    def kill(self, node: str) -> None:
        """SIGKILL ``node``'s postmaster and its children (only those pids); wait until gone."""
        n = self._node(node)
        if not n.server.kill():
            raise RuntimeError(f"{node} is not running")
        n.hung = False

    def hang(self, node: str) -> None:
        """SIGSTOP every process of ``node``: connections stay open, nothing answers."""
        n = self._node(node)
        n.server.hang()
        n.hung = True

    def resume(self, node: str) -> None:
        """SIGCONT every process of ``node`` (undoes :meth:`hang`)."""
        n = self._node(node)
        n.server.resume()
        n.hung = False

    def stop(self, node: str) -> None:
        """``pg_ctl stop -m fast``; nothing if ``node`` is not running."""
        n = self._node(node)
        if n.hung:
            self.resume(node)
        if n.server.pid() is None:
            return
        self._pg_ctl("stop", n, "-m", "fast", "-w", "-t", str(START_TIMEOUT))

    def start_node(self, node: str) -> None:
        """``pg_ctl start`` ``node`` again on its port (after :meth:`stop` or :meth:`kill`)."""
        n = self._node(node)
        if n.server.pid() is not None:
            return
        n.server.clear_stale(self.directory, n.port)
        self._pg_ctl_start(n)

    def set_apply_delay(self, node: str, ms: int) -> None:
        """Make replica ``node`` replay commits ``ms`` milliseconds late (0: no delay).

        Returns once the new ``recovery_min_apply_delay`` is in force.
        """
        if self._node(node).upstream is None:
            raise RuntimeError(f"{node} is not a replica")
        set_apply_delay(self._query, node, ms)

    # ---------------------------------------------------------------- the network

    def _proxy(self) -> ProxyThread | ProxyProcess:
        if self._proxies is None:
            raise RuntimeError("no proxies: create the topology with proxies=True")
        return self._proxies

    def _proxy_name(self, node: str, replication: bool) -> str:
        """The name of ``node``'s client proxy, or of the proxy it streams through."""
        n = self._node(node)
        if not replication:
            if n.proxy_port is None:
                raise RuntimeError("no proxies: create the topology with proxies=True")
            return node
        if node not in self._replication_ports:
            raise RuntimeError(
                f"{node} does not stream through a proxy: create the topology with "
                "replication_proxies=True (standbys configured later stream directly)"
            )
        return replication_proxy(node)

    def delay(self, node: str, ms: float, *, replication: bool = False) -> None:
        """Add ``ms`` milliseconds to every chunk crossing ``node``'s proxy, both ways.

        ``replication=True``: the proxy standby ``node`` streams through instead.
        """
        self._proxy().delay(self._proxy_name(node, replication), ms)

    def blackhole(self, node: str, *, replication: bool = False) -> None:
        """``node``'s proxy accepts and keeps connections but forwards nothing (until heal)."""
        self._proxy().blackhole(self._proxy_name(node, replication))

    def cut(self, node: str, *, replication: bool = False) -> None:
        """Reset every connection through ``node``'s proxy now; new ones work as usual."""
        self._proxy().cut(self._proxy_name(node, replication))

    def heal(self, node: str, *, replication: bool = False) -> None:
        """``node``'s proxy forwards normally again (no delay, no blackhole)."""
        self._proxy().heal(self._proxy_name(node, replication))
