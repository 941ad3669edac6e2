"""Per-pipeline Dagster definitions for backfill and end-of-day reconciliation.

For a pipeline ``p``:

* asset ``sync/p/backfill`` and job ``p_backfill_job``: reads source tables in key-ordered
  chunks into the stream (launchpad config: which tables, restart or resume). The replication
  sensor launches it for every table that was never backfilled when ``initial_backfill`` is on;
  progress is logged per chunk and each table's materialization carries rows, chunks, percent;
* asset ``sync/p/reconciliation`` (daily partitions in the spec's timezone) with the
  ``drift`` check, job ``p_reconcile_job`` and schedule ``p_reconcile_schedule`` (after each
  day ends, running by default): drift per class as numeric metadata (so it plots over days),
  a sample of differing keys with the fields that differ, duration and rows compared per
  second; launchpad config ``repair: true`` sends the confirmed drift through the stream.

Both jobs carry ``sync/maintenance`` instead of the delivery runs' ``sync/pipeline`` tag, so a
long backfill or reconciliation never holds up delivery (which they rely on).
"""


import time
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import dagster as dg

import sync_pipelines.engine as engine
from sync_pipelines.engine import (
    HttpTargetSpec,
    PipelineSpec,
    SnapshotReport,
    SyncError,
    SyncSpec,
    TableDrift,
)

from .keys import MAINTENANCE_TAG, backfill_key, delivered_key, reconciliation_key
from .resources import SyncEngine

SAMPLE_ROWS = 50


class BackfillConfig(dg.Config):
    tables: list[str] = []
    """Source tables (``schema.table``) to read; all of the pipeline's tables if empty."""
    restart: bool = False
    """Start over from the first key instead of resuming an unfinished backfill."""


class ReconcileConfig(dg.Config):
    repair: bool | None = None
    """Send confirmed drift through the stream (default: the spec's ``reconcile.repair``)."""
    full: bool | None = None
    """Compare every row, not only the day's changes (default: on the spec's
    ``reconcile.full_on`` weekday)."""
    tables: list[str] = []
    """Source tables to compare; all if empty."""
    targets: list[str] = []
    """Targets to compare; all if empty."""


_WAITING = (dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED,
            dg.DagsterRunStatus.STARTING)
STARTUP_GRACE_S = 120.0
"""A backfill run this young counts as active even before its worker holds the table's lock;
an older one that holds no lock has died (its process was killed: Dagster may still show it
as started)."""


def _backfill_run_active(instance: dg.DagsterInstance, job_name: str) -> str | None:
    """Why a new backfill run must wait, if it must: one is queued or starting, or started
    so recently that its worker may not have taken its lock yet."""
    records = instance.get_run_records(dg.RunsFilter(
        job_name=job_name, statuses=[*_WAITING, dg.DagsterRunStatus.STARTED]), limit=20)
    now = time.time()
    for r in records:
        if r.dagster_run.status in _WAITING:
            return f"backfill run {r.dagster_run.run_id[:8]} is queued or starting"
        started = r.start_time or r.create_timestamp.timestamp()
        if now - started < STARTUP_GRACE_S:
            return f"backfill run {r.dagster_run.run_id[:8]} has just started"
    return None


def _fail(err: SyncError) -> dg.Failure:
    return dg.Failure(description=str(err), metadata={"error": type(err).__name__})


def _snapshot_metadata(r: SnapshotReport) -> dict[str, Any]:
    """A table's backfill progress. A finished one is 100 %; an unfinished one has a percent
    only when the catalog's row estimate is known (never a made-up 0)."""
    out: dict[str, Any] = {
        "table": r.table, "status": "done" if r.done else "running",
        "rows_this_run": r.rows, "rows_total": r.total_rows, "chunks_this_run": r.chunks,
        "resumed": r.resumed, "duration_s": round(r.duration_s, 2),
        "rows_per_s": round(r.rows_per_s, 1),
    }
    if r.done:
        out["percent"] = 100.0
    elif r.rows_estimate:
        out["rows_estimate"] = r.rows_estimate
        out["percent"] = round(min(100.0 * r.total_rows / r.rows_estimate, 99.9), 1)
    return out


def _drift_table(tables: list[TableDrift]) -> dg.MetadataValue:
    columns = ("target", "table", "key", "kind", "fields")
    records = [
        dg.TableRecord({"target": t.target, "table": t.table,
                        "key": ", ".join("NULL" if v is None else v for v in d.key),
                        "kind": d.kind, "fields": ", ".join(d.fields)})
        for t in tables for d in t.drift
    ][:SAMPLE_ROWS]
    schema = dg.TableSchema(columns=[dg.TableColumn(c, "string") for c in columns])
    return dg.MetadataValue.table(records, schema=schema)


def _per_table(tables: list[TableDrift]) -> dg.MetadataValue:
    columns = ("target", "table", "method", "missing", "extra", "different", "in_flight",
               "rows_compared", "rows_per_s", "note")
    records = [dg.TableRecord({
        "target": t.target, "table": t.table, "method": t.method, "missing": t.missing,
        "extra": t.extra, "different": t.different, "in_flight": t.in_flight,
        "rows_compared": t.source_rows + t.target_rows, "rows_per_s": round(t.rows_per_s),
        "note": t.note or ""}) for t in tables]
    types = {"missing": "int", "extra": "int", "different": "int", "in_flight": "int",
             "rows_compared": "int", "rows_per_s": "int"}
    schema = dg.TableSchema(columns=[dg.TableColumn(c, types.get(c, "string")) for c in columns])
    return dg.MetadataValue.table(records, schema=schema)


def _first_day(spec: SyncSpec, pipeline: PipelineSpec) -> str:
    """The first daily partition: the spec's ``start_date``, else the day the pipeline was first
    seen in the state DB, else today (a new pipeline), so the UI does not offer hundreds of
    days nobody synced."""
    if pipeline.reconcile.start_date:
        return pipeline.reconcile.start_date
    seen = engine.first_day(spec, pipeline.name)
    if seen is None:
        seen = datetime.now(ZoneInfo(pipeline.reconcile.timezone)).date()
    return seen.isoformat()


def build_reconcile_defs(spec: SyncSpec, pipeline: PipelineSpec) -> dg.Definitions:
    if pipeline.postgres_source is None:  # both read the source's tables with SQL
        return dg.Definitions()
    p = pipeline.name
    rspec = pipeline.reconcile
    # end_offset=1: today is a partition too (the rows changed so far today), so a pipeline
    # started today can be reconciled from the launchpad before its first day has ended.
    partitions = dg.DailyPartitionsDefinition(start_date=_first_day(spec, pipeline),
                                              timezone=rspec.timezone, end_offset=1)

    @dg.asset(key=backfill_key(p), group_name=p,
              deps=[dg.AssetKey(["sync", p, "source"])],
              description=f"Rows that existed in the source of {p} before its slot, read in "
              "key-ordered chunks and placed in the stream between watermarks.")
    def backfill(context: dg.AssetExecutionContext, config: BackfillConfig,
                 sync: SyncEngine) -> dg.MaterializeResult:
        spec = sync.spec()

        def progress(r: SnapshotReport) -> None:
            total = f" of ~{r.rows_estimate:,}" if r.rows_estimate else ""
            context.log.info(f"{p} backfill {r.table}: {r.total_rows:,} rows{total} emitted "
                             f"({r.chunks} chunk(s) this run, {r.rows_per_s:,.0f} rows/s)")

        try:
            reports = engine.backfill_pipeline(spec, p, tables=config.tables or None,
                                               restart=config.restart, on_chunk=progress)
        except SyncError as err:
            raise _fail(err) from None
        return dg.MaterializeResult(metadata={
            "tables": dg.MetadataValue.json({r.table: _snapshot_metadata(r) for r in reports}),
            "rows_this_run": sum(r.rows for r in reports),
            "rows_total": sum(r.total_rows for r in reports),
            "done": all(r.done for r in reports),
        })

    backfill_job = dg.define_asset_job(
        f"{p}_backfill_job", selection=[backfill_key(p)], executor_def=dg.in_process_executor,
        tags={MAINTENANCE_TAG: p},
        description=f"Backfill source tables of {p} through the stream (resumable).")

    drift_check = dg.AssetCheckSpec(
        "drift", asset=reconciliation_key(p),
        description="Confirmed drift between source and targets: WARN above the spec's "
        "reconcile.drift_warn, ERROR above reconcile.drift_error.")

    @dg.asset(key=reconciliation_key(p), group_name=p, partitions_def=partitions,
              deps=[delivered_key(p, t) for t in pipeline.targets], check_specs=[drift_check],
              description=f"End-of-day comparison of {p}'s source with each target.")
    def reconciliation(context: dg.AssetExecutionContext, config: ReconcileConfig,
                       sync: SyncEngine):
        repair = rspec.repair if config.repair is None else config.repair
        day = date.fromisoformat(context.partition_key)
        full = config.full if config.full is not None else (
            rspec.full_on != "never" and day.strftime("%A").lower() == rspec.full_on)
        try:
            report = engine.reconcile(
                sync.spec(), p, tables=config.tables or None, targets=config.targets or None,
                repair=repair, day=day, full=full, drive=True, on_table=lambda t: context.log.info(
                    f"{p} {t.table} → {t.target} ({t.method}): {t.missing} missing, "
                    f"{t.extra} extra, {t.different} different, {t.in_flight} in flight"
                    + (f"; {t.note}" if t.note else "")))
        except SyncError as err:
            raise _fail(err) from None
        tables = report.tables
        total = report.drift
        yield dg.MaterializeResult(metadata={
            "day": context.partition_key,
            "scope": dg.MetadataValue.text(_scope(pipeline, report, full)),
            "as_of": report.as_of.isoformat(timespec="seconds") if report.as_of else "",
            "waited_for_delivery_s": round(report.waited_s, 2),
            "drift_total": total,
            "drift_missing": sum(t.missing for t in tables),
            "drift_extra": sum(t.extra for t in tables),
            "drift_different": sum(t.different for t in tables),
            "in_flight": sum(t.in_flight for t in tables),
            "rows_compared": sum(t.source_rows + t.target_rows for t in tables),
            "rows_per_s": round(sum(t.source_rows + t.target_rows for t in tables)
                                / max(sum(t.duration_s for t in tables), 1e-9)),
            "duration_s": round(report.duration_s, 2),
            "repaired_keys": sum(r.rows for r in report.repairs),
            "not_compared": sum(1 for t in tables if t.method == "unsupported"),
            "per_table": _per_table(tables),
            "sample": _drift_table(tables),
        })
        # A table that could not be compared (its target table or a column is missing, say)
        # is not clean: the check fails, unless it is an HTTP table without a list endpoint,
        # which the spec chose not to compare.
        unverified = [t for t in tables if t.method == "unsupported" and not _unlisted(t)]
        severity = (dg.AssetCheckSeverity.ERROR if total > rspec.drift_error
                    else dg.AssetCheckSeverity.WARN)
        yield dg.AssetCheckResult(
            check_name="drift", passed=total <= rspec.drift_warn and not unverified,
            severity=severity,
            metadata={"drift_total": total, "repaired": repair,
                      "could_not_compare": dg.MetadataValue.text(", ".join(
                          f"{t.target}/{t.table}: {t.note}" for t in unverified) or "none"),
                      "not_compared_by_spec": dg.MetadataValue.text(", ".join(
                          f"{t.target}/{t.table}" for t in tables if _unlisted(t)) or "none"),
                      "sample": _drift_table(tables)})

    def _scope(pipeline: PipelineSpec, report: Any, full: bool) -> str:
        by_day = sorted({t.table for t in report.tables if t.method.startswith("changed-at")})
        current = sorted({t.table for t in report.tables} - set(by_day))
        parts = []
        if by_day:
            parts.append(f"rows changed on the day (by their change-time column): "
                         f"{', '.join(by_day)}")
        if current:
            why = "a full run" if full else "no reconcile.changed_at column"
            parts.append(f"current state as of {report.as_of:%Y-%m-%d %H:%M:%S %Z} ({why}): "
                         f"{', '.join(current)}")
        return "; ".join(parts) or "nothing compared"

    def _unlisted(t: TableDrift) -> bool:
        tspec = pipeline.targets[t.target]
        return (isinstance(tspec, HttpTargetSpec) and t.table in tspec.tables
                and tspec.tables[t.table].list is None)

    reconcile_job = dg.define_asset_job(
        f"{p}_reconcile_job", selection=[reconciliation_key(p)],
        executor_def=dg.in_process_executor, tags={MAINTENANCE_TAG: p},
        description=f"Compare {p}'s source with its targets; with repair, fix confirmed drift "
        "through the stream.")
    hour, minute = (int(x) for x in rspec.at.split(":"))
    first_day = _first_day(spec, pipeline)

    @dg.schedule(
        name=f"{p}_reconcile_schedule", job=reconcile_job, cron_schedule=f"{minute} {hour} * * *",
        execution_timezone=rspec.timezone, default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Reconciles the day that ended, every day at {rspec.at} "
        f"({rspec.timezone}).")
    def schedule(context: dg.ScheduleEvaluationContext):
        # The day that ended (today's partition exists too, for the launchpad, but is not over).
        when = context.scheduled_execution_time or datetime.now(ZoneInfo(rspec.timezone))
        day = (when.astimezone(ZoneInfo(rspec.timezone)).date() - timedelta(days=1)).isoformat()
        if day < first_day:
            return dg.SkipReason(f"{day} is before the pipeline's first day ({first_day})")
        return dg.RunRequest(run_key=f"{p}-reconcile-{day}", partition_key=day)

    @dg.sensor(name=f"{p}_initial_backfill_sensor", job=backfill_job,
               minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
               description=f"Launches {p}_backfill_job once for tables never backfilled, as "
               "soon as the pipeline's slot exists (spec: initial_backfill), and resumes a "
               "backfill whose run died midway.")
    def initial_backfill(context: dg.SensorEvaluationContext, sync: SyncEngine):
        if not pipeline.initial_backfill:
            return dg.SkipReason("initial_backfill is off for this pipeline")
        busy = _backfill_run_active(context.instance, backfill_job.name)
        if busy:
            return dg.SkipReason(busy)
        try:
            plan = engine.backfill_plan(sync.spec(), p)
        except SyncError as err:
            return dg.SkipReason(f"cannot read the state database: {err}")
        if plan.running:
            return dg.SkipReason(f"a backfill of {', '.join(plan.running)} is running")
        if not plan.tables:
            return dg.SkipReason("every table has been backfilled, or the slot does not exist "
                                 "yet (the replication sensor creates it)")
        # One key per table and resume point: a table is launched once, and a backfill that
        # died is resumed once per point it reached (a run that dies without progress is not
        # relaunched in a loop; its failure is in the run history).
        parts = [*plan.new, *(f"{s.table}@{s.snapshot_id}.{s.chunks}" for s in plan.unfinished)]
        return dg.RunRequest(
            run_key=f"{p}-initial-backfill-{'+'.join(parts)}",
            run_config={"ops": {backfill.op.name: {"config": {"tables": plan.tables,
                                                              "restart": False}}}},
            tags={MAINTENANCE_TAG: p})

    return dg.Definitions(assets=[backfill, reconciliation], jobs=[backfill_job, reconcile_job],
                          schedules=[schedule], sensors=[initial_backfill])
