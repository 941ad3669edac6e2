"""Per-pipeline standing-health checks, always showing a finished result.

For a pipeline ``p``:

* asset checks ``slot_lag`` on ``sync/p/source`` (WAL the slot retains, seconds since it last
  moved past a heartbeat, closeness to ``max_slot_wal_keep_size``, a dropped or lost slot) and
  ``backlog``, ``retry_queue``, ``dead_letters`` on each ``sync/p/delivered/<t>`` — WARN or
  ERROR by the spec's thresholds, the latest rows as tables;
* sensor ``p_health_sensor`` (every 30 s, running by default) evaluates them all and reports
  the results without a run, so the latest evaluation a person sees is never an "in
  progress" one — no delivery or sweep run plans them. Each evaluation names the asset's
  latest materialization it describes: Dagster shows a check of a materialized asset as "not
  evaluated" once the asset has materialized since, and a delivery run materializes its
  target — so a delivery run also reports its target's checks right after materializing;
* the same checks are executable: the asset's Checks tab can run any of them on demand
  (``p_health`` is subsettable), and ``p_health_job`` runs them all.

Bodies are thin: the engine reports (:func:`~sync_pipelines.engine.slot_health`,
:func:`~sync_pipelines.engine.target_health`), this module applies the thresholds.
"""

from typing import Any

import dagster as dg

# Not exported by dagster 1.13: what a check evaluation points at (the materialization it checks).
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData as TargetMaterialization,
)

import sync_pipelines.engine as engine
from sync_pipelines.engine import PipelineSpec, SlotHealth, SyncError, TargetHealth

from .keys import delivered_key, source_key
from .resources import SyncEngine

HEALTH_INTERVAL_S = 30
TARGET_CHECKS = {
    "backlog": "Staged changes this target has not applied yet, and the age of the oldest.",
    "retry_queue": "Changes held for retry (or parked behind one) for this target.",
    "dead_letters": "Unresolved dead letters for this target.",
}
CONFLICT_COLUMNS = ("id", "table", "key", "decision", "reason", "status", "created_at")
HELD_COLUMNS = ("table", "key", "commit_lsn", "seq", "op", "attempts", "next_attempt_at",
                "last_status", "last_error", "held_since")
DEAD_COLUMNS = ("id", "table", "key", "commit_lsn", "seq", "op", "attempts", "last_status",
                "reason", "dead_at")
MB = 1024 * 1024


def _grade(value: float, warn: float, error: float) -> tuple[bool, dg.AssetCheckSeverity]:
    """Passed at or below ``warn``; WARN above it; ERROR above ``error``."""
    if value > error:
        return False, dg.AssetCheckSeverity.ERROR
    return value <= warn, dg.AssetCheckSeverity.WARN


def _worst(*grades: tuple[bool, dg.AssetCheckSeverity]) -> tuple[bool, dg.AssetCheckSeverity]:
    if any(not ok and sev == dg.AssetCheckSeverity.ERROR for ok, sev in grades):
        return False, dg.AssetCheckSeverity.ERROR
    return all(ok for ok, _ in grades), dg.AssetCheckSeverity.WARN


def _table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> dg.MetadataValue:
    records = [dg.TableRecord({c: ("" if r.get(c) is None else str(r[c])) for c in columns})
               for r in rows]
    schema = dg.TableSchema(columns=[dg.TableColumn(c, "string") for c in columns])
    return dg.MetadataValue.table(records, schema=schema)


Evaluation = tuple[dg.AssetKey, str, bool, dg.AssetCheckSeverity, dict[str, Any]]


def slot_evaluation(pipeline: PipelineSpec, s: SlotHealth) -> Evaluation:
    policy = pipeline.policy
    metadata: dict[str, Any] = {
        "slot": s.slot, "wal_status": s.wal_status or "—",
        "retained_mb": round(s.retained_bytes / MB, 1),
        "behind_mb": round(s.behind_bytes / MB, 1),
        "lag_seconds": round(s.lag_seconds, 1) if s.lag_seconds is not None else None,
        "max_slot_wal_keep_size_mb": (round(s.max_wal_keep_bytes / MB)
                                      if s.max_wal_keep_bytes is not None else "unlimited"),
    }
    metadata = {k: v for k, v in metadata.items() if v is not None}
    key = source_key(pipeline.name)
    if not s.applicable:
        return key, "slot_lag", True, dg.AssetCheckSeverity.WARN, {
            "problem": dg.MetadataValue.text(f"no slot: a {pipeline.source.kind} source")}
    if s.error:
        return key, "slot_lag", False, dg.AssetCheckSeverity.ERROR, {
            **metadata, "problem": dg.MetadataValue.text(f"cannot read the slot: {s.error}")}
    if s.lost or not s.exists:
        what = ("was dropped or lost WAL it needed: the pipeline has stopped. Launch "
                f"{pipeline.name}_recover_job (recreate the slot, backfill, reconcile)"
                if s.lost else "does not exist yet (the replication sensor creates it)")
        return key, "slot_lag", not s.lost, (
            dg.AssetCheckSeverity.ERROR if s.lost else dg.AssetCheckSeverity.WARN), {
            **metadata, "problem": dg.MetadataValue.text(f"slot {s.slot!r} {what}")}
    grades = [_grade(s.retained_bytes / MB, policy.slot_lag_warn_mb, policy.slot_lag_error_mb)]
    if s.lag_seconds is not None:
        grades.append(_grade(s.lag_seconds, policy.slot_lag_warn_seconds,
                             policy.slot_lag_error_seconds))
    share = s.share_of_limit
    if share is not None:  # the server invalidates the slot at max_slot_wal_keep_size
        metadata["share_of_max_slot_wal_keep_size"] = round(share, 3)
        grades.append(_grade(share, 0.5, 0.8))
        if share > 0.5:
            metadata["problem"] = dg.MetadataValue.text(
                f"the slot retains {share:.0%} of max_slot_wal_keep_size: at 100% the server "
                "invalidates it and the pipeline must be recovered")
    passed, severity = _worst(*grades)
    return key, "slot_lag", passed, severity, metadata


def target_evaluations(pipeline: PipelineSpec, h: TargetHealth) -> list[Evaluation]:
    policy = pipeline.policy
    key = delivered_key(pipeline.name, h.target)
    age = h.backlog_age_s or 0.0
    backlog = _worst(_grade(h.backlog_changes, policy.backlog_warn, policy.backlog_error),
                     _grade(age, policy.backlog_warn_seconds, policy.backlog_error_seconds))
    return [
        (key, "backlog", *backlog, {
            "changes": h.backlog_changes, "batches": h.backlog_batches,
            "oldest_age_s": round(age, 1)}),
        (key, "retry_queue", *_grade(h.held, policy.retry_warn, policy.retry_error),
         {"held": h.held, "latest": _table(h.latest_held, HELD_COLUMNS)}),
        (key, "dead_letters", *_grade(h.dead_letters, policy.dead_letter_warn,
                                      policy.dead_letter_error),
         {"dead_letters": h.dead_letters, "latest": _table(h.latest_dead_letters,
                                                             DEAD_COLUMNS)}),
    ]


def conflict_evaluation(pipeline: PipelineSpec, counts: dict[str, int],
                        latest: list[Any]) -> Evaluation:
    """A link direction's ``conflicts``: those it decided in the last day, and every key held
    for an operator (any held key warns at least: it waits for a person)."""
    link = pipeline.link
    assert link is not None
    key = delivered_key(pipeline.name, next(iter(pipeline.targets)))
    recent = counts["decided"] + counts["held"]
    grades = [_grade(recent + counts["held_total"], link.conflict_warn, link.conflict_error)]
    if counts["held_total"]:
        grades.append((False, dg.AssetCheckSeverity.WARN))
    rows = [{"id": c.id, "table": c.table, "key": c.key, "decision": c.decision,
             "reason": c.reason, "status": c.status, "created_at": str(c.created_at)}
            for c in latest]
    metadata: dict[str, Any] = {
        "decided_last_day": counts["decided"], "held": counts["held_total"],
        "resolved_last_day": counts["resolved"], "latest": _table(rows, CONFLICT_COLUMNS)}
    if counts["held_total"]:
        metadata["next_step"] = dg.MetadataValue.text(
            f"{counts['held_total']} key(s) held: resolve them with {link.name}_conflicts_job "
            "(take a side, or give values)")
    return (key, "conflicts", *_worst(*grades), metadata)


def evaluate(sync: SyncEngine, pipeline: PipelineSpec) -> list[Evaluation]:
    spec = sync.spec()
    out = [slot_evaluation(pipeline, engine.slot_health(spec, pipeline.name)),
           *(e for h in engine.target_health(spec, pipeline.name)
             for e in target_evaluations(pipeline, h))]
    if pipeline.link is not None:
        out.append(conflict_evaluation(
            pipeline, engine.link_conflict_counts(spec, pipeline.link.name,
                                                  detected_by=pipeline.name),
            engine.link_conflicts(spec, pipeline.link.name, detected_by=pipeline.name,
                                  limit=20)))
    return out


def _latest_materialization(instance: dg.DagsterInstance, key: dg.AssetKey
                            ) -> TargetMaterialization | None:
    records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key),
                                              limit=1).records
    if not records:
        return None
    r = records[0]
    return TargetMaterialization(storage_id=r.storage_id, run_id=r.run_id,
                                 timestamp=r.timestamp)


def as_events(instance: dg.DagsterInstance, evaluations: list[Evaluation]
              ) -> list[dg.AssetCheckEvaluation]:
    """Runless check evaluations, each aimed at its asset's latest materialization: Dagster
    shows a check of a materialized asset as "not evaluated" once the asset has materialized
    again since, and delivered assets materialize with every delivery run."""
    latest: dict[dg.AssetKey, TargetMaterialization | None] = {}
    out = []
    for key, name, passed, severity, metadata in evaluations:
        if key not in latest:
            latest[key] = _latest_materialization(instance, key)
        out.append(dg.AssetCheckEvaluation(
            asset_key=key, check_name=name, passed=passed, severity=severity,
            metadata=metadata, target_materialization_data=latest[key]))
    return out


def report_target_health(instance: dg.DagsterInstance, sync: SyncEngine,
                         pipeline: PipelineSpec, target: str) -> None:
    """Report one target's checks now (a delivery run does, right after it materialized)."""
    try:
        health = next(h for h in engine.target_health(sync.spec(), pipeline.name)
                      if h.target == target)
    except SyncError:
        return  # the health sensor reports it at its next tick
    for event in as_events(instance, target_evaluations(pipeline, health)):
        instance.report_runless_asset_event(event)


def build_health_defs(pipeline: PipelineSpec) -> dg.Definitions:
    p = pipeline.name
    specs = [dg.AssetCheckSpec(
        "slot_lag", asset=source_key(p),
        description="WAL the slot keeps the source from recycling, seconds since it last "
        "moved past a heartbeat, and whether it was lost (then: the recovery job).")]
    specs += [dg.AssetCheckSpec(name, asset=delivered_key(p, t), description=text)
              for t in pipeline.targets for name, text in TARGET_CHECKS.items()]
    if pipeline.link is not None:
        specs.append(dg.AssetCheckSpec(
            "conflicts", asset=delivered_key(p, next(iter(pipeline.targets))),
            description=f"Conflicts this direction of link {pipeline.link.name} decided in the "
            "last day, and keys held for an operator (the latest as a table)."))

    @dg.multi_asset_check(name=f"{p}_health", specs=specs, can_subset=True,
                          description=f"Standing health of pipeline {p}.")
    def health(context: dg.AssetCheckExecutionContext, sync: SyncEngine):
        wanted = context.selected_asset_check_keys
        try:
            evaluations = evaluate(sync, pipeline)
        except SyncError as err:
            raise dg.Failure(description=str(err)) from None
        for key, name, passed, severity, metadata in evaluations:
            if dg.AssetCheckKey(key, name) in wanted:
                yield dg.AssetCheckResult(asset_key=key, check_name=name, passed=passed,
                                          severity=severity, metadata=metadata)

    health_job = dg.define_asset_job(
        f"{p}_health_job", selection=dg.AssetSelection.checks(*[s.key for s in specs]),
        executor_def=dg.in_process_executor,
        description=f"Evaluate every health check of pipeline {p} now.")

    @dg.sensor(name=f"{p}_health_sensor", minimum_interval_seconds=HEALTH_INTERVAL_S,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description=f"Evaluates the health checks of {p} every {HEALTH_INTERVAL_S} s "
               "and reports them without a run.")
    def health_sensor(context: dg.SensorEvaluationContext, sync: SyncEngine):
        try:
            evaluations = evaluate(sync, pipeline)
        except SyncError as err:
            return dg.SkipReason(f"cannot read the pipeline's health: {err}")
        return dg.SensorResult(asset_events=as_events(context.instance, evaluations))

    return dg.Definitions(asset_checks=[health], jobs=[health_job], sensors=[health_sensor])
