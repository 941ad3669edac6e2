"""Postgres target failures through the same path as HTTP ones (real PostgreSQL): a change the
target refuses for good (a constraint) becomes a dead letter naming the constraint and row,
with everything of its key after it, while other keys and later batches flow; redrive after
the fix applies the key's chain in order; a target that is down fails the run (transient) and
loses nothing. Not the Dagster layer."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from sync_pipelines.engine import (
    deliver_pipeline,
    pull_pipeline,
    resolve_dead_letters,
    sweep_pipeline,
    target_health,
)
from sync_pipelines.engine.errors import TransientDeliveryError

from .support.pipelines import assert_tables_equal, execute, make_spec, rows

pytestmark = pytest.mark.pg_versions


@pytest.fixture
def spec(monkeypatch, source_dsn, target_dsn, state_dsn):
    execute(source_dsn, "CREATE TABLE accounts (id int PRIMARY KEY, score int, note text)")
    # The target refuses scores above 100: a business rule the source does not have.
    execute(target_dsn, "CREATE TABLE accounts (id int PRIMARY KEY, score int "
                        "CONSTRAINT score_cap CHECK (score <= 100), note text)")
    s = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                  state_dsn=state_dsn, tables=["accounts"], policy={"batch_size": 20})
    pull_pipeline(s, "crm")
    return s


def sync(spec):
    pull_pipeline(spec, "crm")
    return deliver_pipeline(spec, "crm")[0]


def test_constraint_violation_dead_letters_the_key_and_the_rest_flows(spec, source_dsn,
                                                                       target_dsn):
    execute(source_dsn, "INSERT INTO accounts SELECT g, g, 'n' FROM generate_series(1, 10) g",
            "UPDATE accounts SET score = 500 WHERE id = 3",   # refused by the target
            "UPDATE accounts SET note = 'later' WHERE id = 3",  # must wait behind it
            "UPDATE accounts SET note = 'ok' WHERE id = 4")
    report = sync(spec)
    assert report.dead_letters == 2
    assert rows(target_dsn, "SELECT id, score, note FROM accounts WHERE id IN (3, 4) "
                            "ORDER BY id") == [(3, 3, "n"), (4, 4, "ok")]
    health = target_health(spec, "crm")[0]
    assert health.dead_letters == 2
    reasons = [d["reason"] for d in health.latest_dead_letters]
    assert any("score_cap" in r and "accounts" in r for r in reasons), reasons
    # Later batches: key 3 parks behind its dead letters, other keys flow.
    execute(source_dsn, "UPDATE accounts SET note = 'x' WHERE id IN (3, 5)")
    report = sync(spec)
    assert report.held_changes == 1
    assert rows(target_dsn, "SELECT note FROM accounts WHERE id = 5") == [("x",)]
    # The target's rule is relaxed; the operator redrives key 3: its chain applies in order.
    execute(target_dsn, "ALTER TABLE accounts DROP CONSTRAINT score_cap")
    assert resolve_dead_letters(spec, "crm", "replica", action="redrive") == 2
    [swept] = sweep_pipeline(spec, "crm")
    assert swept.delivered == 3 and swept.dead_letters == 0
    assert_tables_equal(source_dsn, target_dsn, "accounts")
    assert target_health(spec, "crm")[0].held == 0


def test_replay_after_crash_does_not_duplicate_dead_letters(spec, source_dsn, target_dsn,
                                                            state_dsn):
    execute(source_dsn, "INSERT INTO accounts VALUES (1, 500, 'bad'), (2, 2, 'good')")
    sync(spec)
    # Forget the target's checkpoint: the batch is replayed, the refused change again found.
    execute(target_dsn, "DELETE FROM sync_checkpoint.checkpoint")
    execute(state_dsn, "DELETE FROM sync_state.delivery")
    execute(source_dsn, "UPDATE accounts SET note = 'again' WHERE id = 2")
    sync(spec)
    assert rows(state_dsn, "SELECT count(*) FROM sync_state.dead_letter") == [(1,)]
    assert rows(target_dsn, "SELECT id, note FROM accounts") == [(2, "again")]


def test_target_down_fails_transiently_and_loses_nothing(spec, source_dsn, target_dsn,
                                                         monkeypatch):
    execute(source_dsn, "INSERT INTO accounts VALUES (1, 1, 'a')")
    pull_pipeline(spec, "crm")
    monkeypatch.setenv("T_TARGET_DSN", "postgresql://sync@127.0.0.1:1/down")
    with pytest.raises(TransientDeliveryError):
        deliver_pipeline(spec, "crm")
    monkeypatch.setenv("T_TARGET_DSN", target_dsn)
    deliver_pipeline(spec, "crm")
    assert_tables_equal(source_dsn, target_dsn, "accounts")


def test_sweep_without_due_work_is_cheap(spec):
    assert sweep_pipeline(spec, "crm") == []  # nothing held: no target connection at all
    assert datetime.now(timezone.utc) - timedelta(seconds=1) < datetime.now(timezone.utc)
