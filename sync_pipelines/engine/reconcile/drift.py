"""Drift between a source table (seen through the pipeline's mapping) and one target: the result
types shared by the comparers (:mod:`.reconcile` for Postgres targets, :mod:`.reconcile_http`
for HTTP targets with a list endpoint), the confirmation pass, repair and the Dagster layer.

Pure data, no I/O. Keys are tuples of the key columns' values in PostgreSQL text form (as the
mapping sees them in the stream), in the source key order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Key = tuple[str | None, ...]
DriftKind = Literal["missing", "extra", "different"]
"""``missing``: the source has the key (after the row filter), the target does not.
``extra``: the target has the key, the source does not. ``different``: both have it and at
least one mapped column differs."""


@dataclass(frozen=True)
class KeyDrift:
    key: Key
    kind: DriftKind
    fields: tuple[str, ...] = ()
    """Target column names that differ (``different`` only)."""
    source_fingerprint: str | None = None
    """A digest of the mapped source row when it was read (``None``: no source row). The
    confirmation pass compares it to tell drift from a row that changed meanwhile."""


@dataclass
class TableDrift:
    """What one comparison of one table against one target found."""

    pipeline: str
    table: str
    """Source table, ``schema.name``."""
    target: str
    target_table: str
    method: str
    """``range-hash`` (Postgres, hashes per key range on both servers, rows fetched only where
    they differ), ``row-by-row`` (Postgres, every row streamed and mapped), ``http-list`` (the
    API's paged list endpoint) or ``unsupported`` (nothing compared: see ``note``)."""
    source_rows: int = 0
    target_rows: int = 0
    compared_keys: int = 0
    """Distinct keys looked at on either side."""
    ranges: int = 0
    ranges_differing: int = 0
    drift: list[KeyDrift] = field(default_factory=list)
    """Every key found (up to ``truncated``), in key order."""
    truncated: bool = False
    """More drift than the comparer keeps in memory: counts below are lower bounds."""
    in_flight: int = 0
    """Keys that differed but have changes on their way (staged, in retry, dead-lettered, or
    changed while compared): not drift. Filled by the confirmation pass."""
    duration_s: float = 0.0
    waited_s: float = 0.0
    """Time spent waiting for delivery to catch up before the confirmation pass."""
    note: str | None = None

    def count(self, kind: DriftKind) -> int:
        return sum(1 for d in self.drift if d.kind == kind)

    @property
    def missing(self) -> int:
        return self.count("missing")

    @property
    def extra(self) -> int:
        return self.count("extra")

    @property
    def different(self) -> int:
        return self.count("different")

    @property
    def total(self) -> int:
        return len(self.drift)

    @property
    def rows_per_s(self) -> float:
        rows = self.source_rows + self.target_rows
        return rows / self.duration_s if self.duration_s > 0 else 0.0
