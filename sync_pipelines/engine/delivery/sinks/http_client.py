"""HTTP/REST client of the HTTP sink: send requests to an API (a CRM, say), per-key ordered,
with bounded concurrency.

Contract: :meth:`HttpClient.send` takes changes in stream order and returns one
:class:`HttpOutcome` per change, in the same order. It never raises for what the API or the
network does; each failure is an outcome marked ``transient`` (429, 5xx, 408, timeouts,
connection errors: a later attempt may succeed) or terminal (other 4xx, 3xx, a body that cannot
be encoded). It raises only for misuse (called after :meth:`~HttpClient.close`, or from inside a
running event loop) and for bugs.

Invariants:

* **Per-key order.** Changes with the same ``key`` are sent strictly one after another in the
  given order, never two in flight for one key. Each key's chain is one task; chains start in
  order of their first change, and every request waits its turn for one of ``concurrency``
  lanes (connections) handed out first come, first served, so at most ``concurrency`` requests
  are in flight and a hot key cannot starve the others.
* **Parking.** When a change fails (after inline retries), the later changes of its key in the
  same call are not sent: they come back ``parked`` behind it with the head's ``transient``
  flag. The caller keeps them behind the head in its retry queue; other keys keep flowing.
* **Inline retries only for a short, announced wait.** A 429/503 whose ``Retry-After`` is at
  most ``max_retry_after_s`` is retried in place (only that key's chain sleeps, its lane is
  free meanwhile) with the same idempotency key, up to ``max_inline_retries`` times.
  Everything else is returned to the caller, with ``retry_after_s`` when the API gave one, for
  the durable retry queue.
* **Idempotency.** Every request carries ``idempotency_key`` (stable per pipeline, target and
  stream position) in the configured header, so a replay is recognised by the API.

What a crash does: outcomes exist only in memory until the caller records them. If the process
dies during :meth:`~HttpClient.send`, some requests may have reached the API and others not, and
nothing is recorded; the caller later sends the same changes again, in the same order, with the
same idempotency keys. Each attempt has a deadline of ``timeout_s``, so a hung server cannot
hold a call forever. An API that honours the key treats the repeats as no-ops; a plain
``PUT``/``DELETE`` is idempotent by itself, and per-key order still holds because a replay
re-sends each key's chain in order (the target may briefly show an older state of the key
before the newer change is applied again). The sink holds no other state.

Credentials (``headers``, ``auth``, user info in ``base_url``) are never logged nor put into
outcome errors; errors carry the status and the first 500 characters of the response body.

A sink is used from one thread at a time (calls are serialised by a lock); it keeps its own
event loop and its connections (keep-alive) across calls until :meth:`~HttpClient.close`.

Throughput is bounded by Little's law, ``concurrency / latency``, and by the longest key chain
(``chain length × latency``), and by the client's own CPU: requests are written and parsed by
:mod:`.http_wire` (about 0.1 ms of CPU each) because httpx costs about 1 ms per request, which
capped a sink near 1,000 requests/s on a 2-core machine.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import email.utils
import json
import logging
import re
import ssl
import string
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, ClassVar, TypeVar, cast
from urllib.parse import quote

from ...mapping.mapper import Delete, TargetOp, Upsert
from ...wire.pgoutput import format_lsn
from .http_wire import (
    Connection,
    Origin,
    Response,
    WireError,
    check_header,
    header_block,
    request_bytes,
)

log = logging.getLogger(__name__)

METHODS = ("PUT", "POST", "PATCH", "DELETE")
"""HTTP methods an endpoint may use."""

ERROR_BODY_CHARS = 500
"""Characters of a response body kept in an outcome's error."""

USER_AGENT = "sync-pipelines"

_BODY_CAP = 64 * 1024  # bytes of a response read; a bigger body is abandoned (connection closed)
_FEED_STEP = 32  # changes taken from the caller's iterator between two turns of the loop
_KEEP = 4 * ERROR_BODY_CHARS  # bytes kept in memory for the error excerpt (utf-8 ≤ 4 per char)
_ENDPOINT = re.compile(r"^\s*([A-Za-z]+)\s+(/\S*)\s*$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

T = TypeVar("T")


# -- endpoints -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """An API endpoint from the spec, e.g. ``PUT /contacts/{id}``: a method and a path template
    whose ``{name}`` placeholders are filled from the change's fields."""

    ALLOWED: ClassVar[tuple[str, ...]] = METHODS
    """Methods this kind of endpoint may use (the sink's are writes)."""

    method: str
    path_template: str
    _parts: tuple[tuple[str, str | None], ...] = field(
        init=False, repr=False, compare=False, default=()
    )

    def __post_init__(self) -> None:
        where = f"endpoint {self.method} {self.path_template!r}"
        if self.method not in self.ALLOWED:
            raise ValueError(f"{where}: method must be one of {', '.join(self.ALLOWED)}")
        if not self.path_template.startswith("/") or any(c.isspace() for c in self.path_template):
            raise ValueError(f"{where}: the path must start with '/' and contain no spaces")
        try:
            pieces = list(string.Formatter().parse(self.path_template))
        except ValueError as err:  # unbalanced braces
            raise ValueError(
                f"{where}: {err} (write a literal brace as '{{{{' or '}}}}')"
            ) from None
        parts: list[tuple[str, str | None]] = []
        for literal, name, spec, conversion in pieces:
            if name is not None and (not _NAME.match(name) or spec or conversion):
                shown = "{" + name + (f"!{conversion}" if conversion else "")
                shown += (f":{spec}" if spec else "") + "}"
                raise ValueError(
                    f"{where}: placeholder {shown} must be a plain field name like {{id}}"
                )
            parts.append((literal, name))
        object.__setattr__(self, "_parts", tuple(parts))

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """``"PUT /contacts/{id}"`` → ``Endpoint("PUT", "/contacts/{id}")`` (method in any case)."""
        m = _ENDPOINT.match(text)
        if m is None:
            raise ValueError(
                f"endpoint {text!r}: expected '<METHOD> /path/{{field}}', "
                f"e.g. '{cls.ALLOWED[0]} /contacts/{{id}}' (method one of "
                f"{', '.join(cls.ALLOWED)})"
            )
        return cls(m.group(1).upper(), m.group(2))

    @property
    def fields(self) -> tuple[str, ...]:
        """Names of the placeholders, in order."""
        return tuple(name for _, name in self._parts if name is not None)

    def path(self, fields: Mapping[str, Any]) -> str:
        """The path with each ``{name}`` replaced by ``fields[name]``, URL-quoted (``/`` too)."""
        out: list[str] = []
        for literal, name in self._parts:
            out.append(literal)
            if name is None:
                continue
            try:
                value = fields[name]
            except KeyError:
                raise ValueError(
                    f"endpoint {self}: field {name!r} is missing (have: "
                    f"{', '.join(map(str, fields)) or 'none'})"
                ) from None
            if value is None:
                raise ValueError(f"endpoint {self}: field {name!r} is null")
            out.append(quote(str(value), safe=""))
        return "".join(out)

    def __str__(self) -> str:
        return f"{self.method} {self.path_template}"


@dataclass(frozen=True)
class ReadEndpoint(Endpoint):
    """An endpoint that reads one record, e.g. ``GET /contacts/{id}`` (a two-way link's
    ``get``): the same path template and filling as :class:`Endpoint`."""

    ALLOWED: ClassVar[tuple[str, ...]] = ("GET",)


# -- changes and outcomes --------------------------------------------------------------------


@dataclass(frozen=True)
class HttpChange:
    """One request to send, in stream order."""

    position: tuple[int, int]
    """``(commit_lsn, seq)`` of the source change."""
    key: tuple[Any, ...]
    """The per-key ordering key (target table + key values)."""
    method: str
    path: str
    """Already resolved, relative to the sink's base URL."""
    body: dict[str, Any] | None
    """JSON body; ``None`` sends no body (DELETE)."""
    idempotency_key: str
    """Stable per (pipeline, target, position): see :func:`idempotency_key`."""


@dataclass(frozen=True)
class HttpOutcome:
    """What happened to one :class:`HttpChange`."""

    change: HttpChange
    status: int | None
    """HTTP status of the last attempt; ``None`` if no response (timeout, connection error)."""
    ok: bool
    """2xx, or 404 on DELETE (already gone)."""
    transient: bool
    """For failures: a later attempt may succeed (429, 5xx, 408, timeouts, connection errors)."""
    retry_after_s: float | None
    """``Retry-After`` of a 429/503, in seconds, for the caller's durable retry."""
    error: str | None
    """Short description, e.g. ``"HTTP 422: <first 500 chars of body>"``."""
    parked: bool = False
    """Not sent: an earlier change of the same key failed in this call."""


def format_position(position: tuple[int, int]) -> str:
    """``(0x16B374D848, 3)`` → ``"lsn 16/B374D848 seq 3"``."""
    return f"lsn {format_lsn(position[0])} seq {position[1]}"


def idempotency_key(
    pipeline: str, target: str, position: tuple[int, int], op_index: int = 0
) -> str:
    """A key the API can deduplicate replays by: ``"<pipeline>:<target>:<LSN 16 hex>:<seq>"``.

    ``op_index`` tells apart several requests made for one source change (an UPDATE that changes
    the key becomes DELETE old key + PUT new key at the same position): the second gets ``.1``.
    """
    lsn, seq = position
    base = f"{pipeline}:{target}:{lsn:016X}:{seq}"
    return f"{base}.{op_index}" if op_index else base


def http_change(
    op: TargetOp,
    key_names: Sequence[str],
    *,
    pipeline: str,
    target: str,
    upsert: Endpoint,
    delete: Endpoint,
    op_index: int = 0,
) -> HttpChange:
    """Turn a mapped :class:`~...mapping.mapper.Upsert` / :class:`~...mapping.mapper.Delete` into a
    request.

    The path of an upsert is filled from its row, that of a delete from its key (``key_names``
    are the target names of the key columns, :attr:`~...mapping.mapper.TableMapper.key_names`). A
    TRUNCATE has no HTTP equivalent: ``ValueError``. Delivery never passes a ``partial``
    upsert (unchanged TOAST values left out): an API cannot merge it into its record, so the
    row is re-read from the source instead (:mod:`...refetch`).
    """
    if isinstance(op, Upsert):
        fields: Mapping[str, Any] = {**dict(zip(key_names, op.key, strict=True)), **op.row}
        method, path, body = upsert.method, upsert.path(fields), op.row
    elif isinstance(op, Delete):
        fields = dict(zip(key_names, op.key, strict=True))
        method, path, body = delete.method, delete.path(fields), None
    else:
        raise ValueError(
            f"pipeline {pipeline!r}, target {target!r}: TRUNCATE of {op.table} at "
            f"{format_position(op.position)} cannot be sent to an HTTP API"
        )
    return HttpChange(
        position=(op.position[0], op.position[1]),
        key=(op.table, *op.key),
        method=method,
        path=path,
        body=body,
        idempotency_key=idempotency_key(pipeline, target, op.position, op_index),
    )


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date); ``None`` if
    absent or unreadable. A date in the past gives ``0.0``."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if seconds == seconds and seconds != float("inf") else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _json_default(value: Any) -> Any:
    if isinstance(value, (dt.date, dt.time)):  # noqa: UP038
        return value.isoformat()  # datetime is a date
    if isinstance(value, (Decimal, uuid.UUID)):  # noqa: UP038
        return str(value)  # exact: a float would round
    if isinstance(value, (set, frozenset)):  # noqa: UP038
        return sorted(value, key=repr)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def encode_body(body: dict[str, Any]) -> bytes:
    """The JSON bytes sent for a body; dates/times as ISO 8601, decimals and UUIDs as strings."""
    return json.dumps(body, default=_json_default, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False).encode()


# -- the sink --------------------------------------------------------------------------------


if sys.version_info >= (3, 11):

    async def _deadline(aw: Awaitable[T], seconds: float) -> T:
        async with asyncio.timeout(seconds):
            return await aw

else:  # pragma: no cover - Python 3.10

    async def _deadline(aw: Awaitable[T], seconds: float) -> T:
        return await asyncio.wait_for(aw, seconds)


class _Lanes:
    """``n`` lanes (connections) handed out strictly first come, first served.

    A released lane goes straight to the longest waiter, so a chain that finishes a request
    and asks again at once cannot barge ahead of chains already waiting.
    """

    def __init__(self, n: int) -> None:
        self._free: deque[int] = deque(range(n))
        self._waiters: deque[asyncio.Future[int]] = deque()

    async def acquire(self) -> int:
        if self._free and not self._waiters:
            return self._free.popleft()
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(fut.result())  # handed over just as we were cancelled
            else:
                self._waiters.remove(fut)
            raise

    def release(self, lane: int) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(lane)
                return
        self._free.append(lane)


class HttpClient:
    """Sends :class:`HttpChange` requests to one API; see the module docstring for the rules.

    Connections: ``concurrency`` lanes, each one kept-alive HTTP/1.1 connection
    (:mod:`.http_wire`) used by one request at a time, opened on first use and kept across
    calls. A request that finds its reused connection already closed by the server (no byte of
    an answer) is sent once more on a fresh connection, with the same idempotency key.
    """

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        idempotency_header: str = "Idempotency-Key",
        concurrency: int = 16,
        timeout_s: float = 10.0,
        max_retry_after_s: float = 30.0,
        max_inline_retries: int = 3,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if max_retry_after_s < 0 or max_inline_retries < 0:
            raise ValueError("max_retry_after_s and max_inline_retries must not be negative")
        self.concurrency = concurrency
        self.timeout_s = float(timeout_s)
        self.max_retry_after_s = float(max_retry_after_s)
        self.max_inline_retries = max_inline_retries
        self.idempotency_header = idempotency_header
        self._origin = Origin.parse(base_url)
        fixed = [("Host", self._origin.host_header), ("User-Agent", USER_AGENT),
                 ("Accept", "application/json, */*")]
        basic = auth or self._origin.userinfo
        if basic is not None:
            token = base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode("ascii")
            fixed.append(("Authorization", f"Basic {token}"))
        given = {k.lower() for k in (headers or {})}
        fixed = [(k, v) for k, v in fixed if k.lower() not in given]  # the spec's headers win
        fixed += list((headers or {}).items())
        check_header(idempotency_header, "x")
        self._fixed = header_block(fixed)
        self._ssl: ssl.SSLContext | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connections: list[Connection | None] = [None] * concurrency
        self._lanes: _Lanes | None = None
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"HttpClient({self._origin.shown()!r}, concurrency={self.concurrency})"

    # -- public, synchronous -----------------------------------------------------------------

    def send(self, changes: Iterable[HttpChange]) -> list[HttpOutcome]:
        """Send ``changes`` (in stream order); one outcome per change, in the same order.

        ``changes`` may be a lazy iterator: it is consumed inside the sink's event loop, a few
        dozen at a time, while earlier requests are in flight, so building requests (decoding,
        mapping) overlaps with waiting for the API. It must not block for long."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("HttpClient.send is synchronous: call it from a thread without a "
                               "running event loop (e.g. via asyncio.to_thread)")
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
            task = self._loop.create_task(self._send(changes))
            try:
                return self._loop.run_until_complete(task)
            except BaseException:
                # Interrupted (KeyboardInterrupt) or a bug: no request may resume on a later call.
                pending = [t for t in asyncio.all_tasks(self._loop) if not t.done()]
                for t in pending:
                    t.cancel()
                if pending:  # gather() of nothing would belong to no loop and mask the error
                    self._loop.run_until_complete(
                        asyncio.gather(*pending, return_exceptions=True))
                raise

    def close(self) -> None:
        """Close the connections and the event loop. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop, self._loop = self._loop, None
            for conn in self._connections:
                if conn is not None:
                    conn.close()
            self._connections = []
            if loop is None:
                return
            try:
                loop.run_until_complete(asyncio.sleep(0))  # let the transports finish closing
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inside the loop ---------------------------------------------------------------------

    async def _send(self, changes: Iterable[HttpChange]) -> list[HttpOutcome]:
        """Feed ``changes`` into per-key chains as they come: sending starts with the first
        ones while the caller's iterator is still building the rest (see :meth:`send`)."""
        if self._lanes is None:
            self._lanes = _Lanes(self.concurrency)
        lanes = self._lanes
        given: list[HttpChange] = []
        out: list[HttpOutcome | None] = []
        chains: dict[tuple[Any, ...], deque[int]] = {}  # keys with a chain task running
        failed: dict[tuple[Any, ...], HttpOutcome] = {}  # key → its failed head, this call

        def park(i: int, head: HttpOutcome) -> None:
            out[i] = HttpOutcome(given[i], None, False, head.transient, None,
                                 f"parked behind {format_position(head.change.position)}",
                                 parked=True)

        async def chain(key: tuple[Any, ...], queue: deque[int]) -> None:
            # ``queue`` keeps its head until the head is answered, so the feeder appends behind
            # it; the task ends (and leaves ``chains``) only when the queue is empty, without an
            # await in between, so a later change of the key starts a new chain after this one.
            try:
                while queue:
                    i = queue[0]
                    outcome = await self._deliver(given[i], lanes)
                    out[i] = outcome
                    queue.popleft()
                    if not outcome.ok:
                        failed[key] = outcome
                        for j in queue:
                            park(j, outcome)
                        queue.clear()
            finally:
                if chains.get(key) is queue:
                    del chains[key]

        tasks: list[asyncio.Task[None]] = []
        try:
            for i, ch in enumerate(changes):
                given.append(ch)
                out.append(None)
                head = failed.get(ch.key)
                if head is not None:
                    park(i, head)
                elif ch.key in chains:
                    chains[ch.key].append(i)
                else:
                    # Chains start in order of their key's first change; asyncio runs new tasks
                    # in creation order and the lanes serve waiters first come, first served.
                    queue = deque((i,))
                    chains[ch.key] = queue
                    tasks.append(asyncio.ensure_future(chain(ch.key, queue)))
                if i % _FEED_STEP == _FEED_STEP - 1:
                    await asyncio.sleep(0)  # let answers in while the iterator builds more
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        assert all(o is not None for o in out)
        return cast("list[HttpOutcome]", out)

    def _request(self, change: HttpChange) -> bytes | str:
        """The request's bytes, built once and re-sent as they are by inline retries; or why it
        cannot be built (a terminal outcome: no attempt would do better)."""
        body = None
        extra = f"{self.idempotency_header}: {change.idempotency_key}\r\n"
        if change.body is not None:
            try:
                body = encode_body(change.body)
            except (TypeError, ValueError) as err:
                return f"body is not JSON serializable: {err}"
            extra += "Content-Type: application/json\r\n"
        try:
            check_header(self.idempotency_header, change.idempotency_key)
            return request_bytes(change.method, self._origin.base_path + change.path,
                                 self._fixed, extra.encode("latin-1"), body)
        except ValueError as err:
            return f"request cannot be built: {err}"

    async def _deliver(self, change: HttpChange, lanes: _Lanes) -> HttpOutcome:
        request = self._request(change)
        if isinstance(request, str):
            return HttpOutcome(change, None, False, False, None, request)
        retries = 0
        while True:
            lane = await lanes.acquire()
            try:
                outcome = await self._attempt(lane, change, request)
            finally:
                lanes.release(lane)
            wait = outcome.retry_after_s
            if (outcome.ok or wait is None or wait > self.max_retry_after_s
                    or retries >= self.max_inline_retries):
                if not outcome.ok:
                    log.debug("%s %s (%s): %s", change.method, change.path,
                              format_position(change.position), outcome.error)
                return outcome
            retries += 1
            await asyncio.sleep(wait)  # only this key's chain waits; the lane is released

    async def _attempt(self, lane: int, change: HttpChange, request: bytes) -> HttpOutcome:
        try:
            response = await _deadline(self._exchange(lane, request), self.timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            return HttpOutcome(change, None, False, True, None,
                               f"timeout after {self.timeout_s}s")
        except WireError as err:
            return HttpOutcome(change, None, False, True, None,
                               f"connection error: {_short(err)}")
        status = response.status
        if 200 <= status < 300 or (status == 404 and change.method == "DELETE"):
            return HttpOutcome(change, status, True, False, None, None)
        transient = status in (408, 429) or status >= 500
        retry_after = parse_retry_after(response.retry_after) if status in (429, 503) else None
        text = response.body.decode("utf-8", errors="replace").strip()[:ERROR_BODY_CHARS]
        return HttpOutcome(change, status, False, transient, retry_after,
                           f"HTTP {status}: {text}" if text else f"HTTP {status}")

    async def _exchange(self, lane: int, request: bytes) -> Response:
        """One request on the lane's connection (opened if needed); a reused connection the
        server closed before answering gets one more try on a fresh connection."""
        conn = self._connections[lane]
        if conn is not None and not conn.reusable:
            conn = None
        for _ in range(2):
            if conn is None:
                if self._origin.scheme == "https" and self._ssl is None:
                    self._ssl = ssl.create_default_context()  # one CA load, not one per lane
                conn = await Connection.open(self._origin, self._ssl, keep=_KEEP,
                                             body_cap=_BODY_CAP)
                self._connections[lane] = conn
            try:
                return await conn.exchange(request)
            except WireError as err:
                self._connections[lane] = None
                if not (err.unanswered and conn.exchanges > 0):
                    raise
                conn = None  # a stale keep-alive: the server closed it while idle
        raise AssertionError("unreachable")


def _short(err: BaseException) -> str:
    return (str(err).strip() or type(err).__name__)[:ERROR_BODY_CHARS]
