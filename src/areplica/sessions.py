"""Consistency sessions, causal tokens in and out, and routing scopes.

A session records what a reader must see: the WAL position of its writes (its causal token)
and, in ``sticky`` mode, the time of its last write. It lives in a ContextVar keyed by
manager, so tasks inherit it. Tokens from outside (a header, a cookie, a job payload) are
untrusted: a malformed one is ignored, and one beyond every position known is vetted against
the primary before the first read trusts it.

Scopes (``mgr.primary()``, ``mgr.replica(name)``) are kept here too: a ContextVar of routes,
keyed by manager, reset with the token ``set()`` returned.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from .consistency import WarnOnce, format_lsn, parse_lsn
from .core import Core

__all__ = ["Route", "Session", "Sessions"]

logger = logging.getLogger("areplica")


@dataclass(frozen=True)
class Route:
    """A routing scope: ``primary()`` or ``replica(name)``."""

    target: Literal["primary", "replica"]
    name: str | None = None


class Session:
    """A consistency session: the causal token and the time of the last write.

    ``external`` marks a token that came from outside (a header, a cookie, a job payload)
    and has not been vetted yet: the first read of the session clamps it to the primary's
    position, so a forged or absurd token cannot pin reads to the primary.
    """

    __slots__ = ("client", "external", "last_write", "lsn")

    def __init__(self, lsn: int | None = None, *, external: bool = False) -> None:
        self.lsn = lsn
        self.last_write: float | None = None
        self.external = external
        self.client: str | None = None


#: The primary's insert and flush positions, read now (``None``: it cannot answer).
PositionReader = Callable[[], Awaitable[tuple[int, int] | None]]

# manager key -> session / route. Immutable mappings: a child task copies the context, and
# nothing it sets can leak back into its parent's view.
_SESSION: ContextVar[Mapping[object, Session]] = ContextVar(
    "areplica_session", default=MappingProxyType({})
)
_ROUTE: ContextVar[Mapping[object, Route]] = ContextVar(
    "areplica_route", default=MappingProxyType({})
)


class Sessions:
    """The sessions and scopes of one manager."""

    def __init__(self, core: Core) -> None:
        self._core = core
        self._key = object()
        self._highest_lsn = 0
        self._warned = WarnOnce(maxsize=1024)

    # ------------------------------------------------------------------ scopes

    def route(self) -> Route | None:
        """The innermost ``primary()`` / ``replica()`` scope of the current task."""
        route: Route | None = _ROUTE.get().get(self._key)
        return route

    @contextlib.asynccontextmanager
    async def scope(self, route: Route) -> AsyncIterator[None]:
        """Route the block's reads by ``route``."""
        token = _ROUTE.set(MappingProxyType({**_ROUTE.get(), self._key: route}))
        try:
            yield
        finally:
            _ROUTE.reset(token)

    # ------------------------------------------------------------------ sessions

    def current(self, create: bool = False) -> Session | None:
        """The current task's session (made now with ``create``)."""
        session: Session | None = _SESSION.get().get(self._key)
        if session is None and create:
            session = Session()
            _SESSION.set(MappingProxyType({**_SESSION.get(), self._key: session}))
        return session

    @property
    def token(self) -> str | None:
        """The current session's causal token (a WAL position), ``None`` before any write."""
        session = self.current()
        if session is None or session.lsn is None:
            return None
        return format_lsn(session.lsn)

    @contextlib.asynccontextmanager
    async def open(
        self, token: str | None = None, *, client: str | None = None
    ) -> AsyncIterator[Session]:
        """A session for the block, resumed from ``token`` (untrusted: vetted on first read)."""
        lsn = None
        if token:
            try:
                lsn = parse_lsn(token)  # refuses anything long before looking at it
            except ValueError:
                self.warn_once(
                    client,
                    "malformed",
                    f"ignoring a malformed causal token ({len(token)} characters)",
                )
        session = Session(lsn, external=lsn is not None)
        session.client = client
        reset = _SESSION.set(MappingProxyType({**_SESSION.get(), self._key: session}))
        try:
            yield session
        finally:
            _SESSION.reset(reset)

    def min_lsn(self, session: Session | None) -> int | None:
        """The WAL position a read of ``session`` needs a replica to have replayed."""
        if session is not None and self._core.options.consistency == "causal":
            return session.lsn
        return None

    def sticky(self, session: Session | None) -> bool:
        """True while a ``sticky`` session reads from the primary after its last write."""
        options = self._core.options
        return (
            session is not None
            and options.consistency == "sticky"
            and session.last_write is not None
            and time.monotonic() - session.last_write < options.sticky_for
        )

    def note_write(self, lsn: int | None) -> None:
        """A write (or a commit that wrote) happened; ``lsn`` covers it in causal mode."""
        if self._core.options.consistency == "eventual":
            return
        session = self.current(create=True)
        assert session is not None
        session.last_write = time.monotonic()
        if lsn is not None:
            if session.lsn is None or lsn > session.lsn:
                session.lsn = lsn
            if lsn > self._highest_lsn:
                self._highest_lsn = lsn

    # ------------------------------------------------------------------ vetting

    def warn_once(self, client: str | None, kind: str, message: str) -> None:
        """Log ``message`` once per (client, kind); bounded memory, keyed by a hash."""
        if self._warned.should_warn(client, kind):
            shown = "unknown" if client is None else repr(client[:60])
            logger.warning("%s: %s (client %s)", self._core.name, message, shown)

    async def vet(self, session: Session, positions: PositionReader) -> None:
        """Clamp an external token beyond every position known (a forged or absurd one).

        A token at or below the highest position any member has shown (probes, own
        writes) is fine. One beyond it may be another process's write that the last probe
        missed, or garbage: the primary's current position, read now, decides. When the
        primary cannot answer, the highest position known from any member does, so a
        forged token never makes a read fail while standbys answer. This happens once per
        session, and only for such tokens.
        """
        session.external = False
        lsn = session.lsn
        if lsn is None:
            return
        known = max((n.lsn or 0 for n in self._core.cluster), default=0)
        self._highest_lsn = max(self._highest_lsn, known)
        if lsn <= self._highest_lsn:
            return
        current = clamp = self._highest_lsn
        answer = await positions()
        if answer is not None:
            # A record inserted but not yet flushed (an asynchronous commit, a background
            # record) reaches no standby until the WAL writer flushes it (up to
            # wal_writer_delay): a clamp there would send the reads to the primary. A
            # forged token stands for no write of ours, so the clamp goes to what standbys
            # can have: the flush position.
            current = max(current, answer[0])
            clamp = answer[1]
        self._highest_lsn = max(self._highest_lsn, current)
        if lsn > current:
            session.lsn = min(clamp, current)
            self.warn_once(
                session.client,
                "clamped",
                f"a causal token beyond every known WAL position ({format_lsn(current)}) "
                f"was clamped to {format_lsn(session.lsn)}",
            )
