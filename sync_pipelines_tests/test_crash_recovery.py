"""Crash recovery of pull and delivery: after a crash at any point and a restart, the target
equals the source and no change was applied twice or out of order (invariants 1-3).

A crash is an :class:`~sync_pipelines.engine.faults.InjectedCrash` raised at a named point, or a
real error raised by the target database in the middle of an apply; the "restart" is a fresh
series of ``pull_pipeline`` / ``deliver_pipeline`` calls without faults (new connections, new
objects, nothing carried over in memory). Double applies and reordering are detected by a
trigger in the target (see :mod:`.support.versioned`), not by asking the engine.

Covers the engine (ingest, state, deliver, Postgres sink) on real PostgreSQL. Does not touch
the Dagster layer, HTTP targets, or a real process kill (``InjectedCrash`` stands in for it:
it is a ``BaseException`` the engine cannot swallow, and every connection is closed by it).
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass

import psycopg
import pytest

from sync_pipelines.engine.capture.source import Source
from sync_pipelines.engine.delivery.loop import deliver
from sync_pipelines.engine.errors import SyncError, TransientDeliveryError
from sync_pipelines.engine.faults import Faults, InjectedCrash
from sync_pipelines.engine.pipeline import (
    deliver_pipeline,
    open_sink,
    open_state,
    pull_pipeline,
)
from sync_pipelines.engine.wire.pgoutput import parse_lsn

from .support.pipelines import assert_tables_equal, execute, make_spec, rows, sync_until_idle
from .support.versioned import (
    assert_versions_increase,
    create_versioned_tables,
    fail_once_on,
    run_workload,
    version_log,
)

pytestmark = pytest.mark.pg_versions

POLICY = {"batch_size": 50, "demand_budget": 300}


def confirmed_flush(source_dsn: str, slot: str = "sync_crm") -> int:
    (lsn,) = rows(source_dsn, "SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
                              "WHERE slot_name = %s", (slot,))[0]
    return parse_lsn(lsn)


def pipeline_row(state_dsn: str) -> tuple[int, int, int | None]:
    """(staged_lsn, staged_seq, advanced_lsn) of pipeline 'crm' in the state DB."""
    return rows(state_dsn, "SELECT staged_lsn, staged_seq, advanced_lsn "
                           "FROM sync_state.pipeline WHERE pipeline = 'crm'")[0]


def setup(monkeypatch, source_dsn, target_dsn, state_dsn, policy=POLICY):
    create_versioned_tables(source_dsn, target_dsn)
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["items"], policy=policy)
    assert pull_pipeline(spec, "crm").changes == 0  # creates the slot
    return spec


@dataclass
class Crash:
    """Where the crash happened and what the slot did in the call that crashed."""

    what: str
    slot_before: int
    slot_after: int


def run_until_crash(spec, source_dsn: str, faults: Faults, *, max_rounds: int = 200) -> Crash:
    """Alternate pull and deliver with ``faults`` armed until the first crash; fail if none."""
    for _ in range(max_rounds):
        before = confirmed_flush(source_dsn)
        try:
            pulled = pull_pipeline(spec, "crm", faults=faults)
        except InjectedCrash as crash:
            return Crash(f"pull:{crash}", before, confirmed_flush(source_dsn))
        try:
            delivered = deliver_pipeline(spec, "crm", faults=faults)
        except InjectedCrash as crash:
            return Crash(f"deliver:{crash}", before, confirmed_flush(source_dsn))
        except SyncError as err:  # a real error raised by the target mid-apply
            return Crash(f"deliver-error:{err}", before, confirmed_flush(source_dsn))
        if pulled.changes == 0 and all(r.changes == 0 for r in delivered):
            break
    raise AssertionError(f"the crash never happened (hits: {faults.hits})")


# (crash point, hits of that point to let pass before crashing, side). Each case crashes once,
# mid-stream (several batches and pulls have gone through before), then restarts without faults.
CRASH_POINTS = [
    # Pull: the first batch of a pull is staged (its own state transaction), the rest is still
    # only in the slot, which has not moved; a restart re-peeks and skips what is staged.
    pytest.param("after_stage_batch", 0, "pull", id="after_stage_batch-first"),
    # Pull: a later batch of a later pull is staged; earlier pulls were staged and delivered.
    pytest.param("after_stage_batch", 9, "pull", id="after_stage_batch-mid"),
    # Pull: everything the pull read is staged, the slot is not yet advanced.
    pytest.param("before_advance", 2, "pull", id="before_advance"),
    # Pull: the slot was advanced and the state DB knows it; the report was never returned.
    pytest.param("after_advance", 2, "pull", id="after_advance"),
    # Delivery: the batch's changes are read and mapped, the target transaction never started.
    pytest.param("before_apply", 4, "deliver", id="before_apply"),
    # Delivery: the target committed the batch with its checkpoint; the state DB was not told.
    pytest.param("after_apply", 4, "deliver", id="after_apply"),
]


@pytest.mark.parametrize(("point", "after_hits", "side"), CRASH_POINTS)
def test_crash_then_restart_applies_every_change_once(
    monkeypatch, source_dsn, target_dsn, state_dsn, point, after_hits, side
):
    spec = setup(monkeypatch, source_dsn, target_dsn, state_dsn)
    changes = run_workload(source_dsn, transactions=500, seed=7)
    assert changes > 4 * POLICY["demand_budget"]  # several pulls, many batches

    crash = run_until_crash(spec, source_dsn, Faults([point], after_hits=after_hits))
    assert crash.what == f"{side}:{point}"
    if point in ("after_stage_batch", "before_advance"):
        # Nothing lost: the slot has not moved past changes that were only read, not staged.
        assert crash.slot_after == crash.slot_before, "slot moved in a pull that crashed"
        staged_lsn, _, _ = pipeline_row(state_dsn)
        assert crash.slot_after <= staged_lsn
    if point == "after_advance":
        assert crash.slot_after > crash.slot_before

    assert sync_until_idle(spec) >= 0  # restart: new calls, no faults
    assert_tables_equal(source_dsn, target_dsn, "items")
    log = assert_versions_increase(target_dsn)
    # Every id the source still has was written at least once, with its final version last.
    final = dict(rows(source_dsn, "SELECT id, version FROM items"))
    assert all(log[i][-1] == v for i, v in final.items())
    # The state DB is drained: everything staged was delivered and collected.
    assert rows(state_dsn, "SELECT count(*) FROM sync_state.batch") == [(0,)]


def test_target_error_mid_apply_then_retry_applies_every_change_once(
    monkeypatch, source_dsn, target_dsn, state_dsn
):
    """A real failure inside the target transaction: a trigger raises on one row, after the
    batch's deletes and other upserts already ran in that transaction. All of it must roll back
    (checkpoint included); the retry applies the batch once."""
    spec = setup(monkeypatch, source_dsn, target_dsn, state_dsn)
    run_workload(source_dsn, transactions=400, seed=11)
    # An id written late in the workload, so earlier batches have been applied before it.
    (victim,) = rows(source_dsn, "SELECT max(id) - 5 FROM items")[0]
    fail_once_on(target_dsn, victim)

    crash = run_until_crash(spec, source_dsn, Faults())
    assert crash.what.startswith("deliver-error:")
    assert f"injected target failure on item {victim}" in crash.what
    assert "pipeline 'crm', target 'replica', applying batch" in crash.what
    # The failed transaction left no trace: the victim was never logged, the target's
    # checkpoint is still behind the state's staged position.
    assert victim not in version_log(target_dsn)

    sync_until_idle(spec)
    assert_tables_equal(source_dsn, target_dsn, "items")
    assert_versions_increase(target_dsn)
    # The trigger fired again on the retry (the failure was real, and the row got through).
    assert rows(target_dsn, "SELECT last_value FROM fail_once")[0][0] >= 2


# (crash point, hits to let pass). The transaction of 1,000 changes is larger than the demand
# budget (300), so it is staged across several pulls; each case crashes while only part of it
# is staged and the slot is still before its commit.
GIANT_CRASHES = [
    # The first pull staged the small transactions and the first part of the giant one.
    pytest.param("before_advance", 0, id="before_advance-first-pull"),
    # A later pull crashes after staging one more part of the giant transaction.
    pytest.param("after_stage_batch", 5, id="after_stage_batch-later-pull"),
]


@pytest.mark.parametrize(("point", "after_hits"), GIANT_CRASHES)
def test_crash_while_a_giant_transaction_is_staged_across_pulls(
    monkeypatch, source_dsn, target_dsn, state_dsn, point, after_hits
):
    spec = setup(monkeypatch, source_dsn, target_dsn, state_dsn)
    run_workload(source_dsn, transactions=30, seed=3, max_ops=3)
    with psycopg.connect(source_dsn) as conn:  # one transaction: 600 inserts, 400 updates
        conn.execute("INSERT INTO items (id, version, qty, note) SELECT g, "
                     "nextval('item_version'), 0, 'giant ' || g FROM generate_series(1001, 1600) g")
        for i in range(1001, 1401):
            conn.execute("UPDATE items SET version = nextval('item_version'), qty = qty + 1 "
                         "WHERE id = %s", (i,))
    run_workload(source_dsn, transactions=30, seed=4, first_id=2001, max_ops=3)

    crash = run_until_crash(spec, source_dsn, Faults([point], after_hits=after_hits))
    assert crash.what == f"pull:{point}"
    staged_lsn, staged_seq, _ = pipeline_row(state_dsn)
    # Mid-giant: the staged position is inside the giant transaction (small ones have <= 3
    # changes), and the slot has not been advanced past that transaction's commit.
    assert 3 <= staged_seq < 999, f"crash not inside the giant transaction (seq {staged_seq})"
    assert crash.slot_after < staged_lsn

    sync_until_idle(spec)
    assert_tables_equal(source_dsn, target_dsn, "items")
    log = assert_versions_increase(target_dsn)
    # Nothing duplicated: the ids the giant transaction inserted and never updated were
    # written exactly once (the ones it also updated may be written once per batch).
    assert all(len(log[i]) == 1 for i in range(1401, 1601))


def test_crash_between_slot_advance_and_state_record(
    monkeypatch, source_dsn, target_dsn, state_dsn
):
    """A crash after the source confirmed the slot advance but before the state DB recorded
    it must not look like "someone else advanced the slot" on restart."""
    spec = setup(monkeypatch, source_dsn, target_dsn, state_dsn)
    run_workload(source_dsn, transactions=100, seed=5)
    real_advance = Source.advance
    crashed = []

    def advance_then_crash(self, lsn):
        end = real_advance(self, lsn)
        if not crashed:
            crashed.append(end)
            raise InjectedCrash("after the slot advance, before recording it")
        return end

    monkeypatch.setattr(Source, "advance", advance_then_crash)
    with pytest.raises(InjectedCrash):
        sync_until_idle(spec)
    assert confirmed_flush(source_dsn) == crashed[0]
    sync_until_idle(spec)
    assert_tables_equal(source_dsn, target_dsn, "items")
    assert_versions_increase(target_dsn)


def test_trigger_log_detects_a_double_apply(monkeypatch, source_dsn, target_dsn, state_dsn):
    """The detector itself: re-applying a batch behind the engine's back (its target checkpoint
    removed) must show up as a duplicate version in the log."""
    spec = setup(monkeypatch, source_dsn, target_dsn, state_dsn)
    run_workload(source_dsn, transactions=20, seed=1)
    assert pull_pipeline(spec, "crm").changes > 0
    pipeline = spec.pipelines["crm"]
    with open_state(spec) as state, closing(open_sink(pipeline, "replica")) as sink:
        deliver(state, pipeline, "replica", sink)  # no garbage collection: batches stay staged
    assert_versions_increase(target_dsn)
    execute(target_dsn, "DELETE FROM sync_checkpoint.checkpoint")
    with open_state(spec) as state, closing(open_sink(pipeline, "replica")) as sink:
        deliver(state, pipeline, "replica", sink)
    with pytest.raises(AssertionError, match="written twice or out of order"):
        assert_versions_increase(target_dsn)


def test_target_error_is_reported_as_transient(monkeypatch, source_dsn, target_dsn, state_dsn):
    """The mid-apply failure above surfaces as a TransientDeliveryError (retry may succeed)."""
    spec = setup(monkeypatch, source_dsn, target_dsn, state_dsn)
    execute(source_dsn, "INSERT INTO items VALUES (1, nextval('item_version'), 0, 'x')")
    fail_once_on(target_dsn, 1)
    pull_pipeline(spec, "crm")
    with pytest.raises(TransientDeliveryError, match="injected target failure on item 1"):
        deliver_pipeline(spec, "crm")
    assert rows(target_dsn, "SELECT count(*) FROM items") == [(0,)]
    deliver_pipeline(spec, "crm")
    assert rows(target_dsn, "SELECT id FROM items") == [(1,)]
