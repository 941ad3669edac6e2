"""Refetch: re-read source rows whose values the stream did not carry, never write half rows.

pgoutput leaves out a large (TOASTed) value that an UPDATE did not touch: it sends it as
"unchanged" (``'u'``), and the mapped upsert is *partial*. A target that has the row keeps its
own copy of the value (the Postgres sink updates only the columns a partial row carries). When
the target has no copy — the row was never delivered because a backfill chunk dropped the key
in favour of this very change, an UPDATE moved the row to a new key, its insert became a dead
letter or was discarded — or when the target is an HTTP API, which cannot merge a partial body
into a record, there is nothing to take the value from. Then the sink writes nothing for that
key and delivery records a **refetch request** here: the source table, the key and the
position of the change that asked for it.

The puller takes pending requests at the start of each pull (:func:`refetch_pending`) and
re-reads those rows through the same watermarked snapshot path as backfill and repair
(:func:`.backfill.repair_keys`, kind ``refetch``). The re-read rows are placed in the stream at
the chunk's high watermark, after the change that asked for them, and reach every target as
ordinary full changes, in per-key order. A key the source no longer has becomes a delete. A key
changed again between the watermarks is left to that change (which asks again if it is partial
too), so a hot key is settled once it is quiet.

Crash behaviour: a request is written before the target commits the change that asked for it
(Postgres: in the sink's ``before_commit``; HTTP: in the window's state transaction), and is
deleted only after the re-read's high watermark is in the WAL. A crash in between re-reads the
row once more, which is harmless: a re-read row is the current source row, an idempotent upsert.
Requests never merge: each is keyed by the position of the change that made it, so a request
made while an earlier one for the same key is being read is not lost with it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from psycopg import sql

from .backfill import repair_keys
from .errors import SourceError
from .faults import NO_FAULTS, Faults
from .snapshots import SnapshotStore
from .spec import PipelineSpec
from .state import Position, StateStore

Key = tuple[str | None, ...]

REFETCH_LIMIT = 5_000
"""Requests taken by one pull; the rest wait for the next one."""

REFETCH_WAIT_S = 5.0
"""How long the re-read waits for transactions still running at its low watermark (see
:func:`.backfill._wait_for_running`); shorter than a backfill's, as it runs inside a sensor
tick."""


@dataclass(frozen=True)
class Request:
    """One row to re-read: ``key`` holds the source key values as text, in key order."""

    target: str
    position: Position
    table: str
    key: Key
    reason: str


@dataclass(frozen=True)
class RefetchReport:
    """What one pull's refetch did."""

    requests: int = 0
    rows: int = 0
    tables: tuple[str, ...] = ()
    pending: int = 0
    """Requests still waiting after this pull (more than :data:`REFETCH_LIMIT`, or an error)."""
    error: str | None = None
    duration_s: float = 0.0


class RefetchStore:
    """The ``refetch`` table of the state DB."""

    def __init__(self, state: StateStore, pipeline: str) -> None:
        self.state = state
        self.conn = state.conn
        self.pipeline = pipeline

    def _q(self, text: str) -> sql.Composed:
        return self.state._q(text)

    def request(self, requests: Iterable[Request]) -> int:
        """Record requests (idempotent: a replay of the same change asks nothing new)."""
        rows = [(self.pipeline, r.target, r.position.commit_lsn, r.position.seq, r.table,
                 list(r.key), r.reason) for r in requests]
        if rows:
            with self.conn.cursor() as cur:
                cur.executemany(self._q(
                    "INSERT INTO {schema}.refetch (pipeline, target, commit_lsn, seq, "
                    "table_name, key, reason) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT DO NOTHING"), rows)
        return len(rows)

    def pending(self, limit: int = REFETCH_LIMIT) -> list[Request]:
        rows = self.conn.execute(self._q(
            "SELECT target, commit_lsn, seq, table_name, key, reason FROM {schema}.refetch "
            "WHERE pipeline = %s ORDER BY requested_at, commit_lsn, seq LIMIT %s"),
            (self.pipeline, limit)).fetchall()
        return [Request(r[0], Position(r[1], r[2]), r[3], tuple(r[4]), r[5]) for r in rows]

    def count(self) -> int:
        row = self.conn.execute(self._q(
            "SELECT count(*) FROM {schema}.refetch WHERE pipeline = %s"),
            (self.pipeline,)).fetchone()
        return int(row[0]) if row else 0

    def forget(self, requests: Sequence[Request]) -> None:
        """Delete requests whose rows have been re-read (their high watermark is written)."""
        with self.conn.cursor() as cur:
            cur.executemany(self._q(
                "DELETE FROM {schema}.refetch WHERE pipeline = %s AND target = %s "
                "AND commit_lsn = %s AND seq = %s AND table_name = %s AND key = %s"),
                [(self.pipeline, r.target, r.position.commit_lsn, r.position.seq, r.table,
                  list(r.key)) for r in requests])


def refetch_pending(state: StateStore, pipeline: PipelineSpec, *, limit: int = REFETCH_LIMIT,
                    wait_s: float = REFETCH_WAIT_S, faults: Faults = NO_FAULTS
                    ) -> RefetchReport:
    """Re-read the rows of pending requests into the stream (one snapshot per table).

    A source error (the user may not write watermarks, the source is down) is returned in the
    report, not raised: the requests stay and the next pull tries again, and the pull itself
    goes on — a stuck re-read must not stop the stream."""
    started = time.monotonic()
    store = RefetchStore(state, pipeline.name)
    SnapshotStore(state).abandon_dead_chunks(pipeline.name)
    todo = store.pending(limit)
    if not todo:
        return RefetchReport()
    by_table: dict[str, list[Request]] = {}
    for r in todo:
        by_table.setdefault(r.table, []).append(r)
    rows, done, error = 0, [], None
    for table, requests in by_table.items():
        if table not in pipeline.tables:  # the table left the spec: nothing to deliver it to
            done.extend(requests)
            continue
        try:
            report = repair_keys(state, pipeline, table, [r.key for r in requests],
                                 kind="refetch", wait_s=wait_s, faults=faults)
        except SourceError as err:
            error = f"re-reading {table}: {err}"
            break
        rows += report.rows
        done.extend(requests)
    store.forget(done)
    return RefetchReport(len(done), rows, tuple(by_table), store.count(), error,
                         time.monotonic() - started)
