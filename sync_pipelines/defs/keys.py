"""Names shared across the Dagster layer: asset keys, job names, run tags (one place each)."""

import dagster as dg

PIPELINE_TAG = "sync/pipeline"
"""Retry sweeps: one at a time per pipeline."""
TARGET_TAG = "sync/target"
"""Delivery runs: one at a time per (pipeline, target)."""
OPERATOR_TAG = "sync/operator"
"""Dead-letter actions: one at a time per pipeline."""
MAINTENANCE_TAG = "sync/maintenance"
"""Backfill, reconciliation, recovery: one at a time per pipeline, beside delivery."""


def source_key(p: str) -> dg.AssetKey:
    return dg.AssetKey(["sync", p, "source"])


def staged_key(p: str) -> dg.AssetKey:
    return dg.AssetKey(["sync", p, "staged"])


def delivered_key(p: str, target: str) -> dg.AssetKey:
    return dg.AssetKey(["sync", p, "delivered", target])


def backfill_key(p: str) -> dg.AssetKey:
    return dg.AssetKey(["sync", p, "backfill"])


def reconciliation_key(p: str) -> dg.AssetKey:
    return dg.AssetKey(["sync", p, "reconciliation"])


def deliver_job_name(p: str, target: str) -> str:
    return f"{p}_deliver_{target}_job"


def deliver_op_name(p: str, target: str) -> str:
    return "__".join(delivered_key(p, target).path)


def target_tag(p: str, target: str) -> dict[str, str]:
    """The run tag the queue limits to one active delivery per (pipeline, target)."""
    return {TARGET_TAG: f"{p}/{target}"}
