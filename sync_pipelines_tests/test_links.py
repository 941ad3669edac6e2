"""Two-way links between two PostgreSQL databases: no loops (replication origins), conflicts
detected against the base both sides last agreed on, each policy on its cases, manual conflicts
held without blocking other keys and resolved by an operator, and a crash mid-window.

Real PostgreSQL: both sides and the state are databases of the test server (the version
matrix runs this file on every server it has, so origin filtering is checked on each).
Per side, a trigger logs every row write with whether it came under a replication origin: a
change that reached a side twice, or came back, shows there. Not covered here: the random
interleavings (test_links_property).
"""

from __future__ import annotations

import pytest

from sync_pipelines.engine import (
    deliver_pipeline,
    link_conflicts,
    pull_pipeline,
    resolve_link_conflict,
)
from sync_pipelines.engine.errors import SyncError
from sync_pipelines.engine.faults import Faults, InjectedCrash

from .support.links import (
    assert_sides_equal,
    create_sides,
    directions,
    drop_origins,
    link_spec,
    side_rows,
    start,
    sync,
)
from .support.pipelines import execute, rows

pytestmark = pytest.mark.pg_versions

N = 10_000


@pytest.fixture
def sides(source_dsn, target_dsn, state_dsn):
    create_sides(source_dsn, target_dsn)
    yield source_dsn, target_dsn
    drop_origins(state_dsn)


def test_ping_pong_each_change_reaches_the_other_side_once_and_never_comes_back(
        monkeypatch, sides, state_dsn):
    a, b = sides
    spec, name = link_spec(monkeypatch, a, b, state_dsn, policy={"batch_size": 2000})
    start(spec, name)
    execute(a, "INSERT INTO accounts (id, name, balance) SELECT g, 'a' || g, g "
               "FROM generate_series(1, 10000) g")
    execute(b, "INSERT INTO accounts (id, title, balance) SELECT g, 'b' || g, g "
               "FROM generate_series(10001, 20000) g")
    sync(spec, name)
    final = assert_sides_equal(a, b)
    assert len(final) == 2 * N
    for dsn, own in ((a, (1, N)), (b, (N + 1, 2 * N))):
        log = rows(dsn, "SELECT id BETWEEN %s AND %s, origin, count(*), count(DISTINCT id) "
                   "FROM apply_log GROUP BY 1, 2 ORDER BY 1, 2", own)
        # Own rows written once by the application (no origin), never again by the link; the
        # other side's rows written once each by the link (under its origin).
        assert log == [(False, "true", N, N), (True, "false", N, N)], (dsn, log)
    # Quiet: another round pulls and delivers nothing, on both directions.
    for p in directions(spec, name):
        assert pull_pipeline(spec, p).changes == 0
        assert sum(r.changes for r in deliver_pipeline(spec, p)) == 0
    assert link_conflicts(spec, name) == []


def test_the_links_own_writes_are_dropped_as_echoes(monkeypatch, sides, state_dsn):
    a, b = sides
    spec, name = link_spec(monkeypatch, a, b, state_dsn)
    a_to_b, b_to_a = directions(spec, name)
    start(spec, name)
    execute(a, "INSERT INTO accounts (id, name, balance) VALUES (1, 'x', 1)")
    assert pull_pipeline(spec, a_to_b).changes == 1
    deliver_pipeline(spec, a_to_b)  # written into b under the link's origin
    report = pull_pipeline(spec, b_to_a)
    assert (report.changes, report.echoes) == (0, 1)
    # A write into b by anyone else under another origin is not the link's: it flows.
    execute(b, "SELECT pg_replication_origin_create('someone_else')")
    with_origin = ("SELECT pg_replication_origin_session_setup('someone_else'); "
                   "UPDATE accounts SET balance = 2 WHERE id = 1")
    execute(b, with_origin)
    assert pull_pipeline(spec, b_to_a).changes == 1
    execute(b, "SELECT pg_replication_origin_drop('someone_else')")


# (conflict spec, what crm does, what billing does, the row both end with, conflicts logged).
# Row: (name, balance); None: the key is gone. Key 5 starts as ('v5', 5) on both sides.
# `updated_at` is set explicitly where a case needs to know which version is later.
CASES = {
    "merge: different fields both apply": (
        {"policy": "field_merge", "timestamp": "updated_at"},
        "UPDATE accounts SET balance = 50 WHERE id = 5",
        "UPDATE accounts SET title = 'renamed' WHERE id = 5",
        ("renamed", 50), 1),
    "merge: the same field falls back to last_writer_wins": (
        {"policy": "field_merge", "timestamp": "updated_at", "fallback": "last_writer_wins"},
        "UPDATE accounts SET balance = 50, updated_at = now() + interval '1 s' WHERE id = 5",
        "UPDATE accounts SET balance = 60, updated_at = now() + interval '2 s' WHERE id = 5",
        ("v5", 60), 1),
    "last_writer_wins: the later row wins whole": (
        {"policy": "last_writer_wins", "timestamp": "updated_at"},
        "UPDATE accounts SET name = 'crm', balance = 1, updated_at = now() + interval '3 s' "
        "WHERE id = 5",
        "UPDATE accounts SET title = 'billing', balance = 2, updated_at = now() + "
        "interval '2 s' WHERE id = 5",
        ("crm", 1), 1),
    "last_writer_wins: a tie goes to the priority side": (
        {"policy": "last_writer_wins", "timestamp": "updated_at", "priority": "billing"},
        "UPDATE accounts SET balance = 1, updated_at = '2030-01-01' WHERE id = 5",
        "UPDATE accounts SET balance = 2, updated_at = '2030-01-01' WHERE id = 5",
        ("v5", 2), 1),
    "source_priority: crm wins though billing wrote later": (
        {"policy": "source_priority", "priority": "crm"},
        "UPDATE accounts SET balance = 1 WHERE id = 5",
        "UPDATE accounts SET balance = 2, title = 'b', updated_at = now() + interval '9 s' "
        "WHERE id = 5",
        ("v5", 1), 1),
    "a field override: balance by priority, the rest by time": (
        {"policy": "last_writer_wins", "timestamp": "updated_at", "priority": "crm",
         "fields": {"balance": "source_priority"}},
        "UPDATE accounts SET name = 'crm', balance = 1, updated_at = now() + interval '1 s' "
        "WHERE id = 5",
        "UPDATE accounts SET title = 'billing', balance = 2, updated_at = now() + "
        "interval '2 s' WHERE id = 5",
        ("billing", 1), 1),
    "delete vs update: the update wins and the row comes back": (
        {"policy": "last_writer_wins", "timestamp": "updated_at"},
        "DELETE FROM accounts WHERE id = 5",
        "UPDATE accounts SET balance = 99 WHERE id = 5",
        ("v5", 99), 1),
    "delete vs update with delete_wins: gone on both": (
        {"policy": "last_writer_wins", "timestamp": "updated_at", "delete": "delete_wins"},
        "DELETE FROM accounts WHERE id = 5",
        "UPDATE accounts SET balance = 99 WHERE id = 5",
        None, 1),
    "deleted on both sides: agreed, no conflict": (
        {"policy": "last_writer_wins", "timestamp": "updated_at"},
        "DELETE FROM accounts WHERE id = 5",
        "DELETE FROM accounts WHERE id = 5",
        None, 0),
    "the same edit on both sides: agreed, no conflict": (
        {"policy": "manual"},
        "UPDATE accounts SET balance = 7, updated_at = '2030-01-01' WHERE id = 5",
        "UPDATE accounts SET balance = 7, updated_at = '2030-01-01' WHERE id = 5",
        ("v5", 7), 0),
    "insert vs insert of one key: no base, last_writer_wins": (
        {"policy": "last_writer_wins", "timestamp": "updated_at"},
        "INSERT INTO accounts (id, name, balance, updated_at) VALUES (6, 'crm6', 6, "
        "now() + interval '5 s')",
        "INSERT INTO accounts (id, title, balance, updated_at) VALUES (6, 'b6', 60, now())",
        ("crm6", 6), 1),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("first", ["crm", "billing"])  # which direction meets the conflict
def test_policy_cases(monkeypatch, sides, state_dsn, case, first):
    a, b = sides
    conflict, crm_sql, billing_sql, expected, n_conflicts = CASES[case]
    spec, name = link_spec(monkeypatch, a, b, state_dsn, conflict=conflict)
    start(spec, name)
    execute(a, "INSERT INTO accounts (id, name, balance) VALUES (5, 'v5', 5)")
    sync(spec, name)
    assert_sides_equal(a, b)
    execute(a, crm_sql)
    execute(b, billing_sql)
    # Let one direction deliver first: the decision must not depend on which one it is.
    a_to_b, b_to_a = directions(spec, name)
    for p in (a_to_b, b_to_a) if first == "crm" else (b_to_a, a_to_b):
        pull_pipeline(spec, p)
        deliver_pipeline(spec, p)
    sync(spec, name)
    final = assert_sides_equal(a, b)
    key = 6 if "insert vs insert" in case else 5
    got = final.get(key)
    assert (got[:2] if got else None) == expected, (case, got)
    logged = link_conflicts(spec, name)
    assert len(logged) == n_conflicts, [(c.decision, c.reason) for c in logged]
    if logged:
        assert logged[0].key == f'["{key}"]' and logged[0].status == "decided"
        assert set(logged[0].versions) == {"crm", "billing"}


def test_manual_conflict_is_held_without_blocking_other_keys_then_resolved(
        monkeypatch, sides, state_dsn):
    a, b = sides
    spec, name = link_spec(monkeypatch, a, b, state_dsn, conflict={"policy": "manual"})
    start(spec, name)
    execute(a, "INSERT INTO accounts (id, name, balance) VALUES (7, 'v7', 7), (8, 'v8', 8)")
    sync(spec, name)
    execute(a, "UPDATE accounts SET balance = 70 WHERE id = 7")
    execute(b, "UPDATE accounts SET title = 'seven' WHERE id = 7")
    sync(spec, name)
    [held] = link_conflicts(spec, name, status="held")
    # Each side keeps its own version meanwhile; other keys flow both ways.
    assert side_rows(a, "name")[7][:2] == ("v7", 70)
    assert side_rows(b, "title")[7][:2] == ("seven", 7)
    execute(a, "UPDATE accounts SET balance = 80 WHERE id = 8")
    execute(b, "INSERT INTO accounts (id, title, balance) VALUES (9, 'v9', 9)")
    # A later edit of the held key is absorbed into the conflict, not delivered.
    execute(b, "UPDATE accounts SET balance = 77 WHERE id = 7")
    sync(spec, name)
    assert side_rows(b, "title")[8][:2] == ("v8", 80)
    assert side_rows(a, "name")[9][:2] == ("v9", 9)
    assert side_rows(a, "name")[7][:2] == ("v7", 70)
    [still] = link_conflicts(spec, name, status="held")
    assert still.id == held.id and still.versions["billing"]["balance"] == "77"
    # Bad resolutions change nothing and say why.
    with pytest.raises(SyncError, match="not a side"):
        resolve_link_conflict(spec, name, held.id, take="erp")
    with pytest.raises(SyncError, match="no conflict 999999"):
        resolve_link_conflict(spec, name, 999999, take="crm")
    # The operator takes billing's version, with one field of their own.
    done = resolve_link_conflict(spec, name, held.id, take="billing", values={"balance": 700})
    assert done.status == "resolved" and done.result["balance"] == "700"
    final = assert_sides_equal(a, b)
    assert final[7][:2] == ("seven", 700)
    with pytest.raises(SyncError, match="resolved already"):
        resolve_link_conflict(spec, name, held.id, take="crm")
    # The resolution is not sent back, and later changes of the key flow as usual.
    sync(spec, name)
    assert_sides_equal(a, b)
    execute(a, "UPDATE accounts SET balance = 701 WHERE id = 7")
    sync(spec, name)
    assert assert_sides_equal(a, b)[7][:2] == ("seven", 701)
    assert [c.status for c in link_conflicts(spec, name)] == ["resolved"]


@pytest.mark.parametrize("point", ["after_send", "after_apply"])
def test_a_crash_mid_window_repeats_the_decision(monkeypatch, sides, state_dsn, point):
    a, b = sides
    spec, name = link_spec(monkeypatch, a, b, state_dsn)
    a_to_b, b_to_a = directions(spec, name)
    start(spec, name)
    execute(a, "INSERT INTO accounts (id, name, balance) VALUES (5, 'v5', 5)")
    sync(spec, name)
    execute(a, "UPDATE accounts SET balance = 1, updated_at = now() + interval '1 s' "
               "WHERE id = 5")
    execute(b, "UPDATE accounts SET balance = 2, updated_at = now() + interval '2 s' "
               "WHERE id = 5")
    pull_pipeline(spec, a_to_b)
    with pytest.raises(InjectedCrash):
        deliver_pipeline(spec, a_to_b, faults=Faults([point]))
    sync(spec, name)
    assert assert_sides_equal(a, b)[5][1] == 2
    assert len(link_conflicts(spec, name)) == 1
