"""The reports of a delivery and of a retry sweep: what they did for one target (plain data)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..staging.store import BatchInfo
from ..wire.pgoutput import format_lsn
from .sinks.base import ApplyStats


@dataclass(frozen=True)
class SweepReport:
    """What one retry sweep did for one target."""

    pipeline: str
    target: str
    keys: int = 0
    delivered: int = 0
    rescheduled: int = 0
    dead_letters: int = 0
    duration_s: float = 0.0


@dataclass(frozen=True)
class DeliveryReport:
    """What one delivery did for one target."""

    pipeline: str
    target: str
    batches: tuple[int, ...] = ()
    changes: int = 0
    skipped_batches: tuple[int, ...] = ()  # already applied (found in the target checkpoint)
    stats: ApplyStats = ApplyStats()
    first_lsn: int | None = None
    last_lsn: int | None = None
    duration_s: float = 0.0
    held_changes: int = 0  # changes put in the retry queue or parked behind one
    dead_letters: int = 0  # changes that became dead letters in this delivery

    @classmethod
    def of(cls, pipeline: str, target: str, batches: list[BatchInfo], changes: int,
           stats: ApplyStats, started: float, *, skipped: tuple[int, ...] = (),
           held_changes: int = 0, dead_letters: int = 0) -> DeliveryReport:
        """The report of a delivery that applied ``batches`` (oldest first) since ``started``."""
        return cls(pipeline, target, tuple(b.batch_id for b in batches), changes, skipped,
                   stats, batches[0].first.commit_lsn if batches else None,
                   batches[-1].last.commit_lsn if batches else None,
                   time.monotonic() - started, held_changes, dead_letters)

    @property
    def lsn_range(self) -> str:
        if self.first_lsn is None or self.last_lsn is None:
            return ""
        return f"{format_lsn(self.first_lsn)}–{format_lsn(self.last_lsn)}"

    @property
    def changes_per_s(self) -> float:
        return self.changes / self.duration_s if self.duration_s > 0 else 0.0
