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
``record`` transaction, only for keys whose changes were all delivered (into an HTTP API:
before its first request, see :meth:`LinkResolver._save_ahead`). Both directions of a
link decide one window at a time (the ``link:<name>`` lock), so they never decide the same key
from the same base at once. A crash anywhere replays the window: rule 2 repeats each decision.

What the link writes carries a replication origin (``sync_<link>_into_<side>``), and the
capture of the other direction drops transactions with it (:mod:`...capture.puller`): a write
is never sent back.

**An HTTP API side.** Its current row is read with the table's ``get`` request (the HTTP sink
reads before it writes; no lock is possible, so an API edit landing between the read and the
write is overwritten — the read-to-write gap is one request's time), values are put in one form
(:mod:`.canon`) and compared without the fields the API sets itself. The API has no WAL, so a
decision that weighs the API's version marks its side with digests instead of a position: of
the API's version and of the decision written into it. An API change carrying one of them
meets rule 3 (once per digest): the decision is written into PostgreSQL — a webhook brings the
API's version first, a poll may only ever see the decision. A change from the API accepted by
rules 4–6 clears the marks (the API has moved on). Otherwise, what the link wrote into the API
is remembered in the echo ledger, and a change from the API bringing back exactly such a
version is dropped (rule 0, after rule 3): a real edit differs from it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..delivery.sinks.base import Item, Outcome
from ..mapping.mapper import Delete, TargetOp, Truncate, Upsert
from ..spec import PipelineSpec
from ..spec.links import LinkRole, LinkTableRole
from ..staging.links import BaseRow, ConflictRecord, LinkStore, key_text
from ..staging.store import StateStore
from .canon import api_row, canonical_row, echo_hash, view
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
        self._written: list[tuple[str, str, str]] = []  # into the API: (table, key, digest)
        self._consumed: list[tuple[str, str, str]] = []  # echoes that came back
        self._echoes: dict[str, dict[str, set[str]]] = {}
        self.into_api = self.role.api_side is not None and (
            self.role.target_side == self.role.api_side)
        self.from_api = self.role.api_side is not None and (
            self.role.source_side == self.role.api_side)
        self.stats = {"conflicts": 0, "held": 0, "superseded": 0, "echoes": 0}

    # -- inside the target transaction -------------------------------------------------------

    def resolve(self, items: list[Item], read: ReadRows) -> list[Item]:
        self._bases.clear()
        self._conflicts.clear()
        self._absorbed.clear()
        self._keys_of.clear()
        self._written.clear()
        self._consumed.clear()
        self._echoes.clear()
        by_table: dict[str, tuple[Item, set[Key]]] = {}
        for it in items:
            for op in it.ops:
                if isinstance(op, (Upsert, Delete)):
                    by_table.setdefault(op.table, (it, set()))[1].add(tuple(op.key))
        current: dict[str, dict[Key, dict[str, Any] | None]] = {}
        wal: dict[str, int] = {}
        bases: dict[str, dict[str, BaseRow]] = {}
        for table, (it, keys) in by_table.items():
            first, trole = self.role.table_of_target(table)
            cols = [c.name for c in it.table.columns]
            ordered = sorted(keys, key=lambda k: [str(v) for v in k])
            rows, lsn = read(table, cols, it.table.key_names, ordered)
            current[table] = {k: self._canon(trole, self.role.to_first_names(first, r))
                              for k, r in rows.items()}
            wal[table] = lsn
            texts = [key_text(k) for k in keys]
            bases[table] = self.store.bases(first, texts)
            if self.from_api and trole.api is not None:
                self._echoes[first] = self.store.echoes(first, texts)
        for it in items:
            ops = [out for op in it.ops for out in self._one(it, op, current, bases, wal)]
            if not ops:
                _ = it.key  # its key comes from the ops it came with: worked out before
            it.ops = ops
        if self.into_api:
            self._save_ahead()
        return items

    def _save_ahead(self) -> None:
        """Into an API, decisions are durable before the first request: an API has no
        transaction to roll back, and a replay after a crash between the requests and the
        record would read the decision back from the API as if it were the API's own version
        (and lose the marks of the version it overwrote). With the bases saved first, a replay
        finds its decisions (rule 2) and sends them again; a change that then fails is retried
        with the same decision."""
        with self.store.conn.transaction():
            self.store.save(list(self._bases.values()), self._conflicts)
            if self._written:
                self.store.save_echoes(self._written, [], self.role.echo_ttl_seconds)

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
        api = trole.api
        if isinstance(op, Upsert):
            v = self._canon(trole, role.to_first_names(first, op.row))
            if op.partial:  # unchanged large values: the target's copy is the value
                v = {**(y or {}), **(v or {})}
        b = self._bases.get((first, k)) or bases[op.table].get(k)
        pos = (op.position.commit_lsn, op.position.seq)

        def same(x: dict[str, Any] | None, z: dict[str, Any] | None) -> bool:
            return x == z if api is None else view(x, api) == view(z, api)

        def agreed(row: dict[str, Any] | None, superseded: dict[str, Any] | None = None,
                   held: int | None = None) -> None:
            marks = dict(superseded if superseded is not None else (b.superseded if b else {}))
            if self.from_api and superseded is None:
                marks.pop(src, None)  # an API change accepted: the API has moved on
            self._bases[(first, k)] = BaseRow(first, k, row, self.direction, pos[0], pos[1],
                                              marks, held)

        def write(row: dict[str, Any] | None) -> list[TargetOp]:
            current[op.table][key] = row
            if same(row, y):  # versions are equal when every column's text is
                return []
            if api is not None and self.into_api:  # remembered, to know it when it comes back
                self._written.append((first, k, echo_hash(row, api)))
            if row is None:
                return [Delete(op.table, key, op.position)]
            out = row
            if api is not None and self.into_api:  # the API sets its managed fields itself
                out = api_row({c: x for c, x in row.items() if c not in api.managed},
                              api.types)
            elif api is not None:  # an API that does not return one does not blank it
                out = {c: x for c, x in row.items() if x is not None or c not in api.managed}
            return [Upsert(op.table, key, role.from_first_names(first, out), False,
                           op.position)]

        if b is not None and b.held is not None:  # rule 1
            self._absorbed.append((b.held, src, v))
            self.stats["held"] += 1
            return []
        if b is not None and b.set_by == self.direction and (b.set_lsn, b.set_seq) == pos:
            return write(b.row)  # rule 2: this change was decided before a crash
        if b is not None and self._superseded(b, src, v, pos[0], trole):
            self.stats["superseded"] += 1  # rule 3
            marks = dict(b.superseded)
            if isinstance(marks.get(src), list):  # an API's digests count once each
                assert api is not None
                marks[src] = [d for d in marks[src] if d != echo_hash(v, api)]
            agreed(b.row, marks)
            return write(b.row)
        if api is not None and self.from_api:  # rule 0: the link's own write, come back
            digest = echo_hash(v, api)
            echoes = self._echoes.get(first, {}).get(k)
            if echoes and digest in echoes:
                echoes.discard(digest)  # once: the same version again is a real edit
                self._consumed.append((first, k, digest))
                self.stats["echoes"] += 1
                return []
        if same(v, y):  # rule 4
            agreed(v)
            current[op.table][key] = v
            return []
        if (b is None and y is None) or (b is not None and same(b.row, y)):
            agreed(v)  # rule 5
            if api is not None or (isinstance(op, Upsert) and op.partial):
                return write(v)
            current[op.table][key] = v
            return [op]
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
        weighed: int | list[str] = (
            [echo_hash(y, api), echo_hash(decision.row, api)] if api is not None
            and self.into_api else wal[op.table])
        superseded = {**(b.superseded if b else {}), dst: weighed}
        if self.from_api:
            superseded.pop(src, None)
        agreed(decision.row, superseded)
        return write(decision.row)

    def _superseded(self, b: BaseRow, side: str, v: dict[str, Any] | None, lsn: int,
                    trole: LinkTableRole) -> bool:
        """Whether this change of ``side`` was weighed in a decision already (rule 3)."""
        mark = b.superseded.get(side)
        if mark is None:
            return False
        if isinstance(mark, list):  # an API side: digests of the versions weighed
            return trole.api is not None and echo_hash(v, trole.api) in mark
        return mark >= lsn

    @staticmethod
    def _canon(trole: LinkTableRole, row: dict[str, Any] | None) -> dict[str, Any] | None:
        return row if trole.api is None else canonical_row(row, trole.api)

    # -- inside the record transaction -------------------------------------------------------

    def save(self, outcomes: Sequence[Outcome]) -> None:
        """Bases and conflicts of the keys whose changes were all delivered (into an API:
        saved before the requests, see :meth:`_save_ahead`)."""
        if self.into_api:
            for conflict_id, side, version in self._absorbed:
                self.store.absorb(conflict_id, side, version)
            return
        failed = {tk for o in outcomes if o.status != "delivered"
                  for tk in self._keys_of.get(id(o.item), [])}
        bases = [b for tk, b in self._bases.items() if tk not in failed]
        conflicts = [c for c in self._conflicts if (c.table, c.key) not in failed]
        self.store.save(bases, conflicts)
        if self._written or self._consumed:
            self.store.save_echoes(
                [w for w in self._written if (w[0], w[1]) not in failed],
                [c for c in self._consumed if (c[0], c[1]) not in failed],
                self.role.echo_ttl_seconds)
        for conflict_id, side, version in self._absorbed:
            self.store.absorb(conflict_id, side, version)


def _other(role: LinkRole) -> str:
    return role.target_side if role.source_side == role.first_side else role.source_side
