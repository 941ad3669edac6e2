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
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial

from ..errors import TerminalDeliveryError, TransientDeliveryError
from ..faults import NO_FAULTS, Faults
from ..mapping.keys import change_key
from ..mapping.mapper import Mapper, TargetOp
from ..spec import PipelineSpec
from ..staging.held import Failure, HeldChange, HeldStore
from ..staging.refetch import RefetchStore, Request
from ..staging.store import BatchInfo, StateStore
from ..wire.change import Position, StoredChange, decode_change
from ..wire.pgoutput import format_lsn
from .sinks.postgres import ApplyStats, Missing, PostgresSink


@dataclass(frozen=True)
class SweepReport:
    """What one retry sweep did for one target."""

    pipeline: str
    target: str
    keys: int = 0
    delivered: int = 0
    rescheduled: int = 0
    dead_letters: int = 0
    duration_s: float = 0.0


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

    @classmethod
    def of(cls, pipeline: str, target: str, batches: list[BatchInfo], changes: int,
           stats: ApplyStats, started: float, *, skipped: tuple[int, ...] = (),
           held_changes: int = 0, dead_letters: int = 0) -> DeliveryReport:
        """The report of a delivery that applied ``batches`` (oldest first) since ``started``."""
        return cls(pipeline, target, tuple(b.batch_id for b in batches), changes, skipped,
                   stats, batches[0].first.commit_lsn if batches else None,
                   batches[-1].last.commit_lsn if batches else None,
                   time.monotonic() - started, held_changes, dead_letters)

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
        changes = n_held = n_dead = 0
        stats = ApplyStats()
        held = HeldStore(state, pipeline.name, target)
        refetch = RefetchStore(state, pipeline.name)
        for batch in state.batches(pipeline.name, upto=upto_batch):
            if batch.last <= checkpoint:
                skipped.append(batch.batch_id)
                state.record_delivered(pipeline.name, target, batch.last, batch.batch_id)
                continue
            rows = state.read_changes_with_messages(
                pipeline.name, max(checkpoint, _before(batch)), batch.last)
            mapped: list[tuple[str, StoredChange, bytes, list[TargetOp]]] = []
            for ch, message in rows:
                tm = mapper.table_mapper(ch.relation_id)
                if tm is None:
                    continue
                sink.prepare(tm, ch.relation_id)
                mapped.append((tm.target_table, ch, message, mapper.map(ch)))
            faults.hit("before_apply")

            # Keys are only worked out when something is held for this target at all: the
            # common case pays one query per batch.
            items = _held_items(mapped) if held.any_held() else None
            blocked = held.blocked(hc.key for hc, _ in items) if items else set()
            bulk_ok = False
            if not blocked:
                try:
                    stats += sink.apply(
                        [op for *_, ops in mapped for op in ops], through=batch.last,
                        batch_id=batch.batch_id,
                        before_commit=partial(_ask_refetch, refetch, pipeline, target, batch.last))
                    bulk_ok = True
                except TerminalDeliveryError:
                    pass  # some change is refused for good: find it, change by change
            if not bulk_ok:
                b_stats, b_held, b_dead = _apply_isolating(
                    state, pipeline, target, held, refetch, sink,
                    items if items is not None else _held_items(mapped), blocked, batch)
                stats, n_held, n_dead = stats + b_stats, n_held + b_held, n_dead + b_dead
            faults.hit("after_apply")
            state.record_delivered(pipeline.name, target, batch.last, batch.batch_id)
            checkpoint = batch.last
            changes += len(rows)
            done.append(batch)
        return DeliveryReport.of(pipeline.name, target, done, changes, stats, started,
                                 skipped=tuple(skipped), held_changes=n_held,
                                 dead_letters=n_dead)
    finally:
        state.unlock(lock)


def _held_items(mapped: list[tuple[str, StoredChange, bytes, list[TargetOp]]]
                ) -> list[tuple[HeldChange, list[TargetOp]]]:
    """Each mapped change as it would be held, keyed by its target table and key."""
    return [(HeldChange(change_key(table, ops), ch.position, ch.relation_id, ch.op, message), ops)
            for table, ch, message, ops in mapped]


def _ask_refetch(refetch: RefetchStore, pipeline: PipelineSpec, target: str, at: Position,
                 missing: list[Missing]) -> None:
    refetch.request(_refetches(pipeline, target, ((at, m) for m in missing)))


def _refetches(pipeline: PipelineSpec, target: str,
               missing: Iterable[tuple[Position, Missing]]) -> list[Request]:
    """Re-read requests for keys partial upserts found missing in the target."""
    return [Request(target, pos, pipeline.source_table_of(table), tuple(key),
                    f"an update without its unchanged large values for a key target "
                    f"{target!r} does not have")
            for pos, (table, key) in missing]


def _apply_isolating(
    state: StateStore, pipeline: PipelineSpec, target: str, held: HeldStore,
    refetch: RefetchStore, sink: PostgresSink,
    items: list[tuple[HeldChange, list[TargetOp]]], blocked: set[str], batch: BatchInfo,
) -> tuple[ApplyStats, int, int]:
    """Apply a batch change by change: changes of blocked keys park behind what blocks them,
    a change the target refuses for good becomes a dead letter with everything of its key
    after it, the rest is applied. Dead letters and parked changes are recorded in the state
    DB *before* the target commits its checkpoint (idempotently: a replay skips positions
    already held or dead), so no refused change can be passed over by a crash."""
    taken = held.taken(batch.first, batch.last)
    parked = [hc for hc, _ in items if hc.key in blocked and hc.position not in taken]
    live = [(hc, ops) for hc, ops in items if hc.key not in blocked]
    dead = 0

    def record(failures: dict[int, str], missing: list[tuple[int, Missing]]) -> None:
        nonlocal dead
        with state.conn.transaction():
            refetch.request(_refetches(pipeline, target,
                                       ((live[i][0].position, m) for i, m in missing)))
            held.hold(parked)
            for i, error in failures.items():
                head = live[i][0]
                chain = [head, *(hc for hc, _ in live[i + 1:] if hc.key == head.key)]
                chain = [hc for hc in chain if hc.position not in taken]
                held.kill(chain, Failure(False, None, error), attempts=1)
                dead += len(chain)

    stats, _ = sink.apply_isolated([(hc.key, ops) for hc, ops in live],
                                   checkpoint=(batch.last, batch.batch_id), before_commit=record)
    return stats, len(parked), dead


def _before(batch: BatchInfo) -> Position:
    """The position just before a batch's first change."""
    return Position(batch.first.commit_lsn, batch.first.seq - 1)


def sweep_postgres(
    state: StateStore, pipeline: PipelineSpec, target: str, sink: PostgresSink, *,
    now: datetime | None = None, max_keys: int = 10_000, lock_timeout_s: float = 300.0,
) -> SweepReport:
    """Apply the held chains of due keys (redriven dead letters, and what parked behind them)
    in order, change by change. The state is updated after the target commits: a crash in
    between re-applies the same chains, which leaves the same rows."""
    started = time.monotonic()
    now = now or datetime.now(timezone.utc)
    lock = f"deliver:{pipeline.name}:{target}"
    _wait_for_lock(state, lock, lock_timeout_s)
    try:
        held = HeldStore(state, pipeline.name, target)
        mapper = Mapper(pipeline, state.relation)
        keys = held.due_keys(now, max_keys)
        entries: list[tuple[HeldChange, list[TargetOp]]] = []
        for key in keys:
            for hc in held.chain(key):
                ch = decode_change(hc.position.commit_lsn, hc.position.seq, 0, hc.relation_id,
                                    hc.op, hc.message)
                tm = mapper.table_mapper(ch.relation_id)
                if tm is not None:
                    sink.prepare(tm, ch.relation_id)
                entries.append((hc, mapper.map(ch) if tm is not None else []))
        refetch = RefetchStore(state, pipeline.name)
        stats, failures = sink.apply_isolated(
            [(hc.key, ops) for hc, ops in entries], checkpoint=None,
            before_commit=lambda _, missing: refetch.request(_refetches(
                pipeline, target, ((entries[i][0].position, m) for i, m in missing))))
        heads = {entries[i][0].key: i for i in failures}
        delivered = dead = 0
        with state.conn.transaction():
            for key in keys:
                chain = [(i, hc) for i, (hc, _) in enumerate(entries) if hc.key == key]
                head_i = heads.get(key)
                ok = [hc for i, hc in chain if head_i is None or i < head_i]
                held.release(hc.position for hc in ok)
                delivered += len(ok)
                if head_i is not None:
                    bad = [hc for i, hc in chain if i >= head_i]
                    held.kill(bad, Failure(False, None, failures[head_i]),
                              attempts=entries[head_i][0].attempts + 1)
                    dead += len(bad)
        return SweepReport(pipeline.name, target, len(keys), delivered, 0, dead,
                           time.monotonic() - started)
    finally:
        state.unlock(lock)
