"""The webhook receiver on a free 127.0.0.1 port in a background thread, and a signing sender.

``ReceiverServer(spec)`` runs :func:`sync_pipelines.engine.receiver.create_app` with uvicorn;
``sign(secret, webhook_id, body)`` makes Standard Webhooks headers with the reference library.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import threading
import time
from typing import Any

import httpx
import uvicorn
from standardwebhooks import Webhook

from sync_pipelines.engine.receiver import create_app
from sync_pipelines.engine.spec import SyncSpec

SECRET = "whsec_" + "c3luYy1waXBlbGluZXMtdGVzdC1zZWNyZXQtMzItYnl0ZXMh"  # base64 of a test key
OTHER_SECRET = "whsec_" + "YW5vdGhlci10ZXN0LXNlY3JldC10aGF0LWlzLWxvbmc="


def sign(secret: str, webhook_id: str, body: str | bytes,
         when: dt.datetime | None = None) -> dict[str, str]:
    text = body.decode() if isinstance(body, bytes) else body
    when = when or dt.datetime.now(dt.timezone.utc)
    return {"webhook-id": webhook_id, "webhook-timestamp": str(int(when.timestamp())),
            "webhook-signature": Webhook(secret).sign(webhook_id, when, text),
            "content-type": "application/json"}


def event(kind: str, data: dict[str, Any]) -> str:
    return json.dumps({"type": kind, "data": data}, separators=(",", ":"))


class ReceiverServer:
    def __init__(self, spec: SyncSpec, port: int = 0) -> None:
        self.app = create_app(spec)
        self.port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.client: httpx.Client | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ReceiverServer:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_config=None,
                                log_level="warning", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("receiver did not start")
            time.sleep(0.01)
        self.client = httpx.Client(base_url=self.url, timeout=30)
        return self

    def post(self, pipeline: str, body: str | bytes, headers: dict[str, str]) -> httpx.Response:
        assert self.client is not None
        return self.client.post(f"/ingest/{pipeline}", content=body, headers=headers)

    def __exit__(self, *exc: object) -> None:
        if self.client is not None:
            self.client.close()
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)
