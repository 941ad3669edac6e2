"""Mapping: a staged change → operations on a target table, per the spec.

* :mod:`.mapper` — renames, include/exclude, casts, derived fields, the row filter, key changes,
  partial rows (values an UPDATE left out as unchanged);
* :mod:`.compaction` — a batch folded to one final operation per key (what lets a Postgres
  sink apply a batch in one statement per table while keeping per-key order);
* :mod:`.keys` — the text form of a change's key, as the retry queue stores it.

Pure: no I/O besides reading relation versions through a callable; nothing to lose in a crash.
"""
