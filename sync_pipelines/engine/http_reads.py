"""The HTTP client of every reader of an API (a link's reads, reconciliation, the poller).

Contract: :func:`read_client` makes an :class:`httpx.Client` whose transport sends a ``GET`` or
``HEAD`` again, once and at once, when it fails on the connection before any answer arrived
(the server closed it, or reset it, while the request went out). Everything else — timeouts,
status codes, a second failure — reaches the caller as before, which decides what is
transient.

Why: a kept-alive connection can be closed by the server just as the client reuses it
(uvicorn, node and gunicorn close idle connections after 2–5 s; httpx keeps them 5 s). The
request then fails with ``RemoteProtocolError``/``ReadError`` though the server was fine, and a
whole window of a link was given up for it (a CI run saw it). A GET is safe to send twice; a
write is never retried here (the HTTP sink has idempotency keys and its own retry queue).

What a crash does: nothing is kept; the client holds only connections.
"""

from __future__ import annotations

from typing import Any

import httpx

IDEMPOTENT = frozenset({"GET", "HEAD"})

# The failures of a connection that the server dropped under the request: nothing of an answer
# came back, so sending the request again on a new connection is what a browser does too.
STALE_CONNECTION = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


class ReadTransport(httpx.HTTPTransport):
    """Retries an idempotent request once after a dropped connection."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method not in IDEMPOTENT:
            return super().handle_request(request)
        try:
            return super().handle_request(request)
        except STALE_CONNECTION:
            return super().handle_request(request)


def read_client(*, limits: httpx.Limits | None = None, **kwargs: Any) -> httpx.Client:
    """An :class:`httpx.Client` (``kwargs`` as for it) whose GETs survive a dropped connection."""
    limits = limits or httpx.Limits()
    return httpx.Client(transport=ReadTransport(limits=limits), limits=limits, **kwargs)
