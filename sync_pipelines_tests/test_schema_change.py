"""Schema changes of a source table mid-stream: ADD COLUMN and DROP COLUMN between changes
that are read in the same pull (the relation message changes inside one peek and one batch).

Covers relation versioning in ingest and the state store, the mapper per relation version, and
the Postgres sink adding target columns. Does not cover column renames or type changes, nor
ADD COLUMN ... DEFAULT on a non-empty table (existing rows get the default in the source
without any WAL change to replicate; the target keeps NULL there — a known limitation of
logical replication, not exercised here).
"""

from __future__ import annotations

import pytest

from sync_pipelines.engine.pipeline import deliver_pipeline, pull_pipeline
from sync_pipelines.engine.staging.store import START, StateStore

from .support.pipelines import assert_tables_equal, execute, make_spec, rows, sync_until_idle

pytestmark = pytest.mark.pg_versions


def columns(dsn: str, table: str) -> list[str]:
    return [r[0] for r in rows(dsn, "SELECT attname FROM pg_attribute WHERE attrelid = "
                                    "%s::regclass AND attnum > 0 AND NOT attisdropped "
                                    "ORDER BY attnum", (table,))]


def test_add_column_mid_stream_in_one_pull(monkeypatch, source_dsn, target_dsn, state_dsn):
    execute(source_dsn, "CREATE TABLE items (id int PRIMARY KEY, name text)")
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["items"])
    pull_pipeline(spec, "crm")
    execute(
        source_dsn,
        "INSERT INTO items SELECT g, 'before ' || g FROM generate_series(1, 50) g",
        "ALTER TABLE items ADD COLUMN score int, ADD COLUMN tags text[]",
        "INSERT INTO items SELECT g, 'after ' || g, g * 10, ARRAY['t' || g] "
        "FROM generate_series(51, 100) g",
        # rows inserted before the ALTER, updated after it to set the new columns
        "UPDATE items SET score = -id, tags = ARRAY['old'] WHERE id <= 20",
        "DELETE FROM items WHERE id IN (30, 60)",
    )
    report = pull_pipeline(spec, "crm")
    assert report.changes == 50 + 50 + 20 + 2
    assert len(report.batches) == 1  # the relation changed inside one peek and one batch
    # Two relation versions are recorded, and the staged changes use both.
    with StateStore.connect(state_dsn) as state:
        staged = state.read_staged("crm", START, report.batches[-1].last)
    assert len(staged) == report.changes
    assert len({relation_id for _, _, _, relation_id, _, _ in staged}) == 2
    delivered = deliver_pipeline(spec, "crm")[0]
    assert delivered.changes == report.changes
    assert columns(target_dsn, "items") == ["id", "name", "score", "tags"]
    assert_tables_equal(source_dsn, target_dsn, "items")
    # 50 rows from before the ALTER, 20 of them updated after it, one deleted
    assert rows(target_dsn, "SELECT count(*) FROM items WHERE score IS NULL") == [(29,)]

    # Later changes keep flowing with the new shape.
    execute(source_dsn, "UPDATE items SET score = 0 WHERE score IS NULL")
    sync_until_idle(spec)
    assert_tables_equal(source_dsn, target_dsn, "items")


def test_drop_column_mid_stream_keeps_flowing(monkeypatch, source_dsn, target_dsn, state_dsn):
    execute(source_dsn, "CREATE TABLE items (id int PRIMARY KEY, name text, legacy text, n int)")
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["items"])
    pull_pipeline(spec, "crm")
    execute(source_dsn, "INSERT INTO items SELECT g, 'first ' || g, 'legacy ' || g, g "
                        "FROM generate_series(1, 30) g")
    sync_until_idle(spec)
    assert_tables_equal(source_dsn, target_dsn, "items")

    execute(
        source_dsn,
        "INSERT INTO items SELECT g, 'second ' || g, 'legacy ' || g, g "
        "FROM generate_series(31, 40) g",
        "ALTER TABLE items DROP COLUMN legacy",
        "INSERT INTO items SELECT g, 'third ' || g, g FROM generate_series(41, 60) g",
        "UPDATE items SET n = n + 1000 WHERE id % 3 = 0",
        "DELETE FROM items WHERE id IN (2, 45)",
    )
    report = pull_pipeline(spec, "crm")
    assert report.changes == 10 + 20 + 20 + 2 and len(report.batches) == 1
    deliver_pipeline(spec, "crm")

    # The target keeps the column; rows written after the drop have NULL in it, rows written
    # before keep what they had; every other column equals the source.
    assert "legacy" in columns(target_dsn, "items")
    assert_tables_equal(source_dsn, target_dsn, "items", columns="id, name, n")
    assert rows(target_dsn, "SELECT count(*) FROM items WHERE id > 40 AND legacy IS NOT NULL"
                ) == [(0,)]
    assert rows(target_dsn, "SELECT count(*) FROM items WHERE id <= 40 AND legacy IS NULL"
                ) == [(0,)]

    execute(source_dsn, "INSERT INTO items VALUES (100, 'later', 1)")
    sync_until_idle(spec)
    assert_tables_equal(source_dsn, target_dsn, "items", columns="id, name, n")
