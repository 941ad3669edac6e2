"""Per-pipeline Dagster definitions for failures: retry sweep, its checks, dead-letter actions.

For a pipeline ``p`` with targets ``t1..tn``:

* asset checks ``retry_queue`` and ``dead_letters`` on each ``sync/p/delivered/<t>`` asset —
  WARN above the policy's warn threshold, ERROR above its error threshold — with the latest
  rows as a table, evaluated by the sweep;
* job ``p_retry_sweep_job`` (runs those checks; their body first delivers due retries in
  per-key order) and schedule ``p_retry_sweep_schedule`` (every 2 minutes, running by default);
* job ``p_dead_letters_job``, launched from the launchpad with config, to redrive dead letters
  (back in front of their keys, due now) or discard them with a recorded reason.
"""

from typing import Any

import dagster as dg

import sync_pipelines.engine as engine
from sync_pipelines.engine import PipelineSpec, SyncError

from .pipelines import PIPELINE_TAG, delivered_key
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


def _severity(count: int, warn: int, error: int) -> tuple[bool, dg.AssetCheckSeverity]:
    if count > error:
        return False, dg.AssetCheckSeverity.ERROR
    return count <= warn, dg.AssetCheckSeverity.WARN


HELD_COLUMNS = ("key", "commit_lsn", "seq", "op", "attempts", "next_attempt_at",
                "last_status", "last_error", "held_since")
DEAD_COLUMNS = ("id", "key", "commit_lsn", "seq", "op", "attempts", "last_status", "reason",
                "dead_at")


def _table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> dg.MetadataValue:
    records = [dg.TableRecord({c: ("" if r.get(c) is None else str(r[c])) for c in columns})
               for r in rows]
    schema = dg.TableSchema(columns=[dg.TableColumn(c, "string") for c in columns])
    return dg.MetadataValue.table(records, schema=schema)


def build_failure_defs(pipeline: PipelineSpec) -> dg.Definitions:
    p = pipeline.name
    policy = pipeline.policy
    specs = [
        dg.AssetCheckSpec(name, asset=delivered_key(p, t), description=text)
        for t in pipeline.targets
        for name, text in (
            ("retry_queue", "Changes held for retry (or parked behind one) for this target."),
            ("dead_letters", "Unresolved dead letters for this target."),
        )
    ]

    @dg.multi_asset_check(name=f"{p}_retry_sweep", specs=specs, can_subset=False)
    def retry_sweep(context: dg.AssetCheckExecutionContext, sync: SyncEngine):
        spec = sync.spec()
        try:
            for r in engine.sweep_pipeline(spec, p):
                context.log.info(f"{p} → {r.target}: {r.keys} due key(s), {r.delivered} "
                                 f"delivered, {r.rescheduled} rescheduled, {r.dead_letters} "
                                 "dead-lettered")
            health = engine.target_health(spec, p)
        except SyncError as err:
            raise dg.Failure(description=str(err)) from None
        for h in health:
            key = delivered_key(p, h.target)
            passed, severity = _severity(h.held, policy.retry_warn, policy.retry_error)
            yield dg.AssetCheckResult(
                asset_key=key, check_name="retry_queue", passed=passed, severity=severity,
                metadata={"held": h.held, "latest": _table(h.latest_held, HELD_COLUMNS)})
            passed, severity = _severity(h.dead_letters, policy.dead_letter_warn,
                                         policy.dead_letter_error)
            yield dg.AssetCheckResult(
                asset_key=key, check_name="dead_letters", passed=passed, severity=severity,
                metadata={"dead_letters": h.dead_letters,
                          "latest": _table(h.latest_dead_letters, DEAD_COLUMNS)})

    sweep_job = dg.define_asset_job(
        f"{p}_retry_sweep_job", selection=dg.AssetSelection.checks(*[s.key for s in specs]),
        executor_def=dg.in_process_executor, tags={PIPELINE_TAG: p},
        description=f"Deliver due retries of pipeline {p} in per-key order; check queue depths.",
    )
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
            tags={PIPELINE_TAG: p},
            description=f"Redrive or discard dead letters of pipeline {p} (launchpad config).")
    def dead_letters_job() -> None:
        dead_letters()

    return dg.Definitions(asset_checks=[retry_sweep], jobs=[sweep_job, dead_letters_job],
                          schedules=[schedule])
