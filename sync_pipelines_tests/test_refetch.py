"""Values the stream did not carry: an UPDATE that leaves a large out-of-line (TOASTed) value
untouched arrives without it, and a target that has no copy of the row to take it from gets the
current source row re-read through the watermarked path instead of a half row — after a key
change, a backfill window, a dead-lettered and discarded insert, and on an HTTP target, which
cannot merge a partial body. Crashes between the change and the re-read change nothing.

Real PostgreSQL (source, state, target), the real puller and sinks; the HTTP case talks to the
reference CRM on 127.0.0.1. Not covered here: the Dagster layer (the re-read is part of the
pull a sensor tick runs), backfill under concurrent writers (test_backfill).
"""

from __future__ import annotations

import secrets

import pytest

from sync_pipelines.engine.backfill.reader import backfill_table
from sync_pipelines.engine.faults import Faults, InjectedCrash
from sync_pipelines.engine.pipeline import (
    deliver_pipeline,
    open_state,
    pull_pipeline,
    resolve_dead_letters,
    sweep_pipeline,
)
from sync_pipelines.engine.spec import parse_spec

from .support.pipelines import assert_tables_equal, execute, make_spec, rows, sync_until_idle
from .test_backfill import Hook

pytestmark = pytest.mark.pg_versions

# A value stored out of line and uncompressed, whatever its content (pgoutput sends it as
# "unchanged" when an UPDATE leaves it alone).
DOCS = ("CREATE TABLE docs (id int PRIMARY KEY, v int NOT NULL, body text)",
        "ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL")
COLUMNS = "id, v, md5(body) AS body_md5, length(body) AS body_len"


def big() -> str:
    """~12 kB of incompressible text."""
    return secrets.token_urlsafe(9000)


def insert_docs(dsn: str, n: int) -> None:
    import psycopg
    with psycopg.connect(dsn, autocommit=True) as conn:
        for k in range(1, n + 1):
            conn.execute("INSERT INTO docs VALUES (%s, %s, %s)", (k, k, big()))


def docs_spec(monkeypatch, source_dsn, target_dsn, state_dsn, **kw):
    execute(source_dsn, *DOCS)
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["docs"], **kw)
    pull_pipeline(spec, "crm")  # the slot
    return spec


def pending(state_dsn: str) -> int:
    return rows(state_dsn, "SELECT count(*) FROM sync_state.refetch")[0][0]


def test_a_key_change_moves_the_row_with_its_large_value(monkeypatch, source_dsn, target_dsn,
                                                          state_dsn):
    spec = docs_spec(monkeypatch, source_dsn, target_dsn, state_dsn)
    insert_docs(source_dsn, 3)
    sync_until_idle(spec)
    execute(source_dsn, "UPDATE docs SET id = 101 WHERE id = 1",   # moved, body "unchanged"
            "UPDATE docs SET v = -1 WHERE id = 2",                 # same key: target keeps it
            "UPDATE docs SET v = 7 WHERE id = 101")                # the moved key's next change
    sync_until_idle(spec)
    assert_tables_equal(source_dsn, target_dsn, "docs", columns=COLUMNS)
    assert rows(target_dsn, "SELECT id, v FROM docs ORDER BY id") == [(2, -1), (3, 3), (101, 7)]
    assert pending(state_dsn) == 0
    refetches = rows(state_dsn, "SELECT count(*) FROM sync_state.snapshot WHERE kind = "
                                "'refetch' AND status = 'done'")[0][0]
    assert refetches >= 1  # the moved row came back through a re-read, not the old value


@pytest.mark.parametrize("point", [
    "after_apply",    # the delete of the old key and the request committed, run not recorded
    "after_low",      # the re-read died after its low watermark
    "after_read",     # ... after reading the row, before the high watermark
    "after_high",     # ... after the high watermark, before forgetting the request
    "before_advance",  # the pull that placed the re-read row died before moving the slot
])
def test_a_crash_between_the_move_and_the_re_read_changes_nothing(
        monkeypatch, source_dsn, target_dsn, state_dsn, point):
    spec = docs_spec(monkeypatch, source_dsn, target_dsn, state_dsn)
    insert_docs(source_dsn, 2)
    sync_until_idle(spec)
    execute(source_dsn, "UPDATE docs SET id = 50 WHERE id = 1")
    faults = Faults([point])
    with pytest.raises(InjectedCrash):
        for _ in range(5):
            pull_pipeline(spec, "crm", faults=faults)
            deliver_pipeline(spec, "crm", faults=faults)
    execute(source_dsn, "UPDATE docs SET v = 9 WHERE id = 50")
    sync_until_idle(spec)
    assert_tables_equal(source_dsn, target_dsn, "docs", columns=COLUMNS)
    assert rows(target_dsn, "SELECT id, v FROM docs ORDER BY id") == [(2, 2), (50, 9)]
    assert pending(state_dsn) == 0


def test_a_partial_update_left_to_by_a_backfill_window_arrives_whole(
        monkeypatch, source_dsn, target_dsn, state_dsn):
    """The bug a user saw: a key updated between a chunk's watermarks is dropped from the chunk
    (the live change decides), and that live change did not carry the large value."""
    execute(source_dsn, *DOCS)
    insert_docs(source_dsn, 20)
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["docs"])
    pull_pipeline(spec, "crm")

    def live_change() -> None:  # between the chunk's read and its high watermark
        execute(source_dsn, "UPDATE docs SET v = v + 100 WHERE id IN (3, 4, 5)")

    with open_state(spec) as state:
        backfill_table(state, spec.pipelines["crm"], "public.docs",
                       faults=Hook("after_read", live_change))
    sync_until_idle(spec)
    assert rows(target_dsn, "SELECT count(*) FROM docs WHERE body IS NULL") == [(0,)]
    assert_tables_equal(source_dsn, target_dsn, "docs", columns=COLUMNS)
    assert rows(state_dsn, "SELECT conflicts FROM sync_state.snapshot_chunk "
                           "JOIN sync_state.snapshot USING (snapshot_id) WHERE kind = "
                           "'backfill'") == [(3,)]


def test_a_discarded_insert_then_a_partial_update_brings_the_whole_row(
        monkeypatch, source_dsn, target_dsn, state_dsn):
    spec = docs_spec(monkeypatch, source_dsn, target_dsn, state_dsn)
    execute(target_dsn, "CREATE TABLE docs (id int PRIMARY KEY, v int NOT NULL CHECK (v >= 0), "
                        "body text)")
    import psycopg
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO docs VALUES (1, -5, %s), (2, 2, %s)", (big(), big()))
    sync_until_idle(spec)  # row 1 is refused by the target: a dead letter
    execute(source_dsn, "UPDATE docs SET v = 5 WHERE id = 1")  # parks behind it, body unchanged
    sync_until_idle(spec)
    assert rows(target_dsn, "SELECT id FROM docs ORDER BY id") == [(2,)]
    assert resolve_dead_letters(spec, "crm", "replica", action="discard",
                                key_like="%", reason="bad v, fixed at the source") == 1
    sweep_pipeline(spec, "crm")  # the parked update: partial, for a key the target lacks
    assert rows(target_dsn, "SELECT count(*) FROM docs WHERE id = 1") == [(0,)]  # no half row
    assert pending(state_dsn) == 1
    sync_until_idle(spec)  # the pull re-reads row 1
    assert_tables_equal(source_dsn, target_dsn, "docs", columns=COLUMNS)


def test_a_row_deleted_before_its_re_read_ends_deleted(monkeypatch, source_dsn, target_dsn,
                                                        state_dsn):
    spec = docs_spec(monkeypatch, source_dsn, target_dsn, state_dsn)
    insert_docs(source_dsn, 2)
    sync_until_idle(spec)
    execute(source_dsn, "UPDATE docs SET id = 30 WHERE id = 1")
    pull_pipeline(spec, "crm")
    deliver_pipeline(spec, "crm")  # old key deleted, re-read of 30 asked for
    assert pending(state_dsn) == 1
    execute(source_dsn, "DELETE FROM docs WHERE id = 30")  # gone before the re-read
    sync_until_idle(spec)
    assert rows(target_dsn, "SELECT id FROM docs ORDER BY id") == [(2,)]
    assert pending(state_dsn) == 0


def test_replica_identity_full_carries_the_value_without_a_re_read(
        monkeypatch, source_dsn, target_dsn, state_dsn):
    spec = docs_spec(monkeypatch, source_dsn, target_dsn, state_dsn)
    execute(source_dsn, "ALTER TABLE docs REPLICA IDENTITY FULL")
    insert_docs(source_dsn, 2)
    sync_until_idle(spec)
    execute(source_dsn, "UPDATE docs SET id = 40 WHERE id = 1")
    pull_pipeline(spec, "crm")
    deliver_pipeline(spec, "crm")
    assert pending(state_dsn) == 0  # the old tuple (whole, detoasted) had the value
    assert_tables_equal(source_dsn, target_dsn, "docs", columns=COLUMNS)
    assert rows(state_dsn, "SELECT count(*) FROM sync_state.snapshot") == [(0,)]


def test_identical_rows_are_not_rewritten(monkeypatch, source_dsn, target_dsn, state_dsn):
    execute(source_dsn, "CREATE TABLE items (id int PRIMARY KEY, v int, n numeric, j jsonb)",
            "INSERT INTO items SELECT g, g, 1.50, '{\"a\": 1.0}' FROM generate_series(1, 500) g")
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["items"])
    pull_pipeline(spec, "crm")
    with open_state(spec) as state:
        backfill_table(state, spec.pipelines["crm"], "public.items")
    sync_until_idle(spec)
    versions = rows(target_dsn, "SELECT id, xmin::text FROM items ORDER BY id")
    # The same numeric and json by value, but another text: these must be rewritten.
    execute(source_dsn, "UPDATE items SET n = 1.5 WHERE id = 1",
            "UPDATE items SET j = '{\"a\": 1.00}' WHERE id = 2")
    with open_state(spec) as state:
        backfill_table(state, spec.pipelines["crm"], "public.items", resume=False)
    pull_pipeline(spec, "crm")
    [report] = deliver_pipeline(spec, "crm")
    # One window: the two updates and the 500 re-read rows, one final row per key. Rows 1 and
    # 2 are rewritten (1.50 → 1.5 is equal as numeric, not as text), the 498 others are not.
    assert (report.stats.upserts, report.stats.unchanged) == (500, 498)
    after = rows(target_dsn, "SELECT id, xmin::text FROM items ORDER BY id")
    assert [a for a, b in zip(versions, after, strict=True) if a != b] == [
        versions[0], versions[1]]
    assert_tables_equal(source_dsn, target_dsn, "items", columns="id, v, n::text, j::text")


# -- HTTP ------------------------------------------------------------------------------------


def http_docs_spec(monkeypatch, source_dsn, state_dsn, base_url):
    monkeypatch.setenv("R_SOURCE_DSN", source_dsn)
    monkeypatch.setenv("R_STATE_DSN", state_dsn)
    monkeypatch.setenv("R_CRM_URL", base_url)
    return parse_spec({
        "state": {"dsn_env": "R_STATE_DSN"},
        "pipelines": {"crm": {
            "source": {"dsn_env": "R_SOURCE_DSN"},
            "tables": {"docs": {}},
            "targets": {"api": {
                "kind": "http", "base_url_env": "R_CRM_URL",
                "tables": {"docs": {"upsert": "PUT /contacts/{id}",
                                    "delete": "DELETE /contacts/{id}"}},
            }},
        }},
    })


def test_an_http_target_gets_whole_records_never_partial_bodies(monkeypatch, source_dsn,
                                                                 state_dsn, crm_server):
    execute(source_dsn, *DOCS)
    spec = http_docs_spec(monkeypatch, source_dsn, state_dsn, crm_server.base_url)
    insert_docs(source_dsn, 3)  # before the slot: the API never gets these inserts
    pull_pipeline(spec, "crm")
    execute(source_dsn, "UPDATE docs SET v = 10 WHERE id = 1",    # API lacks the record
            "UPDATE docs SET id = 20 WHERE id = 2")               # a move: DELETE 2 + whole 20
    for _ in range(4):
        pull_pipeline(spec, "crm")
        deliver_pipeline(spec, "crm")
    source = {r[0]: (r[1], r[2]) for r in rows(source_dsn, "SELECT id::text, v::text, body "
                                                           "FROM docs")}
    records = crm_server.records("contacts")
    assert {k: (r["v"], r["body"]) for k, r in records.items()} == {
        "1": source["1"], "20": source["20"]}
    for w in crm_server.received()["writes"]:  # every PUT carried the whole record
        if w["method"] == "PUT":
            assert set(w["body"]) == {"id", "v", "body"}, w["body"]
    assert pending(state_dsn) == 0
