"""The poller's memory: a cursor per polled table, and a content hash per key.

The **cursor** is the newest change time a poll has staged through; the next poll asks the API
for records changed since ``cursor − overlap``, so rows that share the last change time, or
were written late under an older one, are read again rather than missed. A poll that stops
inside a listing (its page limit, the demand budget) keeps the API's page cursor — the API
pages by ``(updated_at, id)`` — and the next poll goes on from there, so a change time shared
by more rows than one poll reads cannot stall the cursor. The **hash** per key
is what makes the re-read harmless: a record whose content hash equals the one stored for its
key was staged already and is dropped. Both move only inside the transaction that stages the
page's rows (:meth:`~.store.StateStore.stage_records`'s ``also``), so a poll that dies midway
leaves them where the last staged page put them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from .store import StateStore


class PollState:
    def __init__(self, state: StateStore, pipeline: str, table: str) -> None:
        self.state = state
        self.conn = state.conn
        self.key = (pipeline, table)

    def cursor(self) -> datetime | None:
        row = self.conn.execute(self.state._q(
            "SELECT cursor_at FROM {schema}.poll_cursor WHERE pipeline = %s AND "
            "table_name = %s"), self.key).fetchone()
        return row[0] if row else None

    def listing(self) -> tuple[datetime | None, str | None]:
        """A listing a poll stopped in the middle of (its ``updated_since`` and the API's
        cursor after the last staged page), to go on with; ``(None, None)`` if none."""
        row = self.conn.execute(self.state._q(
            "SELECT listing_since, page_cursor FROM {schema}.poll_cursor WHERE pipeline = %s "
            "AND table_name = %s"), self.key).fetchone()
        return (row[0], row[1]) if row else (None, None)

    def polled_at(self) -> datetime | None:
        row = self.conn.execute(self.state._q(
            "SELECT polled_at FROM {schema}.poll_cursor WHERE pipeline = %s AND "
            "table_name = %s"), self.key).fetchone()
        return row[0] if row else None

    def hashes(self, keys: Sequence[str]) -> dict[str, str]:
        rows = self.conn.execute(self.state._q(
            "SELECT key, hash FROM {schema}.poll_seen WHERE pipeline = %s AND table_name = %s "
            "AND key = ANY(%s)"), (*self.key, list(keys))).fetchall()
        return {r[0]: r[1] for r in rows}

    def advance(self, seen: Sequence[tuple[str, str, datetime | None]],
                cursor: datetime | None, *, since: datetime | None = None,
                page_cursor: str | None = None) -> None:
        """Inside the staging transaction: remember what was staged, move the cursor forward
        (never back), note where in an unfinished listing the next poll goes on (``since``
        and the API's ``page_cursor``; None when the listing ended), note the poll time."""
        if seen:
            with self.conn.cursor() as cur:
                cur.executemany(self.state._q(
                    "INSERT INTO {schema}.poll_seen (pipeline, table_name, key, hash, "
                    "changed_at) VALUES (%s, %s, %s, %s, %s) ON CONFLICT (pipeline, "
                    "table_name, key) DO UPDATE SET hash = EXCLUDED.hash, "
                    "changed_at = EXCLUDED.changed_at"),
                    [(*self.key, k, h, at) for k, h, at in seen])
        self.conn.execute(self.state._q(
            "INSERT INTO {schema}.poll_cursor AS c (pipeline, table_name, cursor_at, "
            "listing_since, page_cursor, polled_at) VALUES (%s, %s, %s, %s, %s, now()) "
            "ON CONFLICT (pipeline, table_name) DO UPDATE SET cursor_at = "
            "greatest(c.cursor_at, EXCLUDED.cursor_at), listing_since = EXCLUDED.listing_since, "
            "page_cursor = EXCLUDED.page_cursor, polled_at = now()"),
            (*self.key, cursor, since if page_cursor else None, page_cursor))
