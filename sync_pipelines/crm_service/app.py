"""The reference CRM service as a starlette application: routes, contract and in-memory state.

Resources are ``contacts``, ``companies`` and ``deals``; any other name answers 404. Record ids
are path segments and are compared as strings (``13`` in a JSON body is the record ``"13"``).

Routes (all bodies and errors are JSON; errors are ``{"error": "..."}``)::

    GET    /{resource}/{id}      200 record | 404
    PUT    /{resource}/{id}      body: JSON object -> stored as sent (``id`` added from the
                                 path when absent, 422 when it differs); 200 with the record
    DELETE /{resource}/{id}      204, also when the record does not exist
    GET    /{resource}?cursor=&limit=
                                 {"items": [...], "next_cursor": str | null}; ordered by id,
                                 numerically when every id is an integer, else as strings;
                                 ``cursor`` is the last id of the previous page; limit 1..1000
                                 (default 100)
    GET    /{resource}?updated_since=<ISO time>&cursor=&limit=
                                 the change feed (see .feed): records and tombstones changed
                                 since then, each with updated_at, by (updated_at, id)
    POST   /{resource}/batch     body {"upserts": [{"id": ..., ...}], "deletes": [id, ...]};
                                 all or nothing: upserts in list order, then deletes in list
                                 order; 200 {"upserted": n, "deleted": n}

Writes (PUT, DELETE, POST batch) are checked in this order; the first failing check answers:

1. latency (``await asyncio.sleep``, so concurrent requests overlap; reads are delayed too);
2. outage -> 503 with ``Retry-After`` (reads too);
3. authentication, when configured -> 401;
4. unknown resource -> 404;
5. missing idempotency header -> 400;
6. body: larger than ``max_body_bytes`` -> 413, not a JSON object -> 400, malformed batch
   -> 400, a PUT body ``id`` other than the path id -> 422;
7. injected faults: every ``rate_limit_every``-th write reaching this step -> 429 with
   ``Retry-After``; then a seeded draw answers 500 for a fraction ``error_rate`` of them;
8. idempotency: a key stored for the same method and path -> the stored response again
   (header ``Idempotent-Replayed: true``), counted as a duplicate, nothing applied; a key
   stored for another method or path -> 422;
9. poison records -> the configured status (a batch touching one is rejected whole);
10. apply; only successful (2xx) responses are stored under their key, so a write answered
    429, 500, 503 or 4xx may be retried with the same key and is then really applied.

Steps 8-10 run under one lock without awaiting, so two requests with the same key can never
both be applied. The admin API (``/_admin/...``) is never authenticated, delayed or failed:

    GET  /_admin/faults     the current fault config (shape: :meth:`Faults.to_json`)
    POST /_admin/faults     replace it (fields left out take their defaults); 400 when invalid
    POST /_admin/reset      clear records, received log, idempotency store, stats and faults
    GET  /_admin/received   {"writes": [entry, ...], "applied": n, "duplicates": n,
                             "rejected": n}; entry: seq, method, path, resource, id (null for
                             a batch), ids (the record ids it touches), idempotency_key, body
                             (parsed JSON, else text or null), status (null while in flight),
                             outcome ("applied" | "duplicate" | "rejected" | null), at (epoch s)
    GET  /_admin/stats      {"requests": n, "by_status": {"200": n, ...}, "in_flight": n,
                             "max_in_flight": n, "max_in_flight_writes": n,
                             "max_in_flight_per_key": n, "max_in_flight_by_key":
                             {"contacts/13": n, ...}} — per key counts writes only, from
                             arrival to answer (a batch counts for each id it touches)
    GET  /_admin/records    {"contacts": {id: record}, "companies": {...}, "deals": {...}}
    POST /_admin/webhooks   {"url": ..., "secret": "whsec_...", "event_types"?: ["contact.*"]}:
                            send a signed webhook per
                            applied change (see .feed); {"url": null} stops
    GET  /_admin/webhooks   {"url", "pending", "sent", "attempts", "failures", "dropped",
                             "last_error"}

Everything is lost when the process ends. A reset while requests are in flight lets them
finish, but they no longer count in the new log's counters or stats.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import random
import re
import secrets
import threading
import time
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from typing import Any

from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .feed import Feed, WebhookConfig, WebhookSender

RESOURCES: tuple[str, ...] = ("contacts", "companies", "deals")
DEFAULT_IDEMPOTENCY_HEADER = "Idempotency-Key"
DEFAULT_PAGE_LIMIT = 100
MAX_PAGE_LIMIT = 1000
REPLAYED_HEADER = "Idempotent-Replayed"
_DRAIN_LIMIT = 64 * 1024 * 1024  # an oversized body is read and dropped up to this much
_INT_ID = re.compile(r"-?[0-9]+")

Json = Any


def _error(status: int, message: str, **extra: Json) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


@dataclass(frozen=True)
class Poison:
    """Writes to ``resource``/``id`` are answered ``status`` and never applied."""

    resource: str
    id: str
    status: int = 422


@dataclass(frozen=True)
class Faults:
    """What ``POST /_admin/faults`` configures; the defaults inject nothing."""

    latency_ms: float = 0.0
    """Delay before every non-admin request is handled."""
    error_rate: float = 0.0
    """Fraction (0..1) of writes answered 500 before being applied."""
    rate_limit_every: int = 0
    """Answer every Nth write 429 (0: never)."""
    retry_after_s: int = 1
    """``Retry-After`` (whole seconds) on 429 and 503 answers."""
    outage: bool = False
    """Answer every non-admin request 503."""
    poison: tuple[Poison, ...] = ()
    """Records whose writes are rejected."""
    seed: int = 0
    """Seed of the ``random.Random`` behind ``error_rate``."""

    @classmethod
    def from_json(cls, data: Json) -> Faults:
        """Validate a ``POST /_admin/faults`` body; raises ``ValueError`` naming the field."""
        if not isinstance(data, dict):
            raise ValueError("faults must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fault field(s) {unknown}; known: {sorted(known)}")
        latency = _number(data.get("latency_ms", 0.0), "latency_ms")
        rate = _number(data.get("error_rate", 0.0), "error_rate")
        every = _integer(data.get("rate_limit_every", 0), "rate_limit_every")
        retry_after = _integer(data.get("retry_after_s", 1), "retry_after_s")
        seed = _integer(data.get("seed", 0), "seed")
        outage = data.get("outage", False)
        if latency < 0 or every < 0 or retry_after < 0:
            raise ValueError("latency_ms, rate_limit_every and retry_after_s must be >= 0")
        if not 0.0 <= rate <= 1.0:
            raise ValueError("error_rate must be between 0 and 1")
        if not isinstance(outage, bool):
            raise ValueError("outage must be true or false")
        return cls(latency, rate, every, retry_after, outage, _poison(data.get("poison", [])), seed)

    def to_json(self) -> dict[str, Json]:
        """The config as ``GET /_admin/faults`` answers it."""
        return {
            "latency_ms": self.latency_ms,
            "error_rate": self.error_rate,
            "rate_limit_every": self.rate_limit_every,
            "retry_after_s": self.retry_after_s,
            "outage": self.outage,
            "poison": [
                {"resource": p.resource, "id": p.id, "status": p.status} for p in self.poison
            ],
            "seed": self.seed,
        }


def _number(value: Json, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number")
    return float(value)


def _integer(value: Json, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer")
    return value


def _poison(items: Json) -> tuple[Poison, ...]:
    if not isinstance(items, list):
        raise ValueError("poison must be a list of {resource, id, status}")
    out = []
    for i, item in enumerate(items):
        if (
            not isinstance(item, dict)
            or not {"resource", "id"} <= set(item)
            or set(item) - {"resource", "id", "status"}
        ):
            raise ValueError(f"poison[{i}] must be an object with resource, id and optional status")
        if item["resource"] not in RESOURCES:
            raise ValueError(f"poison[{i}].resource must be one of {list(RESOURCES)}")
        status = _integer(item.get("status", 422), f"poison[{i}].status")
        if not 400 <= status <= 599:
            raise ValueError(f"poison[{i}].status must be an HTTP error status (400-599)")
        out.append(Poison(item["resource"], _record_id(item["id"], f"poison[{i}].id"), status))
    return tuple(out)


def _record_id(value: Json, name: str) -> str:
    """A record id from JSON: a non-empty string or an integer, as a string."""
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        raise ValueError(f"{name} must be a non-empty string or an integer")
    return str(value)


@dataclass(frozen=True)
class _Stored:
    """The first successful response to an idempotency key."""

    method: str
    path: str
    status: int
    body: bytes


@dataclass(frozen=True)
class _Write:
    """A validated write, ready for the idempotency check and to be applied."""

    op: str  # "put" | "delete" | "batch"
    resource: str
    ids: tuple[str, ...]
    record: dict[str, Json] | None = None
    upserts: tuple[dict[str, Json], ...] = ()
    deletes: tuple[str, ...] = ()


class _State:
    """All mutable state; every method takes the lock and never awaits while holding it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight = 0
        self.in_flight_writes = 0
        self.key_in_flight: Counter[str] = Counter()
        self.generation = 0
        self._clear()

    def _clear(self) -> None:
        self.records: dict[str, dict[str, dict[str, Json]]] = {r: {} for r in RESOURCES}
        self.feed = Feed(RESOURCES)
        if hasattr(self, "sender"):
            self.sender.configure(None)
        else:
            self.sender = WebhookSender()
        self.writes: list[dict[str, Json]] = []
        self.idempotency: dict[str, _Stored] = {}
        self.outcomes: Counter[str] = Counter()
        self.by_status: Counter[int] = Counter()
        self.requests = 0
        self.max_in_flight = self.in_flight
        self.max_in_flight_writes = self.in_flight_writes
        self.key_max: dict[str, int] = dict(self.key_in_flight)
        self.set_faults(Faults())

    def set_faults(self, faults: Faults) -> None:
        self.faults = faults
        self.rng = random.Random(faults.seed)
        self.write_counter = 0

    def reset(self) -> None:
        with self.lock:
            self.generation += 1
            self._clear()

    def arrive(self, entry: dict[str, Json] | None) -> int:
        """Count a request in; log ``entry`` (a write) with the next seq. Returns the generation."""
        with self.lock:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            if entry is not None:
                self.in_flight_writes += 1
                self.max_in_flight_writes = max(self.max_in_flight_writes, self.in_flight_writes)
                entry["seq"] = len(self.writes) + 1
                self.writes.append(entry)
            return self.generation

    def enter_keys(self, keys: Iterable[str]) -> None:
        with self.lock:
            for key in keys:
                self.key_in_flight[key] += 1
                self.key_max[key] = max(self.key_max.get(key, 0), self.key_in_flight[key])

    def leave(
        self,
        generation: int,
        entry: dict[str, Json] | None,
        keys: Iterable[str],
        status: int,
        outcome: str | None,
    ) -> None:
        with self.lock:
            self.in_flight -= 1
            for key in keys:
                self.key_in_flight[key] -= 1
                if not self.key_in_flight[key]:
                    del self.key_in_flight[key]
            if entry is not None:
                self.in_flight_writes -= 1
                entry["status"] = status
                entry["outcome"] = outcome or ("applied" if status < 400 else "rejected")
            if generation == self.generation:
                self.by_status[status] += 1
                if entry is not None:
                    self.outcomes[entry["outcome"]] += 1

    def injected_fault(self) -> Response | None:
        """Step 7: 429 every Nth write, then 500 for a seeded fraction."""
        with self.lock:
            faults = self.faults
            self.write_counter += 1
            if faults.rate_limit_every and self.write_counter % faults.rate_limit_every == 0:
                response = _error(429, "rate limited (injected)")
                response.headers["Retry-After"] = str(faults.retry_after_s)
                return response
            if faults.error_rate and self.rng.random() < faults.error_rate:
                return _error(500, "internal error (injected)")
            return None

    def execute(self, write: _Write, key: str, method: str, path: str) -> tuple[Response, str]:
        """Steps 8-10 atomically; returns the response and the outcome for the log."""
        with self.lock:
            stored = self.idempotency.get(key)
            if stored is not None:
                if (stored.method, stored.path) != (method, path):
                    conflict = _error(
                        422,
                        f"idempotency key {key!r} was already used for "
                        f"{stored.method} {stored.path}",
                    )
                    return conflict, "rejected"
                replay = Response(
                    stored.body,
                    status_code=stored.status,
                    media_type="application/json" if stored.body else None,
                    headers={REPLAYED_HEADER: "true"},
                )
                return replay, "duplicate"
            poisoned = [
                p for p in self.faults.poison if p.resource == write.resource and p.id in write.ids
            ]
            if poisoned:
                first = poisoned[0]
                rejection = _error(
                    first.status,
                    f"record {first.resource}/{first.id} is rejected (poison)",
                    rejected=[
                        {"resource": p.resource, "id": p.id, "status": p.status} for p in poisoned
                    ],
                )
                return rejection, "rejected"
            response = self._apply(write)
            self.idempotency[key] = _Stored(
                method, path, response.status_code, bytes(response.body)
            )
            return response, "applied"

    def _apply(self, write: _Write) -> Response:
        table = self.records[write.resource]
        if write.op == "put":
            assert write.record is not None
            table[write.ids[0]] = write.record
            self._changed(write.resource, write.ids[0], write.record)
            return JSONResponse(write.record)
        if write.op == "delete":
            existed = table.pop(write.ids[0], None) is not None
            if existed:
                self._changed(write.resource, write.ids[0], None)
            return Response(status_code=204)
        at = self.feed.next_time()  # a batch is one change: its records share a change time
        for record in write.upserts:
            table[str(record["id"])] = record
            self._changed(write.resource, str(record["id"]), record, at)
        for record_id in write.deletes:
            if table.pop(record_id, None) is not None:
                self._changed(write.resource, record_id, None, at)
        return JSONResponse({"upserted": len(write.upserts), "deleted": len(write.deletes)})

    def _changed(self, resource: str, record_id: str, record: dict[str, Json] | None,
                 at: float | None = None) -> None:
        """The change feed and the outgoing webhooks see every applied change."""
        at = self.feed.touch(resource, record_id, deleted=record is None, at=at)
        self.sender.emit(resource, record, record_id, at, deleted=record is None)

    def changes_page(self, resource: str, since: float, cursor: str | None,
                     limit: int) -> dict[str, Json]:
        with self.lock:
            return self.feed.page(resource, self.records[resource], since, cursor, limit)

    def page(self, resource: str, cursor: str | None, limit: int) -> dict[str, Json]:
        with self.lock:
            table = self.records[resource]
            numeric = all(_INT_ID.fullmatch(i) for i in table) and (
                cursor is None or _INT_ID.fullmatch(cursor) is not None
            )

            def sort_key(record_id: str) -> tuple[int, str]:
                return (int(record_id) if numeric else 0, record_id)

            ordered = sorted(table, key=sort_key)
            start = 0
            if cursor is not None:
                start = bisect_right([sort_key(i) for i in ordered], sort_key(cursor))
            page = ordered[start : start + limit]
            more = start + limit < len(ordered)
            return {
                "items": [table[i] for i in page],
                "next_cursor": page[-1] if more and page else None,
            }

    def received(self) -> dict[str, Json]:
        with self.lock:
            return {
                "writes": [dict(entry) for entry in self.writes],
                "applied": self.outcomes["applied"],
                "duplicates": self.outcomes["duplicate"],
                "rejected": self.outcomes["rejected"],
            }

    def stats(self) -> dict[str, Json]:
        with self.lock:
            return {
                "requests": self.requests,
                "by_status": {str(s): n for s, n in sorted(self.by_status.items())},
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "max_in_flight_writes": self.max_in_flight_writes,
                "max_in_flight_per_key": max(self.key_max.values(), default=0),
                "max_in_flight_by_key": dict(sorted(self.key_max.items())),
            }


@dataclass
class _Body:
    """A request body as read: the parsed object, or the error to answer, and what to log."""

    value: dict[str, Json] | None = None
    error: Response | None = None
    logged: Json = None


class _Service:
    """The endpoints, bound to one :class:`_State` and the app's settings."""

    def __init__(
        self,
        *,
        max_body_bytes: int,
        idempotency_header: str,
        bearer_token: str | None,
        basic: tuple[str, str] | None,
    ) -> None:
        self.state = _State()
        self.max_body_bytes = max_body_bytes
        self.header = idempotency_header
        self.bearer_token = bearer_token
        self.basic = basic

    # -- resource endpoints -----------------------------------------------------------------

    async def record(self, request: Request) -> Response:
        if request.method in ("GET", "HEAD"):
            return await self._read(request)
        return await self._write(request, "put" if request.method == "PUT" else "delete")

    async def collection(self, request: Request) -> Response:
        return await self._read(request)

    async def batch(self, request: Request) -> Response:
        return await self._write(request, "batch")

    async def _read(self, request: Request) -> Response:
        generation = self.state.arrive(None)
        status = 500
        try:
            response = await self._gate(request)
            if response is None:
                response = self._answer_read(request)
            status = response.status_code
            return response
        finally:
            self.state.leave(generation, None, (), status, None)

    def _answer_read(self, request: Request) -> Response:
        resource = request.path_params["resource"]
        record_id = request.path_params.get("id")
        if record_id is not None:
            with self.state.lock:
                record = self.state.records[resource].get(record_id)
            if record is None:
                return _error(404, f"{resource}/{record_id} not found")
            return JSONResponse(record)
        cursor = request.query_params.get("cursor") or None
        raw_limit = request.query_params.get("limit") or str(DEFAULT_PAGE_LIMIT)
        try:
            limit = int(raw_limit)
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_PAGE_LIMIT:
            return _error(400, f"limit must be an integer from 1 to {MAX_PAGE_LIMIT}")
        since = request.query_params.get("updated_since")
        if since is not None:  # the change feed (see .feed)
            try:
                when = datetime.fromisoformat(since.replace("Z", "+00:00").replace(" ", "+"))
            except ValueError:
                return _error(400, f"updated_since {since!r} is not an ISO 8601 time")
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            try:
                return JSONResponse(self.state.changes_page(resource, when.timestamp(), cursor,
                                                            limit))
            except ValueError:
                return _error(400, "cursor is not one this endpoint gave out")
        return JSONResponse(self.state.page(resource, cursor, limit))

    async def _write(self, request: Request, op: str) -> Response:
        resource = request.path_params["resource"]
        record_id = request.path_params.get("id")
        key = request.headers.get(self.header)
        entry: dict[str, Json] = {
            "seq": 0,
            "method": request.method,
            "path": request.url.path,
            "resource": resource,
            "id": record_id,
            "ids": [record_id] if record_id is not None else [],
            "idempotency_key": key,
            "body": None,
            "status": None,
            "outcome": None,
            "at": time.time(),
        }
        generation = self.state.arrive(entry)
        keys: list[str] = []
        status, outcome = 500, None
        try:
            body = _Body() if op == "delete" else await self._read_body(request)
            entry["body"] = body.logged
            write, invalid = self._validate(op, resource, record_id, body)
            if write is not None:
                entry["ids"] = list(write.ids)
                keys = [f"{resource}/{i}" for i in dict.fromkeys(write.ids)]
            self.state.enter_keys(keys)
            response = await self._gate(request)
            if response is None and not key:
                response = _error(400, f"writes require an {self.header} header")
            for check in (body.error, invalid):
                if response is None and check is not None:
                    response = check
            if response is None:
                response = self.state.injected_fault()
            if response is None:
                assert write is not None and key is not None
                response, outcome = self.state.execute(write, key, request.method, request.url.path)
            status = response.status_code
            return response
        finally:
            self.state.leave(generation, entry, keys, status, outcome)

    def _validate(
        self, op: str, resource: str, record_id: str | None, body: _Body
    ) -> tuple[_Write | None, Response | None]:
        """The write a request asks for, or the 400/422 it deserves (404s are the gate's)."""
        if resource not in RESOURCES:
            return None, None
        if op == "delete":
            assert record_id is not None
            return _Write("delete", resource, (record_id,)), None
        if body.value is None:
            return None, None
        if op == "put":
            assert record_id is not None
            record = dict(body.value)
            if "id" in record:
                if isinstance(record["id"], bool) or str(record["id"]) != record_id:
                    return None, _error(
                        422, f"body id {record['id']!r} does not match the path id {record_id!r}"
                    )
            else:
                record["id"] = record_id
            return _Write("put", resource, (record_id,), record=record), None
        try:
            upserts, deletes = _parse_batch(body.value)
        except ValueError as exc:
            return None, _error(400, str(exc))
        ids = tuple(str(r["id"]) for r in upserts) + deletes
        return _Write("batch", resource, ids, upserts=upserts, deletes=deletes), None

    async def _gate(self, request: Request) -> Response | None:
        """Steps 1-4 of the module docstring, common to reads and writes."""
        with self.state.lock:
            faults = self.state.faults
        if faults.latency_ms:
            await asyncio.sleep(faults.latency_ms / 1000)
        if faults.outage:
            response = _error(503, "service unavailable (injected outage)")
            response.headers["Retry-After"] = str(faults.retry_after_s)
            return response
        if not self._authorized(request):
            scheme = "Bearer" if self.bearer_token is not None else "Basic"
            response = _error(401, "missing or invalid credentials")
            response.headers["WWW-Authenticate"] = f'{scheme} realm="crm"'
            return response
        resource = request.path_params["resource"]
        if resource not in RESOURCES:
            return _error(404, f"unknown resource {resource!r}; known: {list(RESOURCES)}")
        return None

    def _authorized(self, request: Request) -> bool:
        if self.bearer_token is None and self.basic is None:
            return True
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        credentials = credentials.strip()
        if self.bearer_token is not None and scheme.lower() == "bearer":
            return secrets.compare_digest(credentials.encode(), self.bearer_token.encode())
        if self.basic is not None and scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(credentials, validate=True)
            except (binascii.Error, ValueError):
                return False
            user, sep, password = decoded.partition(b":")
            return bool(sep) and all(
                [
                    secrets.compare_digest(user, self.basic[0].encode()),
                    secrets.compare_digest(password, self.basic[1].encode()),
                ]
            )
        return False

    async def _read_body(self, request: Request) -> _Body:
        declared = request.headers.get("content-length", "")
        too_large = declared.isdigit() and int(declared) > self.max_body_bytes
        raw = bytearray()
        seen = 0
        async for chunk in request.stream():
            # an oversized body is still read (and dropped, up to _DRAIN_LIMIT), so the client
            # gets the 413 instead of a connection reset while it is still sending
            seen += len(chunk)
            too_large = too_large or seen > self.max_body_bytes
            if too_large and seen > _DRAIN_LIMIT:
                break
            if not too_large:
                raw += chunk
        if too_large:
            return _Body(error=_error(413, f"body larger than {self.max_body_bytes} bytes"))
        try:
            value = json.loads(bytes(raw), parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError):
            text = bytes(raw[:2000]).decode("utf-8", "replace")
            return _Body(error=_error(400, "body is not valid JSON"), logged=text)
        if not isinstance(value, dict):
            return _Body(error=_error(400, "body must be a JSON object"), logged=value)
        return _Body(value=value, logged=value)

    # -- admin endpoints --------------------------------------------------------------------

    async def get_faults(self, request: Request) -> Response:
        with self.state.lock:
            return JSONResponse(self.state.faults.to_json())

    async def set_faults(self, request: Request) -> Response:
        try:
            raw = await request.body()
            faults = Faults.from_json(json.loads(raw) if raw.strip() else {})
        except ValueError as exc:
            return _error(400, str(exc))
        with self.state.lock:
            self.state.set_faults(faults)
        return JSONResponse(faults.to_json())

    async def reset(self, request: Request) -> Response:
        self.state.reset()
        return JSONResponse({"reset": True})

    async def received(self, request: Request) -> Response:
        return JSONResponse(self.state.received())

    async def stats(self, request: Request) -> Response:
        return JSONResponse(self.state.stats())

    async def records(self, request: Request) -> Response:
        with self.state.lock:
            return JSONResponse({r: dict(t) for r, t in self.state.records.items()})

    async def get_webhooks(self, request: Request) -> Response:
        sender = self.state.sender
        stats = sender.stats
        return JSONResponse({"url": sender.config.url if sender.config else None,
                             "pending": sender.pending(), "sent": stats.sent,
                             "attempts": stats.attempts, "failures": stats.failures,
                             "dropped": stats.dropped, "last_error": stats.last_error})

    async def set_webhooks(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body() or b"{}")
            url, secret = body.get("url"), body.get("secret")
            types = body.get("event_types") or []
            if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
                raise ValueError("event_types")
            config = None if url is None else WebhookConfig(
                str(url), str(secret), float(body.get("retry_after_s", 1.0)), tuple(types))
            if config is not None:
                Webhook(config.secret)  # a usable whsec_ secret, or 400
        except Exception:  # noqa: BLE001 - bad JSON, bad secret: one answer, no echo
            return _error(400, 'expected {"url": ..., "secret": "whsec_...", "event_types"?: '
                          '[glob, ...]} (or {"url": null})')
        self.state.sender.configure(config)
        return JSONResponse({"url": url})


def _parse_batch(body: dict[str, Json]) -> tuple[tuple[dict[str, Json], ...], tuple[str, ...]]:
    unknown = sorted(set(body) - {"upserts", "deletes"})
    if unknown:
        raise ValueError(f"unknown batch field(s) {unknown}; expected upserts and deletes")
    upserts, deletes = body.get("upserts", []), body.get("deletes", [])
    if not isinstance(upserts, list) or not isinstance(deletes, list):
        raise ValueError("upserts and deletes must be lists")
    for i, record in enumerate(upserts):
        if not isinstance(record, dict) or "id" not in record:
            raise ValueError(f"upserts[{i}] must be an object with an id")
        _record_id(record["id"], f"upserts[{i}].id")
    return tuple(upserts), tuple(_record_id(d, f"deletes[{i}]") for i, d in enumerate(deletes))


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    response = _error(exc.status_code, str(exc.detail))
    response.headers.update(exc.headers or {})
    return response


def create_app(
    *,
    max_body_bytes: int = 1_000_000,
    idempotency_header: str = DEFAULT_IDEMPOTENCY_HEADER,
    bearer_token: str | None = None,
    basic: tuple[str, str] | None = None,
) -> Starlette:
    """The CRM service with fresh, empty state (see the module docstring for the contract).

    ``bearer_token`` and/or ``basic=(user, password)`` require matching ``Authorization`` on
    every non-admin request (either one is accepted when both are set). The state is reachable
    as ``app.state.crm`` for in-process inspection.
    """
    if max_body_bytes < 1:
        raise ValueError("max_body_bytes must be positive")
    if not idempotency_header:
        raise ValueError("idempotency_header must be a header name")
    service = _Service(
        max_body_bytes=max_body_bytes,
        idempotency_header=idempotency_header,
        bearer_token=bearer_token,
        basic=basic,
    )
    routes = [
        Route("/_admin/faults", service.get_faults, methods=["GET"]),
        Route("/_admin/faults", service.set_faults, methods=["POST"]),
        Route("/_admin/reset", service.reset, methods=["POST"]),
        Route("/_admin/received", service.received, methods=["GET"]),
        Route("/_admin/stats", service.stats, methods=["GET"]),
        Route("/_admin/records", service.records, methods=["GET"]),
        Route("/_admin/webhooks", service.get_webhooks, methods=["GET"]),
        Route("/_admin/webhooks", service.set_webhooks, methods=["POST"]),
        Route("/{resource}", service.collection, methods=["GET"]),
        Route("/{resource}/batch", service.batch, methods=["POST"]),
        Route("/{resource}/{id}", service.record, methods=["GET", "PUT", "DELETE"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
    app.state.crm = service.state
    return app
