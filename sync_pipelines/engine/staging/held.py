"""Held changes: the per-key retry queue, parked changes, dead letters and the delivery ledger.

For one (pipeline, target), a *key* (target table + key values) is **blocked** while it has
held changes or unresolved dead letters. Every change of a blocked key waits in ``held`` in
position order; only the first one (the *head*) has a ``next_attempt_at``. Other keys keep
flowing. This is invariant 3 (per-key order) across retries:

* a delivery that fails transiently holds the change (attempt 1, next attempt after a backoff)
  and parks every later change of its key, in this batch and in later ones;
* the retry sweep re-sends a due key's whole chain in order and releases what succeeds;
* after ``max_attempts``, or at once on a terminal error, the head and everything parked
  behind it become dead letters (with the reason) — nothing is dropped silently; later
  changes of the key park behind the dead letters until an operator redrives them (they go
  back in front, in order) or discards them (with a recorded reason).

The ledger records, by position and sub-request, requests an HTTP target accepted for changes
that did not complete (a key change whose DELETE was accepted but whose PUT failed), so a
re-send skips them; a crash before the ledger write re-sends with the same idempotency key,
which the API deduplicates.

Held rows keep the raw pgoutput message, so they outlive the staged batch they came from.
Every write that moves changes between states is one transaction.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from psycopg import sql

from ..spec import RetrySpec
from .store import Position, StateStore


def backoff(policy: RetrySpec, attempts: int, retry_after_s: float | None = None,
            rng: random.Random | None = None) -> float:
    """Seconds before attempt ``attempts + 1``: exponential, capped, with jitter; never
    sooner than a server's Retry-After."""
    base = min(policy.max_delay_seconds, policy.base_delay_seconds * 2 ** max(attempts - 1, 0))
    spread = (rng or random).uniform(-policy.jitter, policy.jitter)
    delay = max(0.0, base * (1 + spread))
    return max(delay, retry_after_s or 0.0)


@dataclass(frozen=True)
class HeldChange:
    """A staged change as it sits in ``held`` or ``dead_letter``."""

    key: str
    position: Position
    relation_id: int
    op: str
    message: bytes
    attempts: int = 0


@dataclass(frozen=True)
class Failure:
    """Why a key's head failed."""

    transient: bool
    status: int | None
    error: str
    retry_after_s: float | None = None


class HeldStore:
    """Queries and moves on held changes, dead letters and the ledger (state DB)."""

    def __init__(self, state: StateStore, pipeline: str, target: str) -> None:
        self.state = state
        self.conn = state.conn
        self.pipeline = pipeline
        self.target = target
        self._pt = (pipeline, target)

    def _q(self, text: str) -> sql.Composed:
        return self.state._q(text)

    # -- reads -------------------------------------------------------------------------------

    def any_held(self) -> bool:
        """Whether this target has any held change or unresolved dead letter."""
        row = self.conn.execute(self._q(
            "SELECT EXISTS (SELECT 1 FROM {schema}.held WHERE pipeline = %s AND target = %s) "
            "OR EXISTS (SELECT 1 FROM {schema}.dead_letter WHERE pipeline = %s AND target = %s "
            "AND resolved_at IS NULL)"), (*self._pt, *self._pt)).fetchone()
        return bool(row and row[0])

    def blocked(self, keys: Iterable[str]) -> set[str]:
        """Which of ``keys`` have held changes or unresolved dead letters."""
        wanted = list(set(keys))
        if not wanted:
            return set()
        # %b: a binary array parameter; the text form escapes every element (slow for 10k).
        rows = self.conn.execute(self._q(
            "SELECT key FROM {schema}.held WHERE pipeline = %s AND target = %s "
            "AND key = ANY(%b) UNION SELECT key FROM {schema}.dead_letter WHERE pipeline = %s "
            "AND target = %s AND resolved_at IS NULL AND key = ANY(%b)"),
            (*self._pt, wanted, *self._pt, wanted)).fetchall()
        return {r[0] for r in rows}

    def delivered_subs(self, first: Position, last: Position) -> set[tuple[int, int, int]]:
        """Ledger entries ``(commit_lsn, seq, sub)`` in a position range."""
        rows = self.conn.execute(self._q(
            "SELECT commit_lsn, seq, sub FROM {schema}.ledger WHERE pipeline = %s AND "
            "target = %s AND (commit_lsn, seq) >= (%s, %s) AND (commit_lsn, seq) <= (%s, %s)"),
            (*self._pt, first.commit_lsn, first.seq, last.commit_lsn, last.seq)).fetchall()
        return {(r[0], r[1], r[2]) for r in rows}

    def taken(self, first: Position, last: Position) -> set[Position]:
        """Positions in a range already held or dead-lettered for this target (a replay)."""
        rows = self.conn.execute(self._q(
            "SELECT commit_lsn, seq FROM {schema}.held WHERE pipeline = %s AND target = %s "
            "AND (commit_lsn, seq) BETWEEN (%s, %s) AND (%s, %s) UNION SELECT commit_lsn, seq "
            "FROM {schema}.dead_letter WHERE pipeline = %s AND target = %s AND resolved_at IS "
            "NULL AND (commit_lsn, seq) BETWEEN (%s, %s) AND (%s, %s)"),
            (*self._pt, first.commit_lsn, first.seq, last.commit_lsn, last.seq,
             *self._pt, first.commit_lsn, first.seq, last.commit_lsn, last.seq)).fetchall()
        return {Position(r[0], r[1]) for r in rows}

    def due_keys(self, now: datetime, limit: int) -> list[str]:
        """Keys whose head is due and that have no unresolved dead letters, oldest first."""
        rows = self.conn.execute(self._q(
            "SELECT h.key FROM {schema}.held h WHERE h.pipeline = %s AND h.target = %s "
            "AND h.next_attempt_at <= %s AND NOT EXISTS (SELECT 1 FROM {schema}.dead_letter d "
            "WHERE d.pipeline = h.pipeline AND d.target = h.target AND d.key = h.key "
            "AND d.resolved_at IS NULL) ORDER BY h.next_attempt_at LIMIT %s"),
            (*self._pt, now, limit)).fetchall()
        return [r[0] for r in rows]

    def chain(self, key: str) -> list[HeldChange]:
        rows = self.conn.execute(self._q(
            "SELECT key, commit_lsn, seq, relation_id, op, message, attempts FROM {schema}.held "
            "WHERE pipeline = %s AND target = %s AND key = %s ORDER BY commit_lsn, seq"),
            (*self._pt, key)).fetchall()
        return [HeldChange(r[0], Position(r[1], r[2]), r[3], r[4], bytes(r[5]), r[6])
                for r in rows]

    def counts(self) -> tuple[int, int]:
        """(held changes, unresolved dead letters)."""
        row = self.conn.execute(self._q(
            "SELECT (SELECT count(*) FROM {schema}.held WHERE pipeline = %s AND target = %s), "
            "(SELECT count(*) FROM {schema}.dead_letter WHERE pipeline = %s AND target = %s "
            "AND resolved_at IS NULL)"), (*self._pt, *self._pt)).fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def latest_dead_letters(self, limit: int = 20) -> list[dict[str, Any]]:
        rows = self.conn.execute(self._q(
            "SELECT dead_letter_id, key, commit_lsn, seq, op, attempts, last_status, reason, "
            "dead_at FROM {schema}.dead_letter WHERE pipeline = %s AND target = %s AND "
            "resolved_at IS NULL ORDER BY dead_letter_id DESC LIMIT %s"),
            (*self._pt, limit)).fetchall()
        names = ("id", "key", "commit_lsn", "seq", "op", "attempts", "last_status", "reason",
                 "dead_at")
        return [dict(zip(names, r, strict=True)) for r in rows]

    def latest_held(self, limit: int = 20) -> list[dict[str, Any]]:
        rows = self.conn.execute(self._q(
            "SELECT key, commit_lsn, seq, op, attempts, next_attempt_at, last_status, last_error, "
            "held_since FROM {schema}.held WHERE pipeline = %s AND target = %s "
            "ORDER BY held_since DESC, commit_lsn DESC, seq DESC LIMIT %s"),
            (*self._pt, limit)).fetchall()
        names = ("key", "commit_lsn", "seq", "op", "attempts", "next_attempt_at", "last_status",
                 "last_error", "held_since")
        return [dict(zip(names, r, strict=True)) for r in rows]

    # -- writes (call inside a transaction) --------------------------------------------------

    def record_delivered(self, subs: Iterable[tuple[Position, int, int | None]]) -> None:
        """Ledger rows for requests the target accepted: (position, sub, status)."""
        with self.conn.cursor() as cur, cur.copy(self._q(
                "COPY {schema}.ledger (pipeline, target, commit_lsn, seq, sub, status) "
                "FROM STDIN")) as copy:
            for pos, sub, status in subs:
                copy.write_row((*self._pt, pos.commit_lsn, pos.seq, sub, status))

    def hold(self, changes: Iterable[HeldChange], *, next_attempt_at: datetime | None = None,
             failure: Failure | None = None) -> None:
        """Add changes to ``held``; the first gets ``next_attempt_at``/``failure`` if given."""
        rows = [
            (*self._pt, c.key, c.position.commit_lsn, c.position.seq, c.relation_id, c.op,
             c.message, c.attempts, next_attempt_at if i == 0 else None,
             failure.status if i == 0 and failure else None,
             failure.error if i == 0 and failure else None)
            for i, c in enumerate(changes)
        ]
        # executemany pipelines the statements: an outage can park thousands per batch.
        with self.conn.cursor() as cur:
            cur.executemany(self._q(
                "INSERT INTO {schema}.held (pipeline, target, key, commit_lsn, seq, relation_id, "
                "op, message, attempts, next_attempt_at, last_status, last_error) VALUES "
                "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"), rows)

    def release(self, positions: Iterable[Position]) -> None:
        """Remove delivered changes from ``held``."""
        with self.conn.cursor() as cur:
            cur.executemany(self._q(
                "DELETE FROM {schema}.held WHERE pipeline = %s AND target = %s "
                "AND commit_lsn = %s AND seq = %s"),
                [(*self._pt, p.commit_lsn, p.seq) for p in positions])

    def reschedule(self, key: str, head: Position, attempts: int, at: datetime,
                   failure: Failure) -> None:
        self.conn.execute(self._q(
            "UPDATE {schema}.held SET attempts = %s, next_attempt_at = %s, last_status = %s, "
            "last_error = %s WHERE pipeline = %s AND target = %s AND commit_lsn = %s AND seq = %s"),
            (attempts, at, failure.status, failure.error, *self._pt, head.commit_lsn, head.seq))
        # Only the head is due; what waits behind it has no time of its own.
        self.conn.execute(self._q(
            "UPDATE {schema}.held SET next_attempt_at = NULL WHERE pipeline = %s AND target = %s "
            "AND key = %s AND (commit_lsn, seq) > (%s, %s)"),
            (*self._pt, key, head.commit_lsn, head.seq))

    def kill(self, changes: Sequence[HeldChange], failure: Failure, attempts: int) -> None:
        """Make ``changes`` (a head and what is parked behind it) dead letters."""
        for i, c in enumerate(changes):
            reason = failure.error if i == 0 else (
                f"parked behind dead letter at {changes[0].position}: {failure.error}")
            self.conn.execute(self._q(
                "INSERT INTO {schema}.dead_letter (pipeline, target, key, commit_lsn, seq, "
                "relation_id, op, message, attempts, last_status, reason) VALUES "
                "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (pipeline, target, "
                "commit_lsn, seq) WHERE resolved_at IS NULL DO NOTHING"),
                (*self._pt, c.key, c.position.commit_lsn, c.position.seq, c.relation_id, c.op,
                 c.message, attempts if i == 0 else 0, failure.status if i == 0 else None,
                 reason))
        self.release(c.position for c in changes)

    # -- operator actions --------------------------------------------------------------------

    def _select_dead(self, ids: Sequence[int] | None, key_like: str | None) -> sql.Composed:
        where = "pipeline = %s AND target = %s AND resolved_at IS NULL"
        if ids:
            where += " AND dead_letter_id = ANY(%s)"
        if key_like:
            where += " AND key LIKE %s"
        return self._q("SELECT dead_letter_id, key, commit_lsn, seq, relation_id, op, message "
                       "FROM {schema}.dead_letter WHERE " + where + " ORDER BY commit_lsn, seq")

    def _dead_params(self, ids: Sequence[int] | None, key_like: str | None) -> tuple[Any, ...]:
        params: tuple[Any, ...] = self._pt
        if ids:
            params += (list(ids),)
        if key_like:
            params += (key_like,)
        return params

    def redrive(self, *, ids: Sequence[int] | None = None, key_like: str | None = None,
                now: datetime | None = None) -> int:
        """Put dead letters back in front of their keys' queues, due now; returns how many."""
        now = now or datetime.now(timezone.utc)
        with self.conn.transaction():
            rows = self.conn.execute(self._select_dead(ids, key_like),
                                     self._dead_params(ids, key_like)).fetchall()
            keys = {r[1] for r in rows}
            for r in rows:
                self.hold([HeldChange(r[1], Position(r[2], r[3]), r[4], r[5], bytes(r[6]))])
            self._mark_resolved([r[0] for r in rows], "redriven")
            for k in keys:
                self._make_head_due(k, now)
        return len(rows)

    def discard(self, *, reason: str, ids: Sequence[int] | None = None,
                key_like: str | None = None, now: datetime | None = None) -> int:
        """Resolve dead letters without delivering them; what was parked behind flows on."""
        if not reason.strip():
            raise ValueError("discarding dead letters needs a reason")
        now = now or datetime.now(timezone.utc)
        with self.conn.transaction():
            rows = self.conn.execute(self._select_dead(ids, key_like),
                                     self._dead_params(ids, key_like)).fetchall()
            self._mark_resolved([r[0] for r in rows], f"discarded: {reason.strip()}")
            for k in {r[1] for r in rows}:
                self._make_head_due(k, now)
        return len(rows)

    def _mark_resolved(self, ids: list[int], resolution: str) -> None:
        self.conn.execute(self._q(
            "UPDATE {schema}.dead_letter SET resolved_at = now(), resolution = %s "
            "WHERE dead_letter_id = ANY(%s)"), (resolution, ids))

    def _make_head_due(self, key: str, now: datetime) -> None:
        self.conn.execute(self._q(
            "UPDATE {schema}.held SET next_attempt_at = %s WHERE (pipeline, target, commit_lsn, "
            "seq) = (SELECT pipeline, target, commit_lsn, seq FROM {schema}.held WHERE "
            "pipeline = %s AND target = %s AND key = %s ORDER BY commit_lsn, seq LIMIT 1)"),
            (now, *self._pt, key))

    def trim_ledger(self, through: Position) -> None:
        """Forget ledger rows of batches that can never be replayed again (keeping those of
        held changes, whose re-sends skip the requests already accepted)."""
        self.conn.execute(self._q(
            "DELETE FROM {schema}.ledger l WHERE l.pipeline = %s AND l.target = %s "
            "AND (l.commit_lsn, l.seq) <= (%s, %s) AND NOT EXISTS (SELECT 1 FROM "
            "{schema}.held h WHERE h.pipeline = l.pipeline AND h.target = l.target "
            "AND h.commit_lsn = l.commit_lsn AND h.seq = l.seq)"),
            (*self._pt, through.commit_lsn, through.seq))


def due_at(seconds: float, now: datetime | None = None) -> datetime:
    return (now or datetime.now(timezone.utc)) + timedelta(seconds=seconds)
