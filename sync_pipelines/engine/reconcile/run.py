"""End-of-day reconciliation: find drift between a pipeline's source and each target, tell it
from changes still on their way, and repair it through the stream.

Contract: :func:`reconcile_pipeline` compares every table with every target (Postgres targets
with :func:`.reconcile.compare_postgres`, HTTP targets with a list endpoint with
:func:`.reconcile_http.compare_http`, others reported as not compared), then **confirms** what
it found, and with ``repair`` sends the confirmed keys' current source rows (or deletes) through
the pipeline's stream with :func:`.backfill.repair_keys`. It reads source, targets and state;
the only things it writes are repair chunks and their watermarks.

Scope: by default the tables' current state is compared. With a day's ``window``, a table
whose change-time column the spec names (``reconcile.changed_at``) is compared only on the keys
changed that day (:mod:`.changed`), so a past day's run means that day.

Confirmation (no false positives while live changes flow): a key that differed in the first
pass counts as drift only if, after the pipeline has delivered to the target everything that
committed before the first pass ended,

* it still differs (re-read on both sides by key),
* its source row is the one the first pass read (same fingerprint: a row that changed since is
  live traffic, not drift), and
* the target holds nothing for it in the retry queue or the dead letters (those are failures
  the retry sweep and the operator own).

Keys that fail the rule are counted as ``in_flight``. If the pipeline does not catch up within
``confirm_timeout_s`` (its sensor is stopped, say) nothing is confirmed: every candidate is
reported in flight, with a note saying why. A crash leaves nothing to undo: a repair chunk
whose high watermark was written is placed by the puller; one that was not, never is.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import psycopg

from ..backfill.reader import SnapshotReport, repair_keys
from ..capture.source import connect_text, describe_relation
from ..mapping.keys import key_text
from ..mapping.mapper import TableMapper
from ..spec import HttpTargetSpec, PipelineSpec, PostgresTargetSpec, SyncSpec
from ..staging.held import HeldStore
from ..staging.store import Position, StateStore
from ..wire.pgoutput import parse_lsn
from .changed import changed_keys
from .drift import KeyDrift, TableDrift
from .http import compare_http, recheck_http
from .postgres import compare_postgres, recheck_postgres

CatchUp = Callable[[str], None]
"""Called with the target's name while waiting for the pipeline to catch up: a caller that
wants the wait short pulls and delivers that target here (the Dagster job does); ``None``
leaves it to the sensor and the delivery runs."""

Window = tuple[datetime, datetime]
"""``[start, end)`` of the day a reconciliation is responsible for."""


@dataclass
class ReconcileReport:
    pipeline: str
    tables: list[TableDrift] = field(default_factory=list)
    repairs: list[SnapshotReport] = field(default_factory=list)
    duration_s: float = 0.0
    as_of: datetime | None = None
    """When the comparison started: what a table without a change-time column is compared
    as of (its current state), whatever day the run is for."""
    window: Window | None = None
    """The day's bounds, for the tables compared by their change-time column."""

    @property
    def waited_s(self) -> float:
        """Time spent waiting for delivery to catch up before confirming."""
        return sum(t.waited_s for t in self.tables)

    @property
    def drift(self) -> int:
        return sum(t.total for t in self.tables)


def _wal_lsn(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return parse_lsn(row[0])


def wait_caught_up(state: StateStore, pipeline: str, target: str, lsn: int, timeout_s: float,
                   catch_up: CatchUp | None = None) -> bool:
    """Wait until everything that committed before ``lsn`` is delivered to ``target``."""
    deadline = time.monotonic() + timeout_s
    staged_then: Position | None = None
    while True:
        if catch_up is not None:
            catch_up(target)
        ps = state.pipeline_state(pipeline)
        if staged_then is None and ps.advanced_lsn is not None and ps.advanced_lsn >= lsn:
            staged_then = ps.staged  # the slot is past lsn: all of it is staged by now
        if staged_then is not None and state.delivered(pipeline, target) >= staged_then:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def _confirm(first: TableDrift, now: dict[Any, KeyDrift | None], blocked: set[Any]
             ) -> TableDrift:
    confirmed: list[KeyDrift] = []
    in_flight = 0
    for d in first.drift:
        again = now.get(d.key)
        if (again is None or d.key in blocked
                or again.source_fingerprint != d.source_fingerprint):
            in_flight += 1
        else:
            confirmed.append(again)
    return replace(first, drift=confirmed, in_flight=first.in_flight + in_flight)


def _changed_that_day(source: psycopg.Connection[Any],
                      target_conn: psycopg.Connection[Any] | None, pipeline: PipelineSpec,
                      table: str, target: str, column: str, window: Window) -> TableDrift:
    """The first pass of a day's comparison: only the keys whose change time is in the day."""
    started = time.monotonic()
    tm = TableMapper(pipeline.name, table, pipeline.tables[table],
                     describe_relation(source, table))
    in_source, in_target = changed_keys(source, target_conn, tm, column, *window)
    keys = sorted(in_source | in_target, key=lambda k: tuple("" if v is None else v for v in k))
    if target_conn is not None:
        now = recheck_postgres(source, target_conn, pipeline, table, target, keys)
    else:
        now = recheck_http(source, pipeline, table, target, keys)
    return TableDrift(pipeline.name, table, target, tm.target_table, f"changed-at ({column})",
                      source_rows=len(in_source), target_rows=len(in_target),
                      compared_keys=len(keys), drift=[d for d in now.values() if d is not None],
                      duration_s=time.monotonic() - started)


def reconcile_table(spec: SyncSpec, name: str, table: str, target: str, *,
                    state: StateStore, repair: bool = False, confirm_timeout_s: float = 300.0,
                    catch_up: CatchUp | None = None, range_rows: int = 10_000,
                    window: Window | None = None) -> tuple[TableDrift, SnapshotReport | None]:
    """Compare one table with one target, confirm, optionally repair. With ``window`` and a
    change-time column for the table, only the keys changed in the window are compared."""
    pipeline = spec.pipelines[name]
    tspec = pipeline.targets[target]
    what = f"pipeline {name!r}: source"
    source = connect_text(pipeline.source.resolve(what), what, "sync_pipelines:reconcile")
    target_conn: psycopg.Connection[Any] | None = None
    column = pipeline.reconcile.changed_at_of(table) if window is not None else None
    try:
        if isinstance(tspec, PostgresTargetSpec):
            where = f"pipeline {name!r}: target {target!r}"
            target_conn = connect_text(tspec.resolve(where), where, "sync_pipelines:reconcile")
        if column is not None and window is not None:
            first = _changed_that_day(source, target_conn, pipeline, table, target, column,
                                      window)
        elif target_conn is not None:
            first = compare_postgres(source, target_conn, pipeline, table, target,
                                     range_rows=range_rows)
        elif isinstance(tspec, HttpTargetSpec):
            first = compare_http(source, pipeline, table, target)
        else:  # pragma: no cover - the spec has two kinds
            raise AssertionError(type(tspec))
        if not first.drift:
            return first, None
        lsn = _wal_lsn(source)
        waiting = time.monotonic()
        caught_up = wait_caught_up(state, name, target, lsn, confirm_timeout_s, catch_up)
        first.waited_s = time.monotonic() - waiting
        if not caught_up:
            note = (f"the pipeline did not deliver to {target} what committed before the "
                    f"comparison ended within {confirm_timeout_s:.0f}s (is its sensor "
                    "running?): nothing was confirmed")
            return replace(first, drift=[], in_flight=len(first.drift), note=note), None
        keys = [d.key for d in first.drift]
        if target_conn is not None:
            now = recheck_postgres(source, target_conn, pipeline, table, target, keys)
        else:
            now = recheck_http(source, pipeline, table, target, keys)
        tm = TableMapper(name, table, pipeline.tables[table], describe_relation(source, table))
        held = HeldStore(state, name, target)
        held_keys = held.blocked(key_text(tm.target_table, k) for k in keys)
        blocked = {k for k in keys if key_text(tm.target_table, k) in held_keys}
        found = _confirm(first, now, blocked)
        found.duration_s = first.duration_s
        found.waited_s = first.waited_s
        if not (repair and found.drift):
            return found, None
        fix = repair_keys(state, pipeline, table, [d.key for d in found.drift])
        return found, fix
    finally:
        source.close()
        if target_conn is not None:
            target_conn.close()


def reconcile_pipeline(spec: SyncSpec, name: str, *, state: StateStore,
                       tables: Sequence[str] | None = None, targets: Sequence[str] | None = None,
                       repair: bool = False, confirm_timeout_s: float = 300.0,
                       catch_up: CatchUp | None = None, range_rows: int = 10_000,
                       window: Window | None = None,
                       on_table: Callable[[TableDrift], None] | None = None) -> ReconcileReport:
    """Reconcile ``tables`` (default: all) against ``targets`` (default: all) of a pipeline;
    with ``window``, tables with a change-time column compare only that day's keys."""
    started = time.monotonic()
    pipeline: PipelineSpec = spec.pipelines[name]
    report = ReconcileReport(name, as_of=datetime.now(timezone.utc), window=window)
    for target in targets or list(pipeline.targets):
        tspec = pipeline.targets[target]
        sent = (list(tspec.tables) if isinstance(tspec, HttpTargetSpec) and tspec.tables
                else list(pipeline.tables))
        for table in tables or list(pipeline.tables):
            if table not in sent:
                continue
            drift, fix = reconcile_table(spec, name, table, target, state=state, repair=repair,
                                         confirm_timeout_s=confirm_timeout_s,
                                         catch_up=catch_up, range_rows=range_rows,
                                         window=window)
            report.tables.append(drift)
            if fix is not None:
                report.repairs.append(fix)
            if on_table is not None:
                on_table(drift)
    report.duration_s = time.monotonic() - started
    return report
