"""Webhook receipts, and what became of one staged change at each target.

A **receipt** is the dedup record of a webhook: ``webhook-id`` unique per pipeline, with the
correlation id handed to the sender and the position its change was staged at. It is written
in the same state transaction as the change (:meth:`~.store.StateStore.stage_records`'s
``also``), so a webhook is either acknowledged with its change durably staged, or neither —
and a retried ``webhook-id`` finds the first receipt and stages nothing.

:func:`change_outcome` answers, for one staged position and each target: ``staged`` (not
delivered yet), ``delivered`` (with when and in which batch), ``held`` for retry (attempts,
next try, last error), ``dead_letter`` (reason), ``discarded`` (a dead letter an operator
discarded, with the reason). Read-only.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..wire.change import Position
from .store import StateStore


@dataclass(frozen=True)
class Receipt:
    webhook_id: str
    correlation_id: str
    table: str
    position: Position
    batch_id: int
    received_at: datetime | None = None


KEEP_DAYS = 7
"""How long a ``webhook-id`` is remembered: longer than a Standard Webhooks sender's retry
schedule (about a day and a half for Svix's), so a late retry is still a duplicate."""


@dataclass(frozen=True)
class Received:
    """Webhooks staged in batches after a given one (what a sensor tick reports)."""

    webhooks: int
    first_batch: int | None
    last_batch: int | None
    tables: dict[str, int]


class ReceiptStore:
    def __init__(self, state: StateStore, pipeline: str) -> None:
        self.state = state
        self.conn = state.conn
        self.pipeline = pipeline

    def find(self, webhook_ids: Sequence[str]) -> dict[str, Receipt]:
        rows = self.conn.execute(self.state._q(
            "SELECT webhook_id, correlation_id::text, table_name, commit_lsn, seq, batch_id, "
            "received_at FROM {schema}.webhook_receipt WHERE pipeline = %s "
            "AND webhook_id = ANY(%s)"), (self.pipeline, list(webhook_ids))).fetchall()
        return {r[0]: Receipt(r[0], r[1], r[2], Position(r[3], r[4]), r[5], r[6]) for r in rows}

    def by_correlation(self, correlation_id: str) -> Receipt | None:
        try:
            uuid.UUID(correlation_id)
        except ValueError:
            return None
        row = self.conn.execute(self.state._q(
            "SELECT webhook_id, correlation_id::text, table_name, commit_lsn, seq, batch_id, "
            "received_at FROM {schema}.webhook_receipt WHERE pipeline = %s "
            "AND correlation_id = %s"), (self.pipeline, correlation_id)).fetchone()
        return Receipt(row[0], row[1], row[2], Position(row[3], row[4]), row[5],
                       row[6]) if row else None

    def received_since(self, after_batch: int) -> Received:
        rows = self.conn.execute(self.state._q(
            "SELECT table_name, count(*), min(batch_id), max(batch_id) FROM "
            "{schema}.webhook_receipt WHERE pipeline = %s AND batch_id > %s "
            "GROUP BY table_name ORDER BY table_name"), (self.pipeline, after_batch)).fetchall()
        if not rows:
            return Received(0, None, None, {})
        return Received(sum(r[1] for r in rows), min(r[2] for r in rows),
                        max(r[3] for r in rows), {r[0]: r[1] for r in rows})

    def forget_old(self) -> int:
        """Drop receipts older than :data:`KEEP_DAYS` (a retry after that is staged again)."""
        return self.conn.execute(self.state._q(
            "DELETE FROM {schema}.webhook_receipt WHERE pipeline = %s AND received_at < "
            "now() - make_interval(days => %s)"), (self.pipeline, KEEP_DAYS)).rowcount

    def insert_staged(self, receipts: Sequence[tuple[str, str, str, int]]) -> None:
        """Inside :meth:`~.store.StateStore.stage_records`'s transaction, right after its rows:
        ``(webhook_id, correlation_id, table, seq)`` each, at the batch just staged (read back
        from the pipeline row, so this can be pipelined behind the staging statement)."""
        self.conn.execute(self.state._q(
            "INSERT INTO {schema}.webhook_receipt (pipeline, webhook_id, correlation_id, "
            "table_name, commit_lsn, seq, batch_id) SELECT p.pipeline, u.wid, u.corr::uuid, "
            "u.tbl, p.staged_lsn, u.seq, p.next_batch - 1 FROM {schema}.pipeline p, "
            "unnest(%s::text[], %s::text[], %s::text[], %s::int4[]) AS u(wid, corr, tbl, seq) "
            "WHERE p.pipeline = %s"),
            ([r[0] for r in receipts], [r[1] for r in receipts], [r[2] for r in receipts],
             [r[3] for r in receipts], self.pipeline))


def change_outcome(state: StateStore, pipeline: str, targets: Sequence[str],
                   position: Position, batch_id: int) -> dict[str, dict[str, Any]]:
    """What became of the change at ``position`` (staged in ``batch_id``) at each target."""
    q = state._q
    pos = (position.commit_lsn, position.seq)
    out: dict[str, dict[str, Any]] = {}
    for target in targets:
        pt = (pipeline, target)
        held = state.conn.execute(q(
            "SELECT attempts, next_attempt_at, last_status, last_error FROM {schema}.held "
            "WHERE pipeline = %s AND target = %s AND commit_lsn = %s AND seq = %s"),
            (*pt, *pos)).fetchone()
        if held is not None:
            out[target] = {"status": "held", "attempts": held[0],
                           "next_attempt_at": _iso(held[1]), "last_status": held[2],
                           "last_error": held[3]}
            continue
        dead = state.conn.execute(q(
            "SELECT reason, resolved_at, resolution FROM {schema}.dead_letter WHERE "
            "pipeline = %s AND target = %s AND commit_lsn = %s AND seq = %s "
            "ORDER BY dead_letter_id DESC LIMIT 1"), (*pt, *pos)).fetchone()
        if dead is not None and dead[1] is None:
            out[target] = {"status": "dead_letter", "reason": dead[0]}
            continue
        if dead is not None and str(dead[2] or "").startswith("discarded"):
            out[target] = {"status": "discarded", "reason": dead[2], "at": _iso(dead[1])}
            continue
        if state.delivered(pipeline, target) >= position:
            logged = state.conn.execute(q(
                "SELECT delivered_at FROM {schema}.delivery_log WHERE pipeline = %s "
                "AND target = %s AND batch_id = %s"), (*pt, batch_id)).fetchone()
            out[target] = {"status": "delivered", "batch": batch_id,
                           "at": _iso(logged[0]) if logged else None}
            continue
        out[target] = {"status": "staged", "batch": batch_id}
    return out


def _iso(v: Any) -> str | None:
    return v.isoformat() if isinstance(v, datetime) else None
