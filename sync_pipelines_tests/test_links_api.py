"""Two-way links between PostgreSQL and an HTTP API (the reference CRM on 127.0.0.1): the API's
changes come in by polling its change feed (or as its signed webhooks, through the receiver),
the link's writes go out as PUT/DELETE after a GET of the API's current record. No loops (the
API's echo of the link's write is dropped by the echo ledger, the link's writes into
PostgreSQL carry its replication origin), conflicts detected against the base on either
direction, each policy on a case, a manual conflict held and resolved into the API, a crash
between the requests and the record, and values that PostgreSQL and JSON render differently
(timestamps, decimals) compared as equal.

Real PostgreSQL (side and state databases of the test server) and a real HTTP server. The
PostgreSQL side logs every row write with whether it came under a replication origin; the CRM
logs every write it received with its idempotency key, which names the direction that sent it.
"""

from __future__ import annotations

import secrets
import time
from decimal import Decimal

import pytest

from sync_pipelines.engine import (
    deliver_pipeline,
    link_conflicts,
    parse_spec,
    pull_pipeline,
    resolve_link_conflict,
)

from .support.crm_api import batch_put, delete, put
from .support.links import APPLY_LOG_DDL, drop_origins, logged
from .support.pipelines import execute, rows
from .support.receiver import SECRET, ReceiverServer

N = 10_000

SIDE_DDL = (
    "CREATE TABLE people (id int PRIMARY KEY, name text, mail text, score numeric(10,2), "
    "updated_at timestamptz NOT NULL DEFAULT now())",
    *APPLY_LOG_DDL,
    logged("people"),
)

RECORD = {
    "list": "GET /contacts",
    "updated_at": "updated_at",
    "delete_when": {"field": "deleted", "equals": True},
    "key": ["id"],
    "fields": {"id": {"path": "id", "type": "int", "required": True}, "name": "name",
               "email": "email", "score": {"path": "score", "type": "decimal"},
               "updated_at": {"path": "updated_at", "type": "timestamptz"}},
}


@pytest.fixture
def side(source_dsn, state_dsn):
    execute(source_dsn, *SIDE_DDL)
    yield source_dsn
    drop_origins(state_dsn)


POLL = {"kind": "http_poll", "base_url_env": "LA_API_URL", "interval_seconds": 1,
        "overlap_seconds": 2, "page_size": 1000, "records": {"crm.contacts": RECORD}}
WEBHOOK = {"kind": "webhook", "secret_env": "LA_SECRET", "records": {"crm.contacts": {
    **{k: v for k, v in RECORD.items() if k not in ("list", "updated_at", "delete_when")},
    "event_types": ["contact.*"], "data": "data",
    "delete_when": {"event_type": ["contact.deleted"]}}}}


def api_link(monkeypatch, side_dsn, state_dsn, crm, conflict=None, policy=None, changes=None):
    name = f"l{secrets.token_hex(3)}"
    monkeypatch.setenv("LA_DB_DSN", side_dsn)
    monkeypatch.setenv("LA_STATE_DSN", state_dsn)
    monkeypatch.setenv("LA_API_URL", crm.base_url)
    monkeypatch.setenv("LA_SECRET", SECRET)
    spec = parse_spec({
        "state": {"dsn_env": "LA_STATE_DSN"},
        "links": {name: {
            "sides": [
                {"name": "db", "dsn_env": "LA_DB_DSN"},
                {"name": "api", "kind": "http", "base_url_env": "LA_API_URL",
                 "changes": changes or POLL,
                 "tables": {"crm.contacts": {
                     "upsert": "PUT /contacts/{id}", "delete": "DELETE /contacts/{id}",
                     "get": "GET /contacts/{id}", "managed": ["updated_at"]}}},
            ],
            "tables": {"people": {"as": "crm.contacts", "columns": {"mail": "email"},
                                  "conflict": conflict or {
                                      "policy": "field_merge", "timestamp": "updated_at",
                                      "priority": "db"}}},
            "policy": policy or {},
        }},
    })
    return spec, name, f"{name}_db_to_api", f"{name}_api_to_db"


def step(spec, pipeline) -> int:
    moved = pull_pipeline(spec, pipeline, force=True).changes
    return moved + sum(r.changes for r in deliver_pipeline(spec, pipeline))


def sync(spec, *pipelines, rounds=30) -> None:
    for _ in range(rounds):
        if sum(step(spec, p) for p in pipelines) == 0:
            return
    raise AssertionError("the link did not go quiet")


def db_rows(dsn):
    return {r[0]: (r[1], r[2], r[3]) for r in rows(
        dsn, "SELECT id, name, mail, score FROM people")}


def api_rows(crm):
    return {int(k): (r.get("name"), r.get("email"),
                     None if r.get("score") is None else Decimal(str(r["score"])))
            for k, r in crm.records("contacts").items()}


def link_writes(crm, direction):
    """(record id, outcome) of every write the CRM received from the link's direction."""
    return [(int(w["id"]), w["outcome"]) for w in crm.received()["writes"]
            if (w.get("idempotency_key") or "").startswith(f"{direction}:")]


def test_ping_pong_with_an_api_each_change_crosses_once_and_echoes_are_dropped(
        monkeypatch, side, state_dsn, crm_server):
    spec, name, to_api, to_db = api_link(monkeypatch, side, state_dsn, crm_server,
                                         policy={"batch_size": 2000})
    pull_pipeline(spec, to_api)  # the slot, before any write
    execute(side, "INSERT INTO people (id, name, mail, score) SELECT g, 'db' || g, "
                  "'db' || g || '@x', g / 100.0 FROM generate_series(1, 10000) g")
    for lo in range(N + 1, 2 * N + 1, 1000):
        batch_put(crm_server, [{"id": i, "name": f"api{i}", "email": f"api{i}@x",
                                "score": f"{i}.50"} for i in range(lo, lo + 1000)])
    sync(spec, to_api)  # the database's rows into the API
    # The database edits every row again before the API's feed is read: the feed then brings
    # back the link's first write of each (its echo) while the database is already further.
    # Taken for an edit, it would be a conflict with the newer row; it is dropped.
    execute(side, "UPDATE people SET score = score + 1")
    sync(spec, to_db, to_api)
    assert db_rows(side) == api_rows(crm_server)
    assert len(db_rows(side)) == 2 * N
    log = rows(side, "SELECT id <= %s, origin, op, count(*), count(DISTINCT id) FROM apply_log "
               "GROUP BY 1, 2, 3 ORDER BY 1, 2, 3", (N,))
    # The database's own rows written by the application only (insert, update), never by
    # the link; the API's rows written once each by the link, under its origin.
    assert log == [(False, "true", "INSERT", N, N), (True, "false", "INSERT", N, N),
                   (True, "false", "UPDATE", N, N)], log
    writes = link_writes(crm_server, to_api)
    assert {i for i, _ in writes} == set(range(1, N + 1))  # never an API row sent back
    assert sorted(writes) == sorted([(i, "applied") for i in range(1, N + 1)] * 2)
    assert link_conflicts(spec, name) == []
    # Quiet: the next round moves nothing either way.
    assert step(spec, to_db) == 0
    assert step(spec, to_api) == 0


def test_a_real_api_edit_equal_in_nothing_to_the_echo_flows_and_values_compare_by_type(
        monkeypatch, side, state_dsn, crm_server):
    spec, name, to_api, to_db = api_link(monkeypatch, side, state_dsn, crm_server)
    pull_pipeline(spec, to_api)
    execute(side, "INSERT INTO people (id, name, mail, score) VALUES (1, 'a', 'a@x', 1.50)")
    sync(spec, to_api)
    # The CRM stores score as the JSON number 1.5; PostgreSQL has numeric 1.50: the same.
    assert crm_server.records("contacts")["1"]["score"] in (1.5, "1.50", "1.5")
    sync(spec, to_db)  # the echo: dropped, nothing written
    assert rows(side, "SELECT count(*) FROM apply_log WHERE origin = 'true'") == [(0,)]
    put(crm_server, {"id": 1, "name": "edited in the CRM", "email": "a@x", "score": 1.5})
    sync(spec, to_db, to_api)
    assert db_rows(side) == {1: ("edited in the CRM", "a@x", Decimal("1.50"))}
    assert db_rows(side) == api_rows(crm_server)
    assert link_conflicts(spec, name) == []


# (conflict spec, what the database does, what the API does (a record, or None: deleted),
#  which direction runs first, the row both end with (name, mail, score), conflicts logged).
# Key 5 starts as ('v5', 'v5@x', 5.00) on both sides.
CASES = {
    # Different fields on each side: both apply (detected by the GET before the PUT).
    "merge, database first: different fields both apply": (
        None, "UPDATE people SET name = 'db name' WHERE id = 5",
        {"name": "v5", "email": "api@x", "score": 5}, "to_api",
        ("db name", "api@x", Decimal("5.00")), 1),
    # The same, detected on the way into the database (the feed read first).
    "merge, API first: different fields both apply": (
        None, "UPDATE people SET name = 'db name' WHERE id = 5",
        {"name": "v5", "email": "api@x", "score": 5}, "to_db",
        ("db name", "api@x", Decimal("5.00")), 1),
    # Both changed score: the fallback, the database's priority (the timestamp ties).
    "source_priority: the database wins the same field": (
        {"policy": "source_priority", "priority": "db"},
        "UPDATE people SET score = 7 WHERE id = 5",
        {"name": "v5", "email": "v5@x", "score": 9}, "to_api",
        ("v5", "v5@x", Decimal("7.00")), 1),
    "source_priority: the API wins, detected on the way into the database": (
        {"policy": "source_priority", "priority": "api"},
        "UPDATE people SET score = 7 WHERE id = 5",
        {"name": "v5", "email": "v5@x", "score": 9}, "to_db",
        ("v5", "v5@x", Decimal("9.00")), 1),
    # Deleted in the database, updated in the API: by default the update wins and the
    # database gets the row back.
    "delete vs update: the update wins": (
        None, "DELETE FROM people WHERE id = 5",
        {"name": "kept", "email": "v5@x", "score": 5}, "to_api",
        ("kept", "v5@x", Decimal("5.00")), 1),
    # Deleted in the API, updated in the database: the same rule the other way round.
    "update vs delete: the update wins, the API gets the record back": (
        None, "UPDATE people SET name = 'kept' WHERE id = 5", None, "to_db",
        ("kept", "v5@x", Decimal("5.00")), 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_policy_between_the_database_and_the_api(monkeypatch, side, state_dsn,
                                                      crm_server, case):
    conflict, db_change, api_record, first, expected, n_conflicts = CASES[case]
    spec, name, to_api, to_db = api_link(monkeypatch, side, state_dsn, crm_server, conflict)
    pull_pipeline(spec, to_api)
    execute(side, "INSERT INTO people (id, name, mail, score) VALUES (5, 'v5', 'v5@x', 5), "
                  "(6, 'other', 'o@x', 1)")
    sync(spec, to_api, to_db)
    execute(side, db_change)
    if api_record is None:
        delete(crm_server, 5)
    else:
        put(crm_server, {"id": 5, **api_record})
    order = (to_api, to_db) if first == "to_api" else (to_db, to_api)
    sync(spec, *order)
    assert db_rows(side)[5] == expected
    assert db_rows(side) == api_rows(crm_server)
    conflicts = link_conflicts(spec, name)
    assert [(c.key, c.status) for c in conflicts] == [('["5"]', "decided")] * n_conflicts


def test_a_manual_conflict_is_held_and_resolved_into_the_api(monkeypatch, side, state_dsn,
                                                             crm_server):
    spec, name, to_api, to_db = api_link(monkeypatch, side, state_dsn, crm_server,
                                         {"policy": "manual"})
    pull_pipeline(spec, to_api)
    execute(side, "INSERT INTO people (id, name, mail, score) VALUES (5, 'v5', 'v5@x', 5), "
                  "(6, 'other', 'o@x', 1)")
    sync(spec, to_api, to_db)
    execute(side, "UPDATE people SET name = 'db' WHERE id = 5")
    put(crm_server, {"id": 5, "name": "api", "email": "v5@x", "score": 5})
    sync(spec, to_api, to_db)
    [held] = link_conflicts(spec, name)
    assert held.status == "held"
    assert (db_rows(side)[5][0], api_rows(crm_server)[5][0]) == ("db", "api")  # both kept
    # Other keys flow meanwhile, both ways.
    execute(side, "UPDATE people SET name = 'still flows' WHERE id = 6")
    sync(spec, to_api, to_db)
    assert api_rows(crm_server)[6][0] == "still flows"
    # Resolved with the database's version and a given value: written into the API (and its
    # echo not taken for an edit), both sides equal, the key flows again.
    done = resolve_link_conflict(spec, name, held.id, take="db", values={"score": "8.25"})
    assert done.status == "resolved"
    sync(spec, to_db, to_api)
    assert db_rows(side)[5] == api_rows(crm_server)[5] == ("db", "v5@x", Decimal("8.25"))
    put(crm_server, {"id": 5, "name": "later", "email": "v5@x", "score": 8.25})
    sync(spec, to_db, to_api)
    assert db_rows(side)[5][0] == "later"
    assert [c.status for c in link_conflicts(spec, name)] == ["resolved"]


@pytest.mark.parametrize(("type_", "from_postgres", "from_json"), [
    ("timestamptz", "2026-12-02 10:00:00.5+00", "2026-12-02T11:00:00.500+01:00"),
    ("timestamptz", "2026-12-02 10:00:00+00", "2026-12-02T10:00:00Z"),
    ("decimal", "10.50", 10.5),
    ("decimal", "100", "1E+2"),
    ("int", "5", 5.0),
    ("bool", "t", True),
    ("json", '{"b": 1, "a": [1, 2]}', {"a": [1, 2], "b": 1}),
    ("text", "5", 5),
])
def test_one_form_for_values_postgresql_and_json_render_differently(type_, from_postgres,
                                                                     from_json):
    from sync_pipelines.engine.links.canon import canonical
    assert canonical(from_postgres, type_) == canonical(from_json, type_)
    assert canonical("2026-12-02 10:00:01+00", "timestamptz") != canonical(
        "2026-12-02 10:00:00+00", "timestamptz")


def wait_for_webhooks(crm, timeout_s=60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (stats := crm.webhooks())["pending"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not stats["pending"] and not stats["dropped"], stats


def test_through_webhooks_every_version_comes_back_and_none_is_taken_for_an_edit(
        monkeypatch, side, state_dsn, crm_server):
    """Webhooks bring every version the API holds, in order — the link's own writes, and on a
    conflict first the API's version, then the decision the link wrote over it."""
    spec, name, to_api, to_db = api_link(monkeypatch, side, state_dsn, crm_server,
                                         changes=WEBHOOK)
    with ReceiverServer(spec) as receiver:
        crm_server.configure_webhooks(f"{receiver.url}/ingest/{to_db}", SECRET,
                                      retry_after_s=0.1, event_types=["contact.*"])
        pull_pipeline(spec, to_api)
        execute(side, "INSERT INTO people (id, name, mail, score) SELECT g, 'db' || g, "
                      "'db' || g || '@x', g FROM generate_series(1, 500) g")
        batch_put(crm_server, [{"id": i, "name": f"api{i}", "email": f"api{i}@x", "score": i}
                               for i in range(501, 1001)])
        step(spec, to_api)
        execute(side, "UPDATE people SET score = score + 1 WHERE id <= 500")  # ahead of echoes
        wait_for_webhooks(crm_server)
        sync(spec, to_db, to_api)
        # A conflict met on the way into the API: the webhook of the API's edit, then that of
        # the decision written over it, both arrive; the database gets the decision, once.
        execute(side, "UPDATE people SET name = 'db name' WHERE id = 5")
        put(crm_server, {"id": 5, "name": "db5", "email": "api@x", "score": 6})
        sync(spec, to_api)
        wait_for_webhooks(crm_server)
        sync(spec, to_db, to_api)
        wait_for_webhooks(crm_server)
        sync(spec, to_db, to_api)
    assert db_rows(side)[5] == ("db name", "api@x", Decimal("6.00"))
    assert db_rows(side) == api_rows(crm_server)
    assert len(db_rows(side)) == 1000
    log = rows(side, "SELECT id <= 500, origin, count(*), count(DISTINCT id) FROM apply_log "
               "GROUP BY 1, 2 ORDER BY 1, 2")
    # The API's 500 rows written once each by the link; of the database's own rows only key 5
    # again, with the decision (its e-mail from the API).
    assert log == [(False, "true", 500, 500), (True, "false", 1001, 500),
                   (True, "true", 1, 1)], log
    writes = link_writes(crm_server, to_api)
    assert {i for i, _ in writes} == set(range(1, 501))
    assert len(writes) == 1001  # insert and update of each, and the decision of key 5
    assert [(c.key, c.decision) for c in link_conflicts(spec, name)] == [('["5"]', "merge")]


@pytest.mark.parametrize("point", ["after_send", "after_apply"])
def test_a_crash_after_the_requests_into_the_api_repeats_the_decision(
        monkeypatch, side, state_dsn, crm_server, point):
    """The API took the decision, the state never heard: the replay reads the decision back
    from the API and must not take it for the API's own version (that would lose the
    database's edit when the webhook of the API's edit arrives)."""
    from sync_pipelines.engine.faults import Faults, InjectedCrash

    spec, name, to_api, to_db = api_link(monkeypatch, side, state_dsn, crm_server,
                                         changes=WEBHOOK)
    with ReceiverServer(spec) as receiver:
        crm_server.configure_webhooks(f"{receiver.url}/ingest/{to_db}", SECRET,
                                      retry_after_s=0.1, event_types=["contact.*"])
        pull_pipeline(spec, to_api)
        execute(side, "INSERT INTO people (id, name, mail, score) VALUES (5, 'v5', 'v5@x', 5)")
        sync(spec, to_api)
        wait_for_webhooks(crm_server)
        sync(spec, to_db)
        execute(side, "UPDATE people SET name = 'db name' WHERE id = 5")
        put(crm_server, {"id": 5, "name": "v5", "email": "api@x", "score": 5})
        pull_pipeline(spec, to_api)
        with pytest.raises(InjectedCrash):
            deliver_pipeline(spec, to_api, faults=Faults([point]))
        sync(spec, to_api)
        wait_for_webhooks(crm_server)
        sync(spec, to_db, to_api)
    assert db_rows(side)[5] == api_rows(crm_server)[5] == ("db name", "api@x", Decimal("5.00"))
    assert [(c.key, c.decision) for c in link_conflicts(spec, name)] == [('["5"]', "merge")]
