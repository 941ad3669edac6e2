"""Backfill: source rows read in key-ordered chunks and placed in the stream between watermarks.

* :mod:`.reader` — the snapshot worker: :func:`~.reader.backfill_table` (a whole table,
  resumable), :func:`~.reader.repair_keys` (given keys: reconciliation's repairs);
* :mod:`.refetch` — rows delivery asked to re-read because a change did not carry every
  value, re-read before each pull.

Contract: a worker only reads the source, writes two logical messages per chunk into its WAL
and records the chunk in the state; the puller places the chunk at its high watermark, minus
the keys a live change touched in between, so a snapshot row never overwrites a newer change.
A crash leaves chunks unrecorded: a resumed backfill reads those keys again, a refetch keeps its
requests until it completes, and rows emitted twice land twice (idempotent upserts).
"""
