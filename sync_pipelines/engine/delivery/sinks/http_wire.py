"""One kept-alive HTTP/1.1 connection for the HTTP sink: write a request, read its response.

Contract: :meth:`Connection.exchange` writes one complete request (bytes built by
:func:`request_bytes`) and returns the :class:`Response` (status, the headers the sink reads,
the first ``keep`` bytes of the body). One exchange at a time per connection. It raises
:class:`WireError` for everything the network or the server does wrong (connect refused, reset,
closed before the response ended, a malformed or oversized response); ``WireError.unanswered``
says no byte of a response arrived, so a request on a reused keep-alive connection that the
server had already closed can be sent again on a fresh one. After a ``WireError``, a timeout or
a cancellation the connection is closed and must not be used again; :attr:`Connection.reusable`
says whether it may carry the next request.

Why not httpx here: the sink spends its CPU per request, and on a 2-core machine httpx's
layers (request/response models, httpcore's pool and h11) cost ~1 ms of CPU per request, which
caps one sink near 1,000 requests/s whatever the concurrency. This module writes the request
head itself and parses the response with ``httptools`` (llhttp, the parser uvicorn and Node use):
~0.1 ms per request. httpx stays the client for everything that is not the delivery hot path.

What a crash does: nothing is kept here beyond the open socket; a request interrupted mid-way
may or may not have reached the server, which is why every request carries an idempotency key.

Not supported (documented in the README): proxies, HTTP/2, redirects (3xx is an outcome), request
bodies streamed from files; responses with ``Content-Encoding`` are read as bytes (only the
status and an error excerpt are used).
"""

from __future__ import annotations

import asyncio
import re
import ssl
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import httptools

MAX_HEAD_BYTES = 64 * 1024
"""Response status line + headers larger than this are refused (a misbehaving server)."""

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")


class WireError(Exception):
    """The exchange failed below HTTP semantics: connect, reset, early close, bad response."""

    def __init__(self, message: str, *, unanswered: bool) -> None:
        super().__init__(message)
        self.unanswered = unanswered
        """No byte of a response arrived (a retry on a fresh connection is safe to try)."""


@dataclass(frozen=True)
class Origin:
    """Where requests go: scheme, host, port, the base path every request path is appended to."""

    scheme: str
    host: str
    port: int
    base_path: str
    """Without a trailing slash: ``https://api.example/v1/`` → ``/v1``; the root is ``""``."""
    userinfo: tuple[str, str] | None
    """``user:password@`` from the URL, for basic auth; never shown."""

    @classmethod
    def parse(cls, url: str) -> Origin:
        """Parse a base URL; ``ValueError`` (without the credentials) when it is unusable."""
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except ValueError as err:
            raise ValueError(f"base URL is not a URL: {err}") from None
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"base URL must start with http:// or https://, got scheme "
                             f"{parts.scheme!r}" if parts.scheme else
                             "base URL must start with http:// or https://")
        if not parts.hostname:
            raise ValueError("base URL has no host")
        if parts.query or parts.fragment:
            raise ValueError("base URL must not have a query (?…) or fragment (#…); put query "
                             "parameters in the endpoint, e.g. 'PUT /contacts/{id}?upsert=1'")
        userinfo = None
        if parts.username is not None:
            userinfo = (unquote(parts.username), unquote(parts.password or ""))
        return cls(parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80),
                   parts.path.rstrip("/"), userinfo)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    def shown(self) -> str:
        """The URL without credentials, for messages."""
        return f"{self.scheme}://{self.host_header}{self.base_path}"


def check_header(name: str, value: str) -> None:
    """``ValueError`` unless ``name`` is an HTTP token and ``value`` is latin-1 text without
    control characters (a CR or LF in a header would let a value inject headers or a second
    request)."""
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"header name {name!r} is not a valid HTTP token")
    if not _VALUE.fullmatch(value):
        raise ValueError(f"header {name!r} must be latin-1 text without control characters")


def header_block(headers: list[tuple[str, str]]) -> bytes:
    """Checked ``Name: value\\r\\n`` lines."""
    for name, value in headers:
        check_header(name, value)
    return "".join(f"{n}: {v}\r\n" for n, v in headers).encode("latin-1")


def request_bytes(method: str, target: str, fixed: bytes, extra: bytes,
                  body: bytes | None) -> bytes:
    """One HTTP/1.1 request: ``target`` is the absolute path (already URL-quoted), ``fixed`` the
    connection-wide header lines (Host, auth, the spec's headers), ``extra`` this request's
    lines (idempotency key, content type), both from :func:`header_block`."""
    if any(c in target for c in " \r\n\t") or not target.startswith("/"):
        raise ValueError(f"request path {target!r} must start with '/' and have no whitespace")
    head = f"{method} {target} HTTP/1.1\r\n".encode("latin-1")
    if body is None:
        length = b"Content-Length: 0\r\n" if method != "DELETE" else b""
        return head + fixed + extra + length + b"\r\n"
    return b"".join((head, fixed, extra, b"Content-Length: %d\r\n\r\n" % len(body), body))


@dataclass(frozen=True)
class Response:
    status: int
    retry_after: str | None
    """The ``Retry-After`` header, raw."""
    body: bytes
    """The first ``keep`` bytes of the body (a body over the cap ends the connection)."""


class _Protocol(asyncio.Protocol):
    """Feeds received bytes to llhttp; resolves the pending exchange's future."""

    def __init__(self, keep: int, body_cap: int) -> None:
        self.keep, self.body_cap = keep, body_cap
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._waiter: asyncio.Future[Response] | None = None
        self._reset()

    def _reset(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._head_bytes = 0
        self._retry_after: str | None = None
        self._body = bytearray()
        self._body_bytes = 0
        self._headers_done = False
        self._done = False
        self._answered = False

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            self._abort(None)  # bytes nobody asked for: the connection is out of step
            return
        self._answered = True
        if not self._headers_done:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail("the server switched protocols")
        except httptools.HttpParserError as err:
            if not self._done:  # bytes after a complete response are the server's problem
                self._fail(f"malformed response: {err}")
            return
        if not self._done and not self._headers_done and self._head_bytes > MAX_HEAD_BYTES:
            self._fail(f"response headers larger than {MAX_HEAD_BYTES} bytes")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            if self._headers_done:
                # A body delimited by the connection's end (no length, not chunked), or cut
                # short: the status is what the sink needs, so the response stands as read.
                self._finish(close=True)
            else:
                why = f": {exc}" if exc else ""
                self._waiter.set_exception(WireError(
                    f"server closed the connection before answering{why}"
                    if not self._answered else f"server closed the connection mid-response{why}",
                    unanswered=not self._answered))

    # -- httptools callbacks --

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"retry-after":
            self._retry_after = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        if len(self._body) < self.keep:
            self._body += body[: self.keep - len(self._body)]
        self._body_bytes += len(body)
        if self._body_bytes > self.body_cap:
            self._finish(close=True)  # stop reading: the connection is dropped, not drained

    def on_message_complete(self) -> None:
        self._finish(close=not self._parser.should_keep_alive())

    # -- internals --

    def _finish(self, *, close: bool) -> None:
        if self._done:
            return
        self._done = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(Response(self._parser.get_status_code(), self._retry_after,
                                       bytes(self._body)))
        if close:
            self._abort(None)

    def _fail(self, message: str) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(WireError(message, unanswered=False))
        self._abort(None)

    def _abort(self, _: object) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def start(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[Response]:
        self._reset()
        self._waiter = loop.create_future()
        return self._waiter


class Connection:
    """One TCP (or TLS) connection to an :class:`Origin`, one exchange at a time."""

    def __init__(self, protocol: _Protocol) -> None:
        self._protocol = protocol
        self.exchanges = 0
        """Completed exchanges: ``0`` means fresh (a failure is not a stale keep-alive)."""

    @classmethod
    async def open(cls, origin: Origin, ssl_context: ssl.SSLContext | None, *,
                   keep: int, body_cap: int) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await loop.create_connection(
                lambda: _Protocol(keep, body_cap), origin.host, origin.port,
                ssl=ssl_context if origin.scheme == "https" else None,
                server_hostname=origin.host if origin.scheme == "https" else None)
        except ssl.SSLError as err:
            raise WireError(f"TLS handshake failed: {err}", unanswered=True) from None
        except OSError as err:  # refused, unreachable, name resolution (socket.gaierror)
            raise WireError(f"cannot connect to {origin.host_header}: {err}",
                            unanswered=True) from None
        return cls(protocol)

    @property
    def reusable(self) -> bool:
        return not self._protocol.closed

    async def exchange(self, request: bytes) -> Response:
        protocol = self._protocol
        if protocol.closed or protocol.transport is None:
            raise WireError("connection is closed", unanswered=True)
        waiter = protocol.start(asyncio.get_running_loop())
        try:
            protocol.transport.write(request)
            response = await waiter
        except BaseException:
            self.close()  # timeout, cancellation, WireError: the stream is out of step
            raise
        self.exchanges += 1
        return response

    def close(self) -> None:
        self._protocol._abort(None)
