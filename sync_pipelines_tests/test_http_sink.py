"""HTTP sink: per-key ordering, parking, retries and error mapping of the HTTP/REST target.

Unit tests of :mod:`sync_pipelines.engine.sinks.http` against ``httpx.MockTransport`` with
async handlers (no sockets): per-key order with concurrency across keys, fair start order,
parking behind a failed change while other keys flow, inline retry on 429/503 with
``Retry-After`` (same idempotency key), Retry-After over the cap, the status → transient/terminal
mapping (500, 422, 404 on DELETE and on PUT, timeouts, connection errors), request headers and
JSON bodies, ``Endpoint`` parsing and path filling, ``idempotency_key`` stability. Then one
integration test against a real uvicorn/starlette server on 127.0.0.1 (in a thread) checking
that concurrency across keys pays off while per-key order holds.

Not covered: the durable retry queue and the delivery ledger (the caller's job), the reference
CRM service, TLS.

Run as a script for a throughput benchmark against Little's law::

    python -m sync_pipelines_tests.test_http_sink
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine, Iterator
from decimal import Decimal
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

from sync_pipelines.engine.mapping import Delete, Truncate, Upsert
from sync_pipelines.engine.sinks.http import (
    Endpoint,
    HttpChange,
    HttpSink,
    http_change,
    idempotency_key,
    parse_retry_after,
)
from sync_pipelines.engine.state import Position

BASE = "http://crm.test"
Handler = Callable[[httpx.Request], Coroutine[None, None, httpx.Response]]


def change(n: int, key: str, *, method: str = "PUT", body: dict[str, Any] | None = None,
           lsn: int = 0x1000) -> HttpChange:
    """The n-th change of the stream, for ``key``; the body carries ``n`` so a server can tell."""
    if method != "DELETE" and body is None:
        body = {"id": key, "n": n}
    pos = (lsn, n)
    return HttpChange(pos, ("crm.contacts", key), method, f"/contacts/{key}", body,
                      idempotency_key("crm", "api", pos))


def sink(handler: Handler, **kw: Any) -> HttpSink:
    return HttpSink(BASE, transport=httpx.MockTransport(handler), **kw)


def key_of(request: httpx.Request) -> str:
    return request.url.path.rsplit("/", 1)[1]


class Recorder:
    """An async handler recording arrivals and in-flight counts per key and overall."""

    def __init__(self, latency: Callable[[], float] = lambda: 0.0,
                 respond: Callable[[httpx.Request], httpx.Response] | None = None):
        self.latency = latency
        self.respond = respond or (lambda r: httpx.Response(200, json={"ok": True}))
        self.arrivals: list[httpx.Request] = []
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight_key: Counter[str] = Counter()
        self.total = 0
        self.max_total = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        k = key_of(request)
        self.arrivals.append(request)
        self.in_flight[k] += 1
        self.total += 1
        self.max_in_flight_key[k] = max(self.max_in_flight_key[k], self.in_flight[k])
        self.max_total = max(self.max_total, self.total)
        try:
            await asyncio.sleep(self.latency())
            return self.respond(request)
        finally:
            self.in_flight[k] -= 1
            self.total -= 1

    def order(self) -> dict[str, list[int]]:
        per_key: dict[str, list[int]] = defaultdict(list)
        for r in self.arrivals:
            per_key[key_of(r)].append(json.loads(r.content)["n"])
        return dict(per_key)


def interleaved(n_keys: int, per_key: int, seed: int = 0) -> list[HttpChange]:
    """``per_key`` changes for each of ``n_keys`` keys, shuffled across keys (stream order)."""
    keys = [f"k{i}" for i in range(n_keys) for _ in range(per_key)]
    random.Random(seed).shuffle(keys)
    return [change(n, k) for n, k in enumerate(keys)]


def expected_order(changes: list[HttpChange]) -> dict[str, list[int]]:
    per_key: dict[str, list[int]] = defaultdict(list)
    for c in changes:
        per_key[c.key[1]].append(c.position[1])
    return dict(per_key)


# -- ordering and concurrency ----------------------------------------------------------------


def test_per_key_order_with_concurrency_across_keys() -> None:
    rng = random.Random(1)
    rec = Recorder(latency=lambda: rng.uniform(0, 0.004))
    changes = interleaved(n_keys=20, per_key=10)
    with sink(rec, concurrency=8) as s:
        out = s.send(changes)
    assert [o.change for o in out] == changes  # same order as the input
    assert all(o.ok and o.status == 200 and not o.parked for o in out)
    assert max(rec.max_in_flight_key.values()) == 1
    assert 1 < rec.max_total <= 8
    assert rec.order() == expected_order(changes)


def test_chains_start_in_order_of_their_first_change() -> None:
    rec = Recorder()
    keys = ["c", "a", "c", "b", "a", "d"]
    changes = [change(n, k) for n, k in enumerate(keys)]
    with sink(rec, concurrency=1) as s:
        s.send(changes)
    # One slot, FIFO: each key's first change in stream order, then the chains' next changes.
    assert [key_of(r) for r in rec.arrivals] == ["c", "a", "b", "d", "c", "a"]


def test_sink_is_reused_across_calls_and_closes() -> None:
    rec = Recorder()
    s = sink(rec)
    assert s.send([]) == []
    assert s.send([change(0, "a")])[0].ok
    assert s.send([change(1, "a")])[0].ok
    s.close()
    s.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        s.send([change(2, "a")])


def test_send_refuses_a_running_event_loop() -> None:
    async def inside() -> None:
        with sink(Recorder()) as s:
            s.send([change(0, "a")])

    with pytest.raises(RuntimeError, match="synchronous"):
        asyncio.run(inside())


# -- failures and parking --------------------------------------------------------------------


def respond_by_n(statuses: dict[int, httpx.Response]) -> Callable[[httpx.Request], httpx.Response]:
    def respond(request: httpx.Request) -> httpx.Response:
        n = json.loads(request.content)["n"] if request.content else -1
        return statuses.get(n, httpx.Response(200))
    return respond


@pytest.mark.parametrize(
    ("status", "transient"),
    [
        (422, False),  # the head is rejected for good: the rest of the key waits for a human
        (500, True),  # the head may succeed later: the rest of the key waits for the retry
    ],
)
def test_failure_parks_the_rest_of_its_key_and_others_flow(status: int, transient: bool) -> None:
    keys = ["a", "b", "a", "b", "a", "c", "a"]
    changes = [change(n, k) for n, k in enumerate(keys)]
    rec = Recorder(respond=respond_by_n({2: httpx.Response(status, text="no")}))
    with sink(rec, concurrency=4) as s:
        out = s.send(changes)
    by_n = {o.change.position[1]: o for o in out}
    assert by_n[0].ok
    assert not by_n[2].ok and not by_n[2].parked and by_n[2].status == status
    assert by_n[2].transient is transient
    for n in (4, 6):  # later changes of key a: not sent, parked behind change 2
        o = by_n[n]
        assert (o.ok, o.parked, o.status, o.transient) == (False, True, None, transient)
        assert o.error == "parked behind lsn 0/1000 seq 2"
    assert all(by_n[n].ok for n in (1, 3, 5))  # keys b and c are unaffected
    assert sorted(json.loads(r.content)["n"] for r in rec.arrivals) == [0, 1, 2, 3, 5]


def test_429_with_retry_after_is_retried_inline_with_the_same_idempotency_key() -> None:
    calls: list[tuple[float, str]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append((time.monotonic(), request.headers["Idempotency-Key"]))
        if len(calls) == 1:
            return httpx.Response(429, headers={"Retry-After": "0.2"}, text="slow down")
        return httpx.Response(200)

    with sink(handler) as s:
        [out] = s.send([change(7, "a")])
    assert out.ok and out.status == 200
    assert len(calls) == 2
    assert calls[1][0] - calls[0][0] >= 0.2
    assert calls[0][1] == calls[1][1] == "crm:api:0000000000001000:7"


def test_inline_wait_holds_only_its_own_key() -> None:
    seen: list[tuple[str, float]] = []
    t0 = time.monotonic()

    async def handler(request: httpx.Request) -> httpx.Response:
        k = key_of(request)
        seen.append((k, time.monotonic() - t0))
        if k == "a" and sum(1 for x, _ in seen if x == "a") == 1:
            return httpx.Response(503, headers={"Retry-After": "0.3"})
        return httpx.Response(200)

    with sink(handler, concurrency=1) as s:  # even with one slot, b is not blocked by a's wait
        out = s.send([change(0, "a"), change(1, "b"), change(2, "b")])
    assert all(o.ok for o in out)
    assert [k for k, _ in seen] == ["a", "b", "b", "a"]
    assert max(t for k, t in seen if k == "b") < 0.2


def test_inline_retries_are_bounded() -> None:
    attempts = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal attempts
        attempts += 1
        return httpx.Response(429, headers={"Retry-After": "0"})

    with sink(handler, max_inline_retries=3) as s:
        [out] = s.send([change(0, "a")])
    assert attempts == 4  # the first try and three retries
    assert (out.ok, out.transient, out.status, out.retry_after_s) == (False, True, 429, 0.0)


def test_retry_after_over_the_cap_is_returned_to_the_caller() -> None:
    attempts = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal attempts
        attempts += 1
        return httpx.Response(429, headers={"Retry-After": "120"}, text="quota")

    with sink(handler, max_retry_after_s=30) as s:
        [out] = s.send([change(0, "a")])
    assert attempts == 1
    assert (out.ok, out.transient, out.status, out.retry_after_s) == (False, True, 429, 120.0)
    assert out.error == "HTTP 429: quota"


# Status → outcome, one request each: (method, status, ok, transient, retry_after_s)
STATUS_CASES = [
    ("PUT", 200, True, False, None),
    ("POST", 201, True, False, None),
    ("PATCH", 204, True, False, None),
    ("DELETE", 204, True, False, None),
    ("DELETE", 404, True, False, None),  # already gone: the delete's effect holds
    ("PUT", 404, False, False, None),  # the resource path is wrong: terminal
    ("PUT", 400, False, False, None),
    ("PUT", 409, False, False, None),
    ("PUT", 422, False, False, None),
    ("PUT", 301, False, False, None),  # redirects are not followed: a misconfigured base URL
    ("PUT", 408, False, True, None),  # the server gave up waiting for the request
    ("PUT", 429, False, True, None),  # no Retry-After: nothing to wait for inline
    ("PUT", 500, False, True, None),
    ("PUT", 502, False, True, None),
    ("PUT", 503, False, True, None),
]


@pytest.mark.parametrize(("method", "status", "ok", "transient", "retry_after"), STATUS_CASES)
def test_status_mapping(method: str, status: int, ok: bool, transient: bool,
                        retry_after: float | None) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, text="body")

    with sink(handler) as s:
        [out] = s.send([change(0, "a", method=method)])
    assert (out.ok, out.transient, out.status, out.retry_after_s) == (
        ok, transient, status, retry_after)
    assert out.error is None if ok else out.error == f"HTTP {status}: body"


def test_422_error_keeps_the_first_500_characters_of_the_body() -> None:
    body = "x" * 400 + "é" * 400 + "TAIL"

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(422, text=body)

    with sink(handler) as s:
        [out] = s.send([change(0, "a")])
    assert not out.ok and not out.transient
    assert out.error == "HTTP 422: " + body[:500]


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (httpx.ReadTimeout("read timed out"), "timeout after 10.0s (ReadTimeout)"),
        (httpx.ConnectTimeout("connect timed out"), "timeout after 10.0s (ConnectTimeout)"),
        (httpx.ConnectError("[Errno 111] Connection refused"),
         "connection error: ConnectError: [Errno 111] Connection refused"),
        (httpx.RemoteProtocolError("Server disconnected"),
         "connection error: RemoteProtocolError: Server disconnected"),
    ],
)
def test_no_response_is_transient(exc: Exception, expected: str) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    with sink(handler) as s:
        out = s.send([change(0, "a"), change(1, "a"), change(2, "b", method="DELETE")])
    assert (out[0].ok, out[0].transient, out[0].status, out[0].error) == (
        False, True, None, expected)
    assert out[1].parked and out[1].transient
    assert not out[2].parked and out[2].transient


def test_a_hanging_server_hits_the_deadline() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)  # the mock transport enforces no timeouts; the sink's deadline does
        return httpx.Response(200)

    t0 = time.monotonic()
    with sink(handler, timeout_s=0.1) as s:
        [out] = s.send([change(0, "a")])
    assert time.monotonic() - t0 < 2
    assert (out.ok, out.transient, out.status) == (False, True, None)
    assert out.error is not None and out.error.startswith("timeout after 0.1s")


def test_a_refused_connection_is_transient() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with HttpSink(f"http://127.0.0.1:{port}", timeout_s=2) as s:
        [out] = s.send([change(0, "a")])
    assert (out.ok, out.transient, out.status) == (False, True, None)
    assert out.error is not None and out.error.startswith("connection error: ConnectError")


# -- requests --------------------------------------------------------------------------------


def test_requests_carry_headers_auth_body_and_idempotency_key() -> None:
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    body = {"id": "a/1", "amount": Decimal("12.30"), "at": dt.datetime(2024, 5, 1, 12, 0,
                                                                       tzinfo=dt.timezone.utc)}
    ch = HttpChange((0x10, 1), ("t", "a/1"), "PUT", "/contacts/a%2F1", body, "k-1")
    with sink(handler, headers={"X-Tenant": "acme"}, auth=("user", "s3cret"),
              idempotency_header="X-Request-Id") as s:
        s.send([ch, change(2, "b", method="DELETE")])
        assert "s3cret" not in repr(s)
    put, delete = seen
    assert put.url == "http://crm.test/contacts/a%2F1"
    assert put.headers["X-Request-Id"] == "k-1"
    assert put.headers["X-Tenant"] == "acme"
    assert put.headers["Authorization"] == httpx.BasicAuth("user", "s3cret")._auth_header
    assert put.headers["Content-Type"] == "application/json"
    assert json.loads(put.content) == {"id": "a/1", "amount": "12.30",
                                       "at": "2024-05-01T12:00:00+00:00"}
    assert delete.method == "DELETE" and delete.content == b""
    assert "Content-Type" not in delete.headers
    assert delete.headers["X-Request-Id"] == "crm:api:0000000000001000:2"


def test_a_body_that_cannot_be_encoded_is_terminal_and_not_sent() -> None:
    rec = Recorder()
    bad = HttpChange((1, 0), ("crm.contacts", "a"), "PUT", "/contacts/a", {"v": b"\x00"}, "k")
    with sink(rec) as s:
        out = s.send([bad, change(1, "a")])
    assert (out[0].ok, out[0].transient, out[0].status) == (False, False, None)
    assert out[0].error is not None and "not JSON serializable" in out[0].error
    assert out[1].parked and rec.arrivals == []


def test_base_url_credentials_are_not_shown() -> None:
    s = HttpSink("https://user:pw@crm.example/api/")
    assert "pw" not in repr(s)
    s.close()


# -- Endpoint, idempotency key, Retry-After ------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "method", "template"),
    [
        ("PUT /contacts/{id}", "PUT", "/contacts/{id}"),
        ("  delete   /contacts/{id}  ", "DELETE", "/contacts/{id}"),  # any case, any spacing
        ("PATCH /orgs/{org_id}/contacts/{id}?upsert=true", "PATCH",
         "/orgs/{org_id}/contacts/{id}?upsert=true"),
        ("POST /contacts", "POST", "/contacts"),
        ("PUT /literal/{{braces}}", "PUT", "/literal/{{braces}}"),
    ],
)
def test_endpoint_parse(text: str, method: str, template: str) -> None:
    e = Endpoint.parse(text)
    assert (e.method, e.path_template) == (method, template)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("GET /contacts/{id}", "method must be one of PUT, POST, PATCH, DELETE"),
        ("PUT contacts/{id}", "expected '<METHOD> /path/{field}'"),  # no leading slash
        ("PUT", "expected '<METHOD> /path/{field}'"),
        ("/contacts/{id}", "expected '<METHOD> /path/{field}'"),
        ("PUT /a b", "expected '<METHOD> /path/{field}'"),
        ("PUT /contacts/{}", "placeholder {} must be a plain field name"),
        ("PUT /contacts/{0}", "placeholder {0} must be a plain field name"),
        ("PUT /contacts/{id!r}", "placeholder {id!r} must be a plain field name"),
        ("PUT /contacts/{id:>5}", "placeholder {id:>5} must be a plain field name"),
        ("PUT /contacts/{a.b}", "placeholder {a.b} must be a plain field name"),
        ("PUT /contacts/{id", "expected '}'"),
        ("PUT /contacts/id}", "Single '}'"),
    ],
)
def test_endpoint_parse_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="endpoint") as err:
        Endpoint.parse(text)
    assert message in str(err.value)


def test_endpoint_path() -> None:
    e = Endpoint.parse("PUT /orgs/{org}/contacts/{id}")
    assert e.fields == ("org", "id")
    assert e.path({"org": 7, "id": "a/b c?d", "other": 1}) == "/orgs/7/contacts/a%2Fb%20c%3Fd"
    assert Endpoint.parse("PUT /x/{{y}}").path({}) == "/x/{y}"
    with pytest.raises(ValueError, match=r"field 'id' is missing \(have: org\)"):
        e.path({"org": 7})
    with pytest.raises(ValueError, match="field 'id' is null"):
        e.path({"org": 7, "id": None})
    with pytest.raises(ValueError, match="method must be one of"):
        Endpoint("GET", "/x")  # direct construction is validated too


def test_idempotency_key_is_stable_and_distinct() -> None:
    k = idempotency_key("crm", "api", (0x16B374D848, 3))
    assert k == "crm:api:00000016B374D848:3"
    assert k == idempotency_key("crm", "api", Position(0x16B374D848, 3))
    others = {
        idempotency_key("crm2", "api", (0x16B374D848, 3)),
        idempotency_key("crm", "api2", (0x16B374D848, 3)),
        idempotency_key("crm", "api", (0x16B374D849, 3)),
        idempotency_key("crm", "api", (0x16B374D848, 4)),
        idempotency_key("crm", "api", (0x16B374D848, 3), op_index=1),
    }
    assert len(others) == 5 and k not in others
    # Keys sort in stream order within a pipeline and target (fixed-width LSN).
    assert idempotency_key("p", "t", (0xF, 0)) < idempotency_key("p", "t", (0x10, 0))


def test_http_change_from_mapped_ops() -> None:
    up, de = Endpoint.parse("PUT /contacts/{id}"), Endpoint.parse("DELETE /contacts/{id}")
    kw: dict[str, Any] = dict(pipeline="crm", target="api", upsert=up, delete=de)
    u = http_change(Upsert("public.c", ("7",), {"id": "7", "name": "Ann"}, False,
                           Position(0x20, 1)), ["id"], **kw)
    assert (u.method, u.path, u.body, u.key) == ("PUT", "/contacts/7",
                                                 {"id": "7", "name": "Ann"}, ("public.c", "7"))
    assert u.idempotency_key == "crm:api:0000000000000020:1"
    # A key change: DELETE old key and PUT new key share a position, not an idempotency key.
    d = http_change(Delete("public.c", ("6",), Position(0x20, 1)), ["id"], **kw)
    u2 = http_change(Upsert("public.c", ("7",), {"id": "7"}, False, Position(0x20, 1)), ["id"],
                     op_index=1, **kw)
    assert (d.method, d.path, d.body) == ("DELETE", "/contacts/6", None)
    assert d.idempotency_key != u2.idempotency_key
    with pytest.raises(ValueError, match="TRUNCATE of public.c at lsn 0/20 seq 1"):
        http_change(Truncate("public.c", Position(0x20, 1)), ["id"], **kw)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("5", 5.0),
        (" 0.25 ", 0.25),
        ("-3", 0.0),
        ("soon", None),
        ("nan", None),
        (format_datetime(dt.datetime(2030, 1, 1, 0, 0, 30, tzinfo=dt.timezone.utc), usegmt=True),
         30.0),  # an HTTP-date 30 s after "now"
        ("Tue, 01 Jan 2030 00:00:00 GMT", 0.0),  # a date that has passed (weekday is ignored)
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    now = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc).timestamp()
    if value == "Tue, 01 Jan 2030 00:00:00 GMT":
        now += 60
    assert parse_retry_after(value, now=now) == expected


# -- a real server on 127.0.0.1 --------------------------------------------------------------


def make_app() -> Any:
    """A tiny CRM-like API: ``PUT``/``DELETE /contacts/{id}`` after ``SYNC_BENCH_LATENCY_S``,
    recording arrival order and in-flight counts per key. Also a uvicorn ``--factory``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    latency = float(os.environ.get("SYNC_BENCH_LATENCY_S", "0.02"))
    arrivals: list[tuple[str, int]] = []
    in_flight: Counter[str] = Counter()
    max_in_flight: Counter[str] = Counter()
    peers: set[Any] = set()

    async def contact(request: Request) -> Response:
        k = request.path_params["id"]
        n = json.loads(await request.body()).get("n", -1) if request.method == "PUT" else -1
        arrivals.append((k, n))
        peers.add(request.client)  # (host, port): one per connection
        in_flight[k] += 1
        max_in_flight[k] = max(max_in_flight[k], in_flight[k])
        try:
            await asyncio.sleep(latency)
        finally:
            in_flight[k] -= 1
        return JSONResponse({"id": k})

    app = Starlette(routes=[Route("/contacts/{id}", contact, methods=["PUT", "DELETE"])])
    app.state.arrivals = arrivals
    app.state.max_in_flight = max_in_flight
    app.state.peers = peers
    return app


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, Any]]:
    uvicorn = pytest.importorskip("uvicorn")
    pytest.importorskip("starlette")
    app = make_app()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                        access_log=False))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        srv.should_exit = True
        thread.join(10)
        sock.close()


def test_real_server_concurrency_across_keys_with_per_key_order(server: tuple[str, Any]) -> None:
    url, app = server
    latency, n, keys, concurrency = 0.02, 200, 50, 32
    changes = interleaved(n_keys=keys, per_key=n // keys, seed=3)
    with HttpSink(url, concurrency=concurrency) as s:
        s.send([change(10_000, "warmup")])
        app.state.arrivals.clear()
        t0 = time.perf_counter()
        out = s.send(changes)
        elapsed = time.perf_counter() - t0
        arrivals = list(app.state.arrivals)
        again = s.send([change(10_001 + i, f"again{i}") for i in range(64)])
        assert all(o.ok for o in again)
    sequential = n * latency
    assert all(o.ok for o in out), [o.error for o in out if not o.ok][:3]
    assert elapsed < 0.5 * sequential, f"{elapsed:.2f}s vs sequential {sequential:.2f}s"
    # Connections are kept alive and reused across calls: at most one per lane.
    assert 1 < len(app.state.peers) <= concurrency
    per_key: dict[str, list[int]] = defaultdict(list)
    for k, pos in arrivals:
        per_key[k].append(pos)
    assert dict(per_key) == expected_order(changes)
    assert max(app.state.max_in_flight[k] for k in per_key) == 1


# -- benchmark (python -m sync_pipelines_tests.test_http_sink) ---------------------------------


def _workload(n: int, n_keys: int, hot_share: float, hot_keys: int, seed: int = 0
              ) -> list[HttpChange]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if hot_keys and rng.random() < hot_share:
            k = rng.randrange(hot_keys)
        else:
            k = hot_keys + rng.randrange(n_keys - hot_keys) if hot_keys else i % n_keys
        out.append(change(i, f"k{k}"))
    return out


def _bench_one(label: str, url: str, transport: httpx.AsyncBaseTransport | None,
               changes: list[HttpChange], concurrency: int, latency: float) -> None:
    chain = max(Counter(c.key for c in changes).values())
    bound = max(len(changes) * latency / concurrency, chain * latency)
    with HttpSink(url, concurrency=concurrency, transport=transport) as s:
        s.send([change(0, "warmup")])
        t0, cpu0 = time.perf_counter(), time.process_time()
        out = s.send(changes)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    assert all(o.ok for o in out)
    print(f"{label:<40} {len(set(c.key for c in changes)):>6} keys, longest chain {chain:>4}: "
          f"{elapsed:6.2f}s = {len(changes) / elapsed:5.0f}/s "
          f"(bound {bound:5.2f}s: {bound / elapsed:4.0%}); "
          f"client CPU {cpu * 1000 / len(changes):4.2f} ms/change")


def main() -> None:
    concurrency, latency, n = 64, 0.02, 10_000
    cases = [
        ("uniform (10,000 keys)", _workload(n, 10_000, 0.0, 0)),
        ("80% on 1% (100) of 10,000 keys", _workload(n, 10_000, 0.8, 100)),
        ("80% on 10 of 10,000 keys", _workload(n, 10_000, 0.8, 10)),
    ]

    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(latency)
        return httpx.Response(200)

    print(f"{n} changes, concurrency {concurrency}, server latency {latency * 1000:.0f} ms: "
          f"Little's law {concurrency / latency:.0f}/s; bound = max(n·latency/concurrency, "
          "longest chain·latency)")
    for label, changes in cases:
        _bench_one(f"mock, {label}", BASE, httpx.MockTransport(slow), changes,
                   concurrency, latency)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "SYNC_BENCH_LATENCY_S": str(latency)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory",
         "sync_pipelines_tests.test_http_sink:make_app", "--host", "127.0.0.1", "--port",
         str(port), "--log-level", "warning", "--no-access-log", "--lifespan", "off"], env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                httpx.put(f"{url}/contacts/x", json={"n": 0})
                break
            except httpx.TransportError:
                time.sleep(0.05)
        for label, changes in cases:
            _bench_one(f"uvicorn, {label}", url, None, changes, concurrency, latency)
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
