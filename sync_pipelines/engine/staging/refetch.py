"""Refetch requests: rows delivery could not complete because a change did not carry every
value, to be re-read from the source (the ``refetch`` table; :mod:`..backfill.refetch` does
the re-reading and says why).

A request names the source table, the key (source key values as text) and the position of the
change that asked for it. Requests never merge: two changes of one key make two requests, so one
made while an earlier one is being re-read is not deleted with it. Recording is idempotent (a
replay of the same change asks nothing new); a request is deleted only once its row has been
re-read, so a crash in between re-reads it again, which is harmless.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from psycopg import sql

from ..wire.change import Position
from .store import StateStore

Key = tuple[str | None, ...]


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

    def pending(self, limit: int) -> list[Request]:
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
