"""What a read must see: causal positions that follow the program, tokens, and scopes.

What a token means: a WAL position of the primary. A read may be served by a standby only once
that standby has replayed the position its task requires; ``mgr.token`` is that position as
text (a header or cookie value), and ``mgr.session(token)`` resumes it elsewhere.

Which position a read requires follows program order (the README's table has every case):

- a task requires what it wrote itself;
- and what every task it awaited wrote (``await task``, ``gather``, ``TaskGroup``,
  ``wait_for``, ``shield``, ``as_completed``, ``asyncio.timeout``), transitively: a task's
  position folds into its parent's once the task is done;
- a child task starts with what its parent required when the child first queried;
- a task does not require what tasks it did not await wrote (siblings, other requests);
- a task with no session above it (a script, a test, a step of ``run_until_complete``, a
  request of a server without the middleware) is *top-level*: it also requires what every
  top-level task that finished before its read wrote;
- an explicit session (``mgr.session(token)``, the framework middleware) is a root: it
  requires its token and what it and its children wrote, nothing else; when the block exits
  its writes fold into the task that opened it.

A write under contention records no position yet, only an epoch (``unknown_writes``); a
read of a cell holding one first settles it with a read of the primary's position started
after that epoch (``Positions`` in ``writes``, shared), so positions of writes nobody reads
after are never read.

The mechanism needs no task factory: each task gets a *cell* (its position and time of last
write) on its first query, in a ContextVar of this manager. A cell that rises above its start
registers with its parent (or, top-level, with the manager) and folds into it when its task is
done: by a done callback, and by a check for done children at every read, since a task
awaiting a child can resume before the child's callbacks run.

Tokens from outside are untrusted: a malformed one is ignored, and one beyond every position
known is vetted against the primary before the first read trusts it. Scopes
(``mgr.primary()``, ``mgr.replica(name)``) live here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from .consistency import LSN_MASK, WarnOnce, format_lsn, format_token, parse_token, position
from .core import Core

__all__ = ["UNKNOWN_LSN", "UNKNOWN_POS", "Cell", "Route", "Session", "Sessions"]

logger = logging.getLogger("areplica")


#: What a cell requires after a write whose WAL position could not be read: above every
#: real position (no standby has it), until the read path settles it with the primary's
#: position read afterwards (``note_unknown_write``, ``settle_unknown``).
UNKNOWN_LSN = (1 << 64) - 1
#: The same as a position (timeline and LSN all ones): the token of a cell whose position
#: is unknown.
UNKNOWN_POS = (1 << 96) - 1


@dataclass(frozen=True)
class Route:
    """A routing scope: ``primary()`` or ``replica(name)``."""

    target: Literal["primary", "replica"]
    name: str | None = None


class Cell:
    """What one task, or one explicit session, has written or seen.

    ``pos``: the position its reads require (0: none), ``timeline << 64 | lsn`` (see
    ``consistency.position``). ``wrote``: the highest position of writes made in it or folded
    from its children (what an explicit session hands back to its opener). ``unknown``: the
    latest write it requires whose position was never read, as ``Sessions.unknown_writes``
    counted it (0: none); kept apart from ``pos`` so that settling it (with a primary
    position read after that write) never erases a known position above the settled one.
    ``last_write``: monotonic time of the last write (``sticky`` mode). ``external``:
    ``pos`` came from an untrusted token not vetted yet.
    """

    __slots__ = (
        "children",
        "client",
        "explicit",
        "external",
        "folded",
        "last_write",
        "parent",
        "pos",
        "registered",
        "task",
        "top",
        "unknown",
        "wrote",
    )

    def __init__(
        self,
        task: asyncio.Task[Any] | None,
        parent: Cell | None,
        *,
        pos: int = 0,
        unknown: int = 0,
        last_write: float = 0.0,
        top: bool = False,
        explicit: bool = False,
    ) -> None:
        self.task = task
        self.parent = parent
        self.pos = pos
        self.unknown = unknown
        self.wrote = 0
        self.last_write = last_write
        self.top = top
        self.explicit = explicit
        self.external = False
        self.client: str | None = None
        self.children: set[Cell] = set()
        self.registered = False
        self.folded = False

    @property
    def lsn(self) -> int:
        """The WAL position (without its timeline) its reads require; 0: none."""
        return self.pos & LSN_MASK

    def __repr__(self) -> str:
        kind = "session" if self.explicit else "top-level" if self.top else "child"
        shown = format_token(UNKNOWN_POS if self.unknown else self.pos)
        return f"<Cell {kind} {shown} children={len(self.children)}>"


#: ``mgr.session()`` yields a cell: kept under its old name for code that annotated it.
Session = Cell

#: The primary's insert and flush positions, read now (``None``: it cannot answer).
PositionReader = Callable[[], Awaitable[tuple[int, int] | None]]
#: Learn the cluster's current state within a timeout; True once it is learnt.
Learner = Callable[[float], Awaitable[bool]]

# manager key -> route. Immutable mappings: a child task copies the context, and nothing it
# sets can leak back into its parent's view.
_ROUTE: ContextVar[Mapping[object, Route]] = ContextVar(
    "areplica_route", default=MappingProxyType({})
)
_names = itertools.count(1)


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running loop: sync code (allow_sync at import time, say)
        return None


class Sessions:
    """The causal cells, tokens and scopes of one manager (see the module docstring)."""

    def __init__(self, core: Core) -> None:
        self._core = core
        self._key = object()
        self._cell: ContextVar[Cell | None] = ContextVar(
            f"areplica_cell_{next(_names)}", default=None
        )
        #: Top-level cells that wrote and whose tasks are not folded yet.
        self._top: set[Cell] = set()
        #: What finished top-level tasks wrote: every top-level read requires it.
        self._done_pos = 0
        self._done_unknown = 0
        self._done_write = 0.0
        self._highest_lsn = 0
        self._warned = WarnOnce(maxsize=1024)
        #: Writes acknowledged without a position read yet (each one bumps an epoch: a
        #: primary position read started when it was N covers the writes up to N).
        self.unknown_writes = 0
        #: The latest such read's answer: (epoch when it started, LSN, timeline).
        self._settled: tuple[int, int, int | None] | None = None
        self._causal = core.options.consistency == "causal"
        self._tracks = core.options.consistency != "eventual"

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

    # ------------------------------------------------------------------ the current cell

    def current(self) -> Cell | None:
        """The current task's cell, made now on its first use, with done work folded in.

        ``None`` in ``eventual`` mode: nothing is required of a read there.
        """
        if not self._tracks:
            return None
        cell = self._cell.get()
        task = _current_task()
        if task is None:
            # Sync code (allow_sync, at import time say) is no task anyone can await: what
            # it writes is done when the call returns, and every top-level task sees it.
            pos = self._top_pos()
            return Cell(
                None,
                None,
                pos=pos,
                unknown=self._done_unknown,
                last_write=self._done_write,
                top=True,
            )
        if cell is None or cell.task is not task:
            cell = self._new_cell(cell, task)
            self._cell.set(cell)
        self._gather(cell)
        return cell

    def _new_cell(self, inherited: Cell | None, task: asyncio.Task[Any] | None) -> Cell:
        """The first cell of ``task``: a child of the cell it inherited, or a top-level one."""
        if inherited is None or _finished(inherited):
            # No live parent: a top-level task. A finished one inherited (asyncio.Runner
            # reuses one context across steps) still passes on what it required.
            base = self._top_pos()
            unknown = self._done_unknown
            last = self._done_write
            if inherited is not None:
                base = max(base, self._position(inherited))
                unknown = max(unknown, inherited.unknown)
                last = max(last, inherited.last_write)
            return Cell(task, None, pos=base, unknown=unknown, last_write=last, top=True)
        cell = Cell(
            task,
            inherited,
            pos=self._position(inherited),
            unknown=inherited.unknown,
            last_write=inherited.last_write,
        )
        cell.external = inherited.external
        cell.client = inherited.client
        return cell

    def _position(self, cell: Cell) -> int:
        """What ``cell`` requires now, with its done children (and, top-level, done tasks)."""
        self._gather(cell)
        return cell.pos

    def _gather(self, cell: Cell) -> None:
        """Fold in the work of finished children (and, for a top-level cell, finished tasks)."""
        if cell.children:
            for child in [c for c in cell.children if _finished(c)]:
                self._fold(child)
        if cell.top:
            pos = self._top_pos()
            if pos > cell.pos:
                cell.pos = pos
            if self._done_unknown > cell.unknown:
                cell.unknown = self._done_unknown
            if self._done_write > cell.last_write:
                cell.last_write = self._done_write

    def _top_pos(self) -> int:
        """What finished top-level tasks wrote (folding any whose callback has not run)."""
        if self._top:
            for cell in [c for c in self._top if _finished(c)]:
                self._fold(cell)
        return self._done_pos

    # ------------------------------------------------------------------ raising and folding

    def _raise(self, cell: Cell, pos: int, wrote: int, last_write: float, unknown: int = 0) -> None:
        """``cell`` now requires ``pos``; registered with its parent to fold into it later."""
        if pos > cell.pos:
            cell.pos = pos
        if unknown > cell.unknown:
            cell.unknown = unknown
        if wrote > cell.wrote:
            cell.wrote = wrote
        if last_write > cell.last_write:
            cell.last_write = last_write
        if cell.registered or cell.explicit or cell.folded:
            return
        cell.registered = True
        if cell.top:
            self._top.add(cell)
        elif cell.parent is not None:
            cell.parent.children.add(cell)
        if cell.task is not None:
            cell.task.add_done_callback(functools.partial(self._task_done, cell))

    def _task_done(self, cell: Cell, task: asyncio.Task[Any]) -> None:
        self._fold(cell)

    def _fold(self, cell: Cell) -> None:
        """A finished task's cell: hand what it required to its parent (or the manager)."""
        if cell.folded:
            return
        cell.folded = True
        self._gather(cell)
        if cell.top:
            self._top.discard(cell)
            self._done_pos = max(self._done_pos, cell.pos)
            self._done_unknown = max(self._done_unknown, cell.unknown)
            self._done_write = max(self._done_write, cell.last_write)
            return
        parent = cell.parent
        if parent is not None:
            parent.children.discard(cell)
            self._raise(parent, cell.pos, cell.wrote, cell.last_write, cell.unknown)

    # ------------------------------------------------------------------ tokens and sessions

    @property
    def token(self) -> str | None:
        """The position the current task's reads require, as a token; ``None`` when none."""
        cell = self.current()
        if cell is None or not (cell.pos or cell.unknown):
            return None
        if cell.unknown and not self.settle_cached(cell):
            # A write's position not read yet (``settled_token()`` waits for it): the
            # token that makes its reader ask the primary (``vet``), correct if slower.
            return format_token(UNKNOWN_POS)
        return format_token(cell.pos)

    @contextlib.asynccontextmanager
    async def open(
        self, token: str | None = None, *, client: str | None = None
    ) -> AsyncIterator[Cell]:
        """An explicit session for the block: a root that requires ``token`` and its writes.

        The token is untrusted (vetted on the first read). When the block exits, what it
        and its children wrote folds into the task that opened it.
        """
        cell = Cell(_current_task(), None, pos=self._parse(token, client), explicit=True)
        cell.external = cell.pos > 0 and self._causal
        cell.client = client
        reset = self._cell.set(cell)
        try:
            yield cell
        finally:
            self._cell.reset(reset)
            self._gather(cell)
            if self._tracks and (cell.wrote or cell.unknown or cell.last_write):
                opener = self.current()
                if opener is not None:
                    self._raise(opener, cell.wrote, cell.wrote, cell.last_write, cell.unknown)

    def _parse(self, token: str | None, client: str | None) -> int:
        if not token:
            return 0
        try:
            return parse_token(token)  # refuses anything long before looking at it
        except ValueError:
            self.warn_once(
                client, "malformed", f"ignoring a malformed causal token ({len(token)} characters)"
            )
            return 0

    def required(self, cell: Cell | None) -> int | None:
        """The WAL position a read of ``cell`` needs a replica to have replayed."""
        if cell is None or not self._causal:
            return None
        if cell.unknown:
            return UNKNOWN_LSN
        return cell.pos & LSN_MASK if cell.pos else None

    def sticky(self, cell: Cell | None) -> bool:
        """True while a ``sticky`` session reads from the primary after its last write."""
        options = self._core.options
        return (
            cell is not None
            and options.consistency == "sticky"
            and cell.last_write > 0
            and time.monotonic() - cell.last_write < options.sticky_for
        )

    def note_write(self, lsn: int | None, timeline: int | None = None) -> None:
        """A write (or a commit that wrote) happened; ``lsn`` covers it in causal mode.

        ``timeline``: the primary's when it wrote, so the token knows its history.
        """
        cell = self.current()
        if cell is None:
            return
        pos = position(timeline, lsn) if lsn else 0
        now = time.monotonic()
        if cell.task is None:  # sync code: done at once (see current())
            self._done_pos = max(self._done_pos, pos)
            self._done_write = max(self._done_write, now)
        else:
            self._raise(cell, pos, pos, now)
        if lsn and lsn > self._highest_lsn:
            self._highest_lsn = lsn

    def note_unknown_write(self) -> None:
        """A write committed and the WAL position covering it is not read (yet, or at all).

        A write under contention returns before its position is read; a write whose
        position read failed never has one. The current task then requires ``UNKNOWN_LSN``
        (an epoch folded into its parent like a position): no standby has it, so before its
        next read the read path settles it with a read of the primary's position started
        after the write (``Positions``, one read for every write before it started), or,
        when the primary cannot say, reads on the primary. Never a stale read.
        """
        self.unknown_writes += 1
        epoch = self.unknown_writes
        cell = self.current()
        if cell is None:
            return
        now = time.monotonic()
        if cell.task is None:  # sync code: done at once (see current())
            self._done_unknown = epoch
            self._done_write = max(self._done_write, now)
        else:
            self._raise(cell, 0, 0, now, epoch)

    def remember(self, epoch: int, lsn: int, timeline: int | None) -> None:
        """A read of the primary's position, started at ``epoch``, answered ``lsn``.

        Later reads whose unknown writes it covers settle with it at once
        (``settle_cached``), and so do finished top-level tasks at once.
        """
        if self._settled is None or epoch >= self._settled[0]:
            self._settled = (epoch, lsn, timeline)
        if self._done_unknown and self._done_unknown <= epoch:
            self._done_unknown = 0
            self._done_pos = max(self._done_pos, position(timeline, lsn))

    def settle_cached(self, cell: Cell) -> bool:
        """Settle ``cell``'s unknown position with the latest answer, if it covers it."""
        settled = self._settled
        if cell.unknown and settled is not None and cell.unknown <= settled[0]:
            self.settle_unknown(cell, settled[1], settled[0], settled[2])
        return not cell.unknown

    def settle_unknown(self, cell: Cell, lsn: int, epoch: int, timeline: int | None = None) -> None:
        """Settle an unknown position with ``lsn``, the primary's, read once ``epoch`` held.

        ``epoch`` is ``unknown_writes`` when that read started: it covers every write
        acknowledged without a position up to then, and only those. A cell (or what finished
        top-level tasks left) whose unknown write came later stays unknown. The known
        position is kept: the settled one only raises it.
        """
        pos = position(timeline, lsn)
        if cell.unknown and cell.unknown <= epoch:
            cell.unknown = 0
            cell.pos = max(cell.pos, pos)
            cell.wrote = max(cell.wrote, pos)
        if self._done_unknown and self._done_unknown <= epoch:
            self._done_unknown = 0
            self._done_pos = max(self._done_pos, pos)

    # ------------------------------------------------------------------ vetting

    def warn_once(self, client: str | None, kind: str, message: str) -> None:
        """Log ``message`` once per (client, kind); bounded memory, keyed by a hash."""
        if self._warned.should_warn(client, kind):
            shown = "unknown" if client is None else repr(client[:60])
            logger.warning("%s: %s (client %s)", self._core.name, message, shown)

    async def vet(self, cell: Cell, positions: PositionReader, learn: Learner) -> None:
        """Judge an external token once, before its first read trusts it.

        A token within what this process knows (the primary's timeline, at or below the
        highest position any member has shown) stands. One from a newer timeline, or beyond
        every position seen, may be a genuine write on a primary this process has not
        probed yet (a switchover seen by another process first): the cluster's state is
        learnt first (one shared, rate-limited refresh; at most ``causal_wait`` here). Then:
        a token on an older timeline, beyond where the primary's history left it, names a
        write lost in a failover: it is satisfied at that branch point (counted, logged
        once). A token the primary, reached and read now, shows beyond anything written is
        clamped to its flush position (counted, logged once): a forged token never makes a
        read fail or pins it to the primary. When nothing could be learnt in time, the token
        is kept for this read and judged again on the next.
        """
        timeline, lsn = cell.pos >> 64, cell.pos & LSN_MASK
        if lsn == UNKNOWN_LSN:
            await self._settle_token(cell, positions)
            return
        if self._known(timeline, lsn):
            cell.external = False
            return
        options = self._core.options
        wait = options.causal_wait
        primary = self._core.cluster.primary
        if primary is None or primary.state != "up":
            # No primary answers: the read cannot go there, so it waits for the round (one
            # health_timeout at most) rather than fail for want of a judgement.
            wait = max(wait, options.health_timeout)
        if not await learn(wait):
            return  # kept as is for this read: never a stale read on stale knowledge
        cell.external = False
        primary = self._core.cluster.primary
        current_tli = primary.timeline if primary is not None else None
        if timeline and current_tli and timeline < current_tli:
            self._judge_older(cell, timeline, lsn)
        elif not self._known(timeline, lsn):
            await self._judge_beyond(cell, lsn, current_tli, positions)

    async def _settle_token(self, cell: Cell, positions: PositionReader) -> None:
        """The "unknown" token: a write whose position its process had not read yet.

        The write was acknowledged before the token was sent, so before now: the primary's
        flush position now covers it (its commit record was flushed before the
        acknowledgement, ``synchronous_commit = on``). The flush position, not the insert
        position, as for a forged token: a record inserted but not flushed yet reaches no
        standby, and anyone can send this token. While no primary answers: the highest
        position an up standby has replayed (a forged token never fails a read).
        """
        cell.external = False
        answer = await positions()
        primary = self._core.cluster.primary
        if answer is not None and primary is not None:
            self._highest_lsn = max(self._highest_lsn, answer[0])
            cell.pos = max(position(primary.timeline, answer[1]), cell.wrote)
        else:
            cell.pos = max(position(None, self._standbys_have()), cell.wrote)

    def _standbys_have(self) -> int:
        """The highest position an up standby has replayed (else the highest shown).

        With no primary answering, a stopped or crashed primary's last position may be
        past anything its standbys will ever replay (its last records unsent).
        """
        cluster = self._core.cluster
        replayed = [n.lsn for n in cluster if n.role != "primary" and n.state == "up" and n.lsn]
        self._known(0, 0)  # refreshes the highest position members have shown
        return max(replayed, default=self._highest_lsn)

    def _known(self, timeline: int, lsn: int) -> bool:
        """True for a position on the primary's timeline within what members have shown."""
        primary = self._core.cluster.primary
        if timeline and (primary is None or timeline != primary.timeline):
            return False
        known = max((n.lsn or 0 for n in self._core.cluster), default=0)
        self._highest_lsn = max(self._highest_lsn, known)
        return lsn <= self._highest_lsn

    def check_history(self, cell: Cell) -> None:
        """A position of the cell's own on an older timeline than the primary's: judged.

        The cell's own writes (or those it awaited) went to a primary that has since been
        replaced; those past the point where the new primary's history left that timeline
        were lost in the failover (a fork: the old primary went on acknowledging writes).
        Counted and logged like a lost token, and the reads require what survived.
        """
        timeline = cell.pos >> 64
        if not timeline:
            return
        primary = self._core.cluster.primary
        current = primary.timeline if primary is not None else None
        if current and timeline < current:
            self._judge_older(cell, timeline, cell.pos & LSN_MASK)

    def _judge_older(self, cell: Cell, timeline: int, lsn: int) -> None:
        """A position of an ancestor timeline: what of it the primary's history kept."""
        monitor = self._core.monitor
        history = monitor.history if monitor is not None else None
        kept = history.surviving(timeline, lsn) if history is not None else None
        if kept is None or kept >= lsn:
            return  # on the primary's history (or unknowable): it stands
        # Whatever else the cell wrote is at or below this position on this timeline (a
        # later write on the new timeline would be the cell's position): lost as well.
        cell.pos = position(timeline, kept)
        self._core.counters.lost_tokens += 1
        self.warn_once(
            cell.client,
            "lost",
            f"a causal position (a token or a write of its own) of timeline {timeline} at "
            f"{format_lsn(lsn)} is past where the primary's history left that timeline "
            f"({format_lsn(kept)}): its write was lost in a failover; it is satisfied at "
            "that point",
        )

    async def _judge_beyond(
        self, cell: Cell, lsn: int, timeline: int | None, positions: PositionReader
    ) -> None:
        """A token beyond every position seen: the primary's own positions decide."""
        current = self._highest_lsn
        clamp = self._standbys_have()  # no primary answers: what a standby can serve
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
        if lsn <= current and (cell.pos >> 64) in (0, timeline):
            return
        cell.pos = max(position(timeline, min(clamp, current)), cell.wrote)
        self._core.counters.clamped_tokens += 1
        self.warn_once(
            cell.client,
            "clamped",
            f"a causal token beyond every known WAL position ({format_lsn(current)}) "
            f"was clamped to {format_lsn(cell.lsn)}",
        )


def _finished(cell: Cell) -> bool:
    """True once the cell's task is done (a cell of sync code never is)."""
    task = cell.task
    return task is not None and task.done()
