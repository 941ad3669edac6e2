"""Reconciliation: compare source and targets, confirm drift, repair it through the stream.

* :mod:`.run` — per table and target: compare, wait for delivery to catch up, re-check the
  candidates, optionally repair (:func:`~..backfill.reader.repair_keys`);
* :mod:`.postgres` and :mod:`.sql` — Postgres targets: range hashes on both servers, then a
  pandas diff of the ranges that differ, or a row-by-row stream through the mapping;
* :mod:`.http` — HTTP targets through the table's list endpoint;
* :mod:`.drift` — the report types; :mod:`.verify` — a plain full comparison (demo, tests).

Read-only on source and targets (repair goes through the stream). A crash loses nothing but
the report; the next run compares again.
"""
