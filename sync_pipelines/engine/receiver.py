"""The webhook receiver: an HTTP service (starlette + uvicorn) for every webhook pipeline.

Routes::

    POST /ingest/<pipeline>                     a Standard Webhooks request (see .capture.webhook)
        202 {"correlation_id", "status_url", "duplicate", "targets"?}  + Location: status URL
        200 the same with every target's outcome, when ``Prefer: wait=N`` got one in time
        200 {"ignored": true} for an event type under ``ignore_event_types`` (nothing staged)
        400 not JSON / not UTF-8 / bad webhook-id      401 signature missing or rejected
        404 no such webhook pipeline                    413 body over ``max_body_bytes``
        422 JSON the record types do not accept (the field is named)
        429 the pipeline's demand budget is full (Retry-After)   503 cannot stage now
    GET  /ingest/<pipeline>/status/<correlation_id>
        200 {"correlation_id", "webhook_id", "table", "received_at", "targets": {target:
            {"status": staged|delivered|held|dead_letter|discarded, ...}}}   404 unknown
    GET  /healthz                                200 {"pipelines": [...]}

Nothing is staged for any 4xx/5xx answer, and no answer carries a secret or a traceback.

Asynchronous by default: the change is staged (with its receipt, in one transaction) before
the 202, and delivered by the pipeline's delivery runs. Synchronous request/reply with
``Prefer: wait=N`` (RFC 7240, at most the source's ``max_wait_seconds``): the receiver delivers
the pipeline's targets itself right away (through the same :func:`~.pipeline.deliver_target`
a delivery run calls, so a call on an idle pipeline is answered in well under a second instead
of waiting for the sensor and the run queue) and answers once every target has an outcome, or
at the deadline with 202. Per-key order holds between this path and the delivery runs because
both take the same per-target lock and deliver windows in position order from the target's
position: whoever holds the lock delivers everything staged before it, in order.

A crash of the receiver loses nothing acknowledged; an in-flight request was not acknowledged,
so the sender retries it (and a change staged just before the crash makes the retry a
duplicate).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .capture.webhook import Accepted, IntakeError, WebhookIntake
from .errors import SyncError
from .pipeline import deliver_target
from .spec import SyncSpec, WebhookSourceSpec
from .staging.receipts import Receipt

FINAL = {"delivered", "held", "dead_letter", "discarded"}
_WAIT = re.compile(r"(?:^|[\s,;])wait\s*=\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


class _TooLarge(Exception):
    pass


async def _read(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _TooLarge()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge()
        chunks.append(chunk)
    return b"".join(chunks)


def _error(status: int, message: str, retry_after: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(int(retry_after))} if retry_after is not None else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _Deliverer:
    """Delivers a pipeline's targets now, for synchronous callers; concurrent asks coalesce."""

    def __init__(self, spec: SyncSpec, name: str) -> None:
        self.spec, self.name = spec, name
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def kick(self) -> None:
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            self._again = False
            await asyncio.to_thread(self._deliver_all)
            if not self._again:
                return

    def _deliver_all(self) -> None:
        for target in self.spec.pipelines[self.name].targets:
            try:  # a delivery run holding the target's lock delivers it instead
                deliver_target(self.spec, self.name, target, lock_timeout_s=2.0)
            except SyncError:
                pass  # the target's own runs report it; the caller sees "staged"


def create_app(spec: SyncSpec) -> Starlette:
    """The receiver of every webhook pipeline of ``spec`` (credentials read now)."""
    intakes = {name: WebhookIntake(spec, p) for name, p in spec.pipelines.items()
               if isinstance(p.source, WebhookSourceSpec)}
    deliverers = {name: _Deliverer(spec, name) for name in intakes}

    def status_url(name: str, receipt: Receipt) -> str:
        return f"/ingest/{name}/status/{receipt.correlation_id}"

    async def outcome(intake: WebhookIntake, receipt: Receipt) -> dict[str, Any]:
        return await asyncio.to_thread(intake.outcome, receipt)

    async def wait_for(name: str, receipt: Receipt, seconds: float
                       ) -> tuple[dict[str, Any], bool]:
        intake = intakes[name]
        deliverers[name].kick()
        deadline = asyncio.get_running_loop().time() + seconds
        while True:
            targets = await outcome(intake, receipt)
            if all(t["status"] in FINAL for t in targets.values()):
                return targets, True
            if asyncio.get_running_loop().time() >= deadline:
                return targets, False
            await asyncio.sleep(0.05)

    async def ingest(request: Request) -> Response:
        name = request.path_params["pipeline"]
        intake = intakes.get(name)
        if intake is None:
            return _error(404, f"no webhook pipeline {name!r}")
        try:
            body = await _read(request, intake.source.max_body_bytes)
        except _TooLarge:
            return _error(413, f"body larger than {intake.source.max_body_bytes} bytes")
        try:
            webhook_id = intake.verify(body, request.headers)
            row = intake.parse(body)
            if row is None:  # an event type the spec ignores: nothing to stage
                return JSONResponse({"ignored": True}, status_code=200)
            accepted: Accepted = await intake.submit(webhook_id, row)
        except IntakeError as err:
            return _error(err.status, str(err), err.retry_after)
        receipt = accepted.receipt
        answer: dict[str, Any] = {"correlation_id": receipt.correlation_id,
                                  "status_url": status_url(name, receipt),
                                  "duplicate": accepted.duplicate}
        headers = {"Location": status_url(name, receipt)}
        m = _WAIT.search(request.headers.get("prefer", ""))
        status = 202
        if m:
            seconds = min(float(m.group(1)), intake.source.max_wait_seconds)
            answer["targets"], done = await wait_for(name, receipt, seconds)
            headers["Preference-Applied"] = f"wait={seconds:g}"
            status = 200 if done else 202
        elif accepted.duplicate:
            answer["targets"] = await outcome(intake, receipt)
        return JSONResponse(answer, status_code=status, headers=headers)

    async def status(request: Request) -> Response:
        name = request.path_params["pipeline"]
        intake = intakes.get(name)
        if intake is None:
            return _error(404, f"no webhook pipeline {name!r}")
        receipt = await asyncio.to_thread(intake.receipt, request.path_params["correlation"])
        if receipt is None:
            return _error(404, "no such correlation id")
        return JSONResponse({
            "correlation_id": receipt.correlation_id, "webhook_id": receipt.webhook_id,
            "table": receipt.table, "received_at": receipt.received_at.isoformat()
            if receipt.received_at else None, "targets": await outcome(intake, receipt)})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"pipelines": sorted(intakes)})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            for intake in intakes.values():
                intake.close()

    return Starlette(routes=[
        Route("/ingest/{pipeline}", ingest, methods=["POST"]),
        Route("/ingest/{pipeline}/status/{correlation}", status, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
    ], lifespan=lifespan)


def serve(spec: SyncSpec, *, host: str = "127.0.0.1", port: int = 8787) -> None:
    """Run the receiver until interrupted (uvicorn; one process serves every pipeline)."""
    import uvicorn

    uvicorn.run(create_app(spec), host=host, port=port, log_level="warning",
                server_header=False)
