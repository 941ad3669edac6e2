"""One direction of a link, at delivery: what each change of a linked table becomes.

Contract: :meth:`LinkResolver.resolve` runs **inside the target's apply transaction**
(the Postgres sink calls it after locking the window's rows with ``SELECT ... FOR UPDATE``, so
no local write slips between the check and the write). Per key only its last change in the
window is weighed (completed by earlier ones where it is partial): versions the other side
never saw do not count, and a key created and deleted in one window is no change. For each
such change, with ``v`` the incoming version, ``y`` the target's current row and the key's
base (what both sides last agreed on):

1. the key is held (a manual conflict): the change is absorbed into the conflict (its version
   kept there), nothing is written — other keys go on;
2. the base was set by this very change (the window is delivered again after a crash): the
   decision is repeated, not taken again;
3. the change is older than a decision that already weighed its side's version
   (``superseded``: the other direction met the conflict first): the decision is written;
4. ``v`` equals ``y``: nothing to write; they agree on ``v``; ``v`` equals the base (the
   source wrote the same values again): nothing to write, the target's version goes the
   other way;
5. ``y`` equals the base (the target did not change the key): ``v`` is written; they agree.
   Into PostgreSQL the target is marked as weighed up to its WAL position: its own changes of
   the key still on their way (made and undone before this write) meet rule 3;
5b. ``v`` is a delete of a key without a base while the target has a version: nothing to undo
   (the target's version reaches the source through the other direction); not a conflict;
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
from .api_reader import ApiReader
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

    def resolve(self, items: list[Item], read: ReadRows | None) -> list[Item]:
        self._bases.clear()
        self._conflicts.clear()
        self._absorbed.clear()
        self._keys_of.clear()
        self._written.clear()
        self._consumed.clear()
        self._echoes.clear()
        _net(items)
        by_table: dict[str, tuple[Item, set[Key]]] = {}
        for it in items:
            for op in it.ops:
                if isinstance(op, (Upsert, Delete)):
                    by_table.setdefault(op.table, (it, set()))[1].add(tuple(op.key))
        current: dict[str, dict[Key, dict[str, Any] | None]] = {}
        wal: dict[str, int] = {}
        bases: dict[str, dict[str, BaseRow]] = {}
        reader = ApiReader(self.role) if self.role.api_side is not None and by_table else None
        try:
            for table, (it, keys) in by_table.items():
                first, trole = self.role.table_of_target(table)
                ordered = sorted(keys, key=lambda k: [str(v) for v in k])
                if reader is not None and trole.api is not None and self.into_api:
                    rows = self._api_rows(reader, trole, it.table.key_names, ordered)
                    lsn = 0  # an API has no WAL: its side is weighed by digests
                else:
                    assert read is not None
                    cols = [c.name for c in it.table.columns]
                    raw, lsn = read(table, cols, it.table.key_names, ordered)
                    rows = {k: self._canon(trole, self.role.to_first_names(first, r))
                            for k, r in raw.items()}
                current[table] = rows
                wal[table] = lsn
                texts = [key_text(k) for k in keys]
                bases[table] = self.store.bases(first, texts)
                if reader is not None and trole.api is not None and self.from_api:
                    self._echoes[first] = self.store.echoes(first, texts)
                    # What the API holds now is the version weighed, not what a (possibly
                    # late) notice says it held: see :mod:`.api_reader`.
                    now = self._api_rows(reader, trole, [
                        trole.columns.get(c, c) for c in it.table.key_names], ordered)
                    for item in items:
                        item.ops = [_as_now(op, now, trole) if getattr(op, "table", None)
                                    == table and not isinstance(op, Truncate) else op
                                    for op in item.ops]
        finally:
            if reader is not None:
                reader.close()
        for it in items:
            ops = [out for op in it.ops for out in self._one(it, op, current, bases, wal)]
            if not ops:
                _ = it.key  # its key comes from the ops it came with: worked out before
            it.ops = ops
        if self.into_api:
            self._save_ahead()
        return items

    def _api_rows(self, reader: ApiReader, trole: LinkTableRole, key_fields: list[str],
                  keys: list[Key]) -> dict[Key, dict[str, Any] | None]:
        """The API's records of ``keys`` (``key_fields``: the record's key fields, in the
        order of each key's values), in first-side names and one form; absent keys left out."""
        assert trole.api is not None
        names = trole.columns  # first-side column → the record's JSON field
        records = reader.current(trole.api.get, key_fields, keys)
        out: dict[Key, dict[str, Any] | None] = {}
        for key, record in records.items():
            if record is not None:
                out[key] = self._canon(trole, {c: record.get(names.get(c, c))
                                               for c in trole.api.types})
        return out

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
                   held: int | None = None, target_at: int | None = None) -> None:
            marks = dict(superseded if superseded is not None else (b.superseded if b else {}))
            if self.from_api and superseded is None:
                marks.pop(src, None)  # an API change accepted: the API has moved on
            if target_at is not None:  # the target weighed up to this WAL position
                marks[dst] = target_at
            # This change of the source is accounted for: delivered again (a crash before the
            # window was recorded, the base moved on meanwhile), it meets rule 3.
            seen = marks.get(f"seen:{src}")
            if seen is None or tuple(seen) < pos:
                marks[f"seen:{src}"] = [pos[0], pos[1]]
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
        if b is not None and self._superseded(b, src, v, pos[0], pos[1], trole):
            self.stats["superseded"] += 1  # rule 3
            marks = dict(b.superseded)
            if isinstance(marks.get(src), list):  # an API's digests count once each
                assert api is not None
                digest = echo_hash(v, api)
                marks[src] = [d for d in marks[src] if d != digest]
                echoes = self._echoes.get(first, {}).get(k)
                if echoes and digest in echoes:  # the decision's own echo: seen now
                    echoes.discard(digest)
                    self._consumed.append((first, k, digest))
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
        if b is not None and same(v, b.row):
            # Rule 4b: the source holds what both agreed on (it wrote the same values again):
            # only the target changed, and its version reaches the source the other way.
            return []
        if (b is None and y is None) or (b is not None and same(b.row, y)):
            # Rule 5. Into PostgreSQL, the target's own changes of the key up to now are in
            # ``y`` (equal to the base): any still on their way through the other direction
            # are weighed, and must not undo this write when they arrive (rule 3 there).
            agreed(v, target_at=None if self.into_api else wal[op.table])
            if api is not None or (isinstance(op, Upsert) and op.partial):
                return write(v)
            current[op.table][key] = v
            return [op]
        if v is None and b is None:
            # A key the link never carried, deleted on the source while the target has a
            # version: nothing to undo there (the target's version reaches the source through
            # the other direction). Typical: created and deleted within one window.
            return []
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
                    seq: int, trole: LinkTableRole) -> bool:
        """Whether this change of ``side`` was weighed in a decision already (rule 3)."""
        seen = b.superseded.get(f"seen:{side}")
        if seen is not None and (lsn, seq) <= tuple(seen):
            return True
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


def _net(items: list[Item]) -> None:
    """Per key, only its last version in the window is weighed: the source's earlier changes
    of it were never seen by the other side (a key created and deleted in one window is no
    change at all). The last op of each key stays in its item, completed by the earlier ones
    where it is partial (unchanged large values); the earlier ops are dropped."""
    last: dict[tuple[str, Key], tuple[Item, int]] = {}
    net: dict[tuple[str, Key], TargetOp] = {}
    for it in items:
        for i, op in enumerate(it.ops):
            if isinstance(op, Truncate):
                continue
            k = (op.table, tuple(op.key))
            before = net.get(k)
            if isinstance(op, Upsert) and op.partial and isinstance(before, Upsert):
                op = Upsert(op.table, op.key, {**before.row, **op.row}, before.partial,
                            op.position)
            net[k] = op
            last[k] = (it, i)
    if all(len(it.ops) <= 1 for it in items) and len(last) == sum(len(it.ops) for it in items):
        return  # every key once: nothing to fold (the common case)
    keep: dict[int, dict[int, TargetOp]] = {}
    for k, (it, i) in last.items():
        keep.setdefault(id(it), {})[i] = net[k]
    for it in items:
        mine = keep.get(id(it), {})
        _ = it.key  # the change's key (retry queue, dead letters) is that of the ops it came with
        it.ops = [mine[i] if i in mine else op for i, op in enumerate(it.ops)
                  if i in mine or isinstance(op, Truncate)]


def _as_now(op: TargetOp, now: dict[Key, dict[str, Any] | None], trole: LinkTableRole
            ) -> TargetOp:
    """A change from an API as the API's current record of its key (first-side names, which
    are the target's here): an upsert of it, or a delete when the API has none."""
    if not isinstance(op, (Upsert, Delete)):
        return op
    row = now.get(tuple(op.key))
    if row is None:
        return Delete(op.table, op.key, op.position)
    return Upsert(op.table, op.key, dict(row), False, op.position)
