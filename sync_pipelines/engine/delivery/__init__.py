"""Delivery: staged changes out to one target, in per-key order, exactly once in effect.

Contract: one loop serves every sink: it reads windows of staged changes after the target's
position, maps them, parks changes of keys that are blocked (held for retry or dead-lettered),
hands the rest to the target's sink, and records what became of each change — delivered,
held for retry (with backoff), dead letter, re-read from the source — in one state transaction.
The sweep re-sends due retries through the same sink. ``sinks/`` has one module per target
kind behind one small protocol.

Crash: a sink records the window's outcomes before it makes them final (Postgres: before the
commit that also moves its checkpoint; HTTP: after the requests were answered, with stable
idempotency keys), and the delivered position moves only after that. A crash at any line
re-delivers the window, which the checkpoint (Postgres) or the idempotency keys and the ledger
(HTTP) make a no-op for what had been applied.
"""
