"""The delivery loop: staged changes → one target, window by window, for every kind of sink.

:func:`deliver` is the delivery run's work for one target:

1. takes the ``deliver:<pipeline>:<target>`` advisory lock (a concurrent run or sweep waits;
   a draining run takes it per pass, see 5);
2. starts after the target's position — the sink's own checkpoint where it keeps one (it is
   authoritative: written in the same target transaction as the changes), else the state's
   delivered position; batches the checkpoint already covers are only recorded;
3. for each window of consecutive batches (about ``sink.window_changes`` changes, whole
   batches): reads the changes, maps them, and — when anything is held for the target —
   parks the changes of blocked keys behind what blocks them; hands the rest to the sink,
   which records the outcomes (:mod:`.outcomes`) before making its work final;
4. moves the state's delivered position past the window, only after the sink is done;
5. with ``keep_draining_s`` (a Dagster delivery run): looks again for batches staged since it
   started and delivers them too, until nothing new has come for ``idle_s`` or it has run for
   ``keep_draining_s`` — so a run keeps up with a steady stream instead of ending after the
   batches it was asked for while the next one waits behind a process start-up. After each
   pass it drops the batches every target has delivered, so the demand budget they held is
   free for the sensor's next pull. A run is still one bounded unit of work, and stops
   between windows (never inside one).

Per-key order holds because one delivery (or sweep) at a time works on a target, windows go
in position order, a sink keeps order within a window, and a key that failed stays blocked
until its chain is delivered, dead-lettered and redriven, or discarded. A crash before step 4
delivers the window again: the checkpoint (Postgres) or the idempotency keys and ledger (HTTP)
make that a no-op for what was applied, and recorded positions are not recorded twice.
Memory: one window of changes.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..errors import TransientDeliveryError
from ..faults import NO_FAULTS, Faults
from ..links.resolver import LinkResolver
from ..mapping.mapper import Mapper
from ..spec import PipelineSpec
from ..staging.held import HeldChange, HeldStore
from ..staging.store import BatchInfo, StagedRow, StateStore
from ..wire.change import Position, decode_change
from .outcomes import Tally, record_window
from .report import DeliveryReport
from .sinks.base import ApplyStats, Checkpoint, Item, Outcome, Sink


def wait_for_lock(state: StateStore, name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not state.try_lock(name):
        if time.monotonic() > deadline:
            raise TransientDeliveryError(
                f"{name}: another delivery run has held the lock for over {timeout_s:.0f}s")
        time.sleep(0.2)


def target_lock(pipeline: str, target: str) -> str:
    return f"deliver:{pipeline}:{target}"


@contextmanager
def link_window(state: StateStore, pipeline: PipelineSpec, lock_timeout_s: float
                ) -> Iterator[LinkResolver | None]:
    """A two-way link's check for one window (None for other pipelines), under the link's
    lock: the link's two directions decide one window at a time."""
    if pipeline.link is None:
        yield None
        return
    lock = f"link:{pipeline.link.name}"
    wait_for_lock(state, lock, lock_timeout_s)
    try:
        yield LinkResolver(state, pipeline)
    finally:
        state.unlock(lock)


class Items:
    """Staged changes → :class:`Item` for one target: mapped, the target's tables only.

    For a sink that takes raw rows (``sink.raw_rows``) outside a two-way link (whose check
    compares values), a change of a table mapped by renames and column selection keeps its
    row as the source sent it (:meth:`..mapping.mapper.Mapper.map_raw`); every other change is
    decoded and mapped value by value."""

    def __init__(self, state: StateStore, pipeline: PipelineSpec, sink: Sink) -> None:
        self.mapper = Mapper(pipeline, state.relation)
        self.sink = sink
        self.raw = getattr(sink, "raw_rows", False) and pipeline.link is None
        self._takes: dict[int, bool] = {}

    def item(self, row: StagedRow, attempts: int = 0) -> Item | None:
        """The item of a staged change (its raw message is kept for the retry queue); None
        for a table this pipeline or this target does not take."""
        commit_lsn, seq, _, relation_id, op, message = row
        tm = self.mapper.table_mapper(relation_id)
        if tm is None:
            return None  # a published table this pipeline does not sync
        takes = self._takes.get(relation_id)
        if takes is None:
            takes = self._takes[relation_id] = self.sink.prepare(tm, relation_id)
        if not takes:
            return None  # a table this target does not take
        position = Position(commit_lsn, seq)
        ops = self.mapper.map_raw(tm, op, position, message) if self.raw else None
        if ops is None:
            ops = self.mapper.map(decode_change(*row))
        return Item(position, relation_id, op, message, tm, ops, attempts)

    def staged(self, rows: list[StagedRow],
               accepted: set[tuple[int, int, int]]) -> Iterator[Item]:
        """Items of staged rows, lazily; ``accepted`` are ledger entries ``(commit_lsn, seq,
        sub)`` of requests already accepted."""
        for row in rows:
            it = self.item(row)
            if it is None:
                continue
            if accepted:
                it.done_subs = frozenset(sub for lsn, seq, sub in accepted
                                         if (lsn, seq) == it.position)
            yield it


def windows(batches: list[BatchInfo], cap: int) -> Iterator[list[BatchInfo]]:
    """Consecutive batches grouped so each group has at most ``cap`` changes (a bigger batch
    goes alone)."""
    window: list[BatchInfo] = []
    size = 0
    for b in batches:
        if window and size + b.n_changes > cap:
            yield window
            window, size = [], 0
        window.append(b)
        size += b.n_changes
    if window:
        yield window


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a window is mapped and applied.

    A window is ~10,000 changes whose objects (items, operations, rows) all live until it is
    recorded: they survive the young generations and trigger full collections, which scan the
    whole heap — in a Dagster run, every object of its imports — again and again. Nothing in a
    window forms reference cycles (reference counting frees it), so pausing loses no memory
    beyond the window; the collector resumes, and catches up, right after. Measured on 100,000
    staged changes delivered to a Postgres target: 31k changes/s with the collector running,
    45k/s with it paused."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def before(batch: BatchInfo) -> Position:
    """The position just before a batch's first change."""
    return Position(batch.first.commit_lsn, batch.first.seq - 1)


DRAIN_POLL_S = 0.2
"""How often a draining run looks for newly staged batches (one indexed query)."""


def deliver(
    state: StateStore, pipeline: PipelineSpec, target: str, sink: Sink, *,
    upto_batch: int | None = None, faults: Faults = NO_FAULTS, lock_timeout_s: float = 300.0,
    keep_draining_s: float = 0.0, idle_s: float = 0.0,
    progress: Callable[[DeliveryReport], None] | None = None,
) -> DeliveryReport:
    """Deliver every staged batch up to ``upto_batch`` (all if None) to ``target``; with
    ``keep_draining_s``, also those staged meanwhile (step 5 above). ``progress`` is called
    with the report so far after each window."""
    started = time.monotonic()
    lock = target_lock(pipeline.name, target)
    held = HeldStore(state, pipeline.name, target)
    items = Items(state, pipeline, sink)
    done: list[BatchInfo] = []
    skipped: list[int] = []
    changes = n_held = n_dead = 0
    stats = ApplyStats()
    last_work = time.monotonic()
    while True:
        # The lock is taken per pass, so a draining run that waits for work does not keep
        # a retry sweep or a conflict resolution of the target out; each pass starts from the
        # target's position as it is then.
        wait_for_lock(state, lock, lock_timeout_s)
        try:
            delivered = state.delivered(pipeline.name, target)
            own = sink.checkpoint()
            position = own if own is not None else delivered  # the target's own word wins
            pending = []
            for b in state.batches(pipeline.name, upto=upto_batch):
                if b.last > position:
                    pending.append(b)
                elif b.last > delivered:  # the target applied it before a crash: record it
                    skipped.append(b.batch_id)
                    state.record_delivered(pipeline.name, target, b.last, b.batch_id)
                # else: delivered here, kept staged for another target
            for window in windows(pending, sink.window_changes):
                first, last = window[0], window[-1]
                with collector_paused():
                    rows = state.read_staged(
                        pipeline.name, max(position, before(first)), last.last)
                    accepted = held.delivered_subs(first.first, last.last)  # HTTP ledger
                    parked: list[HeldChange] = []
                    live: Iterator[Item] | list[Item]
                    if held.any_held():  # some keys may be blocked: find them before sending
                        batch_items = list(items.staged(rows, accepted))
                        blocked = held.blocked(it.key for it in batch_items)
                        taken = held.taken(first.first, last.last) if blocked else set()
                        parked = [it.change for it in batch_items
                                  if it.key in blocked and it.position not in taken]
                        live = [it for it in batch_items if it.key not in blocked]
                    else:  # nothing is blocked: decode and map while the sink starts sending
                        live = items.staged(rows, accepted)
                    faults.hit("before_apply")
                    with link_window(state, pipeline, lock_timeout_s) as link:
                        recorder = _Recorder(state, pipeline, target, parked, faults, link)
                        result = sink.apply(
                            live, checkpoint=Checkpoint(last.last, last.batch_id),
                            record=recorder, resolve=link.resolve if link is not None else None)
                    n_rows = len(rows)
                    del rows, live  # freed before the collector runs again
                faults.hit("after_apply")
                with state.conn.transaction():
                    state.record_delivered(pipeline.name, target, last.last, last.batch_id)
                    state.log_delivered(pipeline.name, target, [b.batch_id for b in window])
                    held.trim_ledger(last.last)
                position = last.last
                changes += n_rows
                done.extend(window)
                stats += result.stats
                n_held += recorder.tally.held
                n_dead += recorder.tally.dead
                if progress is not None:
                    progress(DeliveryReport.of(pipeline.name, target, done, changes, stats,
                                               started, held_changes=n_held,
                                               dead_letters=n_dead))
        finally:
            state.unlock(lock)
        now = time.monotonic()
        if pending:
            last_work = now
            if keep_draining_s:  # free the demand budget now, so the sensor stages the next
                state.collect_garbage(pipeline.name, list(pipeline.targets))
        if (upto_batch is not None or now - started >= keep_draining_s
                or now - last_work >= idle_s):
            break
        time.sleep(DRAIN_POLL_S)  # the sensor stages the next batch meanwhile
    return DeliveryReport.of(pipeline.name, target, done, changes, stats, started,
                             skipped=tuple(skipped), held_changes=n_held, dead_letters=n_dead)


class _Recorder:
    """The ``record`` a sink calls for one window (see :func:`.outcomes.record_window`)."""

    def __init__(self, state: StateStore, pipeline: PipelineSpec, target: str,
                 parked: list[HeldChange], faults: Faults, link: LinkResolver | None = None
                 ) -> None:
        self.args = (state, pipeline, target)
        self.parked = parked
        self.faults = faults
        self.link = link
        self.tally = Tally()

    def __call__(self, outcomes: list[Outcome]) -> None:
        state = self.args[0]
        with state.conn.transaction():  # the link's decisions commit with the outcomes
            if self.link is not None:
                self.link.save(outcomes)
            self.tally = record_window(*self.args, outcomes, self.parked, faults=self.faults)
