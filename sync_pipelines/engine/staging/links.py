"""A link's memory in the state DB: per key, the version both sides last agreed on; and the
conflict log.

**Base** (``link_base``): per (link, first-side table, key) the agreed row (None: deleted),
which change set it (direction and position: a window delivered again after a crash finds its
own decision and repeats it rather than deciding again), per side the WAL position up to which
that side's changes of the key were weighed in a decision (``superseded``: they arrive later,
through the other direction, and must not undo it), and the conflict the key is held for.
**Conflict log** (``link_conflict``): both versions, the base, the policy, the decision and
its reason, the result, when; ``held`` until an operator resolves it. One row per detection
(unique by direction, position and key), so a replayed window logs nothing twice.

**Echo ledger** (``link_echo``, links with an HTTP API side): per key, the digest of each
version the link wrote into the API, until it expires. A webhook or poll bringing back exactly
that version is the link's own write coming back and is dropped (the entry with it); any other
version is a real edit.

Bases, conflicts and echoes are written by :meth:`LinkStore.save` inside the delivery's
``record`` transaction — for a PostgreSQL target before it commits (see
:mod:`...links.resolver`), for an API after every request was answered.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb

from .store import StateStore


@dataclass
class BaseRow:
    table: str
    key: str
    row: dict[str, Any] | None
    set_by: str
    set_lsn: int
    set_seq: int
    superseded: dict[str, Any] = field(default_factory=dict)
    """Per side: up to which WAL position (a PostgreSQL side, an int) its changes were weighed,
    or (an API side, whose changes carry no position) the digests of the versions weighed."""
    held: int | None = None


@dataclass
class ConflictRecord:
    table: str
    key: str
    detected_by: str
    commit_lsn: int
    seq: int
    versions: dict[str, dict[str, Any] | None]
    base: dict[str, Any] | None
    had_base: bool
    policy: str
    decision: str
    reason: str
    result: dict[str, Any] | None
    status: str
    id: int | None = None
    created_at: datetime | None = None
    resolved_at: datetime | None = None
    resolution: str | None = None


def _conflict(r: Sequence[Any]) -> ConflictRecord:
    return ConflictRecord(*r)


class LinkStore:
    def __init__(self, state: StateStore, link: str) -> None:
        self.state = state
        self.conn = state.conn
        self.link = link

    def bases(self, table: str, keys: Iterable[str]) -> dict[str, BaseRow]:
        rows = self.conn.execute(self.state._q(
            "SELECT table_name, key, row_values, set_by, set_lsn, set_seq, superseded, held "
            "FROM {schema}.link_base WHERE link = %s AND table_name = %s AND key = ANY(%s)"),
            (self.link, table, list(keys))).fetchall()
        return {r[1]: BaseRow(r[0], r[1], r[2], r[3], r[4], r[5], dict(r[6] or {}), r[7])
                for r in rows}

    def save(self, bases: Iterable[BaseRow], conflicts: Iterable[ConflictRecord]) -> None:
        """Inside the caller's transaction: log the conflicts (a replayed one keeps its first
        id), then write the bases (a held base points at its conflict)."""
        ids: dict[tuple[str, str], int] = {}
        for c in conflicts:
            row = self.conn.execute(self.state._q(
                "INSERT INTO {schema}.link_conflict (link, table_name, key, detected_by, "
                "commit_lsn, seq, versions, base, had_base, policy, decision, reason, result, "
                "status) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (link, detected_by, commit_lsn, seq, table_name, key) DO UPDATE "
                "SET link = EXCLUDED.link RETURNING id"),
                (self.link, c.table, c.key, c.detected_by, c.commit_lsn, c.seq,
                 Jsonb(c.versions), Jsonb(c.base) if c.base is not None else None, c.had_base,
                 c.policy, c.decision, c.reason,
                 Jsonb(c.result) if c.result is not None else None, c.status)).fetchone()
            assert row is not None
            c.id = int(row[0])
            ids[(c.table, c.key)] = c.id
        rows = [(b.table, b.key, None if b.row is None else json.dumps(b.row), b.set_by,
                 b.set_lsn, b.set_seq, json.dumps(b.superseded),
                 ids.get((b.table, b.key), b.held) if b.held is not None else None)
                for b in bases]
        if not rows:
            return
        # COPY into a temp table, then one upsert: a window writes a base per key it moved.
        self.conn.execute("CREATE TEMP TABLE IF NOT EXISTS _sync_link_base (table_name text, "
                          "key text, row_values jsonb, set_by text, set_lsn bigint, "
                          "set_seq integer, superseded jsonb, held bigint) "
                          "ON COMMIT DELETE ROWS")
        with self.conn.cursor() as cur, cur.copy(
                "COPY _sync_link_base FROM STDIN") as copy:
            for r in rows:
                copy.write_row(r)
        self.conn.execute(self.state._q(
            "INSERT INTO {schema}.link_base AS b (link, table_name, key, row_values, set_by, "
            "set_lsn, set_seq, superseded, held) SELECT %s, table_name, key, row_values, "
            "set_by, set_lsn, set_seq, superseded, held FROM _sync_link_base "
            "ON CONFLICT (link, table_name, key) DO UPDATE SET row_values = "
            "EXCLUDED.row_values, set_by = EXCLUDED.set_by, set_lsn = EXCLUDED.set_lsn, "
            "set_seq = EXCLUDED.set_seq, superseded = EXCLUDED.superseded, "
            "held = EXCLUDED.held, updated_at = now()"), (self.link,))
        self.conn.execute("TRUNCATE _sync_link_base")  # several saves in one transaction

    def echoes(self, table: str, keys: Iterable[str]) -> dict[str, set[str]]:
        """Unexpired digests of what the link wrote into the API, by key."""
        out: dict[str, set[str]] = {}
        for key, digest in self.conn.execute(self.state._q(
                "SELECT key, hash FROM {schema}.link_echo WHERE link = %s AND table_name = %s "
                "AND key = ANY(%s) AND expires_at > now()"),
                (self.link, table, list(keys))).fetchall():
            out.setdefault(key, set()).add(digest)
        return out

    def save_echoes(self, written: Iterable[tuple[str, str, str]],
                    consumed: Iterable[tuple[str, str, str]], ttl_seconds: float) -> None:
        """Inside the caller's transaction: remember ``(table, key, digest)`` written, forget
        those that came back, and drop expired ones."""
        written, consumed = list(written), list(consumed)
        if written:
            with self.conn.cursor() as cur:
                cur.executemany(self.state._q(
                    "INSERT INTO {schema}.link_echo (link, table_name, key, hash, expires_at) "
                    "VALUES (%s, %s, %s, %s, now() + make_interval(secs => %s)) "
                    "ON CONFLICT (link, table_name, key, hash) DO UPDATE "
                    "SET expires_at = EXCLUDED.expires_at"),
                    [(self.link, t, k, h, ttl_seconds) for t, k, h in written])
        if consumed:
            with self.conn.cursor() as cur:
                cur.executemany(self.state._q(
                    "DELETE FROM {schema}.link_echo WHERE link = %s AND table_name = %s "
                    "AND key = %s AND hash = %s"),
                    [(self.link, t, k, h) for t, k, h in consumed])
        if written or consumed:
            self.conn.execute(self.state._q(
                "DELETE FROM {schema}.link_echo WHERE link = %s AND expires_at <= now()"),
                (self.link,))

    def absorb(self, conflict_id: int, side: str, version: dict[str, Any] | None) -> None:
        """A change of a held key: its side's version in the conflict becomes this one (the
        operator decides between the latest of both)."""
        self.conn.execute(self.state._q(
            "UPDATE {schema}.link_conflict SET versions = jsonb_set(versions, ARRAY[%s], "
            "%s) WHERE link = %s AND id = %s AND status = 'held'"),
            (side, Jsonb(version), self.link, conflict_id))

    def conflict(self, conflict_id: int) -> ConflictRecord | None:
        row = self.conn.execute(self.state._q(
            "SELECT table_name, key, detected_by, commit_lsn, seq, versions, base, had_base, "
            "policy, decision, reason, result, status, id, created_at, resolved_at, resolution "
            "FROM {schema}.link_conflict WHERE link = %s AND id = %s"),
            (self.link, conflict_id)).fetchone()
        return _conflict(row) if row else None

    def conflicts(self, *, status: str | None = None, detected_by: str | None = None,
                  limit: int = 50) -> list[ConflictRecord]:
        rows = self.conn.execute(self.state._q(
            "SELECT table_name, key, detected_by, commit_lsn, seq, versions, base, had_base, "
            "policy, decision, reason, result, status, id, created_at, resolved_at, resolution "
            "FROM {schema}.link_conflict WHERE link = %s "
            "AND (%s::text IS NULL OR status = %s) AND (%s::text IS NULL OR detected_by = %s) "
            "ORDER BY id DESC LIMIT %s"),
            (self.link, status, status, detected_by, detected_by, limit)).fetchall()
        return [_conflict(r) for r in rows]

    def counts(self, since_hours: float = 24.0, detected_by: str | None = None
               ) -> dict[str, int]:
        """Conflicts logged in the last ``since_hours`` by status (of one direction, if
        ``detected_by``), and every key held now (``held_total``, either direction)."""
        rows = self.conn.execute(self.state._q(
            "SELECT status, count(*) FILTER (WHERE created_at > now() - make_interval("
            "secs => %s) AND (%s::text IS NULL OR detected_by = %s)), count(*) "
            "FROM {schema}.link_conflict WHERE link = %s GROUP BY status"),
            (since_hours * 3600, detected_by, detected_by, self.link)).fetchall()
        out = {"decided": 0, "held": 0, "resolved": 0, "held_total": 0}
        for status, recent, total in rows:
            out[status] = int(recent)
            if status == "held":
                out["held_total"] = int(total)
        return out

    def mark_resolved(self, conflict_id: int, result: dict[str, Any] | None,
                      resolution: str) -> None:
        self.conn.execute(self.state._q(
            "UPDATE {schema}.link_conflict SET status = 'resolved', result = %s, "
            "resolution = %s, resolved_at = now() WHERE link = %s AND id = %s"),
            (Jsonb(result) if result is not None else None, resolution, self.link, conflict_id))


_PLAIN = re.compile(r'[^"\\\x00-\x1f\x7f-\uffff]*')


def key_text(key: Sequence[Any]) -> str:
    """A key as stored: the JSON array of its text values (written directly when no value
    needs escaping, the common case: this runs for every change of a link)."""
    texts = [None if v is None else str(v) for v in key]
    if all(t is not None and _PLAIN.fullmatch(t) for t in texts):
        return '["' + '", "'.join(texts) + '"]'  # type: ignore[arg-type]
    return json.dumps(texts)
