"""Wiring: open the state store, the source and the sinks a spec names, and run one step.

These are the entry points an orchestrator calls — the Dagster layer, the benchmark and the
tests all go through them, so each exercises the same path:

* :func:`pull_pipeline` — one sensor tick's work (see :mod:`.ingest`);
* :func:`deliver_pipeline` — one delivery run's work for every target (see :mod:`.deliver`),
  followed by clean-up of batches every target has applied;
* :func:`stale_batch` — the oldest batch left undelivered for too long (a failed run), so the
  sensor can ask for it again.

Connections are opened per call and closed on return, crash or not.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from .deliver import DeliveryReport, deliver
from .faults import NO_FAULTS, Faults
from .ingest import PullReport, pull
from .sinks.postgres import PostgresSink
from .source import Source
from .spec import PipelineSpec, SyncSpec
from .state import BatchInfo, StateStore


def open_state(spec: SyncSpec) -> StateStore:
    return StateStore.connect(spec.state.resolve("state database"), spec.state.schema_name)


def open_source(pipeline: PipelineSpec) -> Source:
    return Source(pipeline.source.resolve(f"pipeline {pipeline.name!r}: source"), pipeline)


def open_sink(pipeline: PipelineSpec, target: str) -> PostgresSink:
    tspec = pipeline.targets[target]
    dsn = tspec.resolve(f"pipeline {pipeline.name!r}: target {target!r}")
    return PostgresSink(dsn, pipeline=pipeline.name, target=target, spec=tspec)


def pull_pipeline(spec: SyncSpec, name: str, *, faults: Faults = NO_FAULTS) -> PullReport:
    pipeline = spec.pipelines[name]
    with open_state(spec) as state, open_source(pipeline) as source:
        return pull(source, state, pipeline, faults=faults)


def deliver_pipeline(
    spec: SyncSpec, name: str, *, upto_batch: int | None = None, faults: Faults = NO_FAULTS
) -> list[DeliveryReport]:
    pipeline = spec.pipelines[name]
    reports = []
    with open_state(spec) as state:
        for target in pipeline.targets:
            with open_sink(pipeline, target) as sink:
                reports.append(
                    deliver(state, pipeline, target, sink, upto_batch=upto_batch, faults=faults)
                )
        state.collect_garbage(name, list(pipeline.targets))
    return reports


def stale_batch(spec: SyncSpec, name: str) -> BatchInfo | None:
    """The oldest undelivered batch whose last request is older than the redelivery delay."""
    pipeline = spec.pipelines[name]
    cutoff = datetime.now(timezone.utc) - timedelta(
        seconds=pipeline.policy.redeliver_after_seconds)
    with open_state(spec) as state:
        state.ensure_pipeline(name, pipeline.slot)
        held = state.batches(name)
    if not held:
        return None
    oldest = held[0]
    last_asked = oldest.requested_at or oldest.staged_at
    return oldest if last_asked is not None and last_asked < cutoff else None


def mark_requested(spec: SyncSpec, name: str, batch_ids: list[int]) -> None:
    with open_state(spec) as state:
        state.mark_requested(name, batch_ids)


def compare_tables(spec: SyncSpec, name: str) -> list[str]:
    """Differences between the source and each target (empty when they match)."""
    from .verify import compare_pipeline

    pipeline = spec.pipelines[name]
    problems = []
    source_dsn = pipeline.source.resolve(f"pipeline {name!r}: source")
    for target, tspec in pipeline.targets.items():
        target_dsn = tspec.resolve(f"pipeline {name!r}: target {target!r}")
        for d in compare_pipeline(source_dsn, target_dsn, pipeline):
            if not d.clean:
                problems.append(f"{target}/{d.table}: {d.missing} missing, {d.extra} extra, "
                                f"{d.different} different; e.g. {d.sample[:3]}")
    return problems
