"""One direction of a link, at delivery: what each change of a linked table becomes.

Contract: :meth:`LinkResolver.resolve` runs **inside the target's apply transaction**
(the Postgres sink calls it after locking the window's rows with ``SELECT ... FOR UPDATE``, so
no local write slips between the check and the write). For each change, with ``v`` the
incoming version, ``y`` the target's current row and the key's base (what both sides last
agreed on):

1. the key is held (a manual conflict): the change is absorbed into the conflict (its version
   kept there), nothing is written — other keys go on;
2. the base was set by this very change (the window is delivered again after a crash): the
   decision is repeated, not taken again;
3. the change is older than a decision that already weighed its side's version
   (``superseded``: the other direction met the conflict first): the decision is written;
4. ``v`` equals ``y``: nothing to write; they agree on ``v``;
5. ``y`` equals the base (the target did not change the key): ``v`` is written; they agree;
6. otherwise **both sides changed the key**: a conflict. :func:`.policy.decide` gives the
   version both get; it is written to the target, the base becomes it, and the target's
   side is marked as weighed up to its current WAL position — its own change of the key is
   still on its way through the other direction and will meet rule 3 there, which writes the
   decision on the other side. Manual policies hold the key (rule 1 from then on).

The new bases and the conflict log are written by :meth:`save`, inside the delivery's
``record`` transaction, only for keys whose changes were all delivered. Both directions of a
link decide one window at a time (the ``link:<name>`` lock), so they never decide the same key
from the same base at once. A crash anywhere replays the window: rule 2 repeats each decision.

What the link writes carries a replication origin (``sync_<link>_into_<side>``), and the
capture of the other direction drops transactions with it (:mod:`...capture.puller`): a write
is never sent back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..delivery.sinks.base import Item, Outcome
from ..mapping.mapper import Delete, TargetOp, Truncate, Upsert
from ..spec import PipelineSpec
from ..spec.links import LinkRole
from ..staging.links import BaseRow, ConflictRecord, LinkStore, key_text
from ..staging.store import StateStore
from .policy import NO_BASE, decide

Key = tuple[Any, ...]
ReadRows = Callable[[str, Sequence[str], Sequence[str], Sequence[Key]],
                    tuple[dict[Key, dict[str, Any]], int]]
"""``read(table, columns, key_columns, keys)`` → (the target's current rows by key, as text,
locked for the transaction; the target's current WAL position)."""


class LinkResolver:
    def __init__(self, state: StateStore, pipeline: PipelineSpec) -> None:
        assert pipeline.link is not None
        self.role: LinkRole = pipeline.link
        self.direction = pipeline.name
        self.store = LinkStore(state, self.role.name)
        self._bases: dict[tuple[str, str], BaseRow] = {}
        self._conflicts: list[ConflictRecord] = []
        self._absorbed: list[tuple[int, str, dict[str, Any] | None]] = []
        self._keys_of: dict[int, list[tuple[str, str]]] = {}  # id(item) → (table, key)
        self.stats = {"conflicts": 0, "held": 0, "superseded": 0}

    # -- inside the target transaction -------------------------------------------------------

    def resolve(self, items: list[Item], read: ReadRows) -> list[Item]:
        self._bases.clear()
        self._conflicts.clear()
        self._absorbed.clear()
        self._keys_of.clear()
        by_table: dict[str, tuple[Item, set[Key]]] = {}
        for it in items:
            for op in it.ops:
                if isinstance(op, (Upsert, Delete)):
                    by_table.setdefault(op.table, (it, set()))[1].add(tuple(op.key))
        current: dict[str, dict[Key, dict[str, Any] | None]] = {}
        wal: dict[str, int] = {}
        bases: dict[str, dict[str, BaseRow]] = {}
        for table, (it, keys) in by_table.items():
            first, _ = self.role.table_of_target(table)
            cols = [c.name for c in it.table.columns]
            ordered = sorted(keys, key=lambda k: [str(v) for v in k])
            rows, lsn = read(table, cols, it.table.key_names, ordered)
            current[table] = {k: self.role.to_first_names(first, r) for k, r in rows.items()}
            wal[table] = lsn
            bases[table] = self.store.bases(first, [key_text(k) for k in keys])
        for it in items:
            ops = [out for op in it.ops for out in self._one(it, op, current, bases, wal)]
            if not ops:
                _ = it.key  # its key comes from the ops it came with: worked out before
            it.ops = ops
        return items

    def _one(self, it: Item, op: TargetOp, current: dict[str, dict[Key, Any]],
             bases: dict[str, dict[str, BaseRow]], wal: dict[str, int]) -> list[TargetOp]:
        if isinstance(op, Truncate):
            return [op]  # a TRUNCATE empties both sides alike: nothing to decide
        role, src, dst = self.role, self.role.source_side, self.role.target_side
        first, trole = role.table_of_target(op.table)
        key = tuple(op.key)
        k = key_text(key)
        self._keys_of.setdefault(id(it), []).append((first, k))
        y = current[op.table].get(key)
        v: dict[str, Any] | None = None
        if isinstance(op, Upsert):
            v = role.to_first_names(first, op.row)
            if op.partial:  # unchanged large values: the target's copy is the value
                v = {**(y or {}), **v}
        b = self._bases.get((first, k)) or bases[op.table].get(k)
        pos = (op.position.commit_lsn, op.position.seq)

        def agreed(row: dict[str, Any] | None, superseded: dict[str, int] | None = None,
                   held: int | None = None) -> None:
            self._bases[(first, k)] = BaseRow(
                first, k, row, self.direction, pos[0], pos[1],
                dict(superseded if superseded is not None else (b.superseded if b else {})),
                held)

        def write(row: dict[str, Any] | None) -> list[TargetOp]:
            current[op.table][key] = row
            if row == y:  # versions are equal when every column's text is
                return []
            if row is None:
                return [Delete(op.table, key, op.position)]
            return [Upsert(op.table, key, role.from_first_names(first, row), False,
                           op.position)]

        if b is not None and b.held is not None:  # rule 1
            self._absorbed.append((b.held, src, v))
            self.stats["held"] += 1
            return []
        if b is not None and b.set_by == self.direction and (b.set_lsn, b.set_seq) == pos:
            return write(b.row)  # rule 2: this change was decided before a crash
        if b is not None and b.superseded.get(src, -1) >= pos[0]:
            self.stats["superseded"] += 1  # rule 3
            agreed(b.row)
            return write(b.row)
        if v == y:  # rule 4
            agreed(v)
            current[op.table][key] = v
            return []
        if (b is None and y is None) or (b is not None and b.row == y):
            agreed(v)  # rule 5
            current[op.table][key] = v
            return [op] if not (isinstance(op, Upsert) and op.partial) else write(v)
        # Rule 6: both sides changed the key since they agreed.
        versions = {s: (v if s == src else y) for s in (role.first_side, _other(role))}
        decision = decide(trole.conflict, b.row if b is not None else NO_BASE, versions,
                          role.first_side)
        self.stats["conflicts"] += 1
        self._conflicts.append(ConflictRecord(
            first, k, self.direction, pos[0], pos[1], versions,
            b.row if b is not None else None, b is not None, trole.conflict.policy,
            decision.winner, decision.reason, decision.row,
            "held" if decision.held else "decided"))
        if decision.held:
            agreed(b.row if b is not None else None, held=-1)  # the conflict's id, at save
            return []
        superseded = {**(b.superseded if b else {}), dst: wal[op.table]}
        agreed(decision.row, superseded)
        return write(decision.row)

    # -- inside the record transaction -------------------------------------------------------

    def save(self, outcomes: Sequence[Outcome]) -> None:
        """Bases and conflicts of the keys whose changes were all delivered."""
        failed = {tk for o in outcomes if o.status != "delivered"
                  for tk in self._keys_of.get(id(o.item), [])}
        bases = [b for tk, b in self._bases.items() if tk not in failed]
        conflicts = [c for c in self._conflicts if (c.table, c.key) not in failed]
        self.store.save(bases, conflicts)
        for conflict_id, side, version in self._absorbed:
            self.store.absorb(conflict_id, side, version)


def _other(role: LinkRole) -> str:
    return role.target_side if role.source_side == role.first_side else role.source_side
