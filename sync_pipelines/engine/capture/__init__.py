"""Capture: changes in from a source, staged durably before the source lets go of them.

* :mod:`.source` — the PostgreSQL source: checks (wal_level, tables, keys), the publication
  and the logical slot, peeking through a server-side cursor, advancing the slot;
* :mod:`.puller` — one pull (a sensor tick): demand = budget − undelivered, peek, stage
  batches in the mailbox, place snapshot chunks at their watermarks, then advance the slot.

Contract: the slot's confirmed position never passes a change that is not staged. A crash at
any line leaves either the slot unmoved (the next pull re-peeks and skips what is staged,
by position) or the slot moved past changes that are staged. Capture never imports delivery:
it ends where every source ends, in staged changes.
"""
