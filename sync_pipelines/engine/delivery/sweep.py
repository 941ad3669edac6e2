"""The retry sweep: due chains from the retry queue → the same sink, in key order.

:func:`sweep` is the retry schedule's work for one target, whatever its kind: for every key
whose head is due (and that has no unresolved dead letter) it takes the key's whole held chain
in order — the retried head, then what parked behind it — maps it again with the current spec
and hands it to the target's sink (change by change for a Postgres target). The outcomes are
recorded by :func:`.outcomes.record_sweep`: a failed head is rescheduled with a longer backoff,
or after ``max_attempts`` (at once for a terminal error) becomes a dead letter with everything
behind it. Once the sink has made its work final, delivered changes leave the queue
(:func:`.outcomes.release`).

It holds the same lock as a delivery of the target, so the two never interleave. A crash
before the release re-sends the same chains next time (the same rows, the same idempotency
keys); a redriven dead letter is simply a due head.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

from ..faults import NO_FAULTS, Faults
from ..links.resolver import LinkResolver
from ..spec import PipelineSpec
from ..staging.held import HeldChange, HeldStore
from ..staging.store import StateStore
from .loop import Items, collector_paused, link_window, target_lock, wait_for_lock
from .outcomes import Tally, record_sweep, release
from .report import SweepReport
from .sinks.base import Item, Outcome, Sink


def sweep(
    state: StateStore, pipeline: PipelineSpec, target: str, sink: Sink, *,
    now: datetime | None = None, max_keys: int = 10_000, faults: Faults = NO_FAULTS,
    lock_timeout_s: float = 300.0,
) -> SweepReport:
    """Deliver the held chains of due keys, in order; reschedule or dead-letter failed heads."""
    started = time.monotonic()
    now = now or datetime.now(timezone.utc)
    lock = target_lock(pipeline.name, target)
    wait_for_lock(state, lock, lock_timeout_s)
    try:
        held = HeldStore(state, pipeline.name, target)
        keys = held.due_keys(now, max_keys)
        if not keys:
            return SweepReport(pipeline.name, target, duration_s=time.monotonic() - started)
        builder = Items(state, pipeline, sink)
        items: list[Item] = []
        gone: list[HeldChange] = []  # changes whose table left the spec or the target
        for key in keys:
            for hc in held.chain(key):
                it = builder.item((hc.position.commit_lsn, hc.position.seq, 0, hc.relation_id,
                                   hc.op, hc.message), hc.attempts)
                if it is None:
                    gone.append(hc)
                    continue
                it.held_key = hc.key  # the chain's own key, as it was held
                it.done_subs = frozenset(
                    sub for _, _, sub in held.delivered_subs(hc.position, hc.position))
                items.append(it)
        if items:
            with collector_paused(), link_window(state, pipeline, lock_timeout_s) as link:
                recorder = _Recorder(state, pipeline, target, gone, now, faults, link)
                sink.apply(items, checkpoint=None, record=recorder,
                           resolve=link.resolve if link is not None else None)
        else:
            recorder = _Recorder(state, pipeline, target, gone, now, faults)
            recorder([])
        delivered = [o.item.position for o in recorder.outcomes
                     if o.status == "delivered"]
        release(state, pipeline.name, target, delivered)
        return SweepReport(pipeline.name, target, len(keys), len(delivered),
                           recorder.tally.rescheduled, recorder.tally.dead,
                           time.monotonic() - started)
    finally:
        state.unlock(lock)


class _Recorder:
    """The ``record`` a sink calls for one sweep (see :func:`.outcomes.record_sweep`)."""

    def __init__(self, state: StateStore, pipeline: PipelineSpec, target: str,
                 gone: list[HeldChange], now: datetime, faults: Faults,
                 link: LinkResolver | None = None) -> None:
        self.args = (state, pipeline, target)
        self.link = link
        self.gone, self.now, self.faults = gone, now, faults
        self.outcomes: list[Outcome] = []
        self.tally = Tally()

    def __call__(self, outcomes: list[Outcome]) -> None:
        self.outcomes = outcomes
        state = self.args[0]
        with state.conn.transaction():  # a link's decisions commit with the outcomes
            if self.link is not None:
                self.link.save(outcomes)
            self.tally = record_sweep(*self.args, outcomes, gone=self.gone, now=self.now,
                                      faults=self.faults)
