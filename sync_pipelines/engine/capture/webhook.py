"""Webhook intake: verify, parse, stage with the dedup record, and say what became of a change.

Contract of :class:`WebhookIntake` (one per pipeline, in the receiver process):

* :meth:`verify` checks a Standard Webhooks signature (``webhook-id``, ``webhook-timestamp``,
  ``webhook-signature`` = ``v1,<base64 HMAC-SHA256 of "id.timestamp.body">`` entries) with the
  reference library (constant-time comparison, ±5 minutes), against every secret in the
  pipeline's ``secret_env`` (several while a secret is rotated); anything wrong is a
  :class:`Unauthorized` that never carries a secret;
* :meth:`parse` turns the body into one staged row of the record type its event type names
  (:mod:`.records`); :class:`BadRequest` for what is not JSON, :class:`Unprocessable` (naming
  the field) for JSON the spec does not accept;
* :meth:`submit` stages the row **and its receipt in one state transaction** before it returns,
  so an acknowledged webhook is durably staged, and a retried ``webhook-id`` stages nothing
  and returns the first receipt. Concurrent submissions are grouped: one writer stages all that
  are waiting as one batch (one transaction, one commit: a group commit), which is what lets
  the receiver keep up with many senders. When the pipeline's staged-but-undelivered changes
  reach its demand budget, new webhook ids are refused with :class:`Busy` (the sender retries
  after ``Retry-After``) and nothing is staged;
* :meth:`outcome` reads what became of a receipt's change at each target.

A crash before the staging transaction commits leaves nothing (the sender's retry stages it);
after it, the receipt makes the retry a duplicate. Never logs a secret or a body.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import os
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import psycopg
from standardwebhooks import Webhook

from ..errors import SpecError, SyncError
from ..spec import PipelineSpec, SyncSpec, WebhookSourceSpec
from ..staging.receipts import Receipt, ReceiptStore, change_outcome
from ..staging.store import StateStore
from ..wire.change import Position
from .records import RecordError, RecordType, Row, get_path

MAX_ID_LENGTH = 256
GROUP_MAX = 500
"""Most webhooks staged by one transaction."""
LINGER_S = 0.002
"""How long the writer waits for more requests before a commit, when the last group had
several (an idle pipeline's single webhook is staged at once)."""
RECOUNT_S = 0.5
"""How often the demand budget's room is counted again (see ``_budget_room``)."""
WRITERS = 1
"""Staging loops, each with its own connection. More than one keeps a group sent while the
last commits, but splits the arrivals into smaller groups: on 2 cores, 2 writers measured no
faster (bench_ingest: 1,411 vs 1,951 webhooks/s, noisy) at more CPU per request."""


class IntakeError(Exception):
    status = 400

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unauthorized(IntakeError):
    status = 401


class BadRequest(IntakeError):
    status = 400


class Unprocessable(IntakeError):
    status = 422


class Busy(IntakeError):
    status = 429


class Unavailable(IntakeError):
    status = 503


@dataclass(frozen=True)
class Accepted:
    receipt: Receipt
    duplicate: bool


@dataclass
class _Pending:
    webhook_id: str
    row: Row
    future: asyncio.Future[Accepted]


class WebhookIntake:
    """The receiving side of one webhook pipeline."""

    def __init__(self, spec: SyncSpec, pipeline: PipelineSpec) -> None:
        if not isinstance(pipeline.source, WebhookSourceSpec):
            raise SpecError(f"pipeline {pipeline.name!r} is not a webhook pipeline")
        self.spec = spec
        self.pipeline = pipeline
        self.source: WebhookSourceSpec = pipeline.source
        secrets = os.environ.get(self.source.secret_env, "").split()
        if not secrets:
            raise SpecError(f"pipeline {pipeline.name!r}: source: environment variable "
                            f"{self.source.secret_env} is not set; set it to the signing "
                            "secret(s), whsec_...")
        try:
            self._verifiers = [Webhook(s) for s in secrets]
        except Exception:  # noqa: BLE001 - the library raises several kinds; never echo the value
            raise SpecError(f"pipeline {pipeline.name!r}: source: ${self.source.secret_env} "
                            "does not hold whsec_<base64> secrets") from None
        self.types = {t: RecordType(t, pipeline.record(t)) for t in pipeline.tables}
        self._queue: asyncio.Queue[_Pending] | None = None
        self._writers: list[asyncio.Task[None]] = []
        self._states: dict[int, StateStore] = {}
        self._room_lock = threading.Lock()
        self._room = 0  # of the demand budget, as last counted minus what was staged since
        self._room_at = float("-inf")

    # -- verify and parse (no I/O) -----------------------------------------------------------

    def verify(self, body: bytes, headers: Mapping[str, str]) -> str:
        """The verified ``webhook-id``; raises :class:`Unauthorized` or :class:`BadRequest`."""
        wanted = {k: headers.get(k) for k in ("webhook-id", "webhook-timestamp",
                                              "webhook-signature")}
        missing = [k for k, v in wanted.items() if not v]
        if missing:
            raise Unauthorized(f"missing header(s): {', '.join(missing)} (Standard Webhooks)")
        webhook_id = str(wanted["webhook-id"])
        if len(webhook_id) > MAX_ID_LENGTH:
            raise BadRequest(f"webhook-id is longer than {MAX_ID_LENGTH} characters")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("the body is not UTF-8") from None
        why = "no signature matches"
        for verifier in self._verifiers:
            try:
                verifier.verify(text, {k: str(v) for k, v in wanted.items()}, json_parse=False)
                return webhook_id
            except Exception as err:  # noqa: BLE001 - malformed headers raise all sorts
                message = str(err)
                if "too old" in message or "too new" in message:
                    why = (f"webhook-timestamp is too {message.split()[-1]} (more than 5 "
                           "minutes from now)")
                elif "Invalid Signature Headers" in message:
                    why = "webhook-timestamp is not a unix time"
        raise Unauthorized(f"signature rejected: {why}")

    def parse(self, body: bytes) -> Row | None:
        """The staged row of a verified body; None for an event type the spec ignores."""
        try:
            event = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("the body is not valid JSON") from None
        if not isinstance(event, dict):
            raise Unprocessable("the body must be a JSON object")
        event_type = get_path(event, self.source.type_field)
        if event_type is not None and not isinstance(event_type, str):
            raise Unprocessable(f"{self.source.type_field!r} must be a string")
        for rtype in self.types.values():
            if rtype.spec.is_event(event_type):
                record = get_path(event, rtype.spec.data) if rtype.spec.data else event
                try:
                    return rtype.row(record, event_type)
                except RecordError as err:
                    raise Unprocessable(str(err)) from None
        if isinstance(event_type, str) and any(fnmatch.fnmatchcase(event_type, p)
                                               for p in self.source.ignore_event_types):
            return None
        raise Unprocessable(f"no record type takes event type {event_type!r} (tables: "
                            f"{', '.join(self.types)})")

    # -- staging (a writer task groups waiting submissions) ----------------------------------

    async def submit(self, webhook_id: str, row: Row) -> Accepted:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._writers = [asyncio.ensure_future(self._write_loop(w)) for w in range(WRITERS)]
        future: asyncio.Future[Accepted] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(webhook_id, row, future))
        return await future

    async def _write_loop(self, writer: int) -> None:
        """One of :data:`WRITERS` loops, each with its own connection: while one group's
        commit is in flight the next group is already sent, and waits in PostgreSQL for the
        pipeline row's lock — so groups commit back to back, in position order."""
        assert self._queue is not None
        busy = False
        while True:
            group = [await self._queue.get()]
            if busy:
                # Under load, answers go out together and the senders' next requests come back
                # together: waiting a moment gathers them into this group instead of staging
                # the first alone and the rest one commit later.
                await asyncio.sleep(LINGER_S)
            while not self._queue.empty() and len(group) < GROUP_MAX:
                group.append(self._queue.get_nowait())
            busy = len(group) > 1
            try:
                results = await asyncio.to_thread(self._stage_group_retrying, group, writer)
            except SyncError as err:
                self._reset(writer)
                for p in group:
                    if not p.future.done():
                        p.future.set_exception(Unavailable(str(err), retry_after=5))
                continue
            except Exception as err:  # noqa: BLE001 - the state DB went away, say
                self._reset(writer)
                for p in group:
                    if not p.future.done():
                        p.future.set_exception(Unavailable(
                            f"cannot stage now ({type(err).__name__}); retry", retry_after=5))
                continue
            for p, result in zip(group, results, strict=True):
                if p.future.done():
                    continue
                if isinstance(result, IntakeError):
                    p.future.set_exception(result)
                else:
                    p.future.set_result(result)

    def _store(self, writer: int) -> StateStore:
        if writer not in self._states:
            state = StateStore.connect(self.spec.state.resolve("state database"),
                                       self.spec.state.schema_name)
            state.ensure_pipeline(self.pipeline.name, self.pipeline.slot)
            self._states[writer] = state
        return self._states[writer]

    def _reset(self, writer: int) -> None:
        state = self._states.pop(writer, None)
        if state is not None:
            state.close()

    def _stage_group_retrying(self, group: list[_Pending], writer: int
                              ) -> list[Accepted | IntakeError]:
        """A webhook id in two groups staged at once (a sender's retry racing its first
        request): the later group's receipt collides, its transaction rolls back whole, and
        it is staged again — now finding the first receipt."""
        try:
            return self._stage_group(group, writer)
        except psycopg.errors.UniqueViolation:
            return self._stage_group(group, writer)

    def _stage_group(self, group: list[_Pending], writer: int) -> list[Accepted | IntakeError]:
        """One transaction for every new webhook id of the group; duplicates (of earlier
        requests, or within the group) get the first receipt."""
        state = self._store(writer)
        receipts = ReceiptStore(state, self.pipeline.name)
        known = receipts.find([p.webhook_id for p in group])
        room = self._budget_room(state)
        fresh: dict[str, int] = {}  # webhook id → index in the batch
        rows: list[Row] = []
        for p in group:
            if p.webhook_id not in known and p.webhook_id not in fresh and len(rows) < room:
                fresh[p.webhook_id] = len(rows)
                rows.append(p.row)
        created: dict[str, Receipt] = {}
        if rows:
            now = datetime.now(timezone.utc)
            correlation = {wid: str(uuid.uuid4()) for wid in fresh}
            batch = state.stage_records(self.pipeline.name, [
                (state.relation_id(self.pipeline.name, self.types[r.table].relation), r.op,
                 r.message) for r in rows], commit_ts=now,
                also=lambda: receipts.insert_staged([
                    (wid, correlation[wid], rows[i].table, i) for wid, i in fresh.items()]))
            with self._room_lock:
                self._room -= len(rows)
            for wid, i in fresh.items():
                created[wid] = Receipt(wid, correlation[wid], rows[i].table,
                                       Position(batch.first.commit_lsn, i), batch.batch_id, now)
        out: list[Accepted | IntakeError] = []
        answered: set[str] = set()
        for p in group:
            if p.webhook_id in known:
                out.append(Accepted(known[p.webhook_id], duplicate=True))
            elif p.webhook_id in created:
                # The first of the group with this id staged it; later ones are duplicates.
                out.append(Accepted(created[p.webhook_id],
                                    duplicate=p.webhook_id in answered))
                answered.add(p.webhook_id)
            else:
                out.append(Busy(
                    f"pipeline {self.pipeline.name!r} has {self.pipeline.policy.demand_budget:,}"
                    " changes staged and not yet delivered (its demand budget); retry later",
                    retry_after=5))
        return out

    def _budget_room(self, state: StateStore) -> int:
        """Room left in the demand budget. Counting the undelivered changes reads every held
        batch, so it is recounted at most every :data:`RECOUNT_S` (and whenever the room looks
        used up); in between, what this process staged is taken off. Delivery freeing room, or
        another receiver process using it, shows at the next count: the budget is kept to
        within half a second of intake."""
        now = time.monotonic()
        with self._room_lock:
            if now - self._room_at <= RECOUNT_S and self._room > 0:
                return self._room
        room = self.pipeline.policy.demand_budget - state.undelivered_changes(self.pipeline.name)
        with self._room_lock:
            self._room, self._room_at = room, now
        return room

    # -- what became of it -------------------------------------------------------------------

    def outcome(self, receipt: Receipt) -> dict[str, dict[str, Any]]:
        with StateStore.connect(self.spec.state.resolve("state database"),
                                self.spec.state.schema_name) as state:
            return change_outcome(state, self.pipeline.name, list(self.pipeline.targets),
                                  receipt.position, receipt.batch_id)

    def receipt(self, correlation_id: str) -> Receipt | None:
        with StateStore.connect(self.spec.state.resolve("state database"),
                                self.spec.state.schema_name) as state:
            return ReceiptStore(state, self.pipeline.name).by_correlation(correlation_id)

    def close(self) -> None:
        for task in self._writers:
            task.cancel()
        for writer in list(self._states):
            self._reset(writer)
