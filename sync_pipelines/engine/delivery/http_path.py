"""Deliver to an HTTP target, and sweep its retry queue: per-key order, retries, dead letters.

:func:`deliver_http` is the delivery run's work for an HTTP target: for each staged batch after
the target's delivered position it maps every change to requests, skips requests the ledger
says were accepted, *parks* changes of keys that are blocked (see :mod:`.held`), sends the rest
with :class:`~.sinks.http.HttpSink` (bounded concurrency, one request in flight per key), then
records in **one state transaction**: the ledger rows of accepted requests, the held/parked
changes of keys that failed (attempt 1, next attempt after a backoff), the dead letters of
terminal failures, and the delivered position. Consecutive small batches are sent together
(up to :data:`WINDOW_CHANGES` changes) and recorded in that one transaction. The batches
complete and the slot keeps moving whatever the target did.

:func:`sweep_http` is the retry schedule's work: for every key whose head is due it re-sends
the key's held chain in order, releases what the API accepted, and either reschedules the head
(exponential backoff with jitter, never sooner than Retry-After) or, after ``max_attempts`` or
on a terminal error, makes the head and everything parked behind it dead letters.

Both hold the ``deliver:<pipeline>:<target>`` lock, so a sweep and a delivery never interleave
for one target. A crash before the state transaction re-sends the same requests with the same
idempotency keys (the API deduplicates); a crash after it has nothing left to redo.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

from ..faults import NO_FAULTS, Faults
from ..mapping.keys import change_key
from ..mapping.mapper import Delete, Mapper, Truncate, Upsert
from ..spec import HttpTargetSpec, PipelineSpec
from ..staging.held import Failure, HeldChange, HeldStore, backoff, due_at
from ..staging.refetch import RefetchStore, Request
from ..staging.store import BatchInfo, StateStore
from ..wire.change import Position, StoredChange, decode_change
from .postgres_path import DeliveryReport, SweepReport, _before, _wait_for_lock
from .sinks.http import Endpoint, HttpChange, HttpOutcome, HttpSink, http_change
from .sinks.postgres import ApplyStats

WINDOW_CHANGES = 10_000
"""Staged changes sent in one :meth:`HttpSink.send` call, across batches. Each call waits for
its slowest key chain and leaves lanes idle at its end, so small batches sent one by one lose
throughput (measured: 5 batches of 2,000 at 64 × 20 ms, 0.77 of Little's law one by one). The
window bounds memory: its changes, with their raw messages and request bodies, are held
until the state transaction that records them."""


@dataclass
class _Item:
    """One staged change on its way to the API: its requests and what became of them."""

    change: HeldChange
    requests: list[tuple[int, HttpChange]] = field(default_factory=list)  # (sub, request)
    failure: Failure | None = None
    parked: bool = False
    refetch: list[Request] = field(default_factory=list)
    """Partial upserts (unchanged large values left out): not sent, as an API cannot merge
    them into its record; the row is re-read from the source once the change is done."""


class _Requests:
    """Builds the requests of a change (mapping + endpoints of the target's tables)."""

    def __init__(self, state: StateStore, pipeline: PipelineSpec, target: str) -> None:
        spec = pipeline.targets[target]
        assert isinstance(spec, HttpTargetSpec)
        self.pipeline, self.target, self.spec = pipeline, target, spec
        self.mapper = Mapper(pipeline, state.relation)
        self.endpoints = {
            t: (Endpoint.parse(m.upsert), Endpoint.parse(m.delete) if m.delete else None)
            for t, m in spec.tables.items()
        }

    def item(self, ch: StoredChange, held: HeldChange | None = None) -> _Item | None:
        """The change's requests; None if this target does not take the change's table."""
        tm = self.mapper.table_mapper(ch.relation_id)
        if tm is None or tm.source_table not in self.endpoints:
            return None
        ops = self.mapper.map(ch)
        change = held or HeldChange(change_key(tm.target_table, ops), ch.position,
                                    ch.relation_id, ch.op, b"")
        item = _Item(change)
        upsert, delete = self.endpoints[tm.source_table]
        for sub, op in enumerate(ops):
            if isinstance(op, Upsert) and op.partial:
                item.refetch.append(Request(
                    self.target, ch.position, tm.source_table, op.key,
                    f"an update without its unchanged large values cannot be sent to target "
                    f"{self.target!r} as a whole record"))
                continue
            if isinstance(op, Truncate) or (isinstance(op, Delete) and delete is None):
                what = "TRUNCATE" if isinstance(op, Truncate) else "a delete (no `delete:` set)"
                item.failure = Failure(False, None, f"{what} of {op.table} cannot be sent to "
                                       f"target {self.target!r}")
                break
            try:
                req = http_change(op, tm.key_names, pipeline=self.pipeline.name,
                                  target=self.target, upsert=upsert,
                                  delete=delete or upsert, op_index=sub)
            except ValueError as err:
                item.failure = Failure(False, None, str(err))
                break
            item.requests.append((sub, req))
        return item


def _build(builder: _Requests, rows: list[tuple[StoredChange, bytes]],
           into: list[_Item] | None = None) -> Iterator[_Item]:
    """The items of staged rows (raw message kept for the retry queue), lazily; each is also
    appended to ``into``."""
    for ch, message in rows:
        it = builder.item(ch)
        if it is not None:
            it.change = HeldChange(it.change.key, ch.position, ch.relation_id, ch.op, message)
            if into is not None:
                into.append(it)
            yield it


def _send(sink: HttpSink, items: Iterable[_Item], done: set[tuple[int, int, int]]
          ) -> list[tuple[_Item, int, HttpOutcome]]:
    """Send the not-yet-accepted requests of items that are neither parked nor failed.

    ``items`` may be lazy: the sink consumes it while earlier requests are in flight."""
    todo: list[tuple[_Item, int]] = []

    def requests() -> Iterator[HttpChange]:
        for it in items:
            if it.parked or it.failure is not None:
                continue
            pos = it.change.position
            for sub, req in it.requests:
                if (pos.commit_lsn, pos.seq, sub) not in done:
                    todo.append((it, sub))
                    yield req

    outcomes = sink.send(requests())
    return [(it, sub, out) for (it, sub), out in zip(todo, outcomes, strict=True)]


def _settle(items: list[_Item], sent: list[tuple[_Item, int, HttpOutcome]], *,
            every_key: bool = False) -> dict[str, list[_Item]]:
    """Mark each item's failure from its requests' outcomes; group items per key, in order:
    every key's, or (delivery) only those of keys with a failed or parked item, as the others
    need no state."""
    for it, _sub, out in sent:
        if not out.ok and it.failure is None:
            it.failure = Failure(out.transient, out.status, out.error or "failed",
                                 out.retry_after_s)
    troubled = {it.change.key for it in items if it.failure is not None or it.parked}
    by_key: dict[str, list[_Item]] = {}
    for it in items:
        if every_key or it.change.key in troubled:
            by_key.setdefault(it.change.key, []).append(it)
    return by_key


def _windows(batches: list[BatchInfo], cap: int) -> Iterator[list[BatchInfo]]:
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


def deliver_http(
    state: StateStore, pipeline: PipelineSpec, target: str, sink: HttpSink, *,
    upto_batch: int | None = None, faults: Faults = NO_FAULTS, lock_timeout_s: float = 300.0,
) -> DeliveryReport:
    started = time.monotonic()
    lock = f"deliver:{pipeline.name}:{target}"
    _wait_for_lock(state, lock, lock_timeout_s)
    try:
        held = HeldStore(state, pipeline.name, target)
        refetch = RefetchStore(state, pipeline.name)
        builder = _Requests(state, pipeline, target)
        policy = pipeline.policy.retry
        delivered = state.delivered(pipeline.name, target)
        done_batches, changes, n_held, n_dead, n_refetch = [], 0, 0, 0, 0
        upserts = deletes = 0
        pending = [b for b in state.batches(pipeline.name, upto=upto_batch)
                   if b.last > delivered]
        for window in _windows(pending, WINDOW_CHANGES):
            first, last = window[0], window[-1]
            rows = state.read_changes_with_messages(
                pipeline.name, max(delivered, _before(first)), last.last)
            items: list[_Item] = []
            done = held.delivered_subs(first.first, last.last)
            if held.any_held():  # some keys may be blocked: find them before sending anything
                items.extend(_build(builder, rows))
                blocked = held.blocked(it.change.key for it in items)
                for it in items:
                    it.parked = it.change.key in blocked
                sent = _send(sink, items, done)
            else:  # nothing is blocked: decode and map while the first requests are in flight
                sent = _send(sink, _build(builder, rows, into=items), done)
            faults.hit("after_send")
            by_key = _settle(items, sent)
            with state.conn.transaction():
                # Ledger rows only for accepted requests of changes that stay behind (a key
                # change's DELETE went through, its PUT did not): a re-send skips them. Rows of
                # finished changes would be trimmed at the end of this transaction anyway.
                held.record_delivered((it.change.position, sub, out.status)
                                      for it, sub, out in sent if out.ok and it.failure)
                staying: set[Position] = set()  # held or dead: re-read once they are done
                for key_items in by_key.values():
                    parked = [it for it in key_items if it.parked]
                    if parked:  # the key was blocked before this window: wait behind it
                        held.hold(it.change for it in parked)
                        n_held += len(parked)
                        staying.update(it.change.position for it in parked)
                    live = [it for it in key_items if not it.parked]
                    first_bad = next((i for i, it in enumerate(live) if it.failure), None)
                    if first_bad is None:
                        continue
                    head, rest = live[first_bad], live[first_bad + 1:]
                    chain = [head.change, *(it.change for it in rest)]
                    staying.update(c.position for c in chain)
                    assert head.failure is not None
                    if head.failure.transient and policy.max_attempts > 1:
                        at = due_at(backoff(policy, 1, head.failure.retry_after_s))
                        held.hold([replace(head.change, attempts=1), *chain[1:]],
                                  next_attempt_at=at, failure=head.failure)
                        n_held += len(chain)
                    else:
                        held.kill(chain, head.failure, attempts=1)
                        n_dead += len(chain)
                n_refetch += refetch.request(r for it in items if it.change.position
                                             not in staying for r in it.refetch)
                state.record_delivered(pipeline.name, target, last.last, last.batch_id)
                held.trim_ledger(last.last)
            faults.hit("after_record")
            delivered = last.last
            changes += len(rows)
            done_batches.extend(window)
            upserts += sum(1 for it, _, out in sent if out.ok and it.change.op in "IU")
            deletes += sum(1 for it, _, out in sent if out.ok and it.change.op == "D")
        return DeliveryReport.of(pipeline.name, target, done_batches, changes,
                                 ApplyStats(upserts=upserts, deletes=deletes,
                                            refetch=n_refetch), started,
                                 held_changes=n_held, dead_letters=n_dead)
    finally:
        state.unlock(lock)


def sweep_http(
    state: StateStore, pipeline: PipelineSpec, target: str, sink: HttpSink, *,
    now: datetime | None = None, max_keys: int = 10_000, faults: Faults = NO_FAULTS,
    lock_timeout_s: float = 300.0,
) -> SweepReport:
    started = time.monotonic()
    now = now or datetime.now(timezone.utc)
    lock = f"deliver:{pipeline.name}:{target}"
    _wait_for_lock(state, lock, lock_timeout_s)
    try:
        held = HeldStore(state, pipeline.name, target)
        builder = _Requests(state, pipeline, target)
        policy = pipeline.policy.retry
        keys = held.due_keys(now, max_keys)
        items: list[_Item] = []
        for key in keys:
            for hc in held.chain(key):
                ch = decode_change(hc.position.commit_lsn, hc.position.seq, 0, hc.relation_id,
                                    hc.op, hc.message)
                it = builder.item(ch, held=hc)
                if it is None:  # the table left the spec: nothing can deliver it
                    gone = Failure(False, None, "its table is no longer sent to this target")
                    it = _Item(hc, failure=gone)
                items.append(it)
        done: set[tuple[int, int, int]] = set()
        for it in items:
            done |= held.delivered_subs(it.change.position, it.change.position)
        sent = _send(sink, items, done)
        faults.hit("after_send")
        by_key = _settle(items, sent, every_key=True)
        delivered = rescheduled = dead = 0
        refetch = RefetchStore(state, pipeline.name)
        with state.conn.transaction():
            held.record_delivered((it.change.position, sub, out.status)
                                  for it, sub, out in sent if out.ok)
            for key, key_items in by_key.items():
                first_bad = next((i for i, it in enumerate(key_items) if it.failure), None)
                ok = key_items if first_bad is None else key_items[:first_bad]
                held.release(it.change.position for it in ok)
                refetch.request(r for it in ok for r in it.refetch)
                delivered += len(ok)
                if first_bad is None:
                    continue
                head, rest = key_items[first_bad], key_items[first_bad + 1:]
                assert head.failure is not None
                attempts = head.change.attempts + 1
                if head.failure.transient and attempts < policy.max_attempts:
                    at = due_at(backoff(policy, attempts, head.failure.retry_after_s), now)
                    held.reschedule(key, head.change.position, attempts, at, head.failure)
                    rescheduled += 1
                else:
                    failure = head.failure
                    if failure.transient:
                        failure = Failure(False, failure.status,
                                          f"gave up after {attempts} attempts: {failure.error}")
                    held.kill([head.change, *(it.change for it in rest)], failure, attempts)
                    dead += 1 + len(rest)
        return SweepReport(pipeline.name, target, len(keys), delivered, rescheduled, dead,
                           time.monotonic() - started)
    finally:
        state.unlock(lock)

