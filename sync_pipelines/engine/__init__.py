"""The sync engine, Dagster-free: the facade orchestrators import.

The Dagster layer (:mod:`sync_pipelines.defs`), the CLI, the benchmarks and outside callers
import from here; the stage packages behind it may move. A change's way through them::

    capture/   source → slot → puller ──stage──▶ staging/ (mailbox)  ◀── backfill/ (snapshots,
                                                     │                     re-reads)
                                     mapping/ ◀──────┘
                                        │
                                    delivery/ (one loop, sweep) ──▶ sinks/ (postgres, http)
    reconcile/   compare source and targets; repair through backfill/
    wire/        pgoutput, types, positions (used by all)   runtime/  embedded PostgreSQL

Entry points (each opens its connections and closes them on return, crash or not):

* :func:`pull_pipeline` — a sensor tick: re-read what delivery asked for, pull within the
  demand budget, stage, advance the slot;
* :func:`deliver_target` — a delivery run for one target; :func:`deliver_pipeline` — every
  target, each on its own; :func:`delivery_backlog`, :func:`mark_requested` — what each target
  has left and when it was asked for;
* :func:`sweep_target`, :func:`sweep_pipeline` — the retry schedule; :func:`target_health`,
  :func:`resolve_dead_letters` — the retry queue and dead letters, for checks and operators;
* :func:`backfill_pipeline`, :func:`backfill_plan` — existing rows through the stream;
* :func:`reconcile` — drift between source and targets, confirmed, optionally repaired;
* :func:`slot_health`, :func:`target_health` — standing health for checks;
  :func:`recover_pipeline` — after a slot was dropped or lost WAL;
* :func:`load_spec`, :func:`parse_spec` — the validated sync spec.
"""

from .backfill.reader import SnapshotReport
from .capture.puller import PullReport
from .delivery.report import DeliveryReport, SweepReport
from .delivery.sinks.base import ApplyStats
from .errors import (
    SlotLostError,
    SpecError,
    SyncError,
    Terminal,
    TerminalDeliveryError,
    Transient,
    TransientDeliveryError,
)
from .health import SlotHealth, TargetHealth, slot_health, target_health
from .links.resolution import ResolutionError
from .pipeline import (
    BackfillPlan,
    backfill_pipeline,
    backfill_plan,
    compare_tables,
    day_window,
    deliver_pipeline,
    deliver_target,
    delivery_backlog,
    first_day,
    link_conflict_counts,
    link_conflicts,
    mark_requested,
    pull_pipeline,
    reconcile,
    resolve_dead_letters,
    resolve_link_conflict,
    sweep_pipeline,
    sweep_target,
    webhooks_received,
)
from .reconcile.drift import KeyDrift, TableDrift
from .reconcile.run import ReconcileReport
from .recovery import RecoveryReport, recover_pipeline
from .spec import (
    HttpPollSourceSpec,
    HttpTargetSpec,
    PipelineSpec,
    PostgresTargetSpec,
    SyncSpec,
    WebhookSourceSpec,
    load_spec,
    parse_spec,
)
from .staging.links import ConflictRecord
from .staging.receipts import Received
from .staging.refetch import RefetchReport
from .staging.store import Backlog
from .wire.pgoutput import format_lsn

__all__ = [
    "ApplyStats", "BackfillPlan", "Backlog", "ConflictRecord", "DeliveryReport",
    "HttpPollSourceSpec", "HttpTargetSpec", "KeyDrift", "PipelineSpec", "PostgresTargetSpec",
    "PullReport", "Received", "ReconcileReport", "RecoveryReport", "RefetchReport",
    "ResolutionError", "SlotHealth", "SlotLostError", "SnapshotReport", "SpecError", "SweepReport",
    "SyncError", "SyncSpec", "TableDrift", "TargetHealth", "Terminal", "TerminalDeliveryError",
    "Transient", "TransientDeliveryError", "WebhookSourceSpec",
    "backfill_pipeline", "backfill_plan", "compare_tables", "day_window", "deliver_pipeline",
    "deliver_target", "delivery_backlog", "first_day", "format_lsn", "link_conflict_counts",
    "link_conflicts", "load_spec", "mark_requested", "parse_spec", "pull_pipeline", "reconcile",
    "recover_pipeline", "resolve_dead_letters", "resolve_link_conflict", "slot_health",
    "sweep_pipeline", "sweep_target", "target_health", "webhooks_received",
]
