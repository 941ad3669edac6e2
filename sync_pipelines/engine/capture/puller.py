"""Pull: read changes from the slot within the demand budget, stage them, advance the slot.

This is the engine function behind a pipeline's replication sensor. One call:

1. takes the pipeline's advisory lock in the state DB (an overlapping tick returns at once);
2. checks the source and the slot (created if missing; moved by someone else → error);
3. computes ``demand = budget − staged-but-undelivered`` and returns a skip reason at zero,
   or while it is under half the budget (few large pulls: each peek re-reads the slot's WAL
   from its restart point);
4. peeks through a server-side cursor, staging at most ``demand`` changes in batches of
   ``batch_size`` (each batch one state transaction) — row changes as the raw pgoutput
   message, so the pull does not decode tuples (delivery does, once); given ``first_peek``
   (a tick while a delivery run drains) and nothing staged, it peeks only one batch and says
   there is ``more``, so the waiting run has work before the whole budget is decoded;
5. only then advances the slot — and only to the end of the last transaction staged whole.

Invariants:

* **Nothing lost.** The slot never moves past a change that is not staged. A change is
  identified by ``(commit_lsn, seq)``; a re-peek after a crash skips positions at or below the
  state's staged position, so staging is idempotent.
* **Budget, at transaction granularity.** A pull stages at most ``demand`` changes, with one
  exception: a single transaction larger than the whole budget, met while nothing else is
  staged, is taken whole — PostgreSQL only lets a slot advance past a whole transaction (a
  mid-transaction advance is a no-op, see DESIGN.md), so waiting could never make room for
  it. Otherwise the pull stops where the budget runs out, possibly mid-transaction: what is
  staged stays staged, the slot stays before that transaction, and a later pull re-peeks it
  and carries on after the staged position.
* **Bounded memory.** Fewer than ``2 × batch_size`` changes, and under ``2 ×``
  :data:`BATCH_BYTES_MAX` of messages plus one message, are held at once, however large the
  transaction: a transaction is staged in chunks of either size as it is read.

Snapshot rows (initial backfill, repair, refetch) enter here too: at a snapshot chunk's high
watermark the puller stages the chunk's rows, minus the keys changed between its two
watermarks, at the watermark's position (see :mod:`...staging.snapshots`); among them the rows
re-read because a change did not carry every value (:mod:`...backfill.refetch`), whose
watermarks the pipeline writes just before it pulls.

A crash at any point leaves either the slot unmoved (changes re-peeked and skipped) or the
slot moved past changes that are staged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from ..errors import SlotConflictError
from ..faults import NO_FAULTS, Faults
from ..spec import PipelineSpec
from ..staging.refetch import RefetchReport
from ..staging.snapshots import SnapshotStore, key_positions, parse_watermark
from ..staging.store import BatchInfo, Position, StagedChange, StateStore
from ..wire import pgoutput as po
from ..wire.pgoutput import format_lsn
from .source import HEARTBEAT_PREFIX, SlotInfo, Source, with_primary_key


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
    waiting_for_room: bool = False
    """Nothing was pulled because the demand budget is taken (zero, or under half of it)."""
    more: bool = False
    """The source has more to read right now (a poll stopped inside a listing; a peek that
    reached its row limit before the demand)."""
    echoes: int = 0
    """Changes dropped as a two-way link's own writes into this source (its origin)."""
    refetch: RefetchReport = RefetchReport()
    """Rows re-read from the source just before this pull (see :mod:`...backfill.refetch`)."""
    duration_s: float = 0.0

    @property
    def lsn_range(self) -> str:
        if not self.batches:
            return ""
        return (f"{format_lsn(self.batches[0].first.commit_lsn)}"
                f"–{format_lsn(self.batches[-1].last.commit_lsn)}")


_ROW_CHANGES = (b"I", b"U", b"D")

ROWS_PER_CHANGE_MAX = 3.0
"""Protocol rows per change at worst: a one-change transaction is BEGIN, change, COMMIT."""

_rows_per_change: dict[str, float] = {}
"""Per slot, the protocol rows per change its last pull read (this process's estimate).

A peek is materialised by the server before its first row arrives: everything up to
``upto_nchanges`` rows is decoded and written out whether the pull takes it or not. Sized for
the worst case (3 rows per change), a pull of 1,000-change transactions made the server
decode and output three times the demand and the puller throw two thirds away (measured on the
standard benchmark: 0.70 s of the source backend's CPU for a 100,000-change pull against 0.33
s asked for what it takes). The estimate only sizes the request: too low, the pull stages
fewer changes than its demand and the next one goes on; a fresh process starts at the worst
case."""


BATCH_BYTES_MAX = 64 << 20
"""A batch is staged once its messages reach this size, even with fewer than ``batch_size``
changes: a batch is one ``bytea`` value in the state DB (at most 1 GB), and it is held in
memory while it is staged and while it is delivered. 10,000 changes of the standard
benchmark's table are 1.5 MB."""


RESTART_LAG_BYTES = 1 << 20
"""WAL the slot may hold back (from its restart point) before a pull writes a record of the
running transactions (see :func:`_mark_restart`).
Measured at 1,000 changes/s with a pull every 0.5 s for 30 s (PostgreSQL 18): the restart
point trailed the confirmed position by 3.2 MB and the source backend used 0.62 s of CPU;
with a record after each pull, 0.11 MB and 0.34 s."""


def _mark_restart(source: Source, slot: SlotInfo) -> None:
    """Each peek and each advance decode from the slot's restart point, which moves only past
    a record of the running transactions; the server writes one every 15 s of activity, so a
    pull every half second re-decoded up to 30 s of WAL, and a backlog staged while delivery
    lagged was re-decoded by every pull that drained it. A record written now, while the
    slot holds more than :data:`RESTART_LAG_BYTES`, lets the advance that passes it move the
    restart point here (see :meth:`.source.Source.log_snapshot`)."""
    if slot.lag_bytes > RESTART_LAG_BYTES:
        source.log_snapshot()


def peek_rows(slot_key: str, pipeline: PipelineSpec, demand: int) -> int:
    """The ``upto_nchanges`` of a pull that may take ``demand`` changes: enough rows for them
    at the slot's last measured rows per change, with a quarter to spare, never more than the
    worst case."""
    per_change = _rows_per_change.get(slot_key, ROWS_PER_CHANGE_MAX)
    slack = len(pipeline.tables) + 8  # relation messages, a heartbeat's transaction
    return min(int(demand * per_change * 1.25), int(demand * ROWS_PER_CHANGE_MAX)) + slack


def learn_rows_per_change(slot_key: str, rows: int, changes: int) -> None:
    """Remember what a pull read (only a pull that read enough to say)."""
    if changes >= 100:
        _rows_per_change[slot_key] = min(rows / changes, ROWS_PER_CHANGE_MAX)


@dataclass
class _Puller:
    """The pull's state machine over pgoutput rows (no I/O besides staging calls).

    Row changes (Insert/Update/Delete) are staged as the raw message: only the message type
    and relation OID are read here; the tuples are decoded once, at delivery.
    """

    pipeline: PipelineSpec
    state: StateStore
    snapshots: SnapshotStore
    staged: Position
    demand: int
    undelivered: int
    faults: Faults
    primary_key: Callable[[int], frozenset[str]] = lambda oid: frozenset()
    """A table's primary key, to key REPLICA IDENTITY FULL relations by (see
    :func:`.source.with_primary_key`)."""
    relations: dict[int, int] = field(default_factory=dict)  # source oid → relation version
    buffer: list[StagedChange] = field(default_factory=list)
    buffer_bytes: int = 0  # of the messages in `buffer`
    batches: list[BatchInfo] = field(default_factory=list)
    taken: int = 0  # changes staged or buffered by this pull
    change_rows: int = 0  # row changes read (taken or not): sizes the next peek
    transactions: int = 0
    last_commit_end: int | None = None  # end LSN of the last transaction taken whole
    begin: po.Begin | None = None
    seq: int = 0
    taken_at_begin: int = 0
    txn_start: int = 0  # index in `buffer` where the current transaction's changes start
    txn_start_bytes: int = 0  # `buffer_bytes` before them
    giant: bool = False
    stopped: bool = False
    heartbeat_in_txn: bool = False
    heartbeat_at: datetime | None = None  # commit time of the newest heartbeat taken whole
    echo: bool = False  # the current transaction is a two-way link's own write: dropped
    echoes: int = 0  # changes of such transactions dropped by this pull

    def feed_row(self, data: bytes) -> None:
        kind = data[:1]
        if kind in _ROW_CHANGES:
            self.change_rows += 1
            self._take(int.from_bytes(data[1:5], "big"), kind.decode(), data)
        else:
            self.feed(po.decode_message(data))

    def feed(self, msg: po.Message) -> None:
        if isinstance(msg, po.Begin):
            self.begin, self.seq = msg, 0
            self.echo = False
            self.taken_at_begin = self.taken
            self.txn_start = len(self.buffer)
            self.txn_start_bytes = self.buffer_bytes
        elif isinstance(msg, po.Commit):
            self.transactions += 1
            self.last_commit_end = msg.end_lsn
            if self.heartbeat_in_txn and self.begin is not None:
                self.heartbeat_at = self.begin.commit_ts
                self.heartbeat_in_txn = False
            self.begin = None
            self.giant = False
            if len(self.buffer) >= self.pipeline.policy.batch_size \
                    or self.buffer_bytes >= BATCH_BYTES_MAX:
                self.flush()
        elif isinstance(msg, po.Relation):
            if msg.qualified_name in self.pipeline.tables:
                rel = msg
                if rel.replica_identity == "f":
                    rel = with_primary_key(rel, self.primary_key(rel.relation_id))
                self.relations[msg.relation_id] = self.state.relation_id(self.pipeline.name, rel)
        elif isinstance(msg, po.Truncate):
            for rid in msg.relation_ids:
                self._take(rid, "T", b"")
        elif isinstance(msg, po.LogicalMessage) and msg.transactional:
            if msg.prefix == HEARTBEAT_PREFIX:
                self.heartbeat_in_txn = msg.content == self.pipeline.name.encode()
            else:
                self._watermark(msg)
        elif isinstance(msg, po.Origin):
            # pgoutput names the origin of a replayed transaction before its changes (when it
            # sends every origin, the default): a two-way link's writes into this database
            # carry the link's origin and are dropped, any other origin flows.
            link = self.pipeline.link
            self.echo = link is not None and msg.name == link.skip_origin
        # Type and other logical messages carry nothing to stage.

    def _take(self, relation_oid: int, op: str, data: bytes) -> None:
        if self.stopped:
            return
        if self.echo:  # written by the link into this source: never sent back
            self.seq += 1
            self.echoes += 1
            return
        rid = self.relations.get(relation_oid)
        if rid is None:
            self.seq += 1  # a published table this pipeline does not sync
            return
        self._stage_one(rid, op, data)

    def _watermark(self, msg: po.LogicalMessage) -> None:
        mark = parse_watermark(self.pipeline.name, msg.prefix, msg.content)
        if mark is None or self.stopped:
            return
        begin = self.begin
        assert begin is not None, "watermarks are transactional"
        chunk_id, kind = mark
        if kind == "low":
            self.snapshots.mark_low(self.pipeline.name, chunk_id, begin.final_lsn)
            return
        chunk = self.snapshots.chunk(self.pipeline.name, chunk_id)
        if chunk is None:
            return  # abandoned (read again by its worker) or not this pipeline's
        self.flush()  # the conflicts are read from the mailbox: everything before must be in it
        touched, truncated = self.snapshots.touched_keys(self.pipeline.name, chunk,
                                                         begin.final_lsn)
        idx = key_positions(self.state.relation(chunk.relation_id), chunk.key_names)
        placed = 0
        for data in () if truncated else chunk.messages:
            row = po.decode_message(data)
            assert isinstance(row, (po.Update, po.Delete))
            values = row.new if isinstance(row, po.Update) else row.old
            assert values is not None
            if tuple(values[i] for i in idx) in touched:
                continue  # changed between the marks: the live change decides
            self._stage_one(chunk.relation_id, data[:1].decode(), data)
            if self.stopped:
                return  # the rest comes with the next pull, which meets this mark again
            placed += 1
        self.snapshots.mark_high(chunk_id, begin.final_lsn, placed,
                                 len(chunk.messages) - placed)

    def _stage_one(self, rid: int, op: str, data: bytes) -> None:
        begin = self.begin
        assert begin is not None, "change outside a transaction"
        seq = self.seq
        self.seq += 1
        if begin.final_lsn < self.staged.commit_lsn or (
            begin.final_lsn == self.staged.commit_lsn and seq <= self.staged.seq
        ):
            return  # staged before a crash, or by an earlier pull of this transaction
        if self.taken >= self.demand and not self.giant:
            if self.taken_at_begin == 0 and self.undelivered == 0:
                # A transaction larger than the whole budget, with nothing else held: take it
                # whole now (in batch-size chunks), as waiting cannot make room for it.
                self.giant = True
            else:
                self.stopped = True
                return
        self.buffer.append(StagedChange(
            begin.final_lsn, seq, begin.xid, begin.commit_ts, rid, op, data))
        self.taken += 1
        self.buffer_bytes += len(data)
        if len(self.buffer) - self.txn_start >= self.pipeline.policy.batch_size \
                or self.buffer_bytes - self.txn_start_bytes >= BATCH_BYTES_MAX:
            # The current transaction alone fills a batch: stage the whole transactions
            # before it as their own batch, then this chunk of it.
            if self.txn_start:
                self.flush(before_txn=True)
            self.flush()

    def flush(self, *, before_txn: bool = False) -> None:
        """Stage the buffer as a batch; ``before_txn``: only the whole transactions before the
        current one."""
        upto = self.txn_start if before_txn else len(self.buffer)
        part = self.buffer[:upto]
        if part:
            self.batches.append(self.state.stage_batch(self.pipeline.name, part))
            self.staged = part[-1].position
            self.buffer = self.buffer[upto:]
            self.buffer_bytes -= self.txn_start_bytes if before_txn else self.buffer_bytes
            self.txn_start = self.txn_start_bytes = 0
            self.faults.hit("after_stage_batch")


def pull(
    source: Source, state: StateStore, pipeline: PipelineSpec, *, faults: Faults = NO_FAULTS,
    first_peek: int | None = None,
) -> PullReport:
    """Pull up to the demand budget from the slot, stage it, advance the slot. With
    ``first_peek`` and nothing staged, peek only that many changes (and report ``more``):
    for a caller that pulls again at once while a delivery run waits (see below)."""
    started = time.monotonic()
    lock = f"pull:{pipeline.name}"
    if not state.try_lock(lock):
        return PullReport(pipeline.name, 0, 0, skipped="another pull of this pipeline is running")
    try:
        st = state.ensure_pipeline(pipeline.name, pipeline.slot)
        # A pipeline that has read its slot before expects it: a dropped or lost slot stops
        # here with the recovery named, instead of a new slot silently starting from now.
        slot = source.prepare(expect_slot=st.advanced_lsn is not None)
        if slot.created or st.advanced_lsn is None:
            state.record_advance(pipeline.name, slot.confirmed_flush_lsn)
        elif slot.confirmed_flush_lsn > st.advanced_lsn:
            raise SlotConflictError(
                f"pipeline {pipeline.name!r}: slot {pipeline.slot!r} was advanced to "
                f"{format_lsn(slot.confirmed_flush_lsn)} by someone else (we left it at "
                f"{format_lsn(st.advanced_lsn)}); changes in between were consumed elsewhere. "
                "Stop the other consumer, then drop the slot and re-run the initial sync."
            )
        now = datetime.now(timezone.utc)
        last = st.heartbeat_written_at
        if (last is None or (now - last).total_seconds() >= pipeline.policy.heartbeat_seconds) \
                and source.emit_heartbeat():
            state.record_heartbeat(pipeline.name, written=now)
        undelivered = state.undelivered_changes(pipeline.name)
        budget = pipeline.policy.demand_budget
        demand = budget - undelivered
        if demand <= 0:
            _mark_restart(source, slot)
            return PullReport(
                pipeline.name, 0, undelivered, slot_lag_bytes=slot.lag_bytes,
                skipped=f"demand is zero: {undelivered} changes staged and not yet delivered "
                f"(budget {budget})", waiting_for_room=True,
                duration_s=time.monotonic() - started,
            )
        if 2 * demand < budget:
            # Every peek decodes the slot's WAL from its restart point, which only moves at
            # the server's running-transactions records (every 15 s of activity, and at
            # checkpoints): in a backlog, each pull re-reads what earlier ones read. So while
            # delivery still holds over half the budget, wait for room and pull it in one go
            # (measured on the standard benchmark, refills of a tenth of the budget made the
            # pulls' peeks grow to most of the puller's time).
            _mark_restart(source, slot)
            return PullReport(
                pipeline.name, demand, undelivered, slot_lag_bytes=slot.lag_bytes,
                skipped=f"demand is under half the budget: {undelivered} changes staged and "
                f"not yet delivered (budget {budget}); the next pull waits for room",
                waiting_for_room=True,
                duration_s=time.monotonic() - started,
            )
        flush_before = source.flush_lsn()
        puller = _Puller(pipeline, state, SnapshotStore(state), st.staged, demand, undelivered,
                         faults, source.primary_key)
        rows = 0
        # `upto_nchanges` counts protocol rows, not changes (BEGIN and COMMIT are rows too).
        # Ask for enough rows to fill the demand; the puller itself stops at `demand` changes.
        # A peek returns its first row once the server has decoded all it was asked for: for
        # the whole budget of 100,000 changes, 0.25 s before the first batch is staged, while
        # a draining delivery run with nothing staged waits. So then peek one batch first; the
        # caller's next pull, at once, asks for the rest (and decodes that batch's WAL again).
        want = min(demand, first_peek) if first_peek and undelivered == 0 else demand
        upto = peek_rows(source.slot_key, pipeline, want)
        with source.peek(upto, pipeline.policy.fetch_chunk) as messages:
            for data in messages:
                rows += 1
                puller.feed_row(data)
                if puller.stopped:
                    break
        puller.flush()
        learn_rows_per_change(source.slot_key, rows, puller.change_rows)
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
        _mark_restart(source, slot)
        if puller.heartbeat_at is not None:  # its transaction was taken whole: the slot is past
            state.record_heartbeat(pipeline.name, passed=puller.heartbeat_at)
        faults.hit("after_advance")
        return PullReport(
            pipeline.name, demand, undelivered, tuple(puller.batches), puller.taken,
            puller.transactions, advanced, slot.lag_bytes,
            skipped=None if puller.taken else "no new changes in the slot",
            stopped_by_demand=puller.stopped, more=not (exhausted or puller.stopped),
            echoes=puller.echoes, duration_s=time.monotonic() - started,
        )
    finally:
        state.unlock(lock)
