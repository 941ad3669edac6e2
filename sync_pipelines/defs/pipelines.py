"""Per-pipeline Dagster definitions: assets, one delivery job per target, replication sensor.

For a pipeline ``p`` with targets ``t1..tn``:

* assets ``sync/p/source`` (the source tables, external) → ``sync/p/staged`` (materialized by
  the sensor, one event per staged batch) → ``sync/p/delivered/<t>`` (one per target, each
  materialized by its own delivery run);
* jobs ``p_deliver_<t>_job`` (in-process executor, tag ``sync/target=p/<t>`` so the run queue
  keeps one delivery at a time per target, in the order asked): a target that is down, slow
  or failing fails its own runs against its own asset and never holds up the others;
* sensor ``p_replication_sensor`` (running by default) pulling within the demand budget and
  asking for a delivery of every target that has staged work it has not delivered — when new
  batches were staged and no run of that target is queued or running, and again after
  ``redeliver_after_seconds`` when a failed run left work behind. While changes keep coming
  (this tick and the one before staged some) or a backlog waits (the demand budget stopped
  this tick's pull) the run it asks for keeps draining: it delivers
  what the sensor stages while it runs, up to the policy's ``run_drain_seconds``, and ends
  after ``run_idle_seconds`` without new work — one run keeps up with a steady stream instead
  of one run (and one process start-up) per batch. While a delivery run is under way and
  every target with work has its run queued or running, the tick goes on pulling, up to
  ``tick_pull_seconds``: as the runs free room when a pull stopped at the budget, and every
  half second once it has caught up, so a change waits for its pull about that long rather
  than up to a sensor interval. The sensor's cursor remembers whether the last tick
  staged anything (and, for webhook sources, the last batch it reported).

Bodies stay thin: each calls one engine function and turns its report into metadata.
"""


import json
from datetime import datetime, timedelta, timezone
from typing import Any

import dagster as dg

import sync_pipelines.engine as engine
from sync_pipelines.engine import PipelineSpec, SyncError, Transient, format_lsn

from .health import report_target_health
from .keys import (
    TARGET_TAG,
    deliver_job_name,
    deliver_op_name,
    delivered_key,
    source_key,
    staged_key,
    target_tag,
)
from .resources import SyncEngine

_WAITING = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED,
            dg.DagsterRunStatus.STARTING]
_ACTIVE = [*_WAITING, dg.DagsterRunStatus.STARTED]


class SyncStepFailed(Exception):
    """A sync step failed for a reason the engine explained (the message says what to fix)."""


class DeliverConfig(dg.Config):
    upto_batch: int | None = None
    """Deliver staged batches up to this id (all staged batches if empty)."""
    keep_draining: bool = False
    """Also deliver what the sensor stages while the run goes on (the pipeline's
    ``run_drain_seconds`` / ``run_idle_seconds``): the sensor sets it while changes keep
    coming. Off: only what is staged when the run starts. Ignored with ``upto_batch``."""


def _delivered_asset(pipeline: PipelineSpec, target: str) -> dg.AssetsDefinition:
    p = pipeline.name
    kind = pipeline.targets[target].kind

    @dg.asset(key=delivered_key(p, target), deps=[staged_key(p)], group_name=p, kinds={kind},
              description=f"Changes of pipeline {p} applied to target {target} ({kind}).")
    def delivered(context: dg.AssetExecutionContext, config: DeliverConfig, sync: SyncEngine):
        def progress(so_far: Any) -> None:
            context.log.info(f"{p} → {target}: {so_far.changes} changes delivered so far "
                             f"(batches up to {so_far.batches[-1]}), {so_far.lsn_range}")

        try:
            r = engine.deliver_target(sync.spec(), p, target, upto_batch=config.upto_batch,
                                      keep_draining=config.keep_draining, progress=progress)
        except SyncError as err:
            # dg.Failure shows the engine's message (which names the fix) in the UI as is.
            raise dg.Failure(description=str(err), metadata={
                "error": type(err).__name__, "transient": isinstance(err, Transient)}) from None
        context.log.info(f"{p} → {target}: {r.changes} changes in {len(r.batches)} batch(es) "
                         f"{r.lsn_range} in {r.duration_s:.2f}s")
        yield dg.MaterializeResult(metadata=_delivery_metadata(r))
        # The materialization is stored by now: report the target's health against it, so
        # the asset's checks describe this very materialization (never "not evaluated").
        report_target_health(context.instance, sync, pipeline, target)

    return delivered


def _delivery_metadata(r: Any) -> dict[str, Any]:
    return {
        "changes": r.changes,
        "batches": dg.MetadataValue.text(", ".join(map(str, r.batches)) or "none"),
        "already_applied_batches": len(r.skipped_batches),
        "upserts": r.stats.upserts,
        "deletes": r.stats.deletes,
        "truncates": r.stats.truncates,
        "unchanged_rows": r.stats.unchanged,
        "rows_to_reread": r.stats.refetch,
        "held_for_retry": r.held_changes,
        "dead_letters": r.dead_letters,
        "lsn_range": r.lsn_range,
        "duration_s": round(r.duration_s, 3),
        "changes_per_s": round(r.changes_per_s, 1),
    }


def build_pipeline_defs(pipeline: PipelineSpec) -> dg.Definitions:
    p = pipeline.name
    kind = pipeline.source.kind
    how = {"postgres": f"captured through publication {pipeline.publication} and slot "
                       f"{pipeline.slot}" + (
                           f"; one direction of two-way link {pipeline.link.name} "
                           f"({pipeline.link.source_side} → {pipeline.link.target_side}), the "
                           "link's own writes dropped" if pipeline.link is not None else ""),
           "webhook": "pushed by signed webhooks to the receiver (sync-pipelines serve)",
           "http_poll": "polled from the API's list endpoints"}[kind]
    source = dg.AssetSpec(
        source_key(p), group_name=p, kinds={"postgres" if kind == "postgres" else "api"},
        description=f"Source tables of pipeline {p}, {how}.",
        metadata={"tables": ", ".join(pipeline.tables), "source": kind,
                  **({"slot": pipeline.slot} if kind == "postgres" else {})},
    )
    staged = dg.AssetSpec(
        staged_key(p), deps=[source_key(p)], group_name=p,
        description="Changes staged durably in the state DB; materialized per batch by "
        f"{p}_replication_sensor.",
    )
    assets = [_delivered_asset(pipeline, t) for t in pipeline.targets]
    jobs = {
        # Without the target's asset checks: they describe standing health and are evaluated
        # on their own schedule, not planned (and shown "in progress") by every delivery run.
        t: dg.define_asset_job(
            deliver_job_name(p, t),
            selection=dg.AssetSelection.assets(delivered_key(p, t)).without_checks(),
            executor_def=dg.in_process_executor, tags=target_tag(p, t),
            description=f"Deliver staged changes of pipeline {p} to target {t}.")
        for t in pipeline.targets
    }
    redeliver_after = timedelta(seconds=pipeline.policy.redeliver_after_seconds)

    @dg.sensor(
        # Dagster's sensor daemon looks every 5 s (MIN_INTERVAL_LOOP_TIME) and skips a sensor
        # whose last tick started under minimum_interval_seconds ago: at 5 s, a tick that
        # started a few milliseconds late made the next one wait 10 s (measured: one gap of
        # 10 s in four at 1,000 changes/s). Under the loop's period, every look ticks.
        name=f"{p}_replication_sensor", jobs=list(jobs.values()), minimum_interval_seconds=2,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description={
            "postgres": f"Pulls changes of pipeline {p} within its demand budget, stages them, "
                        "and asks for a delivery of each target that has work.",
            "http_poll": f"Polls the API of pipeline {p} (each table every interval_seconds), "
                         "stages what changed, and asks for a delivery of each target that has "
                         "work.",
            "webhook": f"Reports what the webhook receiver staged for pipeline {p} and asks for "
                       "a delivery of each target that has work.",
        }[kind],
    )
    def replication_sensor(context: dg.SensorEvaluationContext, sync: SyncEngine):
        spec = sync.spec()

        def delivering() -> bool:
            """A delivery run is under way and every target with work has its run queued or
            running: pulling on keeps nobody from a run request, and the runs take what is
            staged (and free room in the budget) as they go."""
            active = {t: _runs(context, p, t, _ACTIVE) for t in pipeline.targets}
            return any(active.values()) and all(
                not b.batches or active[b.target] for b in engine.delivery_backlog(spec, p))

        try:
            report = engine.pull_pipeline(
                spec, p, keep_pulling_s=pipeline.policy.tick_pull_seconds,
                keep_pulling=delivering, follow=True)
            backlog = engine.delivery_backlog(spec, p)
        except SyncError as err:
            raise SyncStepFailed(str(err)) from None
        if report.refetch.error:  # the stream goes on; the rows are asked for again next tick
            context.log.warning(f"{p}: {report.refetch.pending} row(s) waiting to be re-read "
                                f"from the source: {report.refetch.error}")
        received = None
        last_tick = _cursor(context.cursor)
        if kind == "webhook":  # the receiver staged them
            received = engine.webhooks_received(spec, p, last_tick.get("after") or 0)
        staged_now = bool(report.batches) or (received is not None
                                              and received.last_batch is not None)
        # Changes keep coming (the last tick staged too), or more are waiting than the budget
        # let this tick stage: the run asked for should keep taking what later ticks stage.
        backlog_waits = report.stopped_by_demand or report.more or (
            report.demand > 0 and report.changes >= report.demand)
        steady = staged_now and (bool(last_tick.get("staged")) or backlog_waits)
        now = datetime.now(timezone.utc)
        requests = []
        for b in backlog:
            if not b.batches or b.newest_batch is None:
                continue
            if b.newest_batch > (b.requested_batch or 0):
                if _runs(context, p, b.target, _ACTIVE):
                    continue  # a queued run delivers what is staged, a running one drains it
                key = f"{p}-{b.target}-batch-{b.newest_batch}"
            elif (b.requested_at is None or now - b.requested_at > redeliver_after) and not (
                    _runs(context, p, b.target, _ACTIVE)):
                key = f"{p}-{b.target}-redeliver-{b.newest_batch}-{now:%Y%m%dT%H%M%S}"
            else:
                continue
            engine.mark_requested(spec, p, b.target, b.newest_batch)
            requests.append(dg.RunRequest(
                run_key=key, job_name=jobs[b.target].name, tags=target_tag(p, b.target),
                run_config={"ops": {deliver_op_name(p, b.target): {
                    "config": {"upto_batch": None, "keep_draining": steady}}}}))
        events = [dg.AssetMaterialization(staged_key(p), metadata=_batch_metadata(b, report))
                  for b in report.batches]
        after = last_tick.get("after")
        if received is not None and received.last_batch is not None:  # one event per tick
            events.append(dg.AssetMaterialization(
                staged_key(p), metadata=_received_metadata(received)))
            after = received.last_batch
        cursor = json.dumps({"after": after, "staged": staged_now})
        if not requests and not events:
            context.update_cursor(cursor)
            return dg.SkipReason(_skip_reason(report, backlog))
        return dg.SensorResult(run_requests=requests, asset_events=events, cursor=cursor)

    return dg.Definitions(
        assets=[source, staged, *assets], jobs=list(jobs.values()),
        sensors=[replication_sensor])


def _cursor(text: str | None) -> dict[str, Any]:
    """The sensor's cursor: ``{"after": last webhook batch reported, "staged": whether the
    last tick staged changes}`` (a bare batch id from earlier versions is read too)."""
    if text and text.isdigit():
        return {"after": int(text), "staged": False}
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _skip_reason(report: Any, backlog: list[Any]) -> str:
    behind = [f"{b.target} ({b.changes} changes)" for b in backlog if b.batches]
    why = report.skipped or "nothing to do"
    if behind:
        why += f"; not yet delivered: {', '.join(behind)}"
    return why


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


def _received_metadata(r: Any) -> dict[str, Any]:
    return {
        "webhooks": r.webhooks,
        "batches": f"{r.first_batch}–{r.last_batch}",
        "webhooks_by_table": dg.MetadataValue.json(r.tables),
    }


def _runs(context: dg.SensorEvaluationContext, p: str, target: str,
          statuses: list[dg.DagsterRunStatus]) -> bool:
    return bool(context.instance.get_runs(dg.RunsFilter(
        job_name=deliver_job_name(p, target), statuses=statuses,
        tags={TARGET_TAG: f"{p}/{target}"}), limit=1))
