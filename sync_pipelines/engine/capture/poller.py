"""Polling an API's list endpoints: records changed since the cursor, staged with the cursor.

Contract of :func:`poll` (a sensor tick of an ``http_poll`` pipeline): for each table it asks
the record type's ``list`` endpoint for records with ``updated_since = cursor − overlap``,
``limit = page_size``, following the API's ``next_cursor`` — the paging the reference CRM
implements: records ordered by ``(updated_at, id)``, so rows that share a change time are
never split in a way that loses one; a poll that stops inside a listing (``max_pages``, the
budget) leaves the next poll the API's cursor to go on from. Each page's records become rows
(:mod:`.records`); rows whose content hash equals the stored one for their key were staged
already and are dropped;
the rest are staged **in one state transaction with the new cursor and hashes**
(:mod:`..staging.poll`). Then the next page.

Failures: 429 and 503 are retried after their ``Retry-After`` (capped), 5xx, timeouts and
connection errors after a short backoff, a few times; then the poll stops with
:class:`PollError` and the cursor stays at the last staged page — the next poll goes on from
there (re-reading the overlap, dropping what it had). A record that does not fit its record
type stops the poll too, naming the table, the key and the field: staging the rest would lose
it silently. Nothing is staged when the pipeline's demand budget is full. Memory: one page.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx

from ..errors import SourceError, SpecError, Transient
from ..http_reads import read_client
from ..spec import HttpPollSourceSpec, PipelineSpec
from ..staging.poll import PollState
from ..staging.store import BatchInfo, StateStore
from .records import RecordError, RecordType

RETRIES = 4
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
MAX_RETRY_AFTER_S = 30.0


class PollError(SourceError, Transient):
    """The API could not be read (the message says which table, what it answered)."""


@dataclass
class PollReport:
    pipeline: str
    tables: dict[str, dict[str, int]] = field(default_factory=dict)
    batches: list[BatchInfo] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def staged(self) -> int:
        return sum(t["staged"] for t in self.tables.values())

    @property
    def more(self) -> bool:
        """Some table's listing stopped before its end: the next poll goes on with it."""
        return any(t["more"] for t in self.tables.values())


def _client(pipeline: PipelineSpec, source: HttpPollSourceSpec) -> httpx.Client:
    base = os.environ.get(source.base_url_env, "").strip()
    if not base:
        raise SpecError(f"pipeline {pipeline.name!r}: source: environment variable "
                        f"{source.base_url_env} is not set; set it to the API's base URL")
    headers = {"Accept": "application/json", "User-Agent": "sync-pipelines"}
    if source.auth.bearer_token_env:
        token = os.environ.get(source.auth.bearer_token_env, "").strip()
        if not token:
            raise SpecError(f"pipeline {pipeline.name!r}: source: environment variable "
                            f"{source.auth.bearer_token_env} is not set")
        headers["Authorization"] = f"Bearer {token}"
    return read_client(base_url=base.rstrip("/"), headers=headers,
                       timeout=source.timeout_seconds)


def _get(client: httpx.Client, where: str, path: str, params: dict[str, Any]) -> Any:
    """GET with retries of 429/5xx/timeouts; the parsed JSON page."""
    for attempt in range(RETRIES + 1):
        try:
            response = client.get(path, params=params)
        except httpx.HTTPError as err:
            problem = f"{type(err).__name__}"
            wait = min(2.0 ** attempt * 0.2, 5.0)
        else:
            if response.status_code == 200:
                try:
                    return response.json()
                except ValueError:
                    raise PollError(f"{where}: the API answered with something that is not "
                                    "JSON") from None
            problem = f"HTTP {response.status_code}"
            if response.status_code in (429, 503):
                header = response.headers.get("retry-after", "")
                wait = min(float(header), MAX_RETRY_AFTER_S) if header.replace(
                    ".", "", 1).isdigit() else 1.0
            elif response.status_code >= 500:
                wait = min(2.0 ** attempt * 0.2, 5.0)
            else:
                raise PollError(f"{where}: the API refused the list request ({problem}: "
                                f"{response.text[:200]})")
        if attempt < RETRIES:
            time.sleep(wait)
    raise PollError(f"{where}: the API kept failing ({problem}) after {RETRIES + 1} attempts")


def _hash(values: tuple[str | None, ...]) -> str:
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()[:32]


def poll(state: StateStore, pipeline: PipelineSpec, *, client: httpx.Client | None = None,
         force: bool = False) -> PollReport:
    """One poll of every table (skipped before ``interval_seconds`` since the last one, unless
    ``force``)."""
    started = time.monotonic()
    source = pipeline.source
    assert isinstance(source, HttpPollSourceSpec)
    report = PollReport(pipeline.name)
    state.ensure_pipeline(pipeline.name, pipeline.slot)
    own = client is None
    http = _client(pipeline, source) if client is None else client
    try:
        for table in pipeline.tables:
            rtype = RecordType(table, pipeline.record(table))
            memory = PollState(state, pipeline.name, table)
            last = memory.polled_at()
            # A listing left unfinished (page limit, budget) goes on at the next tick.
            if not force and last is not None and memory.listing()[1] is None and (
                    datetime.now(timezone.utc) - last).total_seconds() < source.interval_seconds:
                continue
            report.tables[table] = _poll_table(state, pipeline, source, rtype, memory, http,
                                               report)
    finally:
        if own:
            http.close()
    report.duration_s = time.monotonic() - started
    return report


def _poll_table(state: StateStore, pipeline: PipelineSpec, source: HttpPollSourceSpec,
                rtype: RecordType, memory: PollState, http: httpx.Client,
                report: PollReport) -> dict[str, int]:
    spec = rtype.spec
    assert spec.list is not None and spec.updated_at is not None
    path = spec.list.split()[1]
    where = f"pipeline {pipeline.name!r}, table {rtype.table} ({spec.list})"
    rid = state.relation_id(pipeline.name, rtype.relation)
    at_index = rtype.names.index(spec.updated_at)
    counts = {"pages": 0, "read": 0, "staged": 0, "unchanged": 0, "more": 0}
    cursor = memory.cursor()
    since, page_cursor = memory.listing()
    if page_cursor is None or since is None:  # a new listing, from a little before the cursor
        # Always with updated_since, from the epoch on the first poll: that asks for the change
        # feed ordered by (updated_at, key), deletes included, rather than a plain listing.
        since = cursor - timedelta(seconds=source.overlap_seconds) if cursor else EPOCH
        page_cursor = None
    params: dict[str, Any] = {"limit": source.page_size, "updated_since": since.isoformat()}
    if page_cursor is not None:
        params["cursor"] = page_cursor
    while counts["pages"] < source.max_pages:
        room = pipeline.policy.demand_budget - state.undelivered_changes(pipeline.name)
        if room <= 0:
            counts["more"] = 1
            break  # the budget is full: the next poll goes on from the cursor
        page = _get(http, where, path, params)
        items = page.get("items") if isinstance(page, dict) else None
        if not isinstance(items, list):
            raise PollError(f"{where}: expected {{\"items\": [...], \"next_cursor\": ...}}")
        counts["pages"] += 1
        counts["read"] += len(items)
        rows = []
        for item in items:
            try:
                rows.append(rtype.row(item))
            except RecordError as err:
                raise PollError(f"{where}: {err}") from None
        keys = [json.dumps(r.key) for r in rows]
        known = memory.hashes(keys)
        fresh: dict[str, tuple[Any, str, datetime | None]] = {}
        newest: datetime | None = None
        for r, k in zip(rows, keys, strict=True):
            at_text = r.values[at_index]
            at = datetime.fromisoformat(at_text) if at_text else None
            if at is not None and (newest is None or at > newest):
                newest = at
            h = _hash(r.values)
            if known.get(k) != h:
                fresh[k] = (r, h, at)  # the last version of a key within the page wins
        counts["unchanged"] += len(rows) - len(fresh)
        seen = [(k, h, at) for k, (_, h, at) in fresh.items()]
        nxt = page.get("next_cursor") or None

        def advance(seen: Any = seen, newest: Any = newest, nxt: Any = nxt) -> None:
            memory.advance(seen, newest, since=since, page_cursor=nxt)

        if fresh:
            report.batches.append(state.stage_records(
                pipeline.name, [(rid, r.op, r.message) for r, _, _ in fresh.values()],
                commit_ts=datetime.now(timezone.utc), also=advance))
            counts["staged"] += len(fresh)
        else:
            with state.conn.transaction():
                advance()
        if not nxt:
            break
        params = {**params, "cursor": nxt}
    else:
        counts["more"] = 1  # max_pages
    return counts
