"""End-to-end engine path on real PostgreSQL: inserts, updates, deletes and truncate reach the
target; a replay changes nothing. Covers ingest + state + mapping + Postgres sink; not Dagster."""

from __future__ import annotations

import pytest

from sync_pipelines.engine.faults import Faults, InjectedCrash
from sync_pipelines.engine.pipeline import deliver_pipeline, pull_pipeline

from .support.pipelines import assert_tables_equal, execute, make_spec, rows, sync_until_idle

pytestmark = pytest.mark.pg_versions

CUSTOMERS = """
CREATE TABLE customers (
    id bigint PRIMARY KEY, name text NOT NULL, email varchar(200), active boolean,
    balance numeric(12, 2), signed_up timestamptz, birthday date, ext_id uuid, attrs jsonb,
    tags text[], big text
)
"""


def test_inserts_updates_deletes_truncate_reach_target(monkeypatch, source_dsn, target_dsn,
                                                         state_dsn):
    execute(source_dsn, CUSTOMERS)
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["customers"])
    # First tick creates the slot: only changes after it are captured.
    assert pull_pipeline(spec, "crm").changes == 0
    execute(
        source_dsn,
        "INSERT INTO customers SELECT g, 'name ' || g, 'c' || g || '@x.io', g % 2 = 0, g * 1.5,"
        " '2024-01-01 10:00+00'::timestamptz + g * interval '1 hour', '1990-01-01'::date + g,"
        " gen_random_uuid(), jsonb_build_object('n', g, 's', 'q\"uote'), ARRAY['a', 'b,' || g],"
        " repeat('x', 5000) FROM generate_series(1, 500) g",
        "UPDATE customers SET name = 'renamed ' || id, attrs = NULL WHERE id % 3 = 0",
        "UPDATE customers SET balance = balance + 1 WHERE id % 5 = 0",  # big: unchanged TOAST
        "DELETE FROM customers WHERE id % 7 = 0",
        "UPDATE customers SET id = id + 10000 WHERE id = 1",  # key change
    )
    assert sync_until_idle(spec) > 0
    assert_tables_equal(source_dsn, target_dsn, "customers")
    execute(source_dsn, "TRUNCATE customers",
            "INSERT INTO customers (id, name) VALUES (1, 'after truncate')")
    sync_until_idle(spec)
    assert rows(target_dsn, "SELECT id, name FROM customers") == [(1, "after truncate")]


def test_replayed_batch_changes_nothing(monkeypatch, source_dsn, target_dsn, state_dsn):
    execute(source_dsn, "CREATE TABLE t (id int PRIMARY KEY, v int)")
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["t"])
    pull_pipeline(spec, "crm")
    execute(source_dsn, "INSERT INTO t SELECT g, g FROM generate_series(1, 100) g")
    assert pull_pipeline(spec, "crm").changes == 100
    # Crash after the target committed but before the state DB heard of it.
    with pytest.raises(InjectedCrash):
        deliver_pipeline(spec, "crm", faults=Faults(["after_apply"]))
    assert rows(state_dsn, "SELECT count(*) FROM sync_state.batch") == [(1,)]
    execute(target_dsn, "UPDATE t SET v = -1 WHERE id = 1")  # a replay would overwrite this
    again = deliver_pipeline(spec, "crm")[0]
    assert again.changes == 0 and len(again.skipped_batches) == 1
    assert rows(target_dsn, "SELECT v FROM t WHERE id = 1") == [(-1,)]
    # The skipped batch still counts as delivered: it is cleaned up and demand recovers.
    assert rows(state_dsn, "SELECT count(*) FROM sync_state.batch") == [(0,)]


def test_pulls_keep_the_slot_restart_point_close(monkeypatch, source_dsn, target_dsn,
                                                 state_dsn):
    """A pull that advanced the slot far past its restart point writes a record of the
    running transactions (PostgreSQL >= 16), so the next advance moves the restart point up:
    peeks then stop re-decoding the WAL since the server's last such record (every 15 s)."""
    execute(source_dsn, "CREATE TABLE items (id int PRIMARY KEY, note text)")
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["items"])
    pull_pipeline(spec, "crm")

    def slot() -> tuple[int, int]:
        restart, lsn = rows(source_dsn, "SELECT restart_lsn - '0/0', pg_current_wal_lsn() - "
                                        "'0/0' FROM pg_replication_slots WHERE slot_name = "
                                        "'sync_crm'")[0]
        return int(restart), int(lsn)

    # About 3 MB of WAL, more than the 1 MiB the restart point may trail by.
    execute(source_dsn, "INSERT INTO items SELECT g, repeat('x', 200) FROM "
                        "generate_series(1, 12000) g")
    restart_before, written = slot()
    assert written - restart_before > 2 << 20
    assert pull_pipeline(spec, "crm").changes == 12000
    execute(source_dsn, "UPDATE items SET note = 'y' WHERE id = 1")
    assert pull_pipeline(spec, "crm").changes == 1
    restart_after, _ = slot()
    version = int(rows(source_dsn, "SHOW server_version_num")[0][0]) // 10000
    if version >= 16:
        assert restart_after >= written, (restart_before, written, restart_after)
    sync_until_idle(spec)
    assert_tables_equal(source_dsn, target_dsn, "items")
