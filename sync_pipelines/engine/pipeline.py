"""Wiring: open the state store, the source and the sinks a spec names, and run one step.

These are the entry points an orchestrator calls — the Dagster layer, the benchmark and the
tests all go through them, so each exercises the same path:

* :func:`pull_pipeline` — one sensor tick's work (see :mod:`.capture.puller`);
* :func:`deliver_target` — one delivery run's work for one target (see
  :mod:`.delivery.loop`), followed by clean-up of batches every target has applied;
  :func:`deliver_pipeline` does it for every target, each on its own;
* :func:`link_conflicts`, :func:`link_conflict_counts`, :func:`resolve_link_conflict` — a
  two-way link's conflict log and an operator's decisions (see :mod:`.links`);
* :func:`webhooks_received` — what the webhook receiver staged since a sensor's last tick;
* :func:`delivery_backlog`, :func:`mark_requested` — what each target has not delivered yet
  and when a delivery was last asked for, so the sensor asks for each target that has work
  (and again after a failed run);
* :func:`sweep_target`, :func:`sweep_pipeline`, :func:`resolve_dead_letters` — the retry
  schedule (:mod:`.delivery.sweep`) and the operator's dead-letter actions;
* :func:`backfill_pipeline`, :func:`backfill_plan` — rows that existed before the
  slot, read into the stream (see :mod:`.backfill`);
* :func:`reconcile` — end-of-day drift check and repair (see :mod:`.reconcile`).

Connections are opened per call and closed on return, crash or not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from time import monotonic, sleep
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from psycopg import sql

from .backfill.reader import Progress, SnapshotReport, backfill_table
from .backfill.refetch import refetch_pending
from .capture.poller import poll
from .capture.puller import PullReport, pull
from .capture.source import Source
from .delivery.loop import deliver
from .delivery.report import DeliveryReport, SweepReport
from .delivery.sinks.registry import open_sink
from .delivery.sweep import sweep
from .errors import SpecError, SyncError
from .faults import NO_FAULTS, Faults
from .links.resolution import resolve_conflict
from .reconcile.drift import TableDrift
from .reconcile.run import CatchUp, ReconcileReport, Window, reconcile_pipeline
from .spec import HttpPollSourceSpec, PipelineSpec, PostgresTargetSpec, SyncSpec, WebhookSourceSpec
from .staging.held import HeldStore
from .staging.links import ConflictRecord, LinkStore
from .staging.receipts import ReceiptStore, Received
from .staging.snapshots import SnapshotInfo, SnapshotStore
from .staging.store import Backlog, StateStore


def open_state(spec: SyncSpec) -> StateStore:
    return StateStore.connect(spec.state.resolve("state database"), spec.state.schema_name)


def open_source(pipeline: PipelineSpec) -> Source:
    return Source(pipeline.source.resolve(f"pipeline {pipeline.name!r}: source"), pipeline)


def pull_pipeline(spec: SyncSpec, name: str, *, faults: Faults = NO_FAULTS,
                  force: bool = False, keep_pulling_s: float = 0.0,
                  keep_pulling: Callable[[], bool] | None = None,
                  follow: bool = False) -> PullReport:
    """One sensor tick of the pipeline's source.

    PostgreSQL: re-read the rows delivery asked for (their watermarks go into the WAL first,
    so this very pull meets them; their few rows are not held to the demand budget), then
    pull within the demand budget — and, with ``keep_pulling_s``, while ``keep_pulling()``
    says delivery is under way, pull again, up to that long (one report for all of it): every
    ``PULL_AGAIN_S`` while the pull stopped at the budget (delivery frees room), and with
    ``follow`` every ``FOLLOW_S`` once it has caught up (new changes are staged as they come,
    not at the next tick). Polling: one poll of each table whose
    interval has passed (``force``: now). Webhooks: nothing to pull — the receiver stages as
    requests come."""
    pipeline = spec.pipelines[name]
    if isinstance(pipeline.source, WebhookSourceSpec):
        return PullReport(name, 0, 0, skipped="webhook source: the receiver stages changes "
                          "as they arrive (sync-pipelines serve)")
    if isinstance(pipeline.source, HttpPollSourceSpec):
        with open_state(spec) as state:
            state.ensure_pipeline(name, pipeline.slot)
            undelivered = state.undelivered_changes(name)
            polled = poll(state, pipeline, force=force)
            return PullReport(
                name, pipeline.policy.demand_budget - undelivered, undelivered,
                tuple(polled.batches), polled.staged, more=polled.more,
                skipped=None if polled.staged else (
                    "no table was due for a poll" if not polled.tables
                    else "the listing goes on at the next poll" if polled.more
                    else "no new or changed records"),
                duration_s=polled.duration_s)
    with open_state(spec) as state, open_source(pipeline) as source:
        refetched = refetch_pending(state, pipeline, faults=faults)
        started = monotonic()
        # While a delivery run drains, a pull that finds nothing staged peeks one batch first
        # (the run has work sooner) and this loop pulls the rest at once.
        draining = bool(keep_pulling_s) and (keep_pulling is None or keep_pulling())
        first_peek = pipeline.policy.batch_size if draining else None
        report = last = pull(source, state, pipeline, faults=faults, first_peek=first_peek)
        while keep_pulling_s and monotonic() - started < keep_pulling_s:
            backlog = last.stopped_by_demand or last.waiting_for_room
            if not (backlog or last.more or follow) or not (
                    keep_pulling is None or keep_pulling()):
                break
            if not last.more:  # more in the slot than the last peek asked for: at once
                sleep(PULL_AGAIN_S if backlog else FOLLOW_S)
            last = pull(source, state, pipeline, faults=faults, first_peek=first_peek)
            report = _merged(report, last, monotonic() - started)
        return dataclasses.replace(report, refetch=refetched)


PULL_AGAIN_S = 0.1
"""How often a tick that keeps pulling looks for room in the budget (a few indexed queries).
It was 0.25 s: sampled over the pipelined benchmark's standard drain, the puller slept 1.8 s
waiting for room, in steps of that size, while the run it waited for took 3.5 s."""
FOLLOW_S = 0.5
"""How often a tick that follows the source pulls once it has caught up: what a change waits
for its pull while a delivery run drains (instead of up to a sensor interval)."""


def _merged(a: PullReport, b: PullReport, duration_s: float) -> PullReport:
    """Two pulls of one tick as one report: the first's demand, everything staged by both."""
    changes = a.changes + b.changes
    return dataclasses.replace(
        b, demand=a.demand, undelivered_before=a.undelivered_before,
        batches=a.batches + b.batches, changes=changes,
        transactions=a.transactions + b.transactions,
        advanced_to=b.advanced_to if b.advanced_to is not None else a.advanced_to,
        skipped=None if changes else b.skipped, echoes=a.echoes + b.echoes,
        duration_s=duration_s)


def _target(pipeline: PipelineSpec, target: str) -> None:
    if target not in pipeline.targets:
        raise SpecError(f"pipeline {pipeline.name!r} has no target {target!r} "
                        f"(targets: {', '.join(pipeline.targets)})")


def deliver_target(spec: SyncSpec, name: str, target: str, *, upto_batch: int | None = None,
                   lock_timeout_s: float = 300.0, faults: Faults = NO_FAULTS,
                   keep_draining: bool = False,
                   progress: Callable[[DeliveryReport], None] | None = None
                   ) -> DeliveryReport:
    """One delivery run's work for one target (see :mod:`.delivery.loop`), then clean-up of
    the batches every target has applied. Waits up to ``lock_timeout_s`` for another delivery
    of the target to finish (a :class:`~.errors.TransientDeliveryError` after that). With
    ``keep_draining`` (a Dagster run), it also delivers what is staged while it runs, as the
    pipeline's ``run_drain_seconds`` and ``run_idle_seconds`` allow."""
    pipeline = spec.pipelines[name]
    _target(pipeline, target)
    drain = (pipeline.policy.run_drain_seconds, pipeline.policy.run_idle_seconds) if (
        keep_draining) else (0.0, 0.0)
    with open_state(spec) as state:
        with closing(open_sink(pipeline, target)) as sink:
            report = deliver(state, pipeline, target, sink, upto_batch=upto_batch,
                             lock_timeout_s=lock_timeout_s, faults=faults,
                             keep_draining_s=drain[0], idle_s=drain[1], progress=progress,
                             open_state=lambda: open_state(spec))
        state.collect_garbage(name, list(pipeline.targets))
    return report


def deliver_pipeline(
    spec: SyncSpec, name: str, *, upto_batch: int | None = None, faults: Faults = NO_FAULTS
) -> list[DeliveryReport]:
    """Deliver to every target, each on its own: a target that fails does not keep the others
    from their changes. The first target's error is raised once all were tried."""
    reports, errors = [], []
    for target in spec.pipelines[name].targets:
        try:
            reports.append(deliver_target(spec, name, target, upto_batch=upto_batch,
                                          faults=faults))
        except SyncError as err:
            errors.append(err)
    if errors:
        raise errors[0]
    return reports


def webhooks_received(spec: SyncSpec, name: str, after_batch: int) -> Received:
    """Webhooks the receiver staged in batches after ``after_batch`` (for the sensor's staged
    materialization); receipts older than the dedup window are forgotten on the way."""
    with open_state(spec) as state:
        receipts = ReceiptStore(state, name)
        receipts.forget_old()
        return receipts.received_since(after_batch)


def link_conflicts(spec: SyncSpec, link: str, *, status: str | None = None,
                   detected_by: str | None = None, limit: int = 50) -> list[ConflictRecord]:
    """A link's logged conflicts, newest first (``status``: held, decided or resolved;
    ``detected_by``: one direction's pipeline)."""
    with open_state(spec) as state:
        return LinkStore(state, link).conflicts(status=status, detected_by=detected_by,
                                                limit=limit)


def link_conflict_counts(spec: SyncSpec, link: str, since_hours: float = 24.0, *,
                         detected_by: str | None = None) -> dict[str, int]:
    """Conflicts of the last ``since_hours`` by status, and every held one (``held_total``)."""
    with open_state(spec) as state:
        return LinkStore(state, link).counts(since_hours, detected_by)


def resolve_link_conflict(spec: SyncSpec, link: str, conflict_id: int, *,
                          take: str | None = None, values: dict[str, Any] | None = None,
                          delete: bool = False) -> ConflictRecord:
    """An operator's decision on a conflict (see :mod:`.links.resolution`)."""
    with open_state(spec) as state:
        return resolve_conflict(spec, state, link, conflict_id, take=take, values=values,
                                delete=delete)


def delivery_backlog(spec: SyncSpec, name: str) -> list[Backlog]:
    """Per target: staged batches it has not delivered yet, and when it was last asked to."""
    pipeline = spec.pipelines[name]
    with open_state(spec) as state:
        state.ensure_pipeline(name, pipeline.slot)
        return [state.backlog(name, t) for t in pipeline.targets]


def mark_requested(spec: SyncSpec, name: str, target: str, batch_id: int) -> None:
    with open_state(spec) as state:
        state.mark_requested(name, target, batch_id)


def compare_tables(spec: SyncSpec, name: str) -> list[str]:
    """Differences between the source and each target (empty when they match)."""
    from .reconcile.verify import compare_pipeline

    pipeline = spec.pipelines[name]
    problems = []
    source_dsn = pipeline.source.resolve(f"pipeline {name!r}: source")
    for target, tspec in pipeline.targets.items():
        if not isinstance(tspec, PostgresTargetSpec):
            continue  # comparing against an HTTP API needs its list endpoint (reconciliation)
        target_dsn = tspec.resolve(f"pipeline {name!r}: target {target!r}")
        for d in compare_pipeline(source_dsn, target_dsn, pipeline):
            if not d.clean:
                problems.append(f"{target}/{d.table}: {d.missing} missing, {d.extra} extra, "
                                f"{d.different} different; e.g. {d.sample[:3]}")
    return problems


def sweep_target(spec: SyncSpec, name: str, target: str, *, now: datetime | None = None,
                 faults: Faults = NO_FAULTS) -> SweepReport:
    """The retry schedule's work for one target (see :mod:`.delivery.sweep`)."""
    pipeline = spec.pipelines[name]
    _target(pipeline, target)
    with open_state(spec) as state:
        if not HeldStore(state, name, target).counts()[0]:  # only connect if work is held
            return SweepReport(name, target)
        with closing(open_sink(pipeline, target)) as sink:
            return sweep(state, pipeline, target, sink, now=now, faults=faults)


def sweep_pipeline(spec: SyncSpec, name: str, *, faults: Faults = NO_FAULTS
                   ) -> list[SweepReport]:
    """Deliver due retries of every target that holds any, in key order, each target on its
    own (the first error is raised once all were tried); a report per target swept."""
    reports, errors = [], []
    pipeline = spec.pipelines[name]
    with open_state(spec) as state:
        holding = [t for t in pipeline.targets if HeldStore(state, name, t).counts()[0]]
    for target in holding:  # a target with nothing held is not even connected to
        try:
            reports.append(sweep_target(spec, name, target, faults=faults))
        except SyncError as err:
            errors.append(err)
    if errors:
        raise errors[0]
    return reports


def resolve_dead_letters(spec: SyncSpec, name: str, target: str, *, action: str,
                         ids: list[int] | None = None, key_like: str | None = None,
                         reason: str = "") -> int:
    """Redrive (back in front of their keys, due now) or discard (with a reason) dead letters."""
    pipeline = spec.pipelines[name]
    _target(pipeline, target)
    with open_state(spec) as state:
        store = HeldStore(state, name, target)
        if action == "redrive":
            return store.redrive(ids=ids, key_like=key_like)
        if action == "discard":
            return store.discard(reason=reason, ids=ids, key_like=key_like)
    raise SpecError(f"action must be 'redrive' or 'discard', not {action!r}")


# -- backfill and reconciliation ---------------------------------------------------------------


def _tables(pipeline: PipelineSpec, tables: Sequence[str] | None) -> list[str]:
    if not tables:
        return list(pipeline.tables)
    unknown = [t for t in tables if t not in pipeline.tables]
    if unknown:
        raise SpecError(f"pipeline {pipeline.name!r} has no table(s) {', '.join(unknown)} "
                        f"(tables: {', '.join(pipeline.tables)}; write them as schema.table)")
    return list(tables)


@dataclass(frozen=True)
class BackfillPlan:
    """Which tables of a pipeline an initial backfill should (re)start now."""

    new: tuple[str, ...] = ()
    """Tables never backfilled."""
    unfinished: tuple[SnapshotInfo, ...] = ()
    """Backfills left ``running`` or ``failed`` by a worker that is gone: resume them."""
    running: tuple[str, ...] = ()
    """Tables whose backfill worker is alive right now."""

    @property
    def tables(self) -> list[str]:
        return [*self.new, *(s.table for s in self.unfinished)]


def backfill_plan(spec: SyncSpec, name: str) -> BackfillPlan:
    """Tables never backfilled, and backfills a dead worker left unfinished; nothing before the
    first pull has created the slot (watermarks written earlier would be lost). A worker holds
    a lock while it runs (see :func:`.staging.snapshots.worker_lock`), so "running" means alive."""
    pipeline = spec.pipelines[name]
    if pipeline.postgres_source is None:
        return BackfillPlan()  # a webhook or polling source has no table to read
    with open_state(spec) as state:
        state.ensure_pipeline(name, pipeline.slot)
        if state.pipeline_state(name).advanced_lsn is None:
            return BackfillPlan()
        store = SnapshotStore(state)
        latest = {s.table: s for s in store.latest(name, kind="backfill")
                  if s.table in pipeline.tables}
        open_ = [s for s in latest.values() if s.status in ("running", "failed")]
        alive = {s.table for s in open_ if store.alive(s)}
        if not state.try_lock(_backfill_lock(name)):  # a run is between two tables
            alive.add("(a backfill run between tables)")
        else:
            state.unlock(_backfill_lock(name))
    return BackfillPlan(
        new=tuple(t for t in pipeline.tables if t not in latest),
        unfinished=tuple(s for s in open_ if s.table not in alive),
        running=tuple(sorted(alive)))


def backfill_pipeline(spec: SyncSpec, name: str, *, tables: Sequence[str] | None = None,
                      restart: bool = False, on_chunk: Progress | None = None,
                      faults: Faults = NO_FAULTS) -> list[SnapshotReport]:
    """Backfill tables (default: all) through the stream, resuming unfinished ones."""
    pipeline = spec.pipelines[name]
    reports = []
    with open_state(spec) as state:
        state.ensure_pipeline(name, pipeline.slot)
        # Held for the whole call so a planner sees a run between two tables as alive; the
        # tables' own locks keep two backfills of one table apart (a second caller goes on).
        locked = state.try_lock(_backfill_lock(name))
        try:
            for table in _tables(pipeline, tables):
                reports.append(backfill_table(state, pipeline, table,
                                              chunk_rows=pipeline.policy.snapshot_chunk,
                                              resume=not restart, on_chunk=on_chunk,
                                              faults=faults))
        finally:
            if locked:
                state.unlock(_backfill_lock(name))
    return reports


def _backfill_lock(name: str) -> str:
    return f"backfill-run:{name}"


def first_day(spec: SyncSpec, name: str) -> date | None:
    """The day (in the reconciliation time zone) the pipeline was first seen in the state DB;
    None when it was not yet, or the state DB cannot be reached."""
    pipeline = spec.pipelines[name]
    try:
        dsn = spec.state.resolve("state database")
        with psycopg.connect(dsn, connect_timeout=5, autocommit=True) as conn:
            row = conn.execute(sql.SQL("SELECT created_at FROM {}.pipeline WHERE pipeline = %s")
                               .format(sql.Identifier(spec.state.schema_name)),
                               (name,)).fetchone()
    except (psycopg.Error, SyncError):
        return None
    if row is None or row[0] is None:
        return None
    return row[0].astimezone(ZoneInfo(pipeline.reconcile.timezone)).date()


def day_window(pipeline: PipelineSpec, day: date) -> Window:
    """``[start, end)`` of ``day`` in the pipeline's reconciliation time zone."""
    zone = ZoneInfo(pipeline.reconcile.timezone)
    start = datetime.combine(day, time(0), tzinfo=zone)
    return start, datetime.combine(day + timedelta(days=1), time(0), tzinfo=zone)


def reconcile(spec: SyncSpec, name: str, *, tables: Sequence[str] | None = None,
              targets: Sequence[str] | None = None, repair: bool = False,
              day: date | None = None, full: bool = False, drive: bool = False,
              catch_up: CatchUp | None = None,
              on_table: Callable[[TableDrift], None] | None = None) -> ReconcileReport:
    """Compare the pipeline's tables with its targets, confirm drift, optionally repair it.

    With ``day`` (and not ``full``), tables with a change-time column (``reconcile.changed_at``)
    compare only the keys changed that day; the others, and every table with ``full``, compare
    their current state. With ``drive`` the wait before confirming pulls and delivers the
    target itself instead of waiting for the sensor and the delivery runs (the engine's locks
    keep that correct beside them)."""
    pipeline = spec.pipelines[name]
    for t in targets or ():
        _target(pipeline, t)
    if drive and catch_up is None:
        def catch_up(target: str) -> None:
            pull_pipeline(spec, name)
            deliver_target(spec, name, target)
    window = day_window(pipeline, day) if day is not None and not full else None
    with open_state(spec) as state:
        return reconcile_pipeline(
            spec, name, state=state, tables=_tables(pipeline, tables), targets=targets,
            repair=repair, confirm_timeout_s=pipeline.reconcile.confirm_timeout_seconds,
            catch_up=catch_up, range_rows=pipeline.reconcile.range_rows, window=window,
            on_table=on_table)
