"""Per-key compaction of a batch of target operations.

Contract: :func:`compact` folds a batch's operations, in stream order, into at most one final
operation per ``(table, key)`` plus a per-table truncate flag, such that applying the result
— truncates first, then deletes, then upserts — leaves a table in exactly the state that
applying every operation one by one would. This is what lets a Postgres sink apply a batch in
one bulk transaction while keeping per-key order: within one atomic transaction only the final
state per key is observable.

* ``Upsert`` after ``Upsert``: the later row is merged over the earlier one (column by column,
  later wins), as a row may not carry every column: a partial row leaves out unchanged TOAST
  columns, a row of a later relation version lacks dropped columns. A whole row over a whole
  row of the same columns simply replaces it (a raw row stays raw). The result keeps the
  earlier one's ``inserted`` hint: a key inserted in the batch is still new to the target.
* ``Delete`` after anything: delete.  ``Upsert`` after ``Delete``: the delete stays too (listed
  in ``deletes``), so the upsert inserts a new row rather than merging into the deleted one.
* ``Truncate``: forget every earlier operation on the table; later ones still apply.

Pure and in memory: its size is bounded by the batch it is given.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..wire.copyrow import RawRow
from .mapper import Delete, Key, TargetOp, Truncate, Upsert


@dataclass
class TableOps:
    truncate: bool = False
    final: dict[Key, Upsert | Delete] = field(default_factory=dict)
    # Keys deleted earlier in the batch whose final op is an upsert: the row is deleted first,
    # or an upsert that does not carry every column would merge into the deleted row.
    deleted_first: set[Key] = field(default_factory=set)

    @property
    def deletes(self) -> list[Delete]:
        deletes = [op for op in self.final.values() if type(op) is Delete]
        if self.deleted_first:
            deletes += [Delete(op.table, op.key, op.position) for op in self.final.values()
                        if type(op) is Upsert and op.key in self.deleted_first]
        return deletes

    @property
    def upserts(self) -> list[Upsert]:
        return [op for op in self.final.values() if type(op) is Upsert]


def _same_columns(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    if isinstance(a, RawRow) and isinstance(b, RawRow):
        return a.shape == b.shape
    return isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys()


def compact(ops: Iterable[TargetOp]) -> dict[str, TableOps]:
    # On the delivery run's critical path for every change of a window: the common case (the
    # window's first op of a key, in the table of the op before) costs one dict lookup and
    # one store.
    tables: dict[str, TableOps] = {}
    table: str | None = None
    t = TableOps()  # (replaced at the first op)
    final = t.final
    for op in ops:
        if op.table != table:
            table = op.table
            got = tables.get(table)
            if got is None:
                got = tables[table] = TableOps()
            t, final = got, got.final
        if isinstance(op, Truncate):
            t.truncate = True
            final.clear()
            t.deleted_first.clear()
            continue
        prev = final.get(op.key)
        if prev is None:
            final[op.key] = op
            continue
        if isinstance(op, Upsert) and isinstance(prev, Upsert):
            # Merge even full rows: a full row of a narrower relation version (after a DROP
            # COLUMN) does not carry every target column either.
            if op.partial or prev.partial or not _same_columns(op.row, prev.row):
                op = Upsert(op.table, op.key, {**prev.row, **op.row},
                            prev.partial and op.partial, op.position, prev.inserted)
            elif prev.inserted and not op.inserted:
                op = Upsert(op.table, op.key, op.row, op.partial, op.position, True)
        elif isinstance(op, Upsert):  # after a Delete
            t.deleted_first.add(op.key)
        final[op.key] = op
    return tables
