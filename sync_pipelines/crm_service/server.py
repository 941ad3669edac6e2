"""``CrmServer``: the reference CRM service on a free 127.0.0.1 port, in a background thread.

Used by the test fixtures and the demo::

    with CrmServer() as crm:
        httpx.put(f"{crm.base_url}/contacts/1", json={...}, headers={"Idempotency-Key": "k1"})
        assert crm.received()["applied"] == 1

The listening socket is bound (port 0) before uvicorn starts and handed to it, so the port
cannot be taken by someone else in between. ``start()`` returns once the server answers an
admin request; ``stop()`` asks uvicorn to exit and joins the thread (forcing the exit after
``stop_timeout`` seconds). The helpers call the admin API (see
:mod:`sync_pipelines.crm_service.app`) over real HTTP. The server thread is a daemon: if the
owning process dies, the server dies with it, and its in-memory state is gone.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Any

import httpx
import uvicorn

from .app import DEFAULT_IDEMPOTENCY_HEADER, create_app

HOST = "127.0.0.1"


class CrmServer:
    """Runs :func:`~sync_pipelines.crm_service.app.create_app` with uvicorn until stopped."""

    def __init__(
        self,
        *,
        bearer_token: str | None = None,
        basic: tuple[str, str] | None = None,
        max_body_bytes: int = 1_000_000,
        idempotency_header: str = DEFAULT_IDEMPOTENCY_HEADER,
        startup_timeout: float = 10.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self.app = create_app(
            max_body_bytes=max_body_bytes,
            idempotency_header=idempotency_header,
            bearer_token=bearer_token,
            basic=basic,
        )
        self.idempotency_header = idempotency_header
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._client: httpx.Client | None = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>`` (no trailing slash); only while running."""
        if self._server is None:
            raise RuntimeError("CrmServer is not running; call start() or use it as a context")
        return f"http://{HOST}:{self.port}"

    def start(self) -> CrmServer:
        """Start serving and wait until the server answers; returns ``self``."""
        if self._server is not None:
            raise RuntimeError("CrmServer is already running")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((HOST, 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            host=HOST,
            port=self.port,
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=int(self.stop_timeout) or 1,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run,
            kwargs={"sockets": [sock]},
            name=f"crm-server-{self.port}",
            daemon=True,
        )
        self._server, self._thread, self._socket = server, thread, sock
        thread.start()
        try:
            self._wait_until_started()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_started(self) -> None:
        assert self._server is not None and self._thread is not None
        deadline = time.monotonic() + self.startup_timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"CRM server thread exited during startup (port {self.port})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRM server did not start within {self.startup_timeout}s")
            time.sleep(0.005)
        self._client = httpx.Client(base_url=self.base_url, timeout=10.0)
        self._client.get("/_admin/faults").raise_for_status()

    def stop(self) -> None:
        """Stop serving (and sending webhooks) and join the thread; safe to call twice."""
        self.app.state.crm.sender.stop()
        server, thread = self._server, self._thread
        if self._client is not None:
            self._client.close()
            self._client = None
        if server is not None and thread is not None:
            server.should_exit = True
            thread.join(self.stop_timeout)
            if thread.is_alive():
                server.force_exit = True
                thread.join(self.stop_timeout)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def __enter__(self) -> CrmServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- admin helpers (sync HTTP calls) ----------------------------------------------------

    def _admin(self, method: str, path: str, json: Any = None) -> Any:
        if self._client is None:
            raise RuntimeError("CrmServer is not running")
        response = self._client.request(method, f"/_admin/{path}", json=json)
        if response.status_code >= 400:
            raise ValueError(
                f"{method} /_admin/{path} answered {response.status_code}: {response.text}"
            )
        return response.json()

    def received(self) -> dict[str, Any]:
        """``GET /_admin/received``: ``{"writes": [...], "applied", "duplicates", "rejected"}``."""
        return self._admin("GET", "received")

    def stats(self) -> dict[str, Any]:
        """``GET /_admin/stats``: status counts and in-flight maxima (overall and per key)."""
        return self._admin("GET", "stats")

    def records(self, resource: str | None = None) -> dict[str, Any]:
        """Every stored record as ``{resource: {id: record}}``, or ``{id: record}`` of one."""
        data = self._admin("GET", "records")
        return data if resource is None else data[resource]

    def configure_webhooks(self, url: str | None, secret: str | None = None,
                           retry_after_s: float = 1.0,
                           event_types: list[str] | None = None) -> None:
        """Send a signed webhook to ``url`` per applied change (None: stop), of the event
        types matching ``event_types`` (globs; all when None)."""
        self._admin("POST", "webhooks", json={"url": url, "secret": secret,
                                              "retry_after_s": retry_after_s,
                                              "event_types": event_types or []})

    def webhooks(self) -> dict[str, Any]:
        """``GET /_admin/webhooks``: pending, sent, attempts, failures, dropped."""
        return self._admin("GET", "webhooks")

    def faults(self) -> dict[str, Any]:
        """``GET /_admin/faults``: the current fault config."""
        return self._admin("GET", "faults")

    def set_faults(self, **faults: Any) -> dict[str, Any]:
        """Replace the fault config (omitted fields take their defaults); returns it.

        Keywords: ``latency_ms``, ``error_rate``, ``rate_limit_every``, ``retry_after_s``,
        ``outage``, ``poison`` (list of ``{"resource", "id", "status"}``), ``seed``. Raises
        ``ValueError`` with the server's message when the config is invalid.
        """
        return self._admin("POST", "faults", json=faults)

    def reset(self) -> None:
        """Clear records, the received log, the idempotency store, stats and faults."""
        self._admin("POST", "reset")
