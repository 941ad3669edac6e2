"""Recovery of a pipeline whose slot was dropped or lost WAL it needed.

A slot past ``max_slot_wal_keep_size`` is invalidated (``wal_status = 'lost'``); a dropped
slot is simply gone. Either way the changes the source committed since the pipeline last read
are no longer in its WAL, and a new slot would start from "now" — so the puller refuses to go
on (:class:`~.errors.SlotLostError`) until :func:`recover_pipeline` has run:

1. **slot** — the lost slot is dropped and a new one created; the pipeline's position becomes
   the new slot's. Changes staged before the loss stay staged and are delivered as usual;
2. **backfill** — every table is read again through the stream (restarted, not resumed), so
   every row the source has now reaches every target, placed between watermarks after the
   changes staged before;
3. **reconcile** — once delivery has caught up, source and targets are compared and the
   confirmed drift is repaired through the stream: rows deleted while the slot was lost are
   still in the targets, and only this finds them.

Steps 2 and 3 need the pipeline's pulls and deliveries to run meanwhile (the sensor and the
delivery runs, or a caller's pump). A crash between steps: run it again — step 1 is skipped
when the slot is healthy, a restarted backfill and a reconciliation are idempotent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .backfill.reader import SnapshotReport
from .capture.source import Source
from .errors import BusyError
from .reconcile.run import CatchUp, ReconcileReport
from .spec import SyncSpec
from .staging.store import StateStore


@dataclass(frozen=True)
class RecoveryReport:
    pipeline: str
    slot_recreated: bool
    backfills: list[SnapshotReport] = field(default_factory=list)
    reconciliation: ReconcileReport | None = None


def recreate_slot(spec: SyncSpec, name: str) -> bool:
    """Drop a lost slot and create a new one; the pipeline continues from the new slot's
    position. Returns False (nothing done) when the slot is there and healthy."""
    pipeline = spec.pipelines[name]
    with StateStore.connect(spec.state.resolve("state database"), spec.state.schema_name) as st, \
            Source(pipeline.source.resolve(f"pipeline {name!r}: source"), pipeline) as src:
        st.ensure_pipeline(name, pipeline.slot)
        info = src.slot_info()
        if info is not None and info.wal_status != "lost":
            return False
        lock = f"pull:{name}"
        deadline = time.monotonic() + 60
        while not st.try_lock(lock):  # no pull may run against the slot meanwhile
            if time.monotonic() > deadline:
                raise BusyError(f"pipeline {name!r}: a pull has held the pipeline's lock for "
                                "a minute; try the recovery again")
            time.sleep(0.2)
        try:
            if info is not None:
                src.drop_slot()
            slot = src.prepare()
            st.restart_from(name, slot.confirmed_flush_lsn)
        finally:
            st.unlock(lock)
    return True


def recover_pipeline(spec: SyncSpec, name: str, *, catch_up: CatchUp | None = None,
                     on_step: Callable[[str], None] | None = None) -> RecoveryReport:
    """Recreate the slot (if lost), backfill every table, reconcile with repair."""
    from .pipeline import backfill_pipeline, reconcile

    say = on_step or (lambda _: None)
    recreated = recreate_slot(spec, name)
    say("slot recreated" if recreated else "slot is healthy: kept")
    backfills = backfill_pipeline(spec, name, restart=True)
    say(f"backfilled {sum(b.rows for b in backfills):,} rows of {len(backfills)} table(s)")
    report = reconcile(spec, name, repair=True, catch_up=catch_up)
    say(f"reconciled: {report.drift} drifted key(s) repaired")
    return RecoveryReport(name, recreated, backfills, report)
