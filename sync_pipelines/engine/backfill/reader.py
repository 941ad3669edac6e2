"""Backfill and repair: read source rows in key-ordered chunks and place them in the stream.

Contract: :func:`backfill_table` reads a whole table, :func:`repair_keys` the current source
rows of given keys (a key the source no longer has becomes a delete), chunk by chunk. Each chunk
goes between a low and a high watermark (see :mod:`..staging.snapshots` for why no snapshot row can
overwrite a newer live change); the pipeline's puller places it in the stream and from there it
is delivered like any change — mapping, per-key order, idempotent sinks, retries, dead letters.
Neither function writes to a target or to the mailbox itself: they only read the source, emit
two logical messages per chunk into its WAL, and record the chunk and the progress in the state
database. The rows reach the targets once the pipeline pulls and delivers (its sensor and
delivery job do that as usual).

Resumable: a backfill records the last key of each chunk whose high watermark it emitted. After
a crash, the next call (``resume``, the default) marks chunks whose high watermark was not met
as abandoned and carries on after that key; rows of a chunk emitted twice land twice, which the
sinks absorb (upserts of the same row).

Memory: one chunk of rows (``chunk_rows``) at a time.

The source user needs to be allowed to run ``pg_logical_emit_message`` (as the REPLICATION
role that creates the slot normally is).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.string import TextLoader

from ..capture.source import connect_text, describe_relation
from ..errors import SnapshotBusyError, SourceConfigError
from ..faults import NO_FAULTS, Faults
from ..mapping.mapper import TableMapper
from ..spec import PipelineSpec
from ..staging.snapshots import PREFIX, SnapshotKind, SnapshotStore, watermark, worker_lock
from ..staging.store import StateStore
from ..wire.pgoutput import Relation, encode_delete, encode_update

Key = tuple[str | None, ...]

DEFAULT_CHUNK_ROWS = 5_000


@dataclass(frozen=True)
class SnapshotReport:
    """What one backfill or repair call did."""

    pipeline: str
    table: str
    kind: SnapshotKind
    snapshot_id: int
    chunks: int
    """Chunks emitted by this call."""
    rows: int
    """Rows (and deletes, for repair) emitted by this call."""
    total_rows: int
    """Rows emitted by the snapshot so far, this call and earlier ones (resumed)."""
    rows_estimate: int | None
    done: bool
    resumed: bool
    duration_s: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.duration_s if self.duration_s > 0 else 0.0


Progress = Callable[[SnapshotReport], None]


class _Table:
    """One source table as the snapshot reads it: columns in the stream's order, text values."""

    def __init__(self, conn: psycopg.Connection[Any], pipeline: PipelineSpec, table: str) -> None:
        if table not in pipeline.tables:
            raise SourceConfigError(
                f"pipeline {pipeline.name!r}: table {table!r} is not one of its tables "
                f"({', '.join(pipeline.tables)})")
        self.rel: Relation = describe_relation(conn, table)
        tm = TableMapper(pipeline.name, table, pipeline.tables[table], self.rel)
        self.key_idx = list(tm.key_idx)
        self.key_names = [self.rel.columns[i].name for i in self.key_idx]
        ident = sql.Identifier(*table.split("."))
        cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in self.rel.columns)
        keys = sql.SQL(", ").join(map(sql.Identifier, self.key_names))
        marks = sql.SQL(", ").join(sql.Placeholder() * len(self.key_names))
        self.first = sql.SQL("SELECT {} FROM {} ORDER BY {} LIMIT %s").format(cols, ident, keys)
        self.after = sql.SQL("SELECT {} FROM {} WHERE ({}) > ({}) ORDER BY {} LIMIT %s").format(
            cols, ident, keys, marks, keys)
        self._cols, self._ident, self._keys, self._marks = cols, ident, keys, marks

    def by_keys(self, n: int) -> sql.Composed:
        tuples = sql.SQL(", ").join(sql.SQL("({})").format(self._marks) for _ in range(n))
        return sql.SQL("SELECT {} FROM {} WHERE ({}) IN ({})").format(
            self._cols, self._ident, self._keys, tuples)

    def fetch(self, conn: psycopg.Connection[Any], query: sql.Composed,
              params: Sequence[Any]) -> list[tuple[str | None, ...]]:
        """Rows as the server's own output text for every column, as pgoutput sends them."""
        with conn.cursor() as cur:
            for col in self.rel.columns:
                cur.adapters.register_loader(col.type_oid, TextLoader)
            return cur.execute(query, params).fetchall()

    def key(self, values: Sequence[str | None]) -> Key:
        return tuple(values[i] for i in self.key_idx)


def _emit(conn: psycopg.Connection[Any], pipeline: str, chunk_id: int, mark: str) -> None:
    try:
        conn.execute("SELECT pg_logical_emit_message(true, %s, %s)",
                     (PREFIX, watermark(pipeline, chunk_id, mark)))  # type: ignore[arg-type]
    except psycopg.errors.InsufficientPrivilege as err:
        raise SourceConfigError(
            f"pipeline {pipeline!r}: cannot write a snapshot watermark ({str(err).strip()}); "
            "the source user needs EXECUTE on pg_logical_emit_message") from None


def _wait_for_running(conn: psycopg.Connection[Any], timeout_s: float,
                      long_running: set[str]) -> None:
    """Wait until the transactions running now have ended (at most ``timeout_s``).

    A transaction can have written its commit record before the low watermark's and still be
    invisible to a snapshot taken right after (it is waiting for its WAL flush, or for a
    synchronous standby). Once it has ended, the chunk's snapshot sees it. A transaction still
    running after the timeout is a long one, whose commit will come after the low watermark:
    its keys then fall between the marks, which is safe. Such transactions are remembered in
    ``long_running`` and waited for only briefly at later chunks, so one idle-in-transaction
    session does not cost every chunk the whole timeout.
    """
    row = conn.execute(
        "SELECT array(SELECT pg_snapshot_xip(pg_current_snapshot()))::text[]").fetchone()
    running = list(row[0]) if row and row[0] else []
    patience = timeout_s if set(running) - long_running else min(timeout_s, 0.5)
    deadline = time.monotonic() + patience
    while running and time.monotonic() < deadline:
        time.sleep(0.02)
        row = conn.execute(
            "SELECT array(SELECT x FROM unnest(%s::xid8[]) x "
            "WHERE pg_xact_status(x) = 'in progress')::text[]", (running,)).fetchone()
        running = list(row[0]) if row and row[0] else []
    long_running.update(running)


class _Snapshot:
    """One backfill or repair in progress: emits chunks and records them."""

    def __init__(self, state: StateStore, pipeline: PipelineSpec, table: str,
                 kind: SnapshotKind, *, resume: bool, wait_s: float, faults: Faults) -> None:
        self.state, self.pipeline, self.table, self.kind = state, pipeline, table, kind
        self.faults = faults
        self.store = SnapshotStore(state)
        self.wait_s = wait_s
        self.long_running: set[str] = set()
        what = f"pipeline {pipeline.name!r}: source"
        dsn = pipeline.source.resolve(what)
        self.emitter = connect_text(dsn, what, "sync_pipelines:snapshot")
        self.reader = connect_text(dsn, what, "sync_pipelines:snapshot")
        self.reader.autocommit = False
        self.reader.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        self.reader.read_only = True
        with self.reader.transaction():
            self.t = _Table(self.reader, pipeline, table)
            estimate = self.reader.execute(
                "SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = %s",
                (self.t.rel.relation_id,)).fetchone()
        self.lock: str | None = None
        if kind == "backfill":  # one backfill of a table at a time, across processes
            self._take_lock(worker_lock(pipeline.name, table, kind, 0))
        running = self.store.running(pipeline.name, table, kind) if resume else None
        self.resumed = running is not None
        if running is not None:
            self.store.abandon_unrecorded(running.snapshot_id)
            self.info = running
        else:
            self.info = self.store.start(pipeline.name, table, kind,
                                         int(estimate[0]) if estimate else None)
        if self.lock is None:
            self._take_lock(worker_lock(pipeline.name, table, kind, self.info.snapshot_id))
        self.started = time.monotonic()
        self.chunks = self.rows = 0
        self.total = self.info.rows

    def _take_lock(self, name: str) -> None:
        if not self.state.try_lock(name):
            self.close()
            raise SnapshotBusyError(
                f"pipeline {self.pipeline.name!r}: a {self.kind} of {self.table} is already "
                "running (another run or process holds it); wait for it to finish")
        self.lock = name

    def close(self) -> None:
        try:
            if self.lock is not None:
                with contextlib.suppress(psycopg.Error):
                    self.state.unlock(self.lock)
                self.lock = None
        finally:
            self.emitter.close()
            self.reader.close()

    def __enter__(self) -> _Snapshot:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: object) -> None:
        try:
            if err is not None:  # recorded for the UI; a resume picks it up all the same
                with contextlib.suppress(psycopg.Error):
                    self.store.finish(self.info.snapshot_id, "failed",
                                      f"{type(err).__name__}: {err}"[:500])
        finally:
            self.close()

    def chunk(self, read: Callable[[_Table], tuple[list[bytes], Key | None]]) -> int:
        """One chunk: low mark, wait, read (in one snapshot), store, high mark, progress.
        Returns the rows emitted."""
        rid = self.state.relation_id(self.pipeline.name, self.t.rel)
        chunk_id = self.store.new_chunk(self.info.snapshot_id, self.pipeline.name, rid,
                                        self.t.key_names)
        _emit(self.emitter, self.pipeline.name, chunk_id, "low")
        self.faults.hit("after_low")
        _wait_for_running(self.emitter, self.wait_s, self.long_running)
        with self.reader.transaction():
            rel = describe_relation(self.reader, self.table)
            if rel != self.t.rel:  # the table changed shape: read it as it is now
                self.t = _Table(self.reader, self.pipeline, self.table)
                rid = self.state.relation_id(self.pipeline.name, self.t.rel)
            messages, last = read(self.t)
        self.faults.hit("after_read")
        self.store.store_rows(chunk_id, rid, messages)
        _emit(self.emitter, self.pipeline.name, chunk_id, "high")
        self.faults.hit("after_high")
        self.store.progress(self.info.snapshot_id, chunk_id, last, len(messages))
        self.chunks += 1
        self.rows += len(messages)
        self.total += len(messages)
        return len(messages)

    def report(self, done: bool) -> SnapshotReport:
        return SnapshotReport(self.pipeline.name, self.table, self.kind, self.info.snapshot_id,
                              self.chunks, self.rows, self.total, self.info.rows_estimate, done,
                              self.resumed, time.monotonic() - self.started)


def backfill_table(state: StateStore, pipeline: PipelineSpec, table: str, *,
                   chunk_rows: int = DEFAULT_CHUNK_ROWS, resume: bool = True,
                   max_chunks: int | None = None, wait_s: float = 10.0,
                   on_chunk: Progress | None = None, faults: Faults = NO_FAULTS
                   ) -> SnapshotReport:
    """Emit every row of ``table`` in key order, ``chunk_rows`` per chunk.

    With ``resume`` an unfinished backfill of the table carries on after its last emitted key;
    without, a new one starts from the first key. ``max_chunks`` stops early (``done`` is then
    false and a later call resumes).
    """
    snap = _Snapshot(state, pipeline, table, "backfill", resume=resume, wait_s=wait_s,
                     faults=faults)
    last: Key | None = snap.info.last_key

    def read(t: _Table) -> tuple[list[bytes], Key | None]:
        nonlocal last
        if last is None:
            rows = t.fetch(snap.reader, t.first, (chunk_rows,))
        else:
            rows = t.fetch(snap.reader, t.after, (*last, chunk_rows))
        if rows:
            last = t.key(rows[-1])
        oid = t.rel.relation_id
        return [encode_update(oid, r) for r in rows], last

    with snap:
        while max_chunks is None or snap.chunks < max_chunks:
            if snap.chunk(read) < chunk_rows:
                snap.store.finish(snap.info.snapshot_id)
                report = snap.report(done=True)
                if on_chunk:
                    on_chunk(report)
                return report
            if on_chunk:
                on_chunk(snap.report(done=False))
        return snap.report(done=False)


def repair_keys(state: StateStore, pipeline: PipelineSpec, table: str, keys: Sequence[Key], *,
                chunk_rows: int = 1_000, wait_s: float = 10.0, kind: SnapshotKind = "repair",
                faults: Faults = NO_FAULTS) -> SnapshotReport:
    """Emit the current source row of each key (a key the source no longer has: a delete).

    ``kind`` tells reconciliation's repairs from refetches (:mod:`.refetch`) in the state."""
    snap = _Snapshot(state, pipeline, table, kind, resume=False, wait_s=wait_s, faults=faults)
    todo = list(dict.fromkeys(tuple(k) for k in keys))

    def read_some(part: list[Key]) -> Callable[[_Table], tuple[list[bytes], Key | None]]:
        def read(t: _Table) -> tuple[list[bytes], Key | None]:
            flat = [v for k in part for v in k]
            rows = t.fetch(snap.reader, t.by_keys(len(part)), flat)
            oid = t.rel.relation_id
            found = {t.key(r) for r in rows}
            out = [encode_update(oid, r) for r in rows]
            width = len(t.rel.columns)
            for k in part:
                if k not in found:
                    values: list[str | None] = [None] * width
                    for i, v in zip(t.key_idx, k, strict=True):
                        values[i] = v
                    out.append(encode_delete(oid, values))
            return out, part[-1] if part else None
        return read

    with snap:
        for at in range(0, len(todo), chunk_rows):
            snap.chunk(read_some(todo[at:at + chunk_rows]))
        snap.store.finish(snap.info.snapshot_id)
        return snap.report(done=True)
