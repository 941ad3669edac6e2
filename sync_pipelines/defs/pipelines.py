"""Per-pipeline Dagster definitions: assets, delivery job, replication sensor.

For a pipeline ``p`` with targets ``t1..tn``:

* assets ``sync/p/source`` (the source tables, external) → ``sync/p/staged`` (materialized by
  the sensor, one event per staged batch) → ``sync/p/delivered/<t>`` (one per target,
  materialized by the delivery run);
* job ``p_deliver_job`` (in-process executor, tag ``sync/pipeline=p`` for per-pipeline run
  concurrency) delivering staged batches to every target;
* sensor ``p_replication_sensor`` (running by default) pulling within the demand budget and
  requesting a delivery run per pull (``run_key`` = the pull's newest batch id), or again for
  a batch a failed run left behind.

Bodies stay thin: each calls one engine function and turns its report into metadata.
"""


from datetime import datetime, timezone
from typing import Any

import dagster as dg

from sync_pipelines.engine import pipeline as engine
from sync_pipelines.engine.errors import SyncError, Transient
from sync_pipelines.engine.spec import PipelineSpec
from sync_pipelines.engine.wire.pgoutput import format_lsn

from .resources import SyncEngine

PIPELINE_TAG = "sync/pipeline"
_ACTIVE = [
    dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


class SyncStepFailed(Exception):
    """A sync step failed for a reason the engine explained (the message says what to fix)."""


class DeliverConfig(dg.Config):
    upto_batch: int | None = None
    """Deliver staged batches up to this id (all staged batches if empty)."""


def _keys(p: str) -> tuple[dg.AssetKey, dg.AssetKey]:
    return dg.AssetKey(["sync", p, "source"]), dg.AssetKey(["sync", p, "staged"])


def delivered_key(p: str, target: str) -> dg.AssetKey:
    return dg.AssetKey(["sync", p, "delivered", target])


def build_pipeline_defs(pipeline: PipelineSpec) -> dg.Definitions:
    p = pipeline.name
    source_key, staged_key = _keys(p)
    source = dg.AssetSpec(
        source_key, group_name=p, kinds={"postgres"},
        description=f"Source tables of pipeline {p}, captured through publication "
        f"{pipeline.publication} and slot {pipeline.slot}.",
        metadata={"tables": ", ".join(pipeline.tables), "slot": pipeline.slot},
    )
    staged = dg.AssetSpec(
        staged_key, deps=[source_key], group_name=p,
        description="Changes staged durably in the state DB; materialized per batch by "
        f"{p}_replication_sensor.",
    )
    specs = [
        dg.AssetSpec(delivered_key(p, t), deps=[staged_key], group_name=p, kinds={"postgres"},
                     description=f"Changes of pipeline {p} applied to target {t}.")
        for t in pipeline.targets
    ]

    @dg.multi_asset(name=f"{p}_deliver", specs=specs, can_subset=False)
    def deliver(context: dg.AssetExecutionContext, config: DeliverConfig, sync: SyncEngine):
        try:
            reports = engine.deliver_pipeline(sync.spec(), p, upto_batch=config.upto_batch)
        except SyncError as err:
            # dg.Failure shows the engine's message (which names the fix) in the UI as is.
            raise dg.Failure(description=str(err), metadata={
                "error": type(err).__name__, "transient": isinstance(err, Transient)}) from None
        for r in reports:
            context.log.info(
                f"{p} → {r.target}: {r.changes} changes in {len(r.batches)} batch(es) "
                f"{r.lsn_range} in {r.duration_s:.2f}s"
            )
            yield dg.MaterializeResult(
                asset_key=delivered_key(p, r.target),
                metadata={
                    "changes": r.changes,
                    "batches": dg.MetadataValue.text(", ".join(map(str, r.batches)) or "none"),
                    "already_applied_batches": len(r.skipped_batches),
                    "upserts": r.stats.upserts,
                    "deletes": r.stats.deletes,
                    "truncates": r.stats.truncates,
                    "unchanged_rows": r.stats.unchanged,
                    "rows_to_reread": r.stats.refetch,
                    "lsn_range": r.lsn_range,
                    "duration_s": round(r.duration_s, 3),
                    "changes_per_s": round(r.changes_per_s, 1),
                },
            )

    job = dg.define_asset_job(
        f"{p}_deliver_job", selection=[s.key for s in specs],
        executor_def=dg.in_process_executor, tags={PIPELINE_TAG: p},
        description=f"Deliver staged changes of pipeline {p} to its targets.",
    )

    @dg.sensor(
        name=f"{p}_replication_sensor", job=job, minimum_interval_seconds=5,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Pulls changes of pipeline {p} within its demand budget and stages them.",
    )
    def replication_sensor(context: dg.SensorEvaluationContext, sync: SyncEngine):
        spec = sync.spec()
        try:
            report = engine.pull_pipeline(spec, p)
        except SyncError as err:
            raise SyncStepFailed(str(err)) from None
        if report.refetch.error:  # the stream goes on; the rows are asked for again next tick
            context.log.warning(f"{p}: {report.refetch.pending} row(s) waiting to be re-read "
                                f"from the source: {report.refetch.error}")
        if report.batches:
            batches = [b.batch_id for b in report.batches]
            engine.mark_requested(spec, p, batches)
            return dg.SensorResult(
                run_requests=[_run_request(p, f"{p}-batch-{batches[-1]}", batches[-1])],
                asset_events=[
                    dg.AssetMaterialization(staged_key, metadata=_batch_metadata(b, report))
                    for b in report.batches
                ],
            )
        stale = engine.stale_batch(spec, p)
        if stale is not None and not _delivery_active(context, f"{p}_deliver_job", p):
            engine.mark_requested(spec, p, [stale.batch_id])
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
            return dg.SensorResult(run_requests=[
                _run_request(p, f"{p}-redeliver-{stale.batch_id}-{stamp}", None)
            ])
        return dg.SkipReason(report.skipped or "nothing to do")

    return dg.Definitions(
        assets=[source, staged, deliver], jobs=[job], sensors=[replication_sensor]
    )


def _run_request(p: str, run_key: str, upto_batch: int | None) -> dg.RunRequest:
    return dg.RunRequest(
        run_key=run_key,
        run_config={"ops": {f"{p}_deliver": {"config": {"upto_batch": upto_batch}}}},
        tags={PIPELINE_TAG: p},
    )


def _batch_metadata(b: Any, report: Any) -> dict[str, Any]:
    return {
        "batch_id": b.batch_id,
        "changes": b.n_changes,
        "lsn_range": f"{format_lsn(b.first.commit_lsn)}–{format_lsn(b.last.commit_lsn)}",
        "demand": report.demand,
        "undelivered_before": report.undelivered_before,
        "slot_lag_bytes": report.slot_lag_bytes,
        "rows_reread": report.refetch.rows,
        "pull_duration_s": round(report.duration_s, 3),
    }


def _delivery_active(context: dg.SensorEvaluationContext, job_name: str, p: str) -> bool:
    runs = context.instance.get_runs(
        dg.RunsFilter(job_name=job_name, statuses=_ACTIVE, tags={PIPELINE_TAG: p}), limit=1
    )
    return bool(runs)
