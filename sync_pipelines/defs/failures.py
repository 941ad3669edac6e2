"""Per-pipeline Dagster definitions for failures: the retry sweep, dead-letter actions, and
recovery of a lost slot.

For a pipeline ``p``:

* job ``p_retry_sweep_job`` (delivers due retries of every target in per-key order) and
  schedule ``p_retry_sweep_schedule`` (every 2 minutes, running by default); the queue depths
  it changes are shown by the ``retry_queue`` / ``dead_letters`` checks (:mod:`.health`);
* job ``p_dead_letters_job``, launched from the launchpad with config, to redrive dead letters
  (back in front of their keys, due now) or discard them with a recorded reason;
* job ``p_recover_job`` (launchpad), for a slot that was dropped or lost WAL: recreates it,
  backfills every table and reconciles with repair.

Operator jobs carry ``sync/operator`` (one at a time per pipeline), the sweep
``sync/pipeline``; neither waits behind delivery runs (``sync/target``): the engine's
per-target locks keep them and the deliveries apart.
"""

import dagster as dg

import sync_pipelines.engine as engine
from sync_pipelines.engine import PipelineSpec, SyncError

from .keys import MAINTENANCE_TAG, OPERATOR_TAG, PIPELINE_TAG
from .resources import SyncEngine

SWEEP_CRON = "*/2 * * * *"


class DeadLetterAction(dg.Config):
    """What to do with a target's unresolved dead letters (all of them unless filtered)."""

    target: str
    """Target name, as in the spec."""
    action: str = "redrive"
    """'redrive' (deliver again, in key order) or 'discard' (give up, with a reason)."""
    dead_letter_ids: list[int] = []
    """Only these dead letters (ids from the dead_letters check's table)."""
    key_like: str | None = None
    """Only keys matching this SQL LIKE pattern, e.g. '%"42"]' for key 42."""
    reason: str = ""
    """Why they are discarded (required for 'discard'; recorded)."""


def build_failure_defs(pipeline: PipelineSpec) -> dg.Definitions:
    p = pipeline.name

    @dg.op(name=f"{p}_retry_sweep")
    def retry_sweep(context: dg.OpExecutionContext, sync: SyncEngine) -> int:
        try:
            reports = engine.sweep_pipeline(sync.spec(), p)
        except SyncError as err:
            raise dg.Failure(description=str(err)) from None
        for r in reports:
            context.log.info(f"{p} → {r.target}: {r.keys} due key(s), {r.delivered} "
                             f"delivered, {r.rescheduled} rescheduled, {r.dead_letters} "
                             "dead-lettered")
        context.add_output_metadata({
            "due_keys": sum(r.keys for r in reports),
            "delivered": sum(r.delivered for r in reports),
            "rescheduled": sum(r.rescheduled for r in reports),
            "dead_lettered": sum(r.dead_letters for r in reports)})
        return sum(r.delivered for r in reports)

    @dg.job(name=f"{p}_retry_sweep_job", executor_def=dg.in_process_executor,
            tags={PIPELINE_TAG: p},
            description=f"Deliver due retries of pipeline {p} in per-key order.")
    def sweep_job() -> None:
        retry_sweep()

    schedule = dg.ScheduleDefinition(
        name=f"{p}_retry_sweep_schedule", job=sweep_job, cron_schedule=SWEEP_CRON,
        default_status=dg.DefaultScheduleStatus.RUNNING,
    )

    @dg.op(name=f"{p}_dead_letters")
    def dead_letters(context: dg.OpExecutionContext, config: DeadLetterAction,
                     sync: SyncEngine) -> int:
        try:
            n = engine.resolve_dead_letters(
                sync.spec(), p, config.target, action=config.action,
                ids=config.dead_letter_ids or None, key_like=config.key_like,
                reason=config.reason)
        except (SyncError, ValueError) as err:
            raise dg.Failure(description=str(err)) from None
        context.log.info(f"{config.action}: {n} dead letter(s) of {p} → {config.target}")
        context.add_output_metadata({"action": config.action, "dead_letters": n})
        return n

    @dg.job(name=f"{p}_dead_letters_job", executor_def=dg.in_process_executor,
            tags={OPERATOR_TAG: p},
            description=f"Redrive or discard dead letters of pipeline {p} (launchpad config).")
    def dead_letters_job() -> None:
        dead_letters()

    @dg.op(name=f"{p}_recover")
    def recover(context: dg.OpExecutionContext, sync: SyncEngine) -> None:
        try:
            report = engine.recover_pipeline(sync.spec(), p, on_step=context.log.info)
        except SyncError as err:
            raise dg.Failure(description=str(err)) from None
        rec = report.reconciliation
        context.add_output_metadata({
            "slot_recreated": report.slot_recreated,
            "rows_backfilled": sum(b.rows for b in report.backfills),
            "drift_repaired": rec.drift if rec else 0})

    @dg.job(name=f"{p}_recover_job", executor_def=dg.in_process_executor,
            tags={MAINTENANCE_TAG: p},
            description=f"Recover pipeline {p} after its slot was dropped or lost WAL: "
            "recreate the slot, backfill every table, reconcile with repair.")
    def recover_job() -> None:
        recover()

    return dg.Definitions(jobs=[sweep_job, dead_letters_job, recover_job],
                          schedules=[schedule])
