"""HTTP sink: per-key ordering, parking, retries, error mapping and the wire of the HTTP target.

Every test talks to a real server on 127.0.0.1: :class:`HandlerServer`, an asyncio server in a
thread (HTTP/1.1 parsed by h11, a different parser from the sink's) that turns each request into
an ``httpx.Request`` for an async handler and writes back the ``httpx.Response`` it returns; a
handler that raises :class:`Drop` makes the server close the connection without answering.
Covered: per-key order with concurrency across keys, fair start order, parking behind a failed
change while other keys flow, inline retry on 429/503 with ``Retry-After`` (same idempotency
key), Retry-After over the cap, the status → transient/terminal mapping, timeouts, refused and
dropped connections, a keep-alive connection the server closed being retried once on a fresh
one, chunked and close-delimited response bodies, request headers and JSON bodies, base URL
checks, ``Endpoint`` parsing and path filling, ``idempotency_key`` stability. Then an
integration test against uvicorn/starlette checking that concurrency across keys pays off while
per-key order holds and connections are reused.

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

import h11
import httpx
import pytest

from sync_pipelines.engine.delivery.sinks.http_client import (
    Endpoint,
    HttpChange,
    HttpClient,
    http_change,
    idempotency_key,
    parse_retry_after,
)
from sync_pipelines.engine.mapping.mapper import Delete, Truncate, Upsert
from sync_pipelines.engine.wire.change import Position

Handler = Callable[[httpx.Request], Coroutine[None, None, httpx.Response]]
MakeSink = Callable[..., HttpClient]


class Drop(Exception):
    """Raised by a handler: the server closes the connection without answering."""


class HandlerServer:
    """A real HTTP/1.1 server on 127.0.0.1 running an async ``handler`` per request.

    Runs its own event loop in a daemon thread, so handlers may ``await asyncio.sleep`` while
    the sink (which has its own loop in the test's thread) keeps other requests in flight. Each
    request the handler sees carries ``X-Test-Connection`` (a connection number) and
    ``X-Test-Request-On-Connection`` (1 for the first request on that connection). A response
    is sent with ``Content-Length`` unless the handler set ``Transfer-Encoding: chunked`` or
    ``X-Test-Close-Delimited`` (body ended by closing the connection).
    """

    def __init__(self) -> None:
        self.handler: Handler | None = None
        self.connections = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10), "test server did not start"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number, served = self.connections, 0
        conn = h11.Connection(h11.SERVER)

        async def next_event() -> Any:
            while True:
                event = conn.next_event()
                if event is not h11.NEED_DATA:
                    return event
                conn.receive_data(await reader.read(65536))

        try:
            while True:
                event = await next_event()
                if not isinstance(event, h11.Request):
                    return  # closed by the client (or a protocol error: nothing to answer)
                head, body = event, b""
                while not isinstance(event := await next_event(), h11.EndOfMessage):
                    body += event.data
                served += 1
                request = httpx.Request(
                    head.method.decode(), self.url + head.target.decode(),
                    headers=[(k.decode(), v.decode("latin-1")) for k, v in head.headers]
                    + [("X-Test-Connection", str(number)),
                       ("X-Test-Request-On-Connection", str(served))],
                    content=body)
                assert self.handler is not None
                try:
                    response = await self.handler(request)
                except Drop:
                    writer.transport.abort()
                    return
                content = response.content
                headers = [(k, v) for k, v in response.headers.items()
                           if k.lower() not in ("content-length", "x-test-close-delimited")]
                close_delimited = "x-test-close-delimited" in response.headers
                if not close_delimited and "transfer-encoding" not in response.headers:
                    headers.append(("Content-Length", str(len(content))))
                if close_delimited:  # h11 refuses to write this framing: do it by hand
                    writer.write(f"HTTP/1.1 {response.status_code} X\r\n".encode()
                                 + "".join(f"{k}: {v}\r\n" for k, v in headers).encode()
                                 + b"\r\n" + content)
                    await writer.drain()
                    return
                writer.write(conn.send(h11.Response(status_code=response.status_code,
                                                    headers=headers)))
                if content:
                    if "transfer-encoding" in response.headers:  # two chunks
                        half = len(content) // 2
                        writer.write(conn.send(h11.Data(data=content[:half])))
                        writer.write(conn.send(h11.Data(data=content[half:])))
                    else:
                        writer.write(conn.send(h11.Data(data=content)))
                writer.write(conn.send(h11.EndOfMessage()))
                await writer.drain()
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.RemoteProtocolError):
            return
        finally:
            writer.close()

    async def _shutdown(self) -> None:
        self.server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def change(n: int, key: str, *, method: str = "PUT", body: dict[str, Any] | None = None,
           lsn: int = 0x1000) -> HttpChange:
    """The n-th change of the stream, for ``key``; the body carries ``n`` so a server can tell."""
    if method != "DELETE" and body is None:
        body = {"id": key, "n": n}
    pos = (lsn, n)
    return HttpChange(pos, ("crm.contacts", key), method, f"/contacts/{key}", body,
                      idempotency_key("crm", "api", pos))


@pytest.fixture(scope="module")
def handler_server() -> Iterator[HandlerServer]:
    server = HandlerServer()
    yield server
    server.stop()


@pytest.fixture
def sink(handler_server: HandlerServer) -> MakeSink:
    """``sink(handler, **kw)``: an HttpClient to the test server, which runs ``handler``."""

    def make(handler: Handler, **kw: Any) -> HttpClient:
        handler_server.handler = handler
        return HttpClient(handler_server.url, **kw)

    return make


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


def test_per_key_order_with_concurrency_across_keys(sink: MakeSink) -> None:
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


def test_chains_start_in_order_of_their_first_change(sink: MakeSink) -> None:
    rec = Recorder()
    keys = ["c", "a", "c", "b", "a", "d"]
    changes = [change(n, k) for n, k in enumerate(keys)]
    with sink(rec, concurrency=1) as s:
        s.send(changes)
    # One slot, FIFO: each key's first change in stream order, then the chains' next changes.
    assert [key_of(r) for r in rec.arrivals] == ["c", "a", "b", "d", "c", "a"]


def test_sink_is_reused_across_calls_and_closes(sink: MakeSink) -> None:
    rec = Recorder()
    s = sink(rec)
    assert s.send([]) == []
    assert s.send([change(0, "a")])[0].ok
    assert s.send([change(1, "a")])[0].ok
    s.close()
    s.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        s.send([change(2, "a")])


def test_send_refuses_a_running_event_loop(sink: MakeSink) -> None:
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
def test_failure_parks_the_rest_of_its_key_and_others_flow(
        status: int, transient: bool, sink: MakeSink) -> None:
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


def test_429_with_retry_after_is_retried_inline_with_the_same_idempotency_key(
        sink: MakeSink) -> None:
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


def test_inline_wait_holds_only_its_own_key(sink: MakeSink) -> None:
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


def test_inline_retries_are_bounded(sink: MakeSink) -> None:
    attempts = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal attempts
        attempts += 1
        return httpx.Response(429, headers={"Retry-After": "0"})

    with sink(handler, max_inline_retries=3) as s:
        [out] = s.send([change(0, "a")])
    assert attempts == 4  # the first try and three retries
    assert (out.ok, out.transient, out.status, out.retry_after_s) == (False, True, 429, 0.0)


def test_retry_after_over_the_cap_is_returned_to_the_caller(sink: MakeSink) -> None:
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
                        retry_after: float | None,
        sink: MakeSink) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, text="body")

    with sink(handler) as s:
        [out] = s.send([change(0, "a", method=method)])
    assert (out.ok, out.transient, out.status, out.retry_after_s) == (
        ok, transient, status, retry_after)
    assert out.error is None if ok else out.error == f"HTTP {status}: body"


def test_422_error_keeps_the_first_500_characters_of_the_body(sink: MakeSink) -> None:
    body = "x" * 400 + "é" * 400 + "TAIL"

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(422, text=body)

    with sink(handler) as s:
        [out] = s.send([change(0, "a")])
    assert not out.ok and not out.transient
    assert out.error == "HTTP 422: " + body[:500]


def test_a_dropped_connection_is_transient(sink: MakeSink) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        raise Drop  # the server closes the connection without answering

    with sink(handler) as s:
        out = s.send([change(0, "a"), change(1, "a"), change(2, "b", method="DELETE")])
    assert (out[0].ok, out[0].transient, out[0].status) == (False, True, None)
    assert out[0].error == "connection error: server closed the connection before answering"
    assert out[1].parked and out[1].transient
    assert not out[2].parked and out[2].transient


def test_a_kept_alive_connection_closed_by_the_server_is_retried_once_on_a_fresh_one(
        sink: MakeSink) -> None:
    seen: list[tuple[str, str, str]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.headers["X-Test-Connection"],
                     request.headers["X-Test-Request-On-Connection"],
                     request.headers["Idempotency-Key"]))
        if request.headers["X-Test-Request-On-Connection"] == "2":
            raise Drop  # as a server does when its keep-alive timeout ends as a request comes
        return httpx.Response(200)

    with sink(handler, concurrency=1) as s:
        assert [o.ok for o in s.send([change(0, "a")])] == [True]
        [again] = s.send([change(1, "a")])
    assert again.ok, again.error
    (c1, n1, _), (c2, n2, k2), (c3, n3, k3) = seen
    assert (n1, c2, n2) == ("1", c1, "2")  # the second request went on the kept connection…
    assert (c3, n3) != (c1, "3") and n3 == "1" and k3 == k2  # …and again on a new one, same key


def test_a_failure_on_a_fresh_connection_is_not_retried(sink: MakeSink) -> None:
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise Drop

    with sink(handler, concurrency=1) as s:
        [out] = s.send([change(0, "a")])
    assert not out.ok and calls == 1


@pytest.mark.parametrize("framing", ["chunked", "close-delimited"])
def test_error_bodies_are_read_whatever_their_framing(framing: str, sink: MakeSink) -> None:
    header = ("Transfer-Encoding", "chunked") if framing == "chunked" else (
        "X-Test-Close-Delimited", "1")

    async def handler(request: httpx.Request) -> httpx.Response:
        n = json.loads(request.content)["n"]
        return httpx.Response(422 if n == 1 else 200, headers=[header],
                              content=b"bad field: email " * 3 if n == 1 else b"{}")

    with sink(handler, concurrency=1) as s:
        out = s.send([change(0, "a"), change(1, "b"), change(2, "c")])
    assert [o.ok for o in out] == [True, False, True]
    assert out[1].error == "HTTP 422: " + ("bad field: email " * 3).strip()


def test_a_huge_response_body_is_cut_and_the_connection_dropped(sink: MakeSink) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, content=b"x" * (1024 * 1024))

    with sink(handler) as s:
        [out] = s.send([change(0, "a")])
    assert (out.ok, out.transient, out.status) == (False, True, 500)
    assert out.error == "HTTP 500: " + "x" * 500


def test_a_hanging_server_hits_the_deadline(sink: MakeSink) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
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
    with HttpClient(f"http://127.0.0.1:{port}", timeout_s=2) as s:
        [out] = s.send([change(0, "a")])
    assert (out.ok, out.transient, out.status) == (False, True, None)
    assert out.error is not None and out.error.startswith(
        f"connection error: cannot connect to 127.0.0.1:{port}")


# -- requests --------------------------------------------------------------------------------


def test_requests_carry_headers_auth_body_and_idempotency_key(sink: MakeSink) -> None:
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
    assert put.url.raw_path == b"/contacts/a%2F1"
    assert put.headers["X-Request-Id"] == "k-1"
    assert put.headers["X-Tenant"] == "acme"
    assert put.headers["Authorization"] == httpx.BasicAuth("user", "s3cret")._auth_header
    assert put.headers["Content-Type"] == "application/json"
    assert json.loads(put.content) == {"id": "a/1", "amount": "12.30",
                                       "at": "2024-05-01T12:00:00+00:00"}
    assert delete.method == "DELETE" and delete.content == b""
    assert "Content-Type" not in delete.headers
    assert delete.headers["X-Request-Id"] == "crm:api:0000000000001000:2"


def test_a_body_that_cannot_be_encoded_is_terminal_and_not_sent(sink: MakeSink) -> None:
    rec = Recorder()
    bad = HttpChange((1, 0), ("crm.contacts", "a"), "PUT", "/contacts/a", {"v": b"\x00"}, "k")
    with sink(rec) as s:
        out = s.send([bad, change(1, "a")])
    assert (out[0].ok, out[0].transient, out[0].status) == (False, False, None)
    assert out[0].error is not None and "not JSON serializable" in out[0].error
    assert out[1].parked and rec.arrivals == []


def test_base_url_credentials_become_basic_auth_and_are_not_shown(
        handler_server: HandlerServer, sink: MakeSink) -> None:
    s = HttpClient("https://user:pw@crm.example/api/")
    assert "pw" not in repr(s) and "crm.example/api" in repr(s)
    s.close()
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    sink(handler).close()  # installs the handler
    url = handler_server.url.replace("http://", "http://us%40er:p%3Aw@") + "/api/v2/"
    with HttpClient(url) as s:
        assert s.send([change(0, "a")])[0].ok
    assert seen[0].url.raw_path == b"/api/v2/contacts/a"  # the base path is kept
    assert seen[0].headers["Authorization"] == httpx.BasicAuth("us@er", "p:w")._auth_header


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://crm.example", "must start with http:// or https://"),
        ("crm.example/api", "must start with http:// or https://"),
        ("http:///contacts", "has no host"),
        ("http://crm.example:99999", "not a URL"),
        ("http://crm.example/api?key=1", "must not have a query"),
    ],
)
def test_unusable_base_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HttpClient(url)


def test_a_pipeline_with_an_unusable_base_url_fails_with_a_spec_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from sync_pipelines.engine.errors import SpecError
    from sync_pipelines.engine.pipeline import open_sink
    from sync_pipelines.engine.spec import parse_spec

    spec = parse_spec({
        "state": {"dsn_env": "UNUSED_STATE_DSN"},
        "pipelines": {"crm": {
            "source": {"dsn_env": "UNUSED_SOURCE_DSN"},
            "tables": ["public.contacts"],
            "targets": {"api": {"kind": "http", "base_url_env": "TEST_CRM_URL",
                                "tables": {"public.contacts": {"upsert": "PUT /c/{id}"}}}},
        }},
    }, source="test")
    monkeypatch.setenv("TEST_CRM_URL", "ftp://user:hunter2@crm.example/")
    with pytest.raises(SpecError) as err:
        open_sink(spec.pipelines["crm"], "api")
    message = str(err.value)
    assert "pipeline 'crm': target 'api'" in message and "$TEST_CRM_URL" in message
    assert "http:// or https://" in message and "hunter2" not in message


@pytest.mark.parametrize("headers", [{"X-Bad": "a\r\nInjected: 1"}, {"Bad Name": "v"}])
def test_header_injection_is_refused(headers: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="header"):
        HttpClient("http://127.0.0.1:1", headers=headers)


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
    with HttpClient(url, concurrency=concurrency) as s:
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


def _bench_one(label: str, url: str, changes: list[HttpChange], concurrency: int,
               latency: float) -> None:
    chain = max(Counter(c.key for c in changes).values())
    bound = max(len(changes) * latency / concurrency, chain * latency)
    with HttpClient(url, concurrency=concurrency) as s:
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

    print(f"{n} changes, concurrency {concurrency}, server latency {latency * 1000:.0f} ms: "
          f"Little's law {concurrency / latency:.0f}/s; bound = max(n·latency/concurrency, "
          "longest chain·latency)")
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
            _bench_one(f"uvicorn, {label}", url, changes, concurrency, latency)
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
