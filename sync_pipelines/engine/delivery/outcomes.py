"""Recording what became of delivered changes: one state transaction per window or sweep.

Contract: :func:`record_window` (a window of the stream) and :func:`record_sweep` (chains taken
from the retry queue) turn a sink's outcomes into state, for every sink alike:

* per key, in order, the first change that failed is the *head*: a transient failure puts it
  in the retry queue (attempt count, next attempt after an exponential backoff with jitter,
  never sooner than Retry-After), a terminal one — or the last allowed attempt — makes it a
  dead letter; every later change of its key in the window stays behind it (parked, or dead
  with it), in order. Other keys are not touched;
* changes of keys that were already blocked (held or dead-lettered for this target before
  the window) park behind what blocks them — unless their position is already held or dead
  (a replay after a crash), which would record them twice;
* accepted requests of changes that stay behind go into the ledger (a re-send skips them);
* delivered changes that asked for rows to be re-read leave a refetch request.

Everything of one call is one transaction, called by the sink before it makes its work final
(see :mod:`.sinks.base`). Releasing delivered changes from the retry queue is done separately,
by :func:`release`, only after the sink has made them final: a crash in between re-sends them,
which the sink's idempotency absorbs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from ..faults import NO_FAULTS, Faults
from ..spec import PipelineSpec
from ..staging.held import Failure, HeldChange, HeldStore, backoff, due_at
from ..staging.refetch import RefetchStore, Request
from ..staging.store import StateStore
from ..wire.change import Position
from .sinks.base import Outcome

_GONE = "its table is no longer sent to this target"
_REASON = "an update without its unchanged large values that target {t!r} could not complete"


@dataclass
class Tally:
    """What recording did, for the report."""

    held: int = 0
    dead: int = 0
    rescheduled: int = 0
    refetch: int = 0


def _heads(outcomes: Sequence[Outcome]) -> dict[str, int]:
    """Index of the first outcome that did not complete, per key (its chain starts there)."""
    heads: dict[str, int] = {}
    for i, o in enumerate(outcomes):
        if o.status != "delivered" and o.item.key not in heads:
            heads[o.item.key] = i
    return heads


def _failure_of(o: Outcome) -> Failure:
    assert o.failure is not None, f"{o.status} outcome without a failure"
    return o.failure


def _refetches(target: str, outcomes: Iterable[Outcome]) -> list[Request]:
    return [Request(target, o.item.position, o.item.table.source_table, tuple(key),
                    _REASON.format(t=target))
            for o in outcomes if o.status == "delivered" for key in o.refetch]


def record_window(state: StateStore, pipeline: PipelineSpec, target: str,
                  outcomes: Sequence[Outcome], parked: Sequence[HeldChange],
                  *, faults: Faults = NO_FAULTS) -> Tally:
    """Record a window's outcomes and the changes parked before it was sent (one transaction)."""
    faults.hit("after_send")
    held = HeldStore(state, pipeline.name, target)
    policy = pipeline.policy.retry
    tally = Tally()
    heads = _heads(outcomes)
    with state.conn.transaction():
        if parked:
            held.hold(parked)
            tally.held += len(parked)
        staying: list[Outcome] = []
        for key, h in heads.items():
            chain = [o for o in outcomes[h:] if o.item.key == key]
            staying.extend(chain)
            failure = _failure_of(chain[0])
            changes = [o.item.change for o in chain]
            if failure.transient and policy.max_attempts > 1:
                at = due_at(backoff(policy, 1, failure.retry_after_s))
                held.hold([replace(changes[0], attempts=1), *changes[1:]],
                          next_attempt_at=at, failure=failure)
                tally.held += len(changes)
            else:
                held.kill(changes, failure, attempts=1)
                tally.dead += len(changes)
        held.record_delivered((o.item.position, sub, status)
                              for o in staying for sub, status in o.accepted)
        tally.refetch = RefetchStore(state, pipeline.name).request(
            _refetches(target, outcomes))
    faults.hit("after_record")
    return tally


def record_sweep(state: StateStore, pipeline: PipelineSpec, target: str,
                 outcomes: Sequence[Outcome], *, gone: Sequence[HeldChange] = (),
                 now: datetime, faults: Faults = NO_FAULTS) -> Tally:
    """Record a sweep's outcomes: per key, a failed head is rescheduled (attempts + 1) or, past
    ``max_attempts`` or for a terminal error, dies with everything behind it. ``gone`` are
    chains nothing can deliver any more (their table left the spec): dead letters."""
    faults.hit("after_send")
    held = HeldStore(state, pipeline.name, target)
    policy = pipeline.policy.retry
    tally = Tally()
    with state.conn.transaction():
        for key in dict.fromkeys(c.key for c in gone):
            chain = [c for c in gone if c.key == key]
            held.kill(chain, Failure(False, None, _GONE), attempts=chain[0].attempts + 1)
            tally.dead += len(chain)
        staying: list[Outcome] = []
        for key, h in _heads(outcomes).items():
            chain = [o for o in outcomes[h:] if o.item.key == key]
            staying.extend(chain)
            head = chain[0].item.change  # as held: its key and attempts so far
            failure = _failure_of(chain[0])
            attempts = head.attempts + 1
            if failure.transient and attempts < policy.max_attempts:
                at = due_at(backoff(policy, attempts, failure.retry_after_s), now)
                held.reschedule(key, head.position, attempts, at, failure)
                tally.rescheduled += 1
            else:
                if failure.transient:
                    failure = Failure(False, failure.status,
                                      f"gave up after {attempts} attempts: {failure.error}")
                held.kill([o.item.change for o in chain], failure, attempts)
                tally.dead += len(chain)
        held.record_delivered((o.item.position, sub, status)
                              for o in staying for sub, status in o.accepted)
        tally.refetch = RefetchStore(state, pipeline.name).request(
            _refetches(target, outcomes))
    faults.hit("after_record")
    return tally


def release(state: StateStore, pipeline: str, target: str, positions: Iterable[Position]
            ) -> None:
    """Remove changes the sink has made final from the retry queue (one transaction)."""
    with state.conn.transaction():
        HeldStore(state, pipeline, target).release(positions)
