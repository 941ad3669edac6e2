"""Pull: read changes from the slot within the demand budget, stage them, advance the slot.

This is the engine function behind a pipeline's replication sensor. One call:

1. takes the pipeline's advisory lock in the state DB (an overlapping tick returns at once);
2. checks the source and the slot (created if missing; moved by someone else → error);
3. computes ``demand = budget − staged-but-undelivered`` and returns a skip reason at zero;
4. peeks through a server-side cursor and decodes, staging at most ``demand`` changes in
   batches of ``batch_size`` (each batch one state transaction);
5. only then advances the slot — and only to the end of the last transaction staged whole.

Invariants:

* **Nothing lost.** The slot never moves past a change that is not staged. A change is
  identified by ``(commit_lsn, seq)``; a re-peek after a crash skips positions at or below the
  state's staged position, so staging is idempotent.
* **Budget.** Never more than ``demand`` changes are staged by one call, even inside a giant
  transaction: the pull stops mid-transaction, stages what fits, and leaves the slot before
  that transaction; the next pull re-peeks it and carries on after the staged position.
  (PostgreSQL only lets a slot advance past a whole transaction, and a mid-transaction advance
  is a no-op — see DESIGN.md.)
* **Bounded memory.** At most ``batch_size`` decoded changes are held at once.

A crash at any point leaves either the slot unmoved (changes re-peeked and skipped) or the
slot moved past changes that are staged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from . import pgoutput as po
from .errors import SlotConflictError
from .faults import NO_FAULTS, Faults
from .pgoutput import UNCHANGED_TOAST, format_lsn
from .source import Source
from .spec import PipelineSpec
from .state import BatchInfo, Position, StagedChange, StateStore


@dataclass(frozen=True)
class PullReport:
    """What one pull did; ``skipped`` says why nothing was pulled, if nothing was."""

    pipeline: str
    demand: int
    undelivered_before: int
    batches: tuple[BatchInfo, ...] = ()
    changes: int = 0
    transactions: int = 0
    advanced_to: int | None = None
    slot_lag_bytes: int = 0
    skipped: str | None = None
    stopped_by_demand: bool = False
    duration_s: float = 0.0

    @property
    def lsn_range(self) -> str:
        if not self.batches:
            return ""
        return (f"{format_lsn(self.batches[0].first.commit_lsn)}"
                f"–{format_lsn(self.batches[-1].last.commit_lsn)}")


def _values(tup: tuple[po.Value, ...]) -> tuple[list[str | None], list[int] | None]:
    unchanged = [i for i, v in enumerate(tup) if v is UNCHANGED_TOAST]
    if not unchanged:
        return list(tup), None  # type: ignore[arg-type]
    return [None if v is UNCHANGED_TOAST else v for v in tup], unchanged  # type: ignore[misc]


@dataclass
class _Puller:
    """The pull's state machine over decoded messages (no I/O besides staging calls)."""

    pipeline: PipelineSpec
    state: StateStore
    staged: Position
    demand: int
    faults: Faults
    relations: dict[int, int] = field(default_factory=dict)  # source oid → relation version
    buffer: list[StagedChange] = field(default_factory=list)
    batches: list[BatchInfo] = field(default_factory=list)
    taken: int = 0  # changes staged or buffered by this pull
    transactions: int = 0
    last_commit_end: int | None = None  # end LSN of the last transaction taken whole
    begin: po.Begin | None = None
    seq: int = 0
    stopped: bool = False

    def skip_staged(self, data: bytes) -> bool:
        """Count, without decoding, a row change already staged (a re-peek of a transaction
        staged across pulls, or after a crash): the hot path when a giant transaction is
        taken in several pulls."""
        begin = self.begin
        if begin is None or data[:1] not in (b"I", b"U", b"D"):
            return False
        staged = self.staged
        if begin.final_lsn < staged.commit_lsn or (
            begin.final_lsn == staged.commit_lsn and self.seq <= staged.seq
        ):
            self.seq += 1
            return True
        return False

    def feed(self, msg: po.Message) -> None:
        if isinstance(msg, po.Begin):
            self.begin, self.seq = msg, 0
        elif isinstance(msg, po.Commit):
            self.transactions += 1
            self.last_commit_end = msg.end_lsn
            self.begin = None
            if len(self.buffer) >= self.pipeline.policy.batch_size:
                self.flush()
        elif isinstance(msg, po.Relation):
            if msg.qualified_name in self.pipeline.tables:
                self.relations[msg.relation_id] = self.state.relation_id(self.pipeline.name, msg)
        elif isinstance(msg, po.Insert):
            self._take(msg.relation_id, "I", msg.new, None)
        elif isinstance(msg, po.Update):
            self._take(msg.relation_id, "U", msg.new, msg.old)
        elif isinstance(msg, po.Delete):
            self._take(msg.relation_id, "D", None, msg.old)
        elif isinstance(msg, po.Truncate):
            for rid in msg.relation_ids:
                self._take(rid, "T", None, None)
        # Origin, Type and logical messages carry nothing to stage.

    def _take(self, relation_oid: int, op: str, new: tuple[po.Value, ...] | None,
              old: tuple[po.Value, ...] | None) -> None:
        if self.stopped:
            return
        assert self.begin is not None, "change outside a transaction"
        seq = self.seq
        self.seq += 1
        pos = Position(self.begin.final_lsn, seq)
        if pos <= self.staged:
            return  # staged before a crash or by an earlier pull of this transaction
        rid = self.relations.get(relation_oid)
        if rid is None:
            return  # a published table this pipeline does not sync
        if self.taken >= self.demand:
            self.stopped = True
            return
        new_values, unchanged = _values(new) if new is not None else (None, None)
        old_values = _values(old)[0] if old is not None else None
        self.buffer.append(StagedChange(
            pos.commit_lsn, pos.seq, self.begin.xid, self.begin.commit_ts, rid, op,
            new_values, old_values, unchanged,
        ))
        self.taken += 1
        # Flush mid-transaction only at twice the batch size: batches prefer whole transactions.
        if len(self.buffer) >= 2 * self.pipeline.policy.batch_size:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.batches.append(self.state.stage_batch(self.pipeline.name, self.buffer))
            self.staged = self.buffer[-1].position
            self.buffer = []
            self.faults.hit("after_stage_batch")


def pull(
    source: Source, state: StateStore, pipeline: PipelineSpec, *, faults: Faults = NO_FAULTS
) -> PullReport:
    """Pull up to the demand budget from the slot, stage it, advance the slot."""
    started = time.monotonic()
    lock = f"pull:{pipeline.name}"
    if not state.try_lock(lock):
        return PullReport(pipeline.name, 0, 0, skipped="another pull of this pipeline is running")
    try:
        st = state.ensure_pipeline(pipeline.name, pipeline.slot)
        slot = source.prepare()
        if slot.created or st.advanced_lsn is None:
            state.record_advance(pipeline.name, slot.confirmed_flush_lsn)
        elif slot.confirmed_flush_lsn > st.advanced_lsn:
            raise SlotConflictError(
                f"pipeline {pipeline.name!r}: slot {pipeline.slot!r} was advanced to "
                f"{format_lsn(slot.confirmed_flush_lsn)} by someone else (we left it at "
                f"{format_lsn(st.advanced_lsn)}); changes in between were consumed elsewhere. "
                "Stop the other consumer, then drop the slot and re-run the initial sync."
            )
        undelivered = state.undelivered_changes(pipeline.name)
        demand = pipeline.policy.demand_budget - undelivered
        if demand <= 0:
            return PullReport(
                pipeline.name, 0, undelivered, slot_lag_bytes=slot.lag_bytes,
                skipped=f"demand is zero: {undelivered} changes staged and not yet delivered "
                f"(budget {pipeline.policy.demand_budget})",
                duration_s=time.monotonic() - started,
            )
        flush_before = source.flush_lsn()
        puller = _Puller(pipeline, state, st.staged, demand, faults)
        rows = 0
        # `upto_nchanges` counts protocol rows, not changes: a one-change transaction is three
        # (BEGIN, change, COMMIT). Ask for enough rows to fill the demand; the puller itself
        # stops at `demand` changes.
        upto = 3 * demand + len(pipeline.tables)
        with source.peek(upto, pipeline.policy.fetch_chunk) as messages:
            for data in messages:
                rows += 1
                if not puller.skip_staged(data):
                    puller.feed(po.decode_message(data))
                if puller.stopped:
                    break
        puller.flush()
        faults.hit("before_advance")
        target = puller.last_commit_end
        # The server stops a peek after the transaction that reaches `upto_nchanges` rows. With
        # fewer rows than that and no stop of ours, the slot was read to its end: every
        # transaction that committed before flush_before has been seen, so the slot may move
        # that far even if none of them touched our tables (an idle pipeline then holds no WAL).
        exhausted = not puller.stopped and rows < upto
        if exhausted:
            target = max(target or 0, flush_before)
        advanced = None
        if target is not None and target > slot.confirmed_flush_lsn:
            # Record the advance before making it: a crash between the two must not look, on
            # the next pull, like the slot having been advanced by someone else.
            state.record_advance(pipeline.name, target)
            advanced = source.advance(target)
            state.record_advance(pipeline.name, advanced)
        faults.hit("after_advance")
        return PullReport(
            pipeline.name, demand, undelivered, tuple(puller.batches), puller.taken,
            puller.transactions, advanced, slot.lag_bytes,
            skipped=None if puller.taken else "no new changes in the slot",
            stopped_by_demand=puller.stopped, duration_s=time.monotonic() - started,
        )
    finally:
        state.unlock(lock)
