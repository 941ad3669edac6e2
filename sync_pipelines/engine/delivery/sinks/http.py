"""HTTP/REST sink: each mapped change becomes requests to the target's endpoints.

Contract (the sink protocol of :mod:`.base`): :meth:`HttpSink.apply` turns every change of a
table the target lists into requests — an upsert into the table's ``upsert`` endpoint filled
from the row, a delete into its ``delete`` endpoint filled from the key, a key change into
both — sends them with :class:`~.http_client.HttpClient` (bounded concurrency, one request in
flight per key, inline retries of short Retry-Afters), and folds the answers into one outcome
per change:

* every request accepted (2xx, or 404 for a DELETE): ``delivered``;
* a transient failure (429, 5xx, 408, timeout, connection error): ``retry``, with the API's
  Retry-After; a terminal one (another 4xx, a 3xx, a body that cannot be encoded): ``dead``;
* not sent because an earlier change of its key failed in this call: ``parked``;
* a TRUNCATE, or a delete of a table without a ``delete`` endpoint, cannot be sent: ``dead``.

A 401 is not any one change's fault: the whole call fails with a terminal error naming the
environment variables of the credentials (never their values), nothing is recorded, and the
target's runs fail until the credentials are fixed — no dead letter to redrive afterwards.

A partial upsert (an UPDATE that left large values out as unchanged) is never sent: an API
would replace its record with the partial body. It is reported for a re-read of the row
instead (``Outcome.refetch``), and the change counts as delivered.

A two-way link's direction into an API (``resolve``): before anything is sent, the link reads
the API's current record of every key in the call (:mod:`....links.api_reader`) and decides
what each change becomes (see :mod:`....links.resolver`); only that is sent. A read that fails
fails the call: nothing sent, nothing recorded, delivered again later.

Idempotency: every request carries ``<pipeline>:<target>:<lsn>:<seq>[.sub]`` in the configured
header, so a replay after a crash is recognised by the API; requests listed in
``Item.done_subs`` (the ledger) are not sent again, and accepted requests of a change that does
not complete are returned in ``Outcome.accepted`` for the ledger. ``record`` is called once
every request of the call has been answered. A crash before that re-sends the same requests,
with the same keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from ...errors import SpecError, TerminalDeliveryError
from ...mapping.mapper import Delete, TableMapper, Truncate, Upsert
from ...spec import HttpTargetSpec, PipelineSpec
from ...spec.links import LinkRole
from ...staging.held import Failure
from ...wire.change import Position
from .base import ApplyResult, ApplyStats, Checkpoint, Item, Outcome, Record, Resolve
from .http_client import Endpoint, HttpChange, HttpClient, HttpOutcome, http_change

WINDOW_CHANGES = 10_000
"""Staged changes sent in one :meth:`HttpClient.send` call, across batches. Each call waits for
its slowest key chain and leaves lanes idle at its end, so small batches sent one by one lose
throughput (measured: 5 batches of 2,000 at 64 × 20 ms, 0.77 of Little's law one by one). The
window bounds memory: its changes, with their raw messages and request bodies, are held
until the state transaction that records them."""


class _Change:
    """One item's requests and what became of them."""

    __slots__ = ("item", "requests", "failure", "refetch", "accepted", "parked")

    def __init__(self, item: Item) -> None:
        self.item = item
        self.requests: list[tuple[int, HttpChange]] = []  # (sub, request) still to send
        self.failure: Failure | None = None
        self.refetch: list[tuple[str | None, ...]] = []
        self.accepted: list[tuple[int, int | None]] = []
        self.parked = False


class HttpSink:
    """Delivers one pipeline's changes to one HTTP API."""

    def __init__(self, client: HttpClient, *, pipeline: str, target: str,
                 spec: HttpTargetSpec, window_changes: int = WINDOW_CHANGES,
                 link: LinkRole | None = None) -> None:
        self.client = client
        self.link = link
        auth = spec.auth.variables if spec.auth else []
        self.credentials = (f"${' and $'.join(auth)}" if auth
                            else "the spec: the target has no `auth:`")
        self.pipeline = pipeline
        self.target = target
        self.window_changes = window_changes
        self.endpoints = {
            t: (Endpoint.parse(m.upsert), Endpoint.parse(m.delete) if m.delete else None)
            for t, m in spec.tables.items()
        }

    def close(self) -> None:
        self.client.close()

    def checkpoint(self) -> Position | None:
        return None  # an API keeps no position of ours: the state's delivered position counts

    def prepare(self, table: TableMapper, relation_version: int) -> bool:
        return table.source_table in self.endpoints

    def apply(self, items: Iterable[Item], *, checkpoint: Checkpoint | None,
              record: Record, resolve: Resolve | None = None) -> ApplyResult:
        if resolve is not None:
            if self.link is None or self.link.api_side != self.link.target_side:
                raise TerminalDeliveryError(f"pipeline {self.pipeline!r}, target "
                                            f"{self.target!r}: not a link's API side")
            items = resolve(list(items), None)  # the link reads the API's records itself
        changes: list[_Change] = []
        sent: list[tuple[_Change, int]] = []

        def requests() -> Iterator[HttpChange]:
            for item in items:  # lazily: mapping overlaps the first requests in flight
                ch = self._requests(item)
                changes.append(ch)
                for sub, req in ch.requests:
                    sent.append((ch, sub))
                    yield req

        answers = self.client.send(requests())
        refused = next((a for a in answers if a.status == 401), None)
        if refused is not None:  # the whole target refuses us: not a fault of any one change
            raise TerminalDeliveryError(
                f"pipeline {self.pipeline!r}, target {self.target!r}: the API refused the "
                f"credentials ({refused.error}); check {self.credentials}")
        for (ch, sub), answer in zip(sent, answers, strict=True):
            self._settle(ch, sub, answer)
        outcomes = [self._outcome(ch) for ch in changes]
        record(outcomes)
        delivered = [o for o in outcomes if o.status == "delivered"]
        stats = ApplyStats(
            upserts=sum(1 for o in delivered if o.item.op in "IU"),
            deletes=sum(1 for o in delivered if o.item.op == "D"),
            refetch=sum(len(o.refetch) for o in delivered))
        return ApplyResult(outcomes, stats)

    def _requests(self, item: Item) -> _Change:
        ch = _Change(item)
        upsert, delete = self.endpoints[item.table.source_table]
        for sub, op in enumerate(item.ops):
            if isinstance(op, Upsert) and op.partial:
                ch.refetch.append(tuple(op.key))  # a whole record comes with the re-read
                continue
            if isinstance(op, Truncate) or (isinstance(op, Delete) and delete is None):
                what = "TRUNCATE" if isinstance(op, Truncate) else "a delete (no `delete:` set)"
                ch.failure = Failure(False, None, f"{what} of {op.table} cannot be sent to "
                                     f"target {self.target!r}")
                break
            if sub in item.done_subs:
                continue  # accepted before a crash (ledger)
            try:
                req = http_change(op, item.table.key_names, pipeline=self.pipeline,
                                  target=self.target, upsert=upsert, delete=delete or upsert,
                                  op_index=sub)
            except ValueError as err:
                ch.failure = Failure(False, None, str(err))
                break
            ch.requests.append((sub, req))
        if ch.failure is not None:
            ch.requests.clear()
        return ch

    @staticmethod
    def _settle(ch: _Change, sub: int, answer: HttpOutcome) -> None:
        if answer.ok:
            ch.accepted.append((sub, answer.status))
        elif ch.failure is None:
            ch.parked = answer.parked
            ch.failure = Failure(answer.transient, answer.status, answer.error or "failed",
                                 answer.retry_after_s)

    @staticmethod
    def _outcome(ch: _Change) -> Outcome:
        if ch.failure is None:
            return Outcome(ch.item, "delivered", refetch=tuple(ch.refetch))
        status = "parked" if ch.parked else "retry" if ch.failure.transient else "dead"
        return Outcome(ch.item, status, ch.failure, accepted=tuple(ch.accepted))


def open_http_sink(pipeline: PipelineSpec, target: str) -> HttpSink:
    """The sink of an HTTP target, its credentials read from the environment now."""
    tspec = pipeline.targets[target]
    assert isinstance(tspec, HttpTargetSpec)
    what = f"pipeline {pipeline.name!r}: target {target!r}"
    headers, auth = tspec.credentials(what)
    base_url = tspec.base_url(f"{what} base URL")
    try:
        client = HttpClient(base_url, headers=headers, auth=auth,
                            idempotency_header=tspec.idempotency_header,
                            concurrency=tspec.concurrency, timeout_s=tspec.timeout_seconds)
    except ValueError as err:  # the message never carries the URL's credentials or headers' values
        raise SpecError(f"{what} (base URL from ${tspec.base_url_env}): {err}") from None
    return HttpSink(client, pipeline=pipeline.name, target=target, spec=tspec,
                    link=pipeline.link)
