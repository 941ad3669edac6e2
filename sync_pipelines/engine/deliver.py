"""Deliver: apply staged batches to one target, oldest first, exactly once.

The engine function behind a pipeline's delivery job. For one target it:

1. takes the ``deliver:<pipeline>:<target>`` advisory lock (a concurrent run waits for it);
2. reads the target's own checkpoint — the authoritative record of what it has applied;
3. for each staged batch up to ``upto_batch`` not yet covered by the checkpoint, reads its
   changes from the state DB, maps them and applies them in one target transaction that also
   moves the checkpoint;
4. records the delivered position in the state DB (a mirror used for demand and clean-up).

Per-key order holds because one run at a time delivers a target, batch by batch in position
order, and a batch is applied as its per-key final state. A crash before a target commit
leaves the batch undelivered (the next run applies it); a crash after the commit but before
step 4 is caught by step 2 (the batch is skipped). Memory is bounded by one batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .errors import TransientDeliveryError
from .faults import NO_FAULTS, Faults
from .mapping import Mapper, TargetOp
from .pgoutput import format_lsn
from .sinks.postgres import ApplyStats, PostgresSink
from .spec import PipelineSpec
from .state import BatchInfo, Position, StateStore


@dataclass(frozen=True)
class DeliveryReport:
    """What one delivery did for one target."""

    pipeline: str
    target: str
    batches: tuple[int, ...] = ()
    changes: int = 0
    skipped_batches: tuple[int, ...] = ()  # already applied (found in the target checkpoint)
    stats: ApplyStats = ApplyStats()
    first_lsn: int | None = None
    last_lsn: int | None = None
    duration_s: float = 0.0
    held_changes: int = 0  # changes put in the retry queue or parked behind one (HTTP)
    dead_letters: int = 0  # changes that became dead letters in this delivery (HTTP)

    @property
    def lsn_range(self) -> str:
        if self.first_lsn is None or self.last_lsn is None:
            return ""
        return f"{format_lsn(self.first_lsn)}–{format_lsn(self.last_lsn)}"

    @property
    def changes_per_s(self) -> float:
        return self.changes / self.duration_s if self.duration_s > 0 else 0.0


def _wait_for_lock(state: StateStore, name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not state.try_lock(name):
        if time.monotonic() > deadline:
            raise TransientDeliveryError(
                f"{name}: another delivery run has held the lock for over {timeout_s:.0f}s"
            )
        time.sleep(0.2)


def deliver(
    state: StateStore,
    pipeline: PipelineSpec,
    target: str,
    sink: PostgresSink,
    *,
    upto_batch: int | None = None,
    lock_timeout_s: float = 300.0,
    faults: Faults = NO_FAULTS,
) -> DeliveryReport:
    """Apply every staged batch up to ``upto_batch`` (all if None) to ``target``."""
    started = time.monotonic()
    lock = f"deliver:{pipeline.name}:{target}"
    _wait_for_lock(state, lock, lock_timeout_s)
    try:
        checkpoint = sink.checkpoint()
        mapper = Mapper(pipeline, state.relation)
        done: list[BatchInfo] = []
        skipped: list[int] = []
        changes = 0
        stats = ApplyStats()
        for batch in state.batches(pipeline.name, upto=upto_batch):
            if batch.last <= checkpoint:
                skipped.append(batch.batch_id)
                state.record_delivered(pipeline.name, target, batch.last, batch.batch_id)
                continue
            rows = state.read_changes(pipeline.name, max(checkpoint, _before(batch)), batch.last)
            ops: list[TargetOp] = []
            for ch in rows:
                tm = mapper.table_mapper(ch.relation_id)
                if tm is not None:
                    sink.prepare(tm, ch.relation_id)
                ops.extend(mapper.map(ch))
            faults.hit("before_apply")
            stats += sink.apply(ops, through=batch.last, batch_id=batch.batch_id)
            faults.hit("after_apply")
            state.record_delivered(pipeline.name, target, batch.last, batch.batch_id)
            checkpoint = batch.last
            changes += len(rows)
            done.append(batch)
        return DeliveryReport(
            pipeline.name, target, tuple(b.batch_id for b in done), changes, tuple(skipped),
            stats,
            done[0].first.commit_lsn if done else None,
            done[-1].last.commit_lsn if done else None,
            time.monotonic() - started,
        )
    finally:
        state.unlock(lock)


def _before(batch: BatchInfo) -> Position:
    """The position just before a batch's first change."""
    return Position(batch.first.commit_lsn, batch.first.seq - 1)
