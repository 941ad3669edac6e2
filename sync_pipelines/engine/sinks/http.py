"""HTTP/REST sink: deliver changes to an API (a CRM, say), per-key ordered, bounded concurrency.

Contract: :meth:`HttpSink.send` takes changes in stream order and returns one
:class:`HttpOutcome` per change, in the same order. It never raises for what the API or the
network does; each failure is an outcome marked ``transient`` (429, 5xx, 408, timeouts,
connection errors: a later attempt may succeed) or terminal (other 4xx, 3xx, a body that cannot
be encoded). It raises only for misuse (called after :meth:`~HttpSink.close`, or from inside a
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
dies during :meth:`~HttpSink.send`, some requests may have reached the API and others not, and
nothing is recorded; the caller later sends the same changes again, in the same order, with the
same idempotency keys. Each attempt has a deadline of ``timeout_s``, so a hung server cannot
hold a call forever. An API that honours the key treats the repeats as no-ops; a plain
``PUT``/``DELETE`` is idempotent by itself, and per-key order still holds because a replay
re-sends each key's chain in order (the target may briefly show an older state of the key
before the newer change is applied again). The sink holds no other state.

Credentials (``headers``, ``auth``, user info in ``base_url``) are never logged nor put into
outcome errors; errors carry the status and the first 500 characters of the response body.

A sink is used from one thread at a time (calls are serialised by a lock); it keeps its own
event loop and its connections (keep-alive) across calls until :meth:`~HttpSink.close`.

Throughput is bounded by Little's law, ``concurrency / latency``, and by the longest key chain
(``chain length × latency``); on a 2-core machine the client's own CPU (httpx, about 1 ms per
request over a real socket) caps one sink near 1,000 requests/s. Install ``sniffio``: without
it httpcore retries a failed import on every request (encode/httpcore#1103), ~25% more CPU.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import json
import logging
import re
import string
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar, cast
from urllib.parse import quote

import httpx

from ..mapping import Delete, TargetOp, Upsert
from ..pgoutput import format_lsn

log = logging.getLogger(__name__)

METHODS = ("PUT", "POST", "PATCH", "DELETE")
"""HTTP methods an endpoint may use."""

ERROR_BODY_CHARS = 500
"""Characters of a response body kept in an outcome's error."""

_BODY_CAP = 64 * 1024  # bytes of a response read; a bigger body is abandoned (connection closed)
_KEEP = 4 * ERROR_BODY_CHARS  # bytes kept in memory for the error excerpt (utf-8 ≤ 4 per char)
_ENDPOINT = re.compile(r"^\s*([A-Za-z]+)\s+(/\S*)\s*$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

T = TypeVar("T")


# -- endpoints -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """An API endpoint from the spec, e.g. ``PUT /contacts/{id}``: a method and a path template
    whose ``{name}`` placeholders are filled from the change's fields."""

    method: str
    path_template: str
    _parts: tuple[tuple[str, str | None], ...] = field(
        init=False, repr=False, compare=False, default=()
    )

    def __post_init__(self) -> None:
        where = f"endpoint {self.method} {self.path_template!r}"
        if self.method not in METHODS:
            raise ValueError(f"{where}: method must be one of {', '.join(METHODS)}")
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
                f"e.g. 'PUT /contacts/{{id}}' (method one of {', '.join(METHODS)})"
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
    """Turn a mapped :class:`~..mapping.Upsert` / :class:`~..mapping.Delete` into a request.

    The path of an upsert is filled from its row, that of a delete from its key (``key_names``
    are the target names of the key columns, :attr:`~..mapping.TableMapper.key_names`). A
    TRUNCATE has no HTTP equivalent: ``ValueError``. A ``partial`` upsert (unchanged TOAST
    values left out) sends only the columns it has; use PATCH for such tables.
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


class HttpSink:
    """Sends :class:`HttpChange` requests to one API; see the module docstring for the rules.

    Connections: ``concurrency`` lanes, each an ``httpx.AsyncClient`` limited to one kept-alive
    connection and used by one request at a time, created on first use and kept across calls.
    (One shared client with ``max_connections=concurrency`` burns CPU in httpcore's pool: it
    hands one idle connection to every queued request, all but one of which spin on
    ``ConnectionNotAvailable``; measured 3–4x fewer requests per second at concurrency 64.)
    With a ``transport`` given (tests), all lanes share one client over it.
    """

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str] | None = None,
        auth: httpx.Auth | tuple[str, str] | None = None,
        idempotency_header: str = "Idempotency-Key",
        concurrency: int = 16,
        timeout_s: float = 10.0,
        max_retry_after_s: float = 30.0,
        max_inline_retries: int = 3,
        transport: httpx.AsyncBaseTransport | None = None,
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
        url = httpx.URL(base_url)
        self._shown_url = str(url.copy_with(userinfo=b"")) if url.userinfo else str(url)
        self._client_args: dict[str, Any] = dict(
            base_url=url,
            headers=dict(headers or {}),
            auth=httpx.BasicAuth(*auth) if isinstance(auth, tuple) else auth,
            timeout=httpx.Timeout(self.timeout_s),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            follow_redirects=False,
        )
        self._transport = transport
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clients: list[httpx.AsyncClient | None] = [None] * concurrency
        self._lanes: _Lanes | None = None
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"HttpSink({self._shown_url!r}, concurrency={self.concurrency})"

    # -- public, synchronous -----------------------------------------------------------------

    def send(self, changes: Sequence[HttpChange]) -> list[HttpOutcome]:
        """Send ``changes`` (in stream order); one outcome per change, in the same order."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("HttpSink.send is synchronous: call it from a thread without a "
                               "running event loop (e.g. via asyncio.to_thread)")
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            if not changes:
                return []
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
            clients = {id(c): c for c in self._clients if c is not None}
            self._clients = []
            if loop is None:
                return
            try:
                for client in clients.values():
                    loop.run_until_complete(client.aclose())
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    def __enter__(self) -> HttpSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inside the loop ---------------------------------------------------------------------

    def _client(self, lane: int) -> httpx.AsyncClient:
        client = self._clients[lane]
        if client is None:
            if self._transport is not None:
                client = next((c for c in self._clients if c is not None), None)
                client = client or httpx.AsyncClient(transport=self._transport,
                                                     **self._client_args)
            else:
                if "verify" not in self._client_args:  # one CA bundle load, not one per lane
                    self._client_args["verify"] = httpx.create_ssl_context()
                client = httpx.AsyncClient(**self._client_args)
            self._clients[lane] = client
        return client

    async def _send(self, changes: Sequence[HttpChange]) -> list[HttpOutcome]:
        if self._lanes is None:
            self._lanes = _Lanes(self.concurrency)
        chains: dict[tuple[Any, ...], list[int]] = {}
        for i, ch in enumerate(changes):
            chains.setdefault(ch.key, []).append(i)
        out: list[HttpOutcome | None] = [None] * len(changes)
        # Created in order of each key's first change; asyncio starts them in that order and the
        # lanes serve waiters first come, first served.
        tasks = [asyncio.ensure_future(self._chain(changes, idx, out, self._lanes))
                 for idx in chains.values()]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        assert all(o is not None for o in out)
        return cast("list[HttpOutcome]", out)

    async def _chain(self, changes: Sequence[HttpChange], idx: list[int],
                     out: list[HttpOutcome | None], lanes: _Lanes) -> None:
        for n, i in enumerate(idx):
            outcome = await self._deliver(changes[i], lanes)
            out[i] = outcome
            if not outcome.ok:
                note = f"parked behind {format_position(changes[i].position)}"
                for j in idx[n + 1:]:
                    out[j] = HttpOutcome(changes[j], None, False, outcome.transient, None, note,
                                         parked=True)
                return

    async def _deliver(self, change: HttpChange, lanes: _Lanes) -> HttpOutcome:
        headers = {self.idempotency_header: change.idempotency_key}
        content: bytes | None = None
        if change.body is not None:
            try:
                content = encode_body(change.body)
            except (TypeError, ValueError) as err:
                return HttpOutcome(change, None, False, False, None,
                                   f"body is not JSON serializable: {err}")
            headers["Content-Type"] = "application/json"
        retries = 0
        while True:
            lane = await lanes.acquire()
            try:
                outcome = await self._attempt(self._client(lane), change, content, headers)
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

    async def _attempt(self, client: httpx.AsyncClient, change: HttpChange,
                       content: bytes | None, headers: dict[str, str]) -> HttpOutcome:
        try:
            status, retry_after, text = await _deadline(
                _exchange(client, change, content, headers), self.timeout_s)
        except (httpx.TimeoutException, asyncio.TimeoutError) as err:
            kind = type(err).__name__ if isinstance(err, httpx.TimeoutException) else "deadline"
            return HttpOutcome(change, None, False, True, None,
                               f"timeout after {self.timeout_s}s ({kind})")
        except httpx.UnsupportedProtocol as err:
            return HttpOutcome(change, None, False, False, None, f"bad URL: {_short(err)}")
        except httpx.TransportError as err:  # connect, read, write, protocol, proxy errors
            return HttpOutcome(change, None, False, True, None,
                               f"connection error: {type(err).__name__}: {_short(err)}")
        if 200 <= status < 300 or (status == 404 and change.method == "DELETE"):
            return HttpOutcome(change, status, True, False, None, None)
        transient = status in (408, 429) or status >= 500
        return HttpOutcome(change, status, False, transient, retry_after,
                           f"HTTP {status}: {text}" if text else f"HTTP {status}")


async def _exchange(client: httpx.AsyncClient, change: HttpChange, content: bytes | None,
                    headers: dict[str, str]) -> tuple[int, float | None, str]:
    """One request; returns the status, ``Retry-After`` (429/503) and a body excerpt."""
    async with client.stream(change.method, change.path, content=content,
                             headers=headers) as resp:
        kept = bytearray()
        read = 0
        try:
            async for chunk in resp.aiter_bytes():
                if len(kept) < _KEEP:
                    kept += chunk[:_KEEP - len(kept)]
                read += len(chunk)
                if read > _BODY_CAP:
                    break  # the connection is closed instead of drained
        except httpx.DecodingError:
            kept = bytearray(b"<undecodable body>")
        status = resp.status_code
        retry_after = (parse_retry_after(resp.headers.get("Retry-After"))
                       if status in (429, 503) else None)
    text = kept.decode("utf-8", errors="replace").strip()[:ERROR_BODY_CHARS]
    return status, retry_after, text


def _short(err: BaseException) -> str:
    return (str(err).strip() or type(err).__name__)[:ERROR_BODY_CHARS]
