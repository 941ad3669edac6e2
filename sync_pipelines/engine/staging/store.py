"""The state store: the engine's durable memory in a PostgreSQL schema (``sync_state``).

Tables (DDL in :data:`MIGRATIONS`, applied idempotently and in order by :meth:`migrate`):

* ``pipeline``  — one row per pipeline: its slot, the position of the last staged change and
  the LSN we last advanced the slot to.
* ``relation``  — every relation (table schema) version seen in the stream, by fingerprint, so a
  staged change can always be decoded with the schema it was written under.
* ``batch``     — the durable mailbox: one row per staged batch, its position range, number
  of changes, and the changes themselves packed into one value (``changes``, see
  :mod:`.mailbox`): each change keyed by its position ``(commit_lsn, seq)`` (``seq`` = index
  of the change within its transaction), with its pgoutput message as received. A batch is a
  row here until every target has delivered it.
* ``delivery``  — per pipeline and target, the position delivered through (a mirror of the
  target's own checkpoint, which is authoritative).

Contract and crash behaviour: staging a batch (its changes, its batch row and the pipeline's
staged position) is one transaction, so after a crash either all of a batch is staged or none
of it. The staged position only moves forward, which makes re-staging after a re-peek
idempotent: callers skip changes at or below it. Garbage collection removes a batch, with its
changes, only once every target's delivered position is past its last change.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from ..errors import StateError
from ..wire.change import START, Position, StoredChange, decode_change
from ..wire.pgoutput import Column, Relation
from .mailbox import StagedChange, StagedRow, pack, unpack
from .migrations import MIGRATIONS

__all__ = ["START", "Backlog", "BatchInfo", "PipelineState", "Position", "StagedChange",
           "StagedRow", "StateStore", "StoredChange", "decode_change"]

_LOCK_CLASS = 0x5359  # "SY": first half of every advisory lock key we take


@dataclass(frozen=True)
class BatchInfo:
    """A staged batch's range and size."""

    batch_id: int
    first: Position
    last: Position
    n_changes: int
    first_commit_ts: datetime | None
    last_commit_ts: datetime | None
    staged_at: datetime | None = None
    requested_at: datetime | None = None


@dataclass(frozen=True)
class Backlog:
    """Staged batches one target has not delivered yet."""

    target: str
    batches: int
    changes: int
    newest_batch: int | None
    oldest_staged_at: datetime | None
    requested_batch: int | None
    """The newest batch a delivery of this target was last asked for (by the sensor)."""
    requested_at: datetime | None


@dataclass(frozen=True)
class PipelineState:
    staged: Position
    advanced_lsn: int | None
    next_batch: int
    created_at: datetime | None = None
    heartbeat_at: datetime | None = None
    """Commit time of the newest heartbeat the slot has moved past."""
    heartbeat_written_at: datetime | None = None


def relation_fingerprint(rel: Relation) -> str:
    body = json.dumps(
        [rel.relation_id, rel.namespace, rel.name, rel.replica_identity,
         [[c.name, c.type_oid, c.type_modifier, c.is_key] for c in rel.columns]]
    )
    return hashlib.sha256(body.encode()).hexdigest()[:32]


class StateStore:
    """Typed access to the state schema over one psycopg connection (not thread-safe)."""

    def __init__(self, conn: psycopg.Connection[Any], schema: str = "sync_state") -> None:
        self.conn = conn
        self.schema = schema
        self._s = sql.Identifier(schema)
        self._relations: dict[int, Relation] = {}
        self._relation_ids: dict[tuple[str, str], int] = {}

    @classmethod
    def connect(cls, dsn: str, schema: str = "sync_state") -> StateStore:
        try:
            conn = psycopg.connect(dsn, autocommit=True, application_name="sync_pipelines:state")
        except psycopg.OperationalError as err:
            raise StateError(f"cannot connect to the state database: {_first_line(err)}") from None
        store = cls(conn, schema)
        store.migrate()
        return store

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _q(self, text: str) -> sql.Composed:
        return sql.SQL(text).format(schema=self._s)  # type: ignore[arg-type]

    # -- schema ------------------------------------------------------------------------------

    def _schema_version(self) -> int:
        try:
            row = self.conn.execute(
                self._q("SELECT coalesce(max(version), 0) FROM {schema}.migration")
            ).fetchone()
        except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
            return 0
        return int(row[0]) if row else 0

    def migrate(self) -> int:
        """Apply pending migrations; safe to call concurrently and repeatedly."""
        # Sensor ticks connect every few seconds: an up-to-date schema costs one query.
        if self._schema_version() == len(MIGRATIONS):
            return len(MIGRATIONS)
        with self.conn.transaction():
            # Serialise concurrent migrators (several processes start at once under Dagster).
            self.conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (_LOCK_CLASS,))
            self.conn.execute(self._q("CREATE SCHEMA IF NOT EXISTS {schema}"))
            self.conn.execute(self._q(
                "CREATE TABLE IF NOT EXISTS {schema}.migration "
                "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            ))
            row = self.conn.execute(
                self._q("SELECT coalesce(max(version), 0) FROM {schema}.migration")
            ).fetchone()
            current = int(row[0]) if row else 0
            for version, ddl in enumerate(MIGRATIONS, start=1):
                if version <= current:
                    continue
                self.conn.execute(self._q(ddl))
                self.conn.execute(
                    self._q("INSERT INTO {schema}.migration (version) VALUES (%s)"), (version,)
                )
            return len(MIGRATIONS)

    # -- locks -------------------------------------------------------------------------------

    def try_lock(self, name: str) -> bool:
        """Take a session-level advisory lock named ``name``; False if someone holds it."""
        row = self.conn.execute(
            "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (_LOCK_CLASS, name)
        ).fetchone()
        return bool(row and row[0])

    def unlock(self, name: str) -> None:
        self.conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", (_LOCK_CLASS, name))

    # -- pipelines ---------------------------------------------------------------------------

    def ensure_pipeline(self, pipeline: str, slot: str) -> PipelineState:
        self.conn.execute(
            self._q("INSERT INTO {schema}.pipeline (pipeline, slot) VALUES (%s, %s) "
                    "ON CONFLICT (pipeline) DO NOTHING"),
            (pipeline, slot),
        )
        return self.pipeline_state(pipeline)

    def pipeline_state(self, pipeline: str) -> PipelineState:
        row = self.conn.execute(
            self._q("SELECT staged_lsn, staged_seq, advanced_lsn, next_batch, created_at, "
                    "heartbeat_at, heartbeat_written_at FROM {schema}.pipeline "
                    "WHERE pipeline = %s"),
            (pipeline,),
        ).fetchone()
        if row is None:
            raise StateError(f"pipeline {pipeline!r} is not registered in the state database")
        return PipelineState(Position(row[0], row[1]), row[2], row[3], row[4], row[5], row[6])

    def record_heartbeat(self, pipeline: str, *, written: datetime | None = None,
                         passed: datetime | None = None) -> None:
        """A heartbeat was written into the source's WAL (``written``), or the slot moved past
        one committed at ``passed``."""
        self.conn.execute(self._q(
            "UPDATE {schema}.pipeline SET heartbeat_written_at = coalesce(%s, "
            "heartbeat_written_at), heartbeat_at = greatest(heartbeat_at, %s) "
            "WHERE pipeline = %s"), (written, passed, pipeline))

    def restart_from(self, pipeline: str, slot_lsn: int) -> None:
        """A new slot replaces a lost one: the pipeline's position is the new slot's (staged
        changes stay staged; what the old slot lost comes back by backfill and repair)."""
        self.conn.execute(self._q(
            "UPDATE {schema}.pipeline SET advanced_lsn = %s, updated_at = now() "
            "WHERE pipeline = %s"), (slot_lsn, pipeline))

    def record_advance(self, pipeline: str, lsn: int) -> None:
        self.conn.execute(
            self._q("UPDATE {schema}.pipeline SET advanced_lsn = greatest(advanced_lsn, %s), "
                    "updated_at = now() WHERE pipeline = %s"),
            (lsn, pipeline),
        )

    # -- relations ---------------------------------------------------------------------------

    def relation_id(self, pipeline: str, rel: Relation) -> int:
        """The durable id of this relation version (registered on first sight)."""
        fp = relation_fingerprint(rel)
        cached = self._relation_ids.get((pipeline, fp))
        if cached is not None:
            return cached
        cols = [[c.name, c.type_oid, c.type_modifier, c.is_key] for c in rel.columns]
        row = self.conn.execute(
            self._q(
                "INSERT INTO {schema}.relation (pipeline, fingerprint, source_oid, namespace, "
                "name, replica_identity, columns) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (pipeline, fingerprint) DO UPDATE SET pipeline = EXCLUDED.pipeline "
                "RETURNING relation_id"
            ),
            (pipeline, fp, rel.relation_id, rel.namespace, rel.name, rel.replica_identity,
             json.dumps(cols)),
        ).fetchone()
        assert row is not None
        rid = int(row[0])
        self._relation_ids[(pipeline, fp)] = rid
        self._relations[rid] = rel
        return rid

    def relation(self, relation_id: int) -> Relation:
        rel = self._relations.get(relation_id)
        if rel is None:
            row = self.conn.execute(
                self._q("SELECT source_oid, namespace, name, replica_identity, columns "
                        "FROM {schema}.relation WHERE relation_id = %s"),
                (relation_id,),
            ).fetchone()
            if row is None:
                raise StateError(f"relation version {relation_id} is missing from the state DB")
            cols = tuple(Column(n, o, m, k) for n, o, m, k in row[4])
            rel = Relation(int(row[0]), row[1], row[2], row[3], cols)
            self._relations[relation_id] = rel
        return rel

    # -- staging -----------------------------------------------------------------------------

    def stage_batch(self, pipeline: str, changes: Sequence[StagedChange]) -> BatchInfo:
        """Stage ``changes`` (in stream order, all after the staged position) as one batch.

        One transaction: the changes, the batch row and the new staged position. Raises
        :class:`StateError` if the changes do not start after the staged position (a second
        writer, which the per-pipeline lock is there to prevent).
        """
        if not changes:
            raise ValueError("stage_batch needs at least one change")
        with self.conn.transaction():
            staged, batch_id = self._lock_staged(pipeline)
            if changes[0].position <= staged:
                raise StateError(
                    f"pipeline {pipeline!r}: refusing to stage at {changes[0].position}, already "
                    f"staged through {staged} (is another process pulling the same slot?)"
                )
            return self._write_batch(pipeline, batch_id, changes)

    def stage_records(self, pipeline: str, rows: Sequence[tuple[int, str, bytes]], *,
                      commit_ts: datetime,
                      also: Callable[[], None] | None = None) -> BatchInfo:
        """Stage rows of a source without a WAL (webhooks, polling) as one batch:
        ``(relation_id, op, message)`` each, positioned after everything staged so far (one
        made-up transaction per batch). ``also()`` runs in the same transaction — the webhook
        receipts or the poll cursor commit with the rows or not at all. Concurrent callers are
        serialised by the pipeline row's lock.

        One round trip: the position is taken from the locked pipeline row by the statement
        that inserts the batch (its rows packed at offsets from that position, see
        :mod:`.mailbox`) and the new staged position (data-modifying CTEs),
        and ``also``'s statements and the COMMIT are pipelined behind it — the receiver stages
        a group of webhooks per commit, so its rate is this call's latency."""
        if not rows:
            raise ValueError("stage_records needs at least one row")
        n = len(rows)
        # Packed at offset 0 from the batch's first LSN, which the statement picks.
        changes = pack([StagedChange(0, seq, 0, commit_ts, rid, op, msg)
                        for seq, (rid, op, msg) in enumerate(rows)], 0)
        query = self._q(
            "WITH p AS (SELECT staged_lsn + 1 AS lsn, next_batch AS b FROM {schema}.pipeline "
            "  WHERE pipeline = %(p)s FOR UPDATE), "
            "bt AS (INSERT INTO {schema}.batch (pipeline, batch_id, first_lsn, first_seq, "
            "  last_lsn, last_seq, n_changes, first_commit_ts, last_commit_ts, changes) "
            "  SELECT %(p)s, p.b, p.lsn, 0, p.lsn, %(last)s, %(n)s, %(ts)s, %(ts)s, %(c)s "
            "  FROM p), "
            "up AS (UPDATE {schema}.pipeline SET staged_lsn = p.lsn, staged_seq = %(last)s, "
            "  next_batch = p.b + 1, updated_at = now() FROM p WHERE pipeline = %(p)s) "
            "SELECT p.lsn, p.b FROM p")
        params = {"p": pipeline, "ts": commit_ts, "last": n - 1, "n": n, "c": changes}
        with self.conn.pipeline(), self.conn.transaction():
            cur = self.conn.execute(query, params)
            if also is not None:
                also()
        row = cur.fetchone()
        if row is None:
            raise StateError(f"pipeline {pipeline!r} is not registered")
        lsn, batch_id = int(row[0]), int(row[1])
        return BatchInfo(batch_id, Position(lsn, 0), Position(lsn, n - 1), n, commit_ts,
                         commit_ts)

    def _lock_staged(self, pipeline: str) -> tuple[Position, int]:
        row = self.conn.execute(
            self._q("SELECT staged_lsn, staged_seq, next_batch FROM {schema}.pipeline "
                    "WHERE pipeline = %s FOR UPDATE"),
            (pipeline,),
        ).fetchone()
        if row is None:
            raise StateError(f"pipeline {pipeline!r} is not registered")
        return Position(row[0], row[1]), int(row[2])

    def _write_batch(self, pipeline: str, batch_id: int, changes: Sequence[StagedChange]
                     ) -> BatchInfo:
        first, last = changes[0], changes[-1]
        self.conn.execute(
            self._q(
                "INSERT INTO {schema}.batch (pipeline, batch_id, first_lsn, first_seq, "
                "last_lsn, last_seq, n_changes, first_commit_ts, last_commit_ts, changes) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            ),
            (pipeline, batch_id, first.commit_lsn, first.seq, last.commit_lsn, last.seq,
             len(changes), first.commit_ts, last.commit_ts,
             pack(changes, first.commit_lsn)),
        )
        self.conn.execute(
            self._q("UPDATE {schema}.pipeline SET staged_lsn = %s, staged_seq = %s, "
                    "next_batch = %s, updated_at = now() WHERE pipeline = %s"),
            (last.commit_lsn, last.seq, batch_id + 1, pipeline),
        )
        return BatchInfo(batch_id, first.position, last.position, len(changes),
                         first.commit_ts, last.commit_ts)

    def undelivered_changes(self, pipeline: str) -> int:
        """Changes staged but not yet delivered to every target (batch granularity)."""
        row = self.conn.execute(
            self._q("SELECT coalesce(sum(n_changes), 0) FROM {schema}.batch WHERE pipeline = %s"),
            (pipeline,),
        ).fetchone()
        return int(row[0]) if row else 0

    def batches(self, pipeline: str, *, upto: int | None = None) -> list[BatchInfo]:
        """Batches still held (not yet delivered everywhere), oldest first."""
        rows = self.conn.execute(
            self._q("SELECT batch_id, first_lsn, first_seq, last_lsn, last_seq, n_changes, "
                    "first_commit_ts, last_commit_ts, staged_at, requested_at "
                    "FROM {schema}.batch WHERE pipeline = %s AND batch_id <= %s "
                    "ORDER BY batch_id"),
            (pipeline, upto if upto is not None else 2**62),
        ).fetchall()
        return [
            BatchInfo(r[0], Position(r[1], r[2]), Position(r[3], r[4]), r[5], r[6], r[7], r[8],
                      r[9])
            for r in rows
        ]

    def backlog(self, pipeline: str, target: str) -> Backlog:
        """What the target has not yet delivered, and when a delivery was last asked for."""
        delivered = self.delivered(pipeline, target)
        row = self.conn.execute(self._q(
            "SELECT count(*), coalesce(sum(n_changes), 0), max(batch_id), min(staged_at), "
            "(SELECT requested_batch FROM {schema}.delivery WHERE pipeline = %s AND target = %s),"
            " (SELECT requested_at FROM {schema}.delivery WHERE pipeline = %s AND target = %s) "
            "FROM {schema}.batch WHERE pipeline = %s AND (last_lsn, last_seq) > (%s, %s)"),
            (pipeline, target, pipeline, target, pipeline, delivered.commit_lsn, delivered.seq)
        ).fetchone()
        assert row is not None
        return Backlog(target, int(row[0]), int(row[1]), row[2], row[3], row[4], row[5])

    def mark_requested(self, pipeline: str, target: str, batch_id: int) -> None:
        """A delivery of the target up to ``batch_id`` was asked for (now)."""
        self.conn.execute(self._q(
            "INSERT INTO {schema}.delivery AS d (pipeline, target, commit_lsn, seq, batch_id, "
            "requested_batch, requested_at) VALUES (%s, %s, %s, %s, 0, %s, now()) "
            "ON CONFLICT (pipeline, target) DO UPDATE SET requested_batch = "
            "EXCLUDED.requested_batch, requested_at = now()"),
            (pipeline, target, START.commit_lsn, START.seq, batch_id))

    def read_changes(self, pipeline: str, after: Position, through: Position) -> list[StoredChange]:
        """Staged changes with ``after < position <= through``, in stream order, decoded."""
        return [decode_change(*r) for r in self.read_staged(pipeline, after, through)]

    def read_staged(self, pipeline: str, after: Position, through: Position
                    ) -> list[StagedRow]:
        """Like :meth:`read_changes`, as stored: ``(commit_lsn, seq, batch_id, relation_id,
        op, message)`` with the raw message (delivery decodes it, or passes it through)."""
        with self.conn.cursor(binary=True) as cur:  # bytea as is, not hex
            rows = cur.execute(self._overlapping("batch_id", "first_lsn", "changes"),
                               self._range(pipeline, after, through)).fetchall()
        out: list[StagedRow] = []
        for batch_id, first_lsn, changes in sorted(rows, key=lambda r: r[0]):
            out.extend(r for r in unpack(changes, batch_id, first_lsn)
                       if after < (r[0], r[1]) <= through)
        return out

    def iter_staged(self, pipeline: str, after: Position, through: Position
                    ) -> Iterator[StagedRow]:
        """Like :meth:`read_staged`, for a range of any size: one batch in memory at a time
        (a round trip each), and the connection free between batches."""
        ids = self.conn.execute(self._overlapping("batch_id", "first_lsn"),
                                self._range(pipeline, after, through)).fetchall()
        for batch_id, first_lsn in sorted(ids):
            with self.conn.cursor(binary=True) as cur:
                row = cur.execute(self._q(
                    "SELECT changes FROM {schema}.batch WHERE pipeline = %s AND batch_id = %s"),
                    (pipeline, batch_id)).fetchone()
            if row is None:
                continue  # collected meanwhile: every target has delivered it
            yield from (r for r in unpack(row[0], batch_id, first_lsn)
                        if after < (r[0], r[1]) <= through)

    def _overlapping(self, *columns: str) -> sql.Composed:
        """``columns`` of the batches holding a change in ``(after, through]``. Batches are
        disjoint and in position order: those that end inside the range, and the first one
        that ends after it, if it starts inside. Both are ranges of the index on last."""
        return sql.SQL(
            "(SELECT {cols} FROM {schema}.batch WHERE pipeline = %(p)s "
            " AND (last_lsn, last_seq) > (%(al)s, %(as)s) "
            " AND (last_lsn, last_seq) <= (%(tl)s, %(ts)s)) "
            "UNION ALL "
            "(SELECT {cols} FROM (SELECT * FROM {schema}.batch WHERE pipeline = %(p)s "
            " AND (last_lsn, last_seq) > (%(tl)s, %(ts)s) ORDER BY last_lsn, last_seq LIMIT 1) b "
            " WHERE (first_lsn, first_seq) <= (%(tl)s, %(ts)s))"
        ).format(schema=self._s, cols=sql.SQL(", ").join(map(sql.Identifier, columns)))

    @staticmethod
    def _range(pipeline: str, after: Position, through: Position) -> dict[str, Any]:
        return {"p": pipeline, "al": after.commit_lsn, "as": after.seq,
                "tl": through.commit_lsn, "ts": through.seq}

    # -- delivery ----------------------------------------------------------------------------

    def delivered(self, pipeline: str, target: str) -> Position:
        row = self.conn.execute(
            self._q("SELECT commit_lsn, seq FROM {schema}.delivery "
                    "WHERE pipeline = %s AND target = %s"),
            (pipeline, target),
        ).fetchone()
        return Position(row[0], row[1]) if row else START

    def record_delivered(self, pipeline: str, target: str, pos: Position, batch_id: int) -> None:
        """Move the target's delivered position forward (never backward)."""
        self.conn.execute(
            self._q(
                "INSERT INTO {schema}.delivery AS d (pipeline, target, commit_lsn, seq, batch_id) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (pipeline, target) DO UPDATE SET "
                "commit_lsn = EXCLUDED.commit_lsn, seq = EXCLUDED.seq, "
                "batch_id = EXCLUDED.batch_id, updated_at = now() "
                "WHERE (d.commit_lsn, d.seq) < (EXCLUDED.commit_lsn, EXCLUDED.seq)"
            ),
            (pipeline, target, pos.commit_lsn, pos.seq, batch_id),
        )

    def log_delivered(self, pipeline: str, target: str, batch_ids: Sequence[int]) -> None:
        """When the target delivered these batches (for the webhook status API)."""
        with self.conn.cursor() as cur:
            cur.executemany(self._q(
                "INSERT INTO {schema}.delivery_log (pipeline, target, batch_id) VALUES "
                "(%s, %s, %s) ON CONFLICT DO NOTHING"),
                [(pipeline, target, b) for b in batch_ids])

    def collect_garbage(self, pipeline: str, targets: Sequence[str], *,
                        housekeeping: bool = True) -> int:
        """Drop the batches every target has delivered; returns the changes they held.
        ``housekeeping``: also forget placed snapshot rows and week-old delivery log entries
        (a delivery run does that once, at its end, not after every window)."""
        floor = min((self.delivered(pipeline, t) for t in targets), default=START)
        # A snapshot chunk whose high watermark the slot has not passed may be placed again
        # (a re-peek): keep the changes after its low watermark, its conflicts come from them.
        row = self.conn.execute(self._q(
            "SELECT min(c.low_lsn) FROM {schema}.snapshot_chunk c JOIN {schema}.pipeline p "
            "USING (pipeline) WHERE c.pipeline = %s AND NOT c.abandoned "
            "AND c.low_lsn IS NOT NULL AND c.created_at > now() - interval '1 day' "
            "AND (c.high_lsn IS NULL OR c.high_lsn >= coalesce(p.advanced_lsn, 0))"),
            (pipeline,)).fetchone()
        if row and row[0] is not None:
            floor = min(floor, Position(int(row[0]), 2**31 - 1))
        if housekeeping:
            # Rows of chunks placed before the slot's position can never be placed again.
            self.conn.execute(self._q(
                "UPDATE {schema}.snapshot_chunk c SET messages = NULL FROM {schema}.pipeline p "
                "WHERE c.pipeline = %s AND p.pipeline = c.pipeline AND c.messages IS NOT NULL "
                "AND c.high_lsn < p.advanced_lsn"), (pipeline,))
            self.conn.execute(self._q(
                "DELETE FROM {schema}.delivery_log WHERE pipeline = %s "
                "AND delivered_at < now() - interval '7 days'"), (pipeline,))
        if floor == START:
            return 0
        rows = self.conn.execute(
            self._q("DELETE FROM {schema}.batch WHERE pipeline = %s "
                    "AND (last_lsn, last_seq) <= (%s, %s) RETURNING n_changes"),
            (pipeline, floor.commit_lsn, floor.seq),
        ).fetchall()
        return sum(r[0] for r in rows)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
