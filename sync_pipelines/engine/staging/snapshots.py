"""Snapshots in the stream: how rows read from a source table (initial backfill, repair) are
placed among live changes so a snapshot row never overwrites a newer live change.

The technique is DBLog's watermarks, with the stream itself as the place where the two meet:

1. the snapshot worker (:mod:`..backfill`) emits a **low watermark** into the source's WAL
   (``pg_logical_emit_message``, transactional, prefix :data:`PREFIX`), waits until every
   transaction that was still running when it committed has ended, then reads one chunk of rows
   in key order in its own snapshot, stores them in ``snapshot_chunk`` as pgoutput messages (an
   ``'U'`` per row: "the row now reads …", a ``'D'`` for a key the source no longer has), and
   emits a **high watermark**;
2. the puller (:mod:`..capture.puller`) meets both marks in commit order. At the high mark it drops
from
   the chunk every key that any staged change touched between the two marks (the chunk's read
   may have seen that change or not: the live change is the one to keep), and stages the rest
   at the high mark's position. From there on they are ordinary changes: same mapping, per-key
   order, compaction, idempotent sinks, retries and dead letters.

Why it is exact: every transaction that committed before the low mark had finished before the
chunk was read (the worker waits for the ones still running), so the chunk reflects it, and it
precedes the chunk in the stream. Every transaction after the high mark comes after the chunk in
the stream. Those in between are exactly the ambiguous ones, and their keys are left to them.

This module is the state side: the ``snapshot`` (one backfill or repair of one table: progress,
resume point) and ``snapshot_chunk`` tables, and the watermark payload. A crash leaves chunks
the worker had not recorded as emitted (``abandoned`` on resume: the worker reads the same keys
again; if the high mark did reach the WAL, the puller skips it), or a high mark met twice (a
re-peek: positions at or below the staged one are skipped, and the conflict set is computed
from the same staged changes, so the same rows land at the same positions).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from psycopg import sql

from ..wire.change import Position
from ..wire.pgoutput import Delete, Insert, Relation, Update, decode_message
from .store import StateStore

PREFIX = "sync_pipelines.snapshot"
"""Prefix of our logical decoding messages; other prefixes are ignored."""
_LAST_SEQ = 2**31 - 1  # above every index of a change in its transaction

Mark = Literal["low", "high"]
SnapshotKind = Literal["backfill", "repair", "refetch"]
"""``backfill``: a whole table (resumable); ``repair``: keys reconciliation found drifted;
``refetch``: rows whose values the stream did not carry (see :mod:`.refetch`)."""


def worker_lock(pipeline: str, table: str, kind: str, snapshot_id: int) -> str:
    """The advisory lock a snapshot's worker holds on its state connection while it runs.

    A backfill's lock is per table, so two backfills of one table never run at once; others
    are per snapshot. A worker that dies loses its connection and with it the lock, which is
    how a snapshot left ``running`` is told from one in progress."""
    if kind == "backfill":
        return f"snapshot:{pipeline}:{table}:backfill"
    return f"snapshot:{snapshot_id}"


def watermark(pipeline: str, chunk_id: int, mark: Mark) -> str:
    return json.dumps({"pipeline": pipeline, "chunk": chunk_id, "mark": mark},
                      separators=(",", ":"))


def parse_watermark(pipeline: str, prefix: str, content: bytes) -> tuple[int, Mark] | None:
    """``(chunk_id, mark)`` if the message is one of this pipeline's watermarks."""
    if prefix != PREFIX:
        return None
    try:
        body = json.loads(content)
        if body.get("pipeline") != pipeline or body.get("mark") not in ("low", "high"):
            return None
        return int(body["chunk"]), body["mark"]
    except (ValueError, TypeError, KeyError, AttributeError):
        return None  # not ours after all: someone else's message under our prefix


def key_positions(rel: Relation, key_names: Sequence[str]) -> list[int]:
    """Positions of the named key columns in a relation version (``ValueError`` if one is gone)."""
    names = [c.name for c in rel.columns]
    return [names.index(k) for k in key_names]


@dataclass(frozen=True)
class Chunk:
    chunk_id: int
    snapshot_id: int
    relation_id: int
    key_names: tuple[str, ...]
    messages: tuple[bytes, ...]
    low_lsn: int | None


@dataclass(frozen=True)
class SnapshotInfo:
    snapshot_id: int
    pipeline: str
    table: str
    kind: str
    status: str
    last_key: tuple[str | None, ...] | None
    chunks: int
    rows: int
    rows_estimate: int | None
    started_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    error: str | None


_SNAPSHOT_COLS = sql.SQL(
    "snapshot_id, pipeline, table_name, kind, status, last_key, chunks, rows, rows_estimate, "
    "started_at, updated_at, finished_at, error")


class SnapshotStore:
    """Typed access to the snapshot tables, over a :class:`~.store.StateStore`'s connection."""

    def __init__(self, state: StateStore) -> None:
        self.state = state
        self.conn = state.conn
        self._schema = sql.Identifier(state.schema)

    def _q(self, text: str) -> sql.Composed:
        return sql.SQL(text).format(schema=self._schema, cols=_SNAPSHOT_COLS)  # type: ignore[arg-type]

    # -- snapshots (the worker's progress) ---------------------------------------------------

    def start(self, pipeline: str, table: str, kind: SnapshotKind,
              rows_estimate: int | None) -> SnapshotInfo:
        row = self.conn.execute(self._q(
            "INSERT INTO {schema}.snapshot (pipeline, table_name, kind, rows_estimate) "
            "VALUES (%s, %s, %s, %s) RETURNING {cols}"),
            (pipeline, table, kind, rows_estimate)).fetchone()
        assert row is not None
        return _info(row)

    def running(self, pipeline: str, table: str, kind: SnapshotKind) -> SnapshotInfo | None:
        """The unfinished snapshot of this kind for the table, to resume."""
        row = self.conn.execute(self._q(
            "SELECT {cols} FROM {schema}.snapshot WHERE pipeline = %s "
            "AND table_name = %s AND kind = %s AND status IN ('running', 'failed') "
            "ORDER BY snapshot_id DESC LIMIT 1"), (pipeline, table, kind)).fetchone()
        return _info(row) if row else None

    def latest(self, pipeline: str, table: str | None = None,
               kind: SnapshotKind | None = None) -> list[SnapshotInfo]:
        """The newest snapshot per (table, kind)."""
        rows = self.conn.execute(self._q(
            "SELECT DISTINCT ON (table_name, kind) {cols} FROM {schema}.snapshot "
            "WHERE pipeline = %s AND (%s::text IS NULL OR table_name = %s) "
            "AND (%s::text IS NULL OR kind = %s) "
            "ORDER BY table_name, kind, snapshot_id DESC"),
            (pipeline, table, table, kind, kind)).fetchall()
        return [_info(r) for r in rows]

    def progress(self, snapshot_id: int, chunk_id: int, last_key: Sequence[str | None] | None,
                 rows: int) -> None:
        """The chunk's high watermark is in the WAL: it will be placed, and the snapshot goes on
        after ``last_key``. One transaction."""
        with self.conn.transaction():
            self.conn.execute(self._q(
                "UPDATE {schema}.snapshot_chunk SET emitted = true WHERE chunk_id = %s"),
                (chunk_id,))
            self.conn.execute(self._q(
                "UPDATE {schema}.snapshot SET last_key = %s, chunks = chunks + 1, "
                "rows = rows + %s, status = 'running', error = NULL, updated_at = now() "
                "WHERE snapshot_id = %s"),
                (list(last_key) if last_key is not None else None, rows, snapshot_id))

    def finish(self, snapshot_id: int, status: str = "done", error: str | None = None) -> None:
        self.conn.execute(self._q(
            "UPDATE {schema}.snapshot SET status = %s, error = %s, updated_at = now(), "
            "finished_at = CASE WHEN %s = 'done' THEN now() END WHERE snapshot_id = %s"),
            (status, error, status, snapshot_id))

    def alive(self, info: SnapshotInfo) -> bool:
        """Whether the snapshot's worker is running (it holds its :func:`worker_lock`)."""
        name = worker_lock(info.pipeline, info.table, info.kind, info.snapshot_id)
        if not self.state.try_lock(name):
            return True
        self.state.unlock(name)
        return False

    def abandon_dead_chunks(self, pipeline: str) -> int:
        """Abandon unrecorded chunks of snapshots whose worker is gone (it died between a low
        watermark and recording the chunk): nothing will place them, and an open chunk keeps
        staged changes from being collected. A backfill reads those keys again when resumed;
        a refetch keeps its requests until it completes; a repair is found again by the next
        reconciliation."""
        rows = self.conn.execute(self._q(
            "SELECT {cols} FROM {schema}.snapshot WHERE snapshot_id IN (SELECT snapshot_id "
            "FROM {schema}.snapshot_chunk WHERE pipeline = %s AND NOT emitted "
            "AND NOT abandoned)"), (pipeline,)).fetchall()
        n = 0
        for info in map(_info, rows):
            if not self.alive(info):
                n += self.abandon_unrecorded(info.snapshot_id)
        return n

    def abandon_unrecorded(self, snapshot_id: int) -> int:
        """Chunks of this snapshot the worker did not record as emitted (it died before or just
        after their high watermark): it reads their keys again, so the puller must not place
        them (nor keep changes for them). Recorded chunks stay: they are placed whenever the
        puller gets to their high watermark."""
        cur = self.conn.execute(self._q(
            "UPDATE {schema}.snapshot_chunk SET abandoned = true WHERE snapshot_id = %s "
            "AND NOT emitted AND NOT abandoned"), (snapshot_id,))
        return cur.rowcount

    # -- chunks (worker side) ----------------------------------------------------------------

    def new_chunk(self, snapshot_id: int, pipeline: str, relation_id: int,
                  key_names: Sequence[str]) -> int:
        row = self.conn.execute(self._q(
            "INSERT INTO {schema}.snapshot_chunk (snapshot_id, pipeline, relation_id, key_names) "
            "VALUES (%s, %s, %s, %s) RETURNING chunk_id"),
            (snapshot_id, pipeline, relation_id, list(key_names))).fetchone()
        assert row is not None
        return int(row[0])

    def store_rows(self, chunk_id: int, relation_id: int, messages: Sequence[bytes]) -> None:
        self.conn.execute(self._q(
            "UPDATE {schema}.snapshot_chunk SET messages = %b, relation_id = %s "
            "WHERE chunk_id = %s"), (list(messages), relation_id, chunk_id))

    # -- chunks (puller side) ----------------------------------------------------------------

    def mark_low(self, pipeline: str, chunk_id: int, lsn: int) -> None:
        self.conn.execute(self._q(
            "UPDATE {schema}.snapshot_chunk SET low_lsn = %s WHERE chunk_id = %s "
            "AND pipeline = %s AND NOT abandoned"), (lsn, chunk_id, pipeline))

    def chunk(self, pipeline: str, chunk_id: int) -> Chunk | None:
        """The chunk to place at its high mark; ``None`` if unknown, abandoned or incomplete."""
        row = self.conn.execute(self._q(
            "SELECT chunk_id, snapshot_id, relation_id, key_names, messages, low_lsn "
            "FROM {schema}.snapshot_chunk WHERE chunk_id = %s AND pipeline = %s "
            "AND NOT abandoned AND messages IS NOT NULL"), (chunk_id, pipeline)).fetchone()
        if row is None or row[5] is None:
            return None
        return Chunk(int(row[0]), int(row[1]), int(row[2]), tuple(row[3]),
                     tuple(bytes(m) for m in row[4]), int(row[5]))

    def mark_high(self, chunk_id: int, lsn: int, placed: int, conflicts: int) -> None:
        self.conn.execute(self._q(
            "UPDATE {schema}.snapshot_chunk SET high_lsn = %s, placed = %s, conflicts = %s "
            "WHERE chunk_id = %s"), (lsn, placed, conflicts, chunk_id))

    def touched_keys(self, pipeline: str, chunk: Chunk, high_lsn: int
                     ) -> tuple[set[tuple[str | None, ...]], bool]:
        """Keys of the chunk's table changed by staged transactions committed between the two
        marks, and whether the table was truncated there (then every key is touched)."""
        assert chunk.low_lsn is not None
        source_oid = self.state.relation(chunk.relation_id).relation_id
        # Committed strictly between the marks: after (low, every seq), through (high − 1, …).
        rows = ((r[3], r[4], r[5]) for r in self.state.iter_staged(
            pipeline, Position(chunk.low_lsn, _LAST_SEQ), Position(high_lsn - 1, _LAST_SEQ))
            if self.state.relation(r[3]).relation_id == source_oid)
        keys: set[tuple[str | None, ...]] = set()
        for relation_id, op, message in rows:
            if op == "T":
                return keys, True
            try:
                idx = key_positions(self.state.relation(int(relation_id)), chunk.key_names)
            except ValueError:
                return keys, True  # a key column was renamed or dropped: trust nothing
            msg = decode_message(message)
            tuples: list[Any] = []
            if isinstance(msg, (Insert, Update)):
                tuples.append(msg.new)
            if isinstance(msg, (Update, Delete)) and msg.old is not None:
                tuples.append(msg.old)
            for t in tuples:
                keys.add(tuple(t[i] for i in idx))
        return keys, False


def _info(row: Sequence[Any]) -> SnapshotInfo:
    return SnapshotInfo(int(row[0]), row[1], row[2], row[3], row[4],
                        tuple(row[5]) if row[5] is not None else None, int(row[6]), int(row[7]),
                        None if row[8] is None else int(row[8]), row[9], row[10], row[11],
                        row[12])
