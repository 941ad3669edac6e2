"""Per-key compaction of a batch of target operations.

Contract: :func:`compact` folds a batch's operations, in stream order, into at most one final
operation per ``(table, key)`` plus a per-table truncate flag, such that applying the result
— truncates first, then deletes, then upserts — leaves a table in exactly the state that
applying every operation one by one would. This is what lets a Postgres sink apply a batch in
one bulk transaction while keeping per-key order: within one atomic transaction only the final
state per key is observable.

* ``Upsert`` after ``Upsert``: the later row wins; a partial row (unchanged TOAST columns left
  out) is merged over the earlier one.
* ``Delete`` after anything: delete.  ``Upsert`` after ``Delete``: upsert (the row is new).
* ``Truncate``: forget every earlier operation on the table; later ones still apply.

Pure and in memory: its size is bounded by the batch it is given.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .mapping import Delete, Key, TargetOp, Truncate, Upsert


@dataclass
class TableOps:
    truncate: bool = False
    final: dict[Key, Upsert | Delete] = field(default_factory=dict)

    @property
    def deletes(self) -> list[Delete]:
        return [op for op in self.final.values() if isinstance(op, Delete)]

    @property
    def upserts(self) -> list[Upsert]:
        return [op for op in self.final.values() if isinstance(op, Upsert)]


def compact(ops: Iterable[TargetOp]) -> dict[str, TableOps]:
    tables: dict[str, TableOps] = {}
    for op in ops:
        t = tables.get(op.table)
        if t is None:
            t = tables[op.table] = TableOps()
        if isinstance(op, Truncate):
            t.truncate = True
            t.final.clear()
            continue
        prev = t.final.get(op.key)
        if isinstance(op, Upsert) and op.partial and isinstance(prev, Upsert):
            op = Upsert(op.table, op.key, {**prev.row, **op.row}, prev.partial, op.position)
        t.final[op.key] = op
    return tables
