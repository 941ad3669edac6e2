"""Refetch: re-read source rows whose values the stream did not carry, never write half rows.

pgoutput leaves out a large (TOASTed) value that an UPDATE did not touch: it sends it as
"unchanged" (``'u'``), and the mapped upsert is *partial*. A target that has the row keeps its
own copy of the value (the Postgres sink updates only the columns a partial row carries). When
the target has no copy — the row was never delivered because a backfill chunk dropped the key
in favour of this very change, an UPDATE moved the row to a new key, its insert became a dead
letter or was discarded — or when the target is an HTTP API, which cannot merge a partial body
into a record, there is nothing to take the value from. Then the sink writes nothing for that
key and delivery records a **refetch request** here: the source table, the key and the
position of the change that asked for it.

The puller takes pending requests at the start of each pull (:func:`refetch_pending`) and
re-reads those rows through the same watermarked snapshot path as backfill and repair
(:func:`.reader.repair_keys`, kind ``refetch``). The re-read rows are placed in the stream at
the chunk's high watermark, after the change that asked for them, and reach every target as
ordinary full changes, in per-key order. A key the source no longer has becomes a delete. A key
changed again between the watermarks is left to that change (which asks again if it is partial
too), so a hot key is settled once it is quiet.

Crash behaviour: a request is written before the target commits the change that asked for it
(Postgres: in the sink's ``before_commit``; HTTP: in the window's state transaction), and is
deleted only after the re-read's high watermark is in the WAL. A crash in between re-reads the
row once more, which is harmless: a re-read row is the current source row, an idempotent upsert.
Requests never merge: each is keyed by the position of the change that made it, so a request
made while an earlier one for the same key is being read is not lost with it.
"""

from __future__ import annotations

import time

from ..errors import SourceError
from ..faults import NO_FAULTS, Faults
from ..spec import PipelineSpec
from ..staging.refetch import RefetchReport, RefetchStore, Request
from ..staging.snapshots import SnapshotStore
from ..staging.store import StateStore
from .reader import repair_keys

REFETCH_LIMIT = 5_000
"""Requests taken by one pull; the rest wait for the next one."""

REFETCH_WAIT_S = 5.0
"""How long the re-read waits for transactions still running at its low watermark (see
:func:`.reader._wait_for_running`); shorter than a backfill's, as it runs inside a sensor
tick."""


def refetch_pending(state: StateStore, pipeline: PipelineSpec, *, limit: int = REFETCH_LIMIT,
                    wait_s: float = REFETCH_WAIT_S, faults: Faults = NO_FAULTS
                    ) -> RefetchReport:
    """Re-read the rows of pending requests into the stream (one snapshot per table).

    A source error (the user may not write watermarks, the source is down) is returned in the
    report, not raised: the requests stay and the next pull tries again, and the pull itself
    goes on — a stuck re-read must not stop the stream."""
    started = time.monotonic()
    store = RefetchStore(state, pipeline.name)
    SnapshotStore(state).abandon_dead_chunks(pipeline.name)
    todo = store.pending(limit)
    if not todo:
        return RefetchReport()
    by_table: dict[str, list[Request]] = {}
    for r in todo:
        by_table.setdefault(r.table, []).append(r)
    rows, done, error = 0, [], None
    for table, requests in by_table.items():
        if table not in pipeline.tables:  # the table left the spec: nothing to deliver it to
            done.extend(requests)
            continue
        try:
            report = repair_keys(state, pipeline, table, [r.key for r in requests],
                                 kind="refetch", wait_s=wait_s, faults=faults)
        except SourceError as err:
            error = f"re-reading {table}: {err}"
            break
        rows += report.rows
        done.extend(requests)
    store.forget(done)
    return RefetchReport(len(done), rows, tuple(by_table), store.count(), error,
                         time.monotonic() - started)
