"""Reconciliation end to end (engine): drift injected by hand is found exactly while live changes
keep flowing (no false positives), repaired through the stream, and a second run is clean;
keys with changes in the retry queue are in flight, not drift; an HTTP target is reconciled
and repaired through its list endpoint; without the pipeline catching up nothing is confirmed.

Real PostgreSQL and the real reference CRM on 127.0.0.1; a thread plays the sensor and the
delivery runs. The comparers' own edge cases are in test_reconcile_compare / test_reconcile_http.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest

from sync_pipelines.engine.pipeline import pull_pipeline, reconcile

from .support.pipelines import (
    assert_tables_equal,
    execute,
    make_spec,
    pipeline_running,
    rows,
    sync_until_idle,
)
from .test_reconcile_http import delete, fill, http_spec, make_source, put

pytestmark = pytest.mark.pg_versions

TABLE = "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL, note text)"


@contextmanager
def live_writes(dsn: str, ids: range) -> Iterator[dict[str, int]]:
    stop = threading.Event()
    done = {"n": 0}

    def loop() -> None:
        rng = random.Random(3)
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                conn.execute("UPDATE items SET v = v + 1 WHERE id = %s", (rng.choice(ids),))
                done["n"] += 1

    t = threading.Thread(target=loop)
    t.start()
    try:
        yield done
    finally:
        stop.set()
        t.join(60)


def drift_of(report) -> set[tuple[str, tuple[str | None, ...], str, tuple[str, ...]]]:
    return {(t.target, d.key, d.kind, d.fields) for t in report.tables for d in t.drift}


def test_drift_is_found_exactly_while_live_changes_flow_then_repaired(
        monkeypatch, source_dsn, target_dsn, state_dsn):
    execute(source_dsn, TABLE)
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["items"],
                     policy={"batch_size": 500})
    pull_pipeline(spec, "crm")
    execute(source_dsn, "INSERT INTO items SELECT g, 0, 'n' || g FROM generate_series(1, 30000) g")
    sync_until_idle(spec)
    execute(target_dsn, "DELETE FROM items WHERE id IN (5000, 29999)",
            "UPDATE items SET note = 'edited', v = -7 WHERE id = 12345",
            "INSERT INTO items VALUES (40000, 1, 'extra'), (0, 1, 'extra')")
    expected = {("replica", ("5000",), "missing", ()), ("replica", ("29999",), "missing", ()),
                ("replica", ("12345",), "different", ("v", "note")),
                ("replica", ("40000",), "extra", ()), ("replica", ("0",), "extra", ())}
    with pipeline_running(spec), live_writes(source_dsn, range(1, 3000)) as live:
        report = reconcile(spec, "crm")
        assert live["n"] > 50, "live changes did not overlap the comparison"
        assert drift_of(report) == expected
        [table] = report.tables
        assert table.method == "range-hash" and table.source_rows == 30000
        fixed = reconcile(spec, "crm", repair=True)
        assert drift_of(fixed) == expected and fixed.repairs[0].rows == 5
        again = None
        for _ in range(50):  # the repair goes through the stream
            again = reconcile(spec, "crm")
            if not again.drift:
                break
        assert again is not None and again.drift == 0
    sync_until_idle(spec)
    assert_tables_equal(source_dsn, target_dsn, "items")


def test_a_key_in_the_retry_queue_is_in_flight_not_drift(monkeypatch, source_dsn, target_dsn,
                                                          state_dsn):
    execute(source_dsn, TABLE)
    execute(target_dsn, TABLE, "ALTER TABLE items ADD CONSTRAINT small CHECK (v < 100)")
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["items"])
    pull_pipeline(spec, "crm")
    execute(source_dsn, "INSERT INTO items SELECT g, g FROM generate_series(1, 50) g",
            "UPDATE items SET v = 500 WHERE id = 7")  # refused by the target: dead letter
    sync_until_idle(spec)
    assert rows(state_dsn, "SELECT count(*) FROM sync_state.dead_letter")[0][0] == 1
    execute(target_dsn, "DELETE FROM items WHERE id = 8")
    with pipeline_running(spec):
        report = reconcile(spec, "crm")
    [table] = report.tables
    assert drift_of(report) == {("replica", ("8",), "missing", ())}
    assert table.in_flight == 1  # key 7 differs, but the dead letters own it


def test_without_the_pipeline_catching_up_nothing_is_confirmed(monkeypatch, source_dsn,
                                                                target_dsn, state_dsn):
    execute(source_dsn, TABLE)
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["items"])
    p = spec.pipelines["crm"]
    spec.pipelines["crm"] = p.model_copy(update={"reconcile": p.reconcile.model_copy(
        update={"confirm_timeout_seconds": 1.0})})
    pull_pipeline(spec, "crm")
    execute(source_dsn, "INSERT INTO items SELECT g, g FROM generate_series(1, 20) g")
    sync_until_idle(spec)
    execute(source_dsn, "UPDATE items SET v = 0 WHERE id <= 3")  # staged never: no pump
    report = reconcile(spec, "crm")
    [table] = report.tables
    assert table.drift == [] and table.in_flight == 3
    assert table.note is not None and "did not deliver" in table.note


def test_http_target_is_reconciled_and_repaired_through_its_list_endpoint(
        monkeypatch, source_dsn, state_dsn, crm_server):
    make_source(source_dsn)
    spec = http_spec(monkeypatch, source_dsn, state_dsn, crm_server.base_url)
    fill(spec, source_dsn, 40)
    url = crm_server.base_url
    delete(url, "3")
    put(url, "4", {"id": "4", "email_address": "hand@edit", "version": "0"})
    put(url, "99", {"id": "99", "email_address": "extra@x.io"})
    with pipeline_running(spec):
        report = reconcile(spec, "crm", repair=True)
        assert drift_of(report) == {("api", ("3",), "missing", ()),
                                    ("api", ("4",), "different", ("email_address",)),
                                    ("api", ("99",), "extra", ())}
        again = None
        for _ in range(50):
            again = reconcile(spec, "crm")
            if not again.drift:
                break
        assert again is not None and again.drift == 0
    records = crm_server.records("contacts")
    assert "99" not in records and records["4"]["email_address"] == "c4@x.io"


def test_a_day_compares_the_rows_changed_that_day_and_a_full_run_all(
        monkeypatch, source_dsn, target_dsn, state_dsn):
    """With a change-time column, yesterday's partition finds drift on rows changed yesterday and
    not on older ones, the day before finds nothing of it, and a full run finds both; the run
    itself drives delivery while confirming (no sensor needed) and says how long it waited."""
    from datetime import date, datetime, timedelta, timezone

    execute(source_dsn, "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL, "
                        "updated_at timestamptz NOT NULL)")
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["items"],
                     reconcile={"changed_at": "updated_at"})
    today = datetime.now(timezone.utc).date()
    yesterday, long_ago = today - timedelta(days=1), today - timedelta(days=5)
    pull_pipeline(spec, "crm")
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        for first, when in ((1, yesterday), (21, long_ago)):
            conn.execute("INSERT INTO items SELECT g, g, %s FROM generate_series(%s::int, %s) g",
                         (datetime.combine(when, datetime.min.time(), timezone.utc)
                          + timedelta(hours=12), first, first + 19))
    sync_until_idle(spec)
    execute(target_dsn, "UPDATE items SET v = -1 WHERE id IN (3, 33)",  # one of each day
            "DELETE FROM items WHERE id = 7")                            # changed yesterday
    day = reconcile(spec, "crm", day=yesterday, drive=True)
    assert drift_of(day) == {("replica", ("3",), "different", ("v",)),
                             ("replica", ("7",), "missing", ())}
    [table] = day.tables
    assert table.method == "changed-at (updated_at)" and table.compared_keys == 20
    assert table.waited_s > 0 and day.waited_s == table.waited_s
    assert drift_of(reconcile(spec, "crm", day=yesterday - timedelta(days=1), drive=True)) \
        == set()
    full = reconcile(spec, "crm", day=yesterday, full=True, drive=True)
    assert {d[1] for d in drift_of(full)} == {("3",), ("7",), ("33",)}
    assert full.tables[0].method in ("range-hash", "row-by-row")
    assert isinstance(day.as_of, datetime) and date.fromisoformat(str(yesterday))


def test_an_unknown_change_time_column_names_pipeline_field_and_columns(
        monkeypatch, source_dsn, target_dsn, state_dsn):
    from datetime import date

    import pytest

    from sync_pipelines.engine import SpecError

    execute(source_dsn, "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL)")
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["items"],
                     reconcile={"changed_at": {"items": "modified"}})
    pull_pipeline(spec, "crm")
    with pytest.raises(SpecError) as err:
        reconcile(spec, "crm", day=date(2026, 11, 30))
    assert str(err.value) == ("pipeline 'crm', reconcile.changed_at: table public.items has no "
                              "column 'modified' (columns: id, v)")
