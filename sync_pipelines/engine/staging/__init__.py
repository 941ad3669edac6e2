"""Staging: the state database, the engine's durable memory (schema ``sync_state``).

* :mod:`.store` — pipelines, relation versions, staged batches and changes (the mailbox), the
  delivered position per target, advisory locks, garbage collection;
* :mod:`.mailbox` — a staged batch's changes packed into the one value its row holds;
* :mod:`.held` — per target and key: the retry queue, changes parked behind it, dead letters,
  the HTTP ledger; operator redrive and discard;
* :mod:`.snapshots` — backfill/repair/refetch progress and chunks, watermark payloads, the
  keys a live change touched between a chunk's watermarks;
* :mod:`.refetch` — rows to re-read from the source because a change did not carry them;
* :mod:`.migrations` — the schema's versioned DDL.

Contract: each write that moves a change from one state to another is one transaction, so a
crash leaves every change in exactly one place (staged, held, dead, or delivered). Staging
knows nothing of mapping, sinks or Dagster; keys arrive already in their stored text form.
"""
