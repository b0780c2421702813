"""What tests do to a :class:`~areplica.testing.patroni.PatroniTopology`'s roles.

Switch over and fail over through Patroni's REST API, crash a member (its Patroni and its
PostgreSQL, by pid) and restart it, add and remove members at runtime, change their tags.
Each returns once Patroni shows the result and PostgreSQL agrees (the new leader accepts
writes, the old one streams from it).
"""

from __future__ import annotations

import base64
import logging
import shutil
import signal
import threading
import time
from collections.abc import Mapping
from typing import Any

from ._patroni_base import BOOL_TAGS, Member, PatroniCore, Switchover, http_call

log = logging.getLogger("areplica.testing.patroni")


class PatroniRoles(PatroniCore):
    """Move roles and change membership (see the module)."""

    # ---------------------------------------------------------------- switchover, failover

    def switchover(self, candidate: str | None = None, *, timeout: float = 90.0) -> Switchover:
        """Ask Patroni (``POST /switchover``) to hand leadership to ``candidate``.

        Without ``candidate``, the first streaming replica without ``nofailover``. Returns
        once the candidate leads and accepts writes *and* the old leader streams from it
        again; the result (also in :attr:`last_switchover`) holds how long each took.
        """
        return self._hand_over("switchover", candidate, timeout)

    def failover(self, candidate: str | None = None, *, timeout: float = 90.0) -> Switchover:
        """Ask Patroni for a manual failover (``POST /failover``) to ``candidate``.

        Patroni requires a candidate for a failover; without one, the first streaming
        replica without ``nofailover`` is named. Returns like :meth:`switchover`. For an
        unplanned failover, :meth:`crash` the leader and :meth:`wait_leader` with
        ``exclude=[old]`` (Patroni waits ``ttl`` seconds for the leader key to expire).
        """
        return self._hand_over("failover", candidate, timeout)

    def _pick_candidate(self, entries: Mapping[str, Mapping[str, Any]], leader: str) -> str:
        for name in sorted(entries):
            entry = entries[name]
            if name == leader or entry.get("state") != "streaming":
                continue
            if entry.get("tags", {}).get("nofailover"):
                continue
            if name in self._members and not self._members[name].down:
                return name
        raise RuntimeError(f"{self.name}: no streaming replica can take over from {leader}")

    def _hand_over(self, action: str, candidate: str | None, timeout: float) -> Switchover:
        with self._lock:
            self._member_names_or_raise()
            old = self.wait_leader(timeout)
            entries = self._entries(self.cluster())
            if candidate is None:
                candidate = self._pick_candidate(entries, old)
            else:
                self._member(candidate)
                if candidate == old:
                    raise ValueError(f"{candidate} is the leader already")
            body = (
                {"leader": old, "candidate": candidate}
                if action == "switchover"
                else {"candidate": candidate}
            )
            answer: dict[str, Any] = {}

            def request() -> None:
                try:
                    answer["response"] = http_call(
                        "POST", f"{self.rest_url(old)}/{action}", body, timeout=timeout
                    )
                except Exception as exc:  # reported by the poll below
                    answer["error"] = exc

            began = time.monotonic()
            thread = threading.Thread(target=request, name=f"{self.name}-{action}", daemon=True)
            thread.start()

            def promoted() -> bool:
                if "error" in answer:
                    raise RuntimeError(
                        f"{action} {old} -> {candidate}: POST failed: {answer['error']}"
                    )
                status, text = answer.get("response", (None, ""))
                if status is not None and (
                    status in (400, 412) or (status == 503 and "failed" in str(text).lower())
                ):
                    raise RuntimeError(
                        f"{action} {old} -> {candidate} refused by Patroni: HTTP {status} {text}"
                    )
                entry = self._entries(self.cluster()).get(candidate, {})
                if entry.get("role") != "leader" or entry.get("state") != "running":
                    return False
                return not self.query(candidate, "SELECT pg_is_in_recovery()")[0][0]

            try:
                self._poll(promoted, timeout, f"{candidate} to lead after the {action}")
                seconds = time.monotonic() - began
                remaining = max(1.0, timeout - seconds)
                self._poll(
                    lambda: self._streams_from(candidate, [old]),
                    remaining,
                    f"{old} streaming from {candidate} after the {action}",
                )
                settled = time.monotonic() - began
            finally:
                # Patroni answers within about a second of the new leader taking the key.
                thread.join(timeout=30)
            result = Switchover(action, old, candidate, seconds, settled)
            self.last_switchover = result
            log.info(
                "%s: %s %s -> %s: leader in %.2fs, settled in %.2fs",
                self.name,
                action,
                old,
                candidate,
                seconds,
                settled,
            )
            return result

    # ---------------------------------------------------------------- faults and membership

    def crash(self, member: str) -> None:
        """SIGKILL ``member``'s Patroni and its PostgreSQL (only those pids); wait until gone.

        A crashed leader keeps Patroni's leader key until ``ttl`` runs out; then a replica
        takes over (see :meth:`wait_leader`). :meth:`restart` brings the member back.
        """
        with self._lock:
            m = self._member(member)
            m.down = True
            m.kill()

    def restart(self, member: str, *, timeout: float = 120.0) -> None:
        """Start ``member``'s Patroni again (after :meth:`crash`); wait until it is healthy.

        Returns once the member leads (``running``) or streams from the leader.
        """
        with self._lock:
            m = self._member(member)
            if m.patroni_pid() is not None:
                raise RuntimeError(f"{member}'s Patroni is running; crash() it first")
            if m.server.pid() is None:
                m.server.clear_stale(self.directory, m.pg_port)
            self._launch(m)
            self._wait_member(m, timeout)

    def _wait_member(self, m: Member, timeout: float) -> None:
        deadline = time.monotonic() + timeout

        def healthy() -> bool:
            entries = self._entries(self.cluster())
            leader = next((n for n, e in entries.items() if e.get("role") == "leader"), None)
            if leader is None:
                return False
            if leader == m.name:
                return entries[leader].get("state") == "running"
            return self._streams_from(leader, [m.name])

        self._poll(healthy, max(1.0, deadline - time.monotonic()), f"{m.name} to rejoin")

    def add_member(
        self,
        name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        *,
        timeout: float = 120.0,
    ) -> str:
        """Start one more member at runtime (a replica, cloned from the leader); return its name.

        Without ``name``, the next free ``nN``. Returns once it streams from the leader.
        """
        with self._lock:
            self._member_names_or_raise()
            if name is None:
                i = len(self._members) + 1
                while f"n{i}" in self._members:
                    i += 1
                name = f"n{i}"
            if name in self._members:
                raise ValueError(f"{self.name} has a member {name!r} already")
            if not name or not all(c.isalnum() or c in "-_" for c in name):
                raise ValueError(f"member names are letters, digits, '-' and '_': {name!r}")
            m = self._new_member(name, tags or {})
            self._launch(m)
            self._wait_member(m, timeout)
            return name

    def remove_member(self, member: str, *, timeout: float = 60.0) -> None:
        """Stop a replica member for good and drop it from Patroni's view and the directory.

        Patroni keeps a stopped member's key until its lease ends (``ttl``); this deletes it
        from etcd so ``GET /cluster`` forgets the member at once. The leader cannot be
        removed: :meth:`switchover` first.
        """
        with self._lock:
            m = self._member(member)
            if self.leader() == member:
                raise RuntimeError(f"{member} is the leader; switchover() first")
            m.down = True
            if m.patroni is not None:
                m.patroni.send_signal(signal.SIGTERM)  # it stops its PostgreSQL (fast) and exits
                m.patroni.wait(timeout)
            if m.pids():
                m.kill()
            key = f"/service/{self.name}/members/{member}".encode()
            status, body = http_call(
                "POST",
                f"{self.etcd_url}/v3/kv/deleterange",
                {"key": base64.b64encode(key).decode()},
            )
            if status != 200:
                raise RuntimeError(f"etcd refused to delete {key.decode()}: {status} {body}")
            self._poll(
                lambda: member not in self._entries(self.cluster()),
                timeout,
                f"{member} to leave /cluster",
            )
            del self._members[member]
            shutil.rmtree(m.home, ignore_errors=True)

    def set_tags(self, member: str, tags: Mapping[str, Any], *, timeout: float = 30.0) -> None:
        """Make ``tags`` the member's Patroni tags: rewrite its YAML and reload (SIGHUP).

        Returns once ``GET /cluster`` shows them (false boolean tags show as absent). On a
        crashed member, the tags apply when it is restarted.
        """
        with self._lock:
            m = self._member(member)
            before, m.tags = m.tags, dict(tags)
            self._write_config(m)
            if m.patroni is None or not m.patroni.running:
                return
            m.patroni.send_signal(signal.SIGHUP)

            def shown() -> bool:
                current = self._entries(self.cluster()).get(member, {}).get("tags", {})
                for key in set(before) | set(m.tags):
                    if key in BOOL_TAGS and not m.tags.get(key):
                        if current.get(key):
                            return False
                    elif key not in m.tags:
                        if key in current:  # a custom tag that was dropped
                            return False
                    elif current.get(key) != m.tags[key]:
                        return False
                return True

            self._poll(shown, timeout, f"tags {m.tags} on {member}")
