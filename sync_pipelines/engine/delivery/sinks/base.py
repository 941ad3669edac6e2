"""The sink protocol: what every target kind implements, and the types it speaks.

A sink applies an ordered window of mapped changes (:class:`Item`) to its target and says, per
change, what became of it (:class:`Outcome`):

* ``delivered`` — applied (it may still ask for rows to be re-read, ``refetch``);
* ``retry`` — a transient failure (429, 5xx, a timeout...; ``failure.retry_after_s`` if the
  target said when to come back): the delivery loop puts it in the retry queue;
* ``dead`` — refused for good (a constraint, a 4xx, a TRUNCATE an API cannot take);
* ``parked`` — not attempted because an earlier change of the same key failed in this window.

Rules every sink keeps (the delivery loop relies on them):

1. **Per-key order.** Changes of one key are applied in the given order, and none after a
   change of that key that failed (it is ``parked``). Other keys go on.
2. **Record before final.** ``record(outcomes)`` is called exactly once per call, with one
   outcome per item in order, *before* the sink makes the window final and acknowledged
   (Postgres: before the commit that moves its checkpoint; HTTP: once every request has been
   answered). The loop writes the retry queue, dead letters, ledger and re-read requests
   there, in one state transaction, so a crash between recording and the sink's commit only
   replays the window.
3. **Idempotency is the sink's own.** A replayed window must not apply a change twice in
   effect: Postgres writes its checkpoint in the apply transaction (``checkpoint()`` then
   says where to start); HTTP sends a stable idempotency key per change and skips requests the
   ledger lists as accepted (``Item.done_subs``), reporting newly accepted requests of changes
   that do not complete (``Outcome.accepted``) for the ledger.
4. **Whole-target failures raise.** When the target itself is unusable (down, unreachable, a
   serialization failure of the whole transaction), :class:`~...errors.TransientDeliveryError`
   (or a terminal error for a target that can never work as configured) is raised before
   ``record``: nothing is recorded and the window is delivered again later.

Sinks never see the slot, the state database or Dagster.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from ...mapping.keys import change_key
from ...mapping.mapper import TableMapper, TargetOp
from ...staging.held import Failure, HeldChange
from ...wire.change import Position

Status = Literal["delivered", "retry", "dead", "parked"]


@dataclass(frozen=True)
class ApplyStats:
    """What a window did at the target, by kind of operation."""

    upserts: int = 0
    """Rows written (or found identical, see ``unchanged``)."""
    deletes: int = 0
    truncates: int = 0
    unchanged: int = 0
    """Upserts of a row the target already had exactly (not rewritten)."""
    refetch: int = 0
    """Partial upserts the target could not complete: not written, the row is re-read from the
    source instead (see :mod:`....backfill.refetch`)."""

    def __add__(self, other: ApplyStats) -> ApplyStats:
        return ApplyStats(self.upserts + other.upserts, self.deletes + other.deletes,
                          self.truncates + other.truncates, self.unchanged + other.unchanged,
                          self.refetch + other.refetch)


@dataclass(slots=True)
class Item:
    """One staged change on its way to a target: where it is, its raw message (kept for the
    retry queue), its mapping and its ops."""

    position: Position
    relation_id: int
    op: str
    message: bytes
    table: TableMapper
    ops: list[TargetOp]
    attempts: int = 0
    done_subs: frozenset[int] = frozenset()
    """Sub-requests of this change the target already accepted (HTTP ledger): not re-sent."""
    held_key: str | None = None
    """Its key in the retry queue's text form, worked out when first needed (most changes
    are delivered without anyone asking)."""

    @property
    def key(self) -> str:
        if self.held_key is None:
            self.held_key = change_key(self.table.target_table, self.ops)
        return self.held_key

    @property
    def change(self) -> HeldChange:
        """The change as the retry queue or the dead letters hold it."""
        return HeldChange(self.key, self.position, self.relation_id, self.op, self.message,
                          self.attempts)


@dataclass(slots=True)
class Outcome:
    """What became of one :class:`Item`."""

    item: Item
    status: Status
    failure: Failure | None = None
    """Why, for ``retry`` and ``dead``."""
    accepted: tuple[tuple[int, int | None], ...] = ()
    """``(sub, status)`` of requests accepted although the change did not complete (a key
    change whose DELETE went through but not its PUT): the ledger keeps them."""
    refetch: tuple[tuple[Any, ...], ...] = ()
    """Source keys (text) of this change's rows to re-read: partial rows the target could not
    complete."""


@dataclass(frozen=True)
class ApplyResult:
    outcomes: list[Outcome]
    stats: ApplyStats = ApplyStats()


@dataclass(frozen=True)
class Checkpoint:
    """Where a window ends: a sink that keeps its own position writes it with the apply."""

    position: Position
    batch_id: int


Record = Callable[[list[Outcome]], None]
Resolve = Callable[[list[Item], Any], list[Item]]
"""A two-way link's check, run inside the apply transaction with the sink's ``read_rows``:
the items with their ops replaced by what the link decided (see :mod:`....links.resolver`)."""


class Sink(Protocol):
    """One target of one pipeline; see the module docstring for the rules."""

    window_changes: int
    """About how many staged changes one :meth:`apply` should get (whole batches are never
    split)."""

    def checkpoint(self) -> Position | None:
        """The sink's own durable position, if it keeps one (authoritative over the state's)."""
        ...

    def prepare(self, table: TableMapper, relation_version: int) -> bool:
        """Ready the target for a table's relation version; False if it does not take the
        table (its changes are skipped)."""
        ...

    def apply(self, items: Iterable[Item], *, checkpoint: Checkpoint | None,
              record: Record, resolve: Resolve | None = None) -> ApplyResult:
        """Apply ``items`` (in stream order; may be lazy) and return one outcome per item,
        having called ``record`` with them first. ``checkpoint`` is None for the retry sweep
        (changes taken from the retry queue, not a window of the stream). ``resolve``: a
        two-way link's check (Postgres targets only)."""
        ...

    def close(self) -> None: ...
