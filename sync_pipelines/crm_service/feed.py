"""The reference CRM's change feed: change times per record, a list filter on them, and signed
outgoing webhooks — what a source pipeline of kind ``http_poll`` or ``webhook`` reads.

* :class:`Feed` keeps, per resource, each record's change time (assigned by the server on every
  applied write, increasing; the records of one batch write share one) and a tombstone for
  deleted ones. :meth:`Feed.page`
  answers ``GET /<resource>?updated_since=<ISO time>``: records (and tombstones ``{"id",
  "deleted": true}``) changed at or after that time, each with ``updated_at``, ordered by
  ``(updated_at, id)``, paged with an opaque ``cursor`` that resumes after the last item — so
  many records sharing one change time are never skipped at a page boundary.
* :class:`WebhookSender` posts one event per applied change to the configured URL, signed per
  Standard Webhooks (``webhook-id`` ``evt_<seq>``, ``webhook-timestamp``, ``webhook-signature``
  ``v1,…`` with the configured ``whsec_`` secret), in order, one at a time; a non-2xx answer
  or a connection error is retried after a backoff (or the ``Retry-After`` of a 429/503), with
  the same ``webhook-id``, until it succeeds — except an event refused for good (another 4xx)
  three times, which is dropped and counted, so one bad event does not block the rest. Events
  are ``{"type": "contact.updated" | "contact.deleted" (company…, deal…), "timestamp",
  "data": record with updated_at}``.

In memory only, like the rest of the service.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import httpx
from standardwebhooks import Webhook

Json = Any
SINGULAR = {"contacts": "contact", "companies": "company", "deals": "deal"}


def _now() -> float:
    return time.time()


@dataclass
class _Change:
    at: float
    record_id: str
    deleted: bool


class Feed:
    """Change times and tombstones per resource (guarded by the caller's lock)."""

    def __init__(self, resources: tuple[str, ...]) -> None:
        self.changes: dict[str, dict[str, _Change]] = {r: {} for r in resources}
        self._last = 0.0

    def next_time(self) -> float:
        """A change time after every earlier one (microsecond steps)."""
        at = max(_now(), self._last + 1e-6)
        self._last = at
        return at

    def touch(self, resource: str, record_id: str, *, deleted: bool,
              at: float | None = None) -> float:
        """Record a change of one record, at ``at`` (a batch's shared time) or now."""
        at = at if at is not None else self.next_time()
        self.changes[resource][record_id] = _Change(at, record_id, deleted)
        return at

    @staticmethod
    def iso(at: float) -> str:
        return dt.datetime.fromtimestamp(at, dt.timezone.utc).isoformat(timespec="microseconds")

    def page(self, resource: str, records: dict[str, dict[str, Json]], since: float,
             cursor: str | None, limit: int) -> dict[str, Json]:
        """Changed since ``since``, after ``cursor`` (``"<at>|<id>"``), ``limit`` of them."""
        after: tuple[float, str] | None = None
        if cursor:
            at, _, rid = cursor.partition("|")
            after = (float(at), rid)
        ordered = sorted((c for c in self.changes[resource].values() if c.at >= since),
                         key=lambda c: (c.at, c.record_id))
        if after is not None:
            ordered = [c for c in ordered if (c.at, c.record_id) > after]
        page = ordered[:limit]
        items = []
        for c in page:
            if c.deleted or c.record_id not in records:
                items.append({"id": c.record_id, "deleted": True, "updated_at": self.iso(c.at)})
            else:
                items.append({**records[c.record_id], "updated_at": self.iso(c.at)})
        more = len(ordered) > limit
        return {"items": items,
                "next_cursor": f"{page[-1].at!r}|{page[-1].record_id}" if more and page else None}


@dataclass
class _Event:
    webhook_id: str
    body: str
    attempts: int = 0

GIVE_UP_AFTER = 3
"""Attempts at an event the receiver refuses for good (a 4xx other than 408/429) before it is
dropped (counted in ``dropped``): one bad event must not block every later one."""


@dataclass
class WebhookConfig:
    url: str
    secret: str
    retry_after_s: float = 1.0
    event_types: tuple[str, ...] = ()
    """Glob patterns of the event types to send (``contact.*``); empty: every type."""

    def wants(self, event_type: str) -> bool:
        return not self.event_types or any(fnmatch.fnmatchcase(event_type, p)
                                           for p in self.event_types)


@dataclass
class SenderStats:
    sent: int = 0
    attempts: int = 0
    failures: int = 0
    dropped: int = 0
    last_error: str | None = None
    delivered_ids: list[str] = field(default_factory=list)


class WebhookSender:
    """One thread posting queued events in order; retries each until it is accepted."""

    def __init__(self) -> None:
        self.config: WebhookConfig | None = None
        self.queue: deque[_Event] = deque()
        self.stats = SenderStats()
        self._seq = 0
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    def configure(self, config: WebhookConfig | None) -> None:
        with self._cond:
            self.config = config
            if config is None:
                self.queue.clear()
            elif self._thread is None:
                self._thread = threading.Thread(target=self._run, name="crm-webhooks",
                                                daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def emit(self, resource: str, record: dict[str, Json] | None, record_id: str, at: float,
             deleted: bool) -> None:
        with self._cond:
            if self.config is None:
                return
            kind = SINGULAR.get(resource, resource)
            event_type = f"{kind}.{'deleted' if deleted else 'updated'}"
            if not self.config.wants(event_type):
                return
            self._seq += 1
            data = ({"id": record_id, "deleted": True, "updated_at": Feed.iso(at)} if deleted
                    else {**(record or {}), "updated_at": Feed.iso(at)})
            body = json.dumps({"type": event_type,
                               "timestamp": Feed.iso(at), "data": data},
                              separators=(",", ":"))
            self.queue.append(_Event(f"evt_{self._seq}", body))
            self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return len(self.queue)

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()

    def _run(self) -> None:
        with httpx.Client(timeout=10.0) as client:
            while True:
                with self._cond:
                    while not self._stop and (not self.queue or self.config is None):
                        self._cond.wait(0.5)
                    if self._stop:
                        return
                    event, config = self.queue[0], self.config
                assert config is not None
                wait = self._post(client, config, event)
                if wait == -1.0:  # refused for good, GIVE_UP_AFTER times: drop it
                    with self._cond:
                        if self.queue and self.queue[0] is event:
                            self.queue.popleft()
                        self.stats.dropped += 1
                elif wait is None:
                    with self._cond:
                        if self.queue and self.queue[0] is event:
                            self.queue.popleft()
                        self.stats.sent += 1
                        self.stats.delivered_ids.append(event.webhook_id)
                        del self.stats.delivered_ids[:-1000]
                else:
                    with self._cond:
                        self._cond.wait(wait)

    def _post(self, client: httpx.Client, config: WebhookConfig, event: _Event) -> float | None:
        """None when accepted; -1 to give up; else seconds to wait before trying again."""
        self.stats.attempts += 1
        event.attempts += 1
        now = dt.datetime.now(dt.timezone.utc)
        signature = Webhook(config.secret).sign(event.webhook_id, now, event.body)
        try:
            response = client.post(config.url, content=event.body.encode(), headers={
                "content-type": "application/json", "webhook-id": event.webhook_id,
                "webhook-timestamp": str(int(now.timestamp())),
                "webhook-signature": signature})
        except httpx.HTTPError as err:
            self.stats.failures += 1
            self.stats.last_error = type(err).__name__
            return config.retry_after_s
        if 200 <= response.status_code < 300:
            return None
        self.stats.failures += 1
        self.stats.last_error = f"HTTP {response.status_code}"
        header = response.headers.get("retry-after", "")
        if response.status_code in (429, 503) and header.isdigit():
            return min(float(header), 30.0)
        if response.status_code < 500 and response.status_code not in (408, 429) and (
                event.attempts >= GIVE_UP_AFTER):
            return -1.0
        return min(config.retry_after_s * 2 ** min(event.attempts - 1, 5), 30.0)
