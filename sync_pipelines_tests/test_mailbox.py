"""The mailbox's packed batches (staging/mailbox.py): a batch's changes come back as they were
staged, a damaged value is refused whole, changes staged as rows by an older version survive
the migration that packs them, and a pull of large rows stages batches bounded in bytes.

The first two are pure; the migration and the pull run against real PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sync_pipelines.engine.capture import puller
from sync_pipelines.engine.errors import StateError
from sync_pipelines.engine.pipeline import deliver_pipeline, pull_pipeline
from sync_pipelines.engine.staging import store as store_module
from sync_pipelines.engine.staging.mailbox import StagedChange, pack, unpack
from sync_pipelines.engine.staging.migrations import MIGRATIONS
from sync_pipelines.engine.staging.store import START, Position, StateStore

from .support.pipelines import assert_tables_equal, execute, make_spec, rows, sync_until_idle

_TS = datetime(2026, 12, 3, 12, 0, tzinfo=timezone.utc)


@st.composite
def batches(draw: st.DrawFn) -> tuple[int, list[StagedChange]]:
    """A batch as the puller stages it: transactions in LSN order, changes numbered in each."""
    first_lsn = draw(st.integers(0, 2**40))
    lsn, out = first_lsn, []
    for _ in range(draw(st.integers(1, 5))):
        xid = draw(st.integers(0, 2**32 - 1))
        ts = _TS + timedelta(microseconds=draw(st.integers(-10**12, 10**12)))
        for seq in range(draw(st.integers(1, 6))):
            op = draw(st.sampled_from("IUDT"))
            message = b"" if op == "T" else draw(st.binary(max_size=300))
            out.append(StagedChange(lsn, seq, xid, ts, draw(st.integers(1, 2**40)), op,
                                    message))
        lsn += draw(st.integers(1, 2**20))
    return first_lsn, out


@settings(max_examples=300, deadline=None)
@given(batches(), st.integers(0, 2**31))
def test_a_packed_batch_comes_back_as_staged(batch, batch_id):
    first_lsn, changes = batch
    data = pack(changes, first_lsn)
    assert unpack(data, batch_id, first_lsn) == [
        (c.commit_lsn, c.seq, batch_id, c.relation_id, c.op, c.message) for c in changes]


@settings(max_examples=100, deadline=None)
@given(batches(), st.data())
def test_a_damaged_batch_is_refused_whole(batch, data):
    first_lsn, changes = batch
    packed = pack(changes, first_lsn)
    cut = data.draw(st.integers(0, len(packed) - 1))
    with pytest.raises(StateError, match="damaged|unknown format"):
        unpack(packed[:cut], 1, first_lsn)
    with pytest.raises(StateError, match="damaged"):
        unpack(packed + data.draw(st.binary(min_size=1, max_size=50)), 1, first_lsn)
    with pytest.raises(StateError, match="unknown format"):
        unpack(b"\x02" + packed[1:], 1, first_lsn)


def test_changes_staged_as_rows_survive_the_migration(monkeypatch, state_dsn):
    """A state schema written by a version that staged one row per change (migrations 1–9)
    with changes waiting, one batch of them partly collected: after migration 10 every
    remaining change reads back unchanged, and the batch counts only what it still holds."""
    schema = "sync_state_old"
    monkeypatch.setattr(store_module, "MIGRATIONS", MIGRATIONS[:9])
    with StateStore.connect(state_dsn, schema=schema) as state:
        state.migrate()
        state.ensure_pipeline("crm", "slot_crm")
        old = [  # (batch_id, commit_lsn, seq, xid, relation_id, op, message)
            (0, 1000, 0, 7, 11, "I", b"I\x00\x00\x00\x01first"),
            (0, 1000, 1, 7, 11, "T", b""),
            (0, 2000, 0, 8, 12, "U", b"U" + bytes(range(256))),
            (1, 3000, 0, 9, 11, "D", b"D\x00\x00\x00\x01gone"),
            (1, 3000, 1, 9, 11, "I", b"I\x00\x00\x00\x01kept"),
            (1, 4000, 0, 10, 11, "I", b""),
        ]
        with state.conn.transaction():
            for b, first, last, n in ((0, (1000, 0), (2000, 0), 3), (1, (3000, 0), (4000, 0), 3)):
                state.conn.execute(state._q(
                    "INSERT INTO {schema}.batch (pipeline, batch_id, first_lsn, first_seq, "
                    "last_lsn, last_seq, n_changes, first_commit_ts, last_commit_ts) VALUES "
                    "('crm', %s, %s, %s, %s, %s, %s, %s, %s)"), (b, *first, *last, n, _TS, _TS))
            for b, lsn, seq, xid, rid, op, msg in old:
                state.conn.execute(state._q(
                    "INSERT INTO {schema}.change (pipeline, commit_lsn, seq, batch_id, xid, "
                    "commit_ts, relation_id, op, message) VALUES ('crm', %s, %s, %s, %s, %s, "
                    "%s, %s, %s)"), (lsn, seq, b, xid, _TS, rid, op, msg))
            # The old collector removed changes up to a target's floor, mid-batch too.
            state.conn.execute(state._q(
                "DELETE FROM {schema}.change WHERE commit_lsn = 3000 AND seq = 0"))
    monkeypatch.setattr(store_module, "MIGRATIONS", MIGRATIONS)
    with StateStore.connect(state_dsn, schema=schema) as state:
        assert state.migrate() == len(MIGRATIONS)
        remaining = [r for r in old if (r[1], r[2]) != (3000, 0)]
        assert state.read_staged("crm", START, Position(2**62, 0)) == [
            (lsn, seq, b, rid, op, msg) for b, lsn, seq, _, rid, op, msg in remaining]
        assert [(b.batch_id, b.n_changes) for b in state.batches("crm")] == [(0, 3), (1, 2)]
        assert state.undelivered_changes("crm") == 5
        assert rows(state_dsn, "SELECT to_regclass(%s)", (f"{schema}.change",)) == [(None,)]
        # A range inside one batch reads only its part.
        assert state.read_staged("crm", Position(1000, 0), Position(1000, 1)) == [
            (1000, 1, 0, 11, "T", b"")]


def test_large_rows_are_staged_in_batches_bounded_in_bytes(monkeypatch, source_dsn,
                                                          target_dsn, state_dsn):
    """With the byte bound lowered to 200 kB: one transaction of 60 rows of 20 kB and 40
    small transactions stage as several batches, none much over the bound, and deliver."""
    monkeypatch.setattr(puller, "BATCH_BYTES_MAX", 200_000)
    execute(source_dsn, "CREATE TABLE docs (id int PRIMARY KEY, body text)",
            "ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL")  # 20 kB in each message
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["docs"])
    assert pull_pipeline(spec, "crm").changes == 0
    execute(source_dsn, "INSERT INTO docs SELECT g, repeat(md5(g::text), 625) "
                        "FROM generate_series(1, 60) g")
    with psycopg.connect(source_dsn, autocommit=True) as conn:  # a transaction each
        for i in range(61, 101):
            conn.execute("INSERT INTO docs VALUES (%s, repeat('y', 20000))", (i,))
    report = pull_pipeline(spec, "crm")
    assert report.changes == 100
    sizes = rows(state_dsn, "SELECT n_changes, octet_length(changes) FROM sync_state.batch "
                            "ORDER BY batch_id")
    assert len(sizes) >= 10, sizes
    # Staged once the bound is reached: at most one message (~20 kB) over it.
    assert all(size < 200_000 + 25_000 for _, size in sizes), sizes
    assert sum(n for n, _ in sizes) == 100
    assert sum(d.changes for d in deliver_pipeline(spec, "crm")) == 100
    sync_until_idle(spec)
    assert_tables_equal(source_dsn, target_dsn, "docs")
