"""Standing health of a pipeline, read on demand: its slot, and each target's backlog, retry
queue and dead letters — what asset checks show (plain reports, no thresholds applied here).

* :func:`slot_health` — the WAL the slot keeps the source from recycling, how far behind the
  newest WAL its confirmed position is, how close it is to ``max_slot_wal_keep_size``, whether
  it was dropped or lost WAL it needed, and the seconds since the slot last moved past a
  heartbeat: every pull writes one into the source's WAL (at most every
  ``policy.heartbeat_seconds``), so on an idle source, or one whose writes are all filtered
  out, the seconds stay small while the pipeline runs and grow as soon as it stops;
* :func:`target_health` — per target: changes held for retry, unresolved dead letters, the
  latest of each, and the backlog of staged changes it has not applied (and their age).

Read-only; a crash loses nothing. Each call opens its connections and closes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone

import psycopg

from .capture.source import Source
from .errors import SourceUnavailableError
from .spec import PipelineSpec, SyncSpec
from .staging.held import HeldStore
from .staging.store import StateStore


@dataclass(frozen=True)
class SlotHealth:
    pipeline: str
    slot: str
    exists: bool
    wal_status: str | None = None
    retained_bytes: int = 0
    """WAL the slot keeps the source from recycling (current LSN − restart LSN)."""
    behind_bytes: int = 0
    """WAL written since the slot's confirmed position."""
    max_wal_keep_bytes: int | None = None
    """``max_slot_wal_keep_size`` in bytes (None: unlimited)."""
    safe_wal_size: int | None = None
    """WAL that may still be written before the slot is lost (None: no limit)."""
    heartbeat_at: datetime | None = None
    """Commit time of the newest heartbeat the slot has moved past."""
    lag_seconds: float | None = None
    """Seconds since then (None before the first one)."""
    lost: bool = False
    """Dropped after the pipeline used it, or invalidated: the pipeline stopped; recover."""
    applicable: bool = True
    """False for webhook and polling sources: they have no slot."""
    error: str | None = None
    """Why the slot could not be read (the source is unreachable, say)."""

    @property
    def share_of_limit(self) -> float | None:
        """Retained WAL as a share of ``max_slot_wal_keep_size`` (None: no limit): at 1.0 the
        server invalidates the slot."""
        if self.max_wal_keep_bytes is None or self.max_wal_keep_bytes <= 0:
            return None
        return self.retained_bytes / self.max_wal_keep_bytes


def slot_health(spec: SyncSpec, name: str) -> SlotHealth:
    pipeline = spec.pipelines[name]
    if pipeline.postgres_source is None:
        return SlotHealth(name, pipeline.slot, False, applicable=False)
    with StateStore.connect(spec.state.resolve("state database"), spec.state.schema_name) as st:
        st.ensure_pipeline(name, pipeline.slot)
        state = st.pipeline_state(name)
    now = datetime.now(timezone.utc)
    lag = (now - state.heartbeat_at).total_seconds() if state.heartbeat_at else None
    base = SlotHealth(name, pipeline.slot, False, heartbeat_at=state.heartbeat_at,
                      lag_seconds=lag)
    try:
        with Source(pipeline.source.resolve(f"pipeline {name!r}: source"), pipeline) as src:
            info = src.slot_info()
    except (SourceUnavailableError, psycopg.Error) as err:
        return SlotHealth(**{**base.__dict__, "error": str(err).strip().splitlines()[0]})
    if info is None:
        return SlotHealth(**{**base.__dict__, "lost": state.advanced_lsn is not None})
    return SlotHealth(
        name, pipeline.slot, True, info.wal_status, info.lag_bytes, info.confirmed_lag_bytes,
        info.max_wal_keep_bytes, info.safe_wal_size, state.heartbeat_at, lag,
        lost=info.wal_status == "lost")


@dataclass(frozen=True)
class TargetHealth:
    target: str
    held: int
    dead_letters: int
    latest_dead_letters: list[dict[str, object]]
    latest_held: list[dict[str, object]]
    backlog_changes: int = 0
    """Staged changes the target has not applied yet."""
    backlog_batches: int = 0
    backlog_age_s: float | None = None
    """Age of the oldest of them (since it was staged)."""


def target_health(spec: SyncSpec, name: str) -> list[TargetHealth]:
    """Retry queue, dead letters (with the latest rows) and backlog of each target."""
    pipeline = spec.pipelines[name]
    out = []
    now = datetime.now(timezone.utc)
    with StateStore.connect(spec.state.resolve("state database"), spec.state.schema_name) as st:
        st.ensure_pipeline(name, pipeline.slot)
        for target in pipeline.targets:
            store = HeldStore(st, name, target)
            n_held, n_dead = store.counts()
            backlog = st.backlog(name, target)
            age = ((now - backlog.oldest_staged_at).total_seconds()
                   if backlog.oldest_staged_at else None)
            out.append(TargetHealth(
                target, n_held, n_dead, _named(pipeline, store.latest_dead_letters()),
                _named(pipeline, store.latest_held()), backlog.changes, backlog.batches, age))
    return out


def _named(pipeline: PipelineSpec, rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Rows of held changes or dead letters with their table named source → target (keys are
    stored under the target table) and the key's values on their own."""
    out = []
    for r in rows:
        try:
            table, *key = json.loads(str(r["key"]))
            source = pipeline.source_table_of(table)
        except (ValueError, KeyError, TypeError):
            out.append(r)
            continue
        shown = table if source == table else f"{source} → {table}"
        out.append({**r, "table": shown, "key": ", ".join("NULL" if v is None else str(v)
                                                        for v in key)})
    return out
