"""Initial backfill and repair through the stream: rows that existed before the slot reach the
target through the normal delivery path, placed between watermarks so a snapshot row never
overwrites a newer live change; resumable after a crash at any point of a chunk.

Real PostgreSQL (source, state, target), the real puller and Postgres sink; live writes come
from a thread on its own connection. Not covered here: the Dagster jobs (test_dagster_reconcile),

pytestmark = pytest.mark.pg_versions
HTTP targets (the same stream path as test_http_target).
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import pytest

from sync_pipelines.engine.backfill.reader import backfill_table, repair_keys
from sync_pipelines.engine.faults import Faults, InjectedCrash
from sync_pipelines.engine.pipeline import deliver_pipeline, open_state, pull_pipeline
from sync_pipelines.engine.staging.snapshots import SnapshotStore

from .support.pipelines import assert_tables_equal, execute, make_spec, rows, sync_until_idle

TABLE = "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL, note text)"


class Hook(Faults):
    """Runs ``action`` at crash point ``point`` instead of crashing (once)."""

    def __init__(self, point: str, action: Any) -> None:
        super().__init__()
        self.point, self.action = point, action

    def hit(self, point: str) -> None:
        if point == self.point and self.action is not None:
            action, self.action = self.action, None
            action()


def test_backfill_brings_rows_that_existed_before_the_slot(monkeypatch, source_dsn, target_dsn,
                                                            state_dsn):
    execute(source_dsn, TABLE,
            "INSERT INTO items SELECT g, g, 'n' || g FROM generate_series(1, 12345) g")
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["items"])
    pull_pipeline(spec, "crm")  # creates the slot: the existing rows are not in the stream
    sync_until_idle(spec)
    assert rows(target_dsn, "SELECT to_regclass('public.items') IS NULL")[0][0] or rows(
        target_dsn, "SELECT count(*) FROM items") == [(0,)]
    with open_state(spec) as state:
        report = backfill_table(state, spec.pipelines["crm"], "public.items", chunk_rows=5000)
    assert (report.done, report.chunks, report.rows) == (True, 3, 12345)
    sync_until_idle(spec)
    assert_tables_equal(source_dsn, target_dsn, "items")
    with open_state(spec) as state:
        [info] = SnapshotStore(state).latest("crm", "public.items")
        assert (info.status, info.rows, info.chunks) == ("done", 12345, 3)


def test_a_change_between_the_watermarks_wins_over_the_snapshot_row(
        monkeypatch, source_dsn, target_dsn, state_dsn):
    execute(source_dsn, TABLE, "INSERT INTO items SELECT g, 0 FROM generate_series(1, 10) g")
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["items"])
    pull_pipeline(spec, "crm")

    def live_change() -> None:  # commits after the chunk was read, before its high watermark
        execute(source_dsn, "UPDATE items SET v = 99 WHERE id = 3",
                "DELETE FROM items WHERE id = 4")

    with open_state(spec) as state:
        backfill_table(state, spec.pipelines["crm"], "public.items",
                       faults=Hook("after_read", live_change))
    sync_until_idle(spec)
    chunk = rows(state_dsn, "SELECT placed, conflicts FROM sync_state.snapshot_chunk")
    # Without the watermark rule the chunk (read with v = 0 and with row 4) would land after
    # the live UPDATE and DELETE and bring both rows back to their old state.
    assert rows(target_dsn, "SELECT id, v FROM items WHERE id IN (3, 4)") == [(3, 99)]
    assert_tables_equal(source_dsn, target_dsn, "items")
    assert chunk == [(8, 2)]


def test_backfill_with_live_updates_and_a_crash_midway(monkeypatch, source_dsn, target_dsn,
                                                       state_dsn):
    n = 100_000
    execute(source_dsn, TABLE,
            "INSERT INTO items SELECT g, 0, 'n' || g FROM generate_series(1, 100000) g")
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["items"])
    pipeline = spec.pipelines["crm"]
    pull_pipeline(spec, "crm")
    stop = threading.Event()
    writes = {"n": 0}

    def live_writes() -> None:  # hammer the same keys the backfill reads
        rng = random.Random(7)
        import psycopg
        with psycopg.connect(source_dsn, autocommit=True) as conn:
            while not stop.is_set():
                with conn.transaction():
                    for _ in range(20):
                        k = rng.randrange(1, n + 500)
                        op = rng.random()
                        if op < 0.8:
                            conn.execute("INSERT INTO items VALUES (%s, 1, 'live') ON CONFLICT "
                                         "(id) DO UPDATE SET v = items.v + 1, note = 'live'",
                                         (k,))
                        else:
                            conn.execute("DELETE FROM items WHERE id = %s", (k,))
                writes["n"] += 20

    def pump() -> None:  # the sensor and the delivery runs
        while not stop.is_set():
            pull_pipeline(spec, "crm")
            deliver_pipeline(spec, "crm")

    threads = [threading.Thread(target=live_writes), threading.Thread(target=pump)]
    for t in threads:
        t.start()
    try:
        with open_state(spec) as state:
            with pytest.raises(InjectedCrash):  # dies between the read and the high watermark
                backfill_table(state, pipeline, "public.items", chunk_rows=5000,
                               faults=Faults(["after_read"], after_hits=7))
            with pytest.raises(InjectedCrash):  # dies after the high watermark, unrecorded
                backfill_table(state, pipeline, "public.items", chunk_rows=5000,
                               faults=Faults(["after_high"], after_hits=3))
            report = backfill_table(state, pipeline, "public.items", chunk_rows=5000)
            assert report.done and report.resumed
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert writes["n"] > 200, "live writes did not overlap the backfill"
    sync_until_idle(spec)
    assert_tables_equal(source_dsn, target_dsn, "items")


def test_repair_sends_current_rows_and_deletes_through_the_stream(
        monkeypatch, source_dsn, target_dsn, state_dsn):
    execute(source_dsn, TABLE)
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["items"])
    pull_pipeline(spec, "crm")
    execute(source_dsn, "INSERT INTO items SELECT g, g FROM generate_series(1, 50) g")
    sync_until_idle(spec)
    execute(target_dsn, "DELETE FROM items WHERE id = 5", "UPDATE items SET v = -1 WHERE id = 6",
            "INSERT INTO items VALUES (77, 77, 'extra')")
    with open_state(spec) as state:
        report = repair_keys(state, spec.pipelines["crm"], "public.items",
                             [("5",), ("6",), ("77",)])
    assert (report.rows, report.done) == (3, True)
    sync_until_idle(spec)
    assert_tables_equal(source_dsn, target_dsn, "items")


def test_a_transaction_open_across_the_backfill_still_wins(monkeypatch, source_dsn, target_dsn,
                                                           state_dsn):
    import psycopg

    execute(source_dsn, TABLE, "INSERT INTO items SELECT g, 0 FROM generate_series(1, 3000) g")
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["items"])
    pull_pipeline(spec, "crm")
    with psycopg.connect(source_dsn) as long_txn:  # idle in transaction, holding an xid
        long_txn.execute("UPDATE items SET v = 555 WHERE id IN (5, 2500)")
        with open_state(spec) as state:
            report = backfill_table(state, spec.pipelines["crm"], "public.items",
                                    chunk_rows=1000, wait_s=0.3)
        assert report.done and report.chunks == 4
        long_txn.commit()  # after every chunk's high watermark: its change comes later
    sync_until_idle(spec)
    assert rows(target_dsn, "SELECT id, v FROM items WHERE v = 555 ORDER BY id") == [
        (5, 555), (2500, 555)]
    assert_tables_equal(source_dsn, target_dsn, "items")


def test_backfill_under_writers_keeps_every_large_value(monkeypatch, source_dsn, target_dsn,
                                                        state_dsn):
    """What a user saw on a live database: rows whose large value was left to a partial live
    update (REPLICA IDENTITY DEFAULT) arrived NULL. Writers update (mostly leaving the large,
    out-of-line, incompressible values alone), delete and re-insert, with hot keys, while the
    backfill runs and crashes twice; the target must end equal column by column."""
    import secrets

    import psycopg

    n = 3000
    execute(source_dsn, "CREATE TABLE docs (id int PRIMARY KEY, v int NOT NULL, body text, "
                        "note text)", "ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL")
    with psycopg.connect(source_dsn, autocommit=True) as conn, conn.cursor() as cur:
        with cur.copy("COPY docs (id, v, body, note) FROM STDIN") as copy:
            for k in range(1, n + 1):
                copy.write_row((k, 0, secrets.token_urlsafe(7000) if k % 3 == 0 else None,
                                f"n{k}"))
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["docs"])
    pipeline = spec.pipelines["crm"]
    pull_pipeline(spec, "crm")
    stop = threading.Event()
    done = {"writes": 0}

    def writers() -> None:
        rng = random.Random(11)
        hot = list(range(3, 63, 3))  # keys that have large values
        with psycopg.connect(source_dsn, autocommit=True) as conn:
            while not stop.is_set():
                k = rng.choice(hot) if rng.random() < 0.3 else rng.randrange(1, n + 200)
                op = rng.random()
                if op < 0.65:  # leaves body untouched: pgoutput sends it as "unchanged"
                    conn.execute("UPDATE docs SET v = v + 1, note = 'u' WHERE id = %s", (k,))
                elif op < 0.75:
                    conn.execute("UPDATE docs SET body = %s WHERE id = %s",
                                 (secrets.token_urlsafe(6000), k))
                elif op < 0.85:
                    conn.execute("DELETE FROM docs WHERE id = %s", (k,))
                else:  # insert or re-insert, with a large value
                    conn.execute("INSERT INTO docs VALUES (%s, 1, %s, 'i') ON CONFLICT (id) DO "
                                 "UPDATE SET v = docs.v + 1", (k, secrets.token_urlsafe(6000)))
                done["writes"] += 1
                time.sleep(0.001)

    def pump() -> None:
        while not stop.is_set():
            pull_pipeline(spec, "crm")
            deliver_pipeline(spec, "crm")

    threads = [threading.Thread(target=writers), threading.Thread(target=pump)]
    for t in threads:
        t.start()
    try:
        with open_state(spec) as state:
            with pytest.raises(InjectedCrash):
                backfill_table(state, pipeline, "public.docs", chunk_rows=300,
                               faults=Faults(["after_read"], after_hits=2))
            with pytest.raises(InjectedCrash):
                backfill_table(state, pipeline, "public.docs", chunk_rows=300,
                               faults=Faults(["after_high"], after_hits=3))
            report = backfill_table(state, pipeline, "public.docs", chunk_rows=300)
            assert report.done and report.resumed
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert done["writes"] > 200, "the writers did not overlap the backfill"
    sync_until_idle(spec)
    columns = "id, v, note, md5(body) AS body_md5"
    assert_tables_equal(source_dsn, target_dsn, "docs", columns=columns)
    big = rows(source_dsn, "SELECT count(*) FROM docs WHERE length(body) > 8000")[0][0]
    assert big > 900
    assert rows(state_dsn, "SELECT count(*) FROM sync_state.refetch") == [(0,)]
