"""Roles and histories of :class:`~areplica.testing.topology.LocalTopology`.

Promote a standby, fork the history (a standby promoted while its primary keeps writing),
add a standby at runtime (cascading from another standby too), rebuild a standby from
another node with ``pg_basebackup`` and rewind an old primary with ``pg_rewind`` into a
standby of the new one: what high-availability and history tests need.
"""

from __future__ import annotations

import shutil

from psycopg2.extensions import make_dsn

from ._local_base import (
    NODE_NAME,
    RECEIVER_SQL,
    START_TIMEOUT,
    Node,
    set_auto_conf,
    slot_name,
)
from .local_faults import LocalFaults
from .processes import HOST


class LocalHistory(LocalFaults):
    """Move roles and fork, rewind or rebuild histories (see the module)."""

    def promote(self, node: str) -> None:
        """``pg_ctl promote`` ``node``; return once ``pg_is_in_recovery()`` is false there.

        The promoted node becomes the one :meth:`wait_replicated` measures against; the other
        replicas keep following the node they followed.
        """
        self._promote(self._node(node))
        self._source = node

    def _promote(self, n: Node) -> None:
        if n.upstream is None:
            raise RuntimeError(f"{n.name} is not a replica")
        self._pg_ctl("promote", n, "-w", "-t", str(START_TIMEOUT))
        self._poll(
            lambda: not self._query(n.name, "SELECT pg_is_in_recovery()")[0][0],
            START_TIMEOUT,
            f"{n.name} to leave recovery",
        )
        n.upstream = None

    def add_replica(self, name: str, upstream: str | None = None) -> str:
        """Add a standby ``name`` streaming from ``upstream`` (a primary or another standby).

        Without ``upstream``, from the node replicas follow. The standby gets a slot on its
        upstream, a base backup (see :meth:`rebuild` for where from), the topology's settings
        and a proxy when ``proxies=True``. Returns its name once it streams.
        """
        if not NODE_NAME.fullmatch(name):
            raise ValueError(f"node names are lowercase letters, digits, '-' and '_': {name!r}")
        if name in self._names:
            raise ValueError(f"there is a node {name!r} already")
        source = self._running_node(upstream or self._source)
        node = self._new_node(name)
        self._names.append(name)
        self._clone(node, source, first=True)
        if self.proxies and self._proxies is not None:
            node.proxy_port = self._proxies.add(name, HOST, node.port)
        return name

    def rebuild(self, node: str, source: str) -> None:
        """Wipe ``node``'s data and clone it anew from ``source``; it then streams from there.

        ``node`` is stopped first (whatever it was: a standby, an old primary, a killed
        node); its slot on the node it followed is dropped. The base backup comes from
        ``source`` itself when it is a primary or the topology is ``rewindable``; else from
        the primary ``source`` streams from, since PostgreSQL refuses a backup from a standby
        that replayed WAL written with ``full_page_writes = off``. Standbys that streamed
        from ``node`` lose their slot on it: rebuild them too.
        """
        n, upstream = self._node(node), self._running_node(source)
        self._check_can_follow(n, upstream)
        self._take_down(n)
        shutil.rmtree(n.data)
        self._clone(n, upstream, first=False)
        self._reroot()

    def rewind(self, node: str, source: str) -> None:
        """``pg_rewind`` ``node`` (an old primary) onto ``source``'s history; then it streams
        from ``source``.

        ``node`` is stopped first if it runs (a killed one is recovered by ``pg_rewind``
        itself, PostgreSQL 13 or newer). Its writes after the histories diverged are lost,
        as in production. Standbys that followed ``node`` past that point diverged too:
        rebuild them. Needs ``rewindable=True``.
        """
        if not self.rewindable:
            raise RuntimeError("rewind() needs a topology created with rewindable=True")
        n, upstream = self._node(node), self._running_node(source)
        self._check_can_follow(n, upstream)
        self._take_down(n)
        # pg_rewind reads the source's timeline from its control file, which a promoted
        # node updates only at its first checkpoint: without one, "no rewind required".
        self._query(upstream.name, "CHECKPOINT")
        self._account.run(
            [
                str(self.bin_dir / "pg_rewind"),
                "-D",
                str(n.data),
                "--source-server",
                str(make_dsn(host=HOST, port=upstream.port, user=self.user, dbname="postgres")),
                "--no-sync",
            ],
            timeout=START_TIMEOUT * 3,
            env=self._client_env(),
        )
        n.slot = slot_name(n.name)
        self._create_slot(upstream, n.slot)
        self._follow(n, upstream, first=False)
        self._reroot()

    def fork(self, node: str) -> None:
        """Promote standby ``node`` while the node it streams from keeps running: a split brain.

        Both then accept writes, on diverging timelines (the promoted one on the next
        timeline). The other standbys keep following the old node: their
        ``primary_conninfo`` names its port, and it never sends them the new timeline, so
        they stay on its history. Unlike :meth:`promote`, the old node remains the one
        :meth:`wait_replicated` measures against. ``node``'s slot on the old node is dropped.
        """
        n = self._node(node)
        old = self._nodes[n.upstream] if n.upstream is not None else None
        slot = n.slot
        self._promote(n)
        if old is not None and slot is not None:
            self._drop_slot(old, slot)
        n.slot = None

    def timeline(self, node: str) -> int:
        """The timeline ``node`` writes WAL on (a primary) or receives it on (a standby)."""
        sql = (
            "SELECT CASE WHEN pg_is_in_recovery() THEN coalesce("
            "(SELECT received_tli FROM pg_stat_wal_receiver),"
            " (pg_control_checkpoint()).timeline_id)"
            " ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int"
            " END"
        )
        return int(self._query(node, sql)[0][0])

    def _running_node(self, name: str) -> Node:
        n = self._node(name)
        if n.server.pid() is None or n.hung:
            raise RuntimeError(f"{name} is not running")
        return n

    def _check_can_follow(self, n: Node, upstream: Node) -> None:
        """Refuse a loop: ``upstream`` must not be ``n`` nor stream from it."""
        name: str | None = upstream.name
        while name is not None:
            if name == n.name:
                raise ValueError(f"{upstream.name} streams from {n.name}: it cannot follow it")
            name = self._nodes[name].upstream

    def _take_down(self, n: Node) -> None:
        """Stop ``n`` (fast), drop its slot upstream, clear what a killed server left."""
        self.stop(n.name)
        if n.upstream is not None and n.slot is not None:
            self._drop_slot(self._nodes[n.upstream], n.slot)
        n.upstream = n.slot = None
        n.server.clear_stale(self.directory, n.port)

    def _clone(self, node: Node, upstream: Node, first: bool) -> None:
        """Make ``node`` (no data yet) a standby of ``upstream`` and start it."""
        node.slot = slot_name(node.name)
        self._create_slot(upstream, node.slot)
        if upstream.upstream is None or self.rewindable:
            self._base_backup(node, upstream, "-S", node.slot)
        else:
            self._base_backup(node, self._nodes[self._root(upstream.name)])
        self._follow(node, upstream, first)

    def _follow(self, node: Node, upstream: Node, first: bool) -> None:
        """Configure ``node`` as a standby of ``upstream``, start it, wait until it streams."""
        conninfo = make_dsn(host=HOST, port=upstream.port, user=self.user, password=self._password)
        self._replication_ports.pop(node.name, None)  # streams directly from now on
        set_auto_conf(
            node.data,
            {"primary_conninfo": str(conninfo), "primary_slot_name": node.slot or ""},
            self._account,
        )
        signal_file = node.data / "standby.signal"
        signal_file.touch()
        self._account.chown(signal_file)
        node.upstream = upstream.name
        self._pg_ctl_start(node, first=first)
        # On the upstream's timeline: a rewound node streams the old one up to the switch
        # first, then waits while its receiver restarts on the new one.
        wanted = [("streaming", upstream.port, self.timeline(upstream.name))]
        self._poll(
            lambda: self._query(node.name, RECEIVER_SQL) == wanted,
            START_TIMEOUT,
            f"{node.name} streaming from {upstream.name}",
        )

    def _create_slot(self, n: Node, slot: str) -> None:
        self._query(
            n.name,
            "SELECT pg_create_physical_replication_slot(%s, true) WHERE NOT EXISTS"
            " (SELECT FROM pg_replication_slots WHERE slot_name = %s)",
            (slot, slot),
        )

    def _drop_slot(self, n: Node, slot: str) -> None:
        """Drop ``slot`` on ``n`` once its walsender is gone; nothing if ``n`` is down."""
        if n.server.pid() is None or n.hung:
            return
        drop = (
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
            " WHERE slot_name = %s AND NOT active"
        )
        exists = "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s"

        def dropped() -> bool:
            self._query(n.name, drop, (slot,))
            return self._query(n.name, exists, (slot,)) == [(0,)]

        self._poll(dropped, START_TIMEOUT, f"slot {slot} dropped on {n.name}")

    def _root(self, name: str) -> str:
        """The primary at the top of ``name``'s chain of upstreams."""
        while (upstream := self._nodes[name].upstream) is not None:
            name = upstream
        return name

    def _reroot(self) -> None:
        """After a node became a standby: replicas follow the primary at the top of its chain."""
        self._source = self._root(self._source)
