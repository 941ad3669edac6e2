"""Postgres → HTTP (CRM) end to end over real HTTP on 127.0.0.1 and a real PostgreSQL: per-key
order, exactly-once effect through idempotency keys and the ledger, the durable retry queue
with parked changes, dead letters, the sweep and redrive/discard. Not the Dagster layer."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from sync_pipelines.engine import (
    deliver_pipeline,
    pull_pipeline,
    resolve_dead_letters,
    sweep_target,
    target_health,
)
from sync_pipelines.engine.faults import Faults, InjectedCrash
from sync_pipelines.engine.spec import parse_spec

from .support.pipelines import execute, rows

LATER = timedelta(hours=1)


def http_spec(monkeypatch, source_dsn, state_dsn, base_url, **retry):
    monkeypatch.setenv("H_SOURCE_DSN", source_dsn)
    monkeypatch.setenv("H_STATE_DSN", state_dsn)
    monkeypatch.setenv("H_CRM_URL", base_url)
    return parse_spec({
        "state": {"dsn_env": "H_STATE_DSN"},
        "pipelines": {"crm": {
            "source": {"dsn_env": "H_SOURCE_DSN"},
            "tables": {"contacts": {"columns": {"email": "email_address"}}},
            "targets": {"api": {
                "kind": "http", "base_url_env": "H_CRM_URL", "concurrency": 8,
                "tables": {"contacts": {"upsert": "PUT /contacts/{id}",
                                        "delete": "DELETE /contacts/{id}"}},
            }},
            "policy": {"batch_size": 50, "retry": {"base_delay_seconds": 1, **retry}},
        }},
    })


@pytest.fixture
def crm(monkeypatch, source_dsn, state_dsn, crm_server):
    execute(source_dsn, "CREATE TABLE contacts (id int PRIMARY KEY, email text, version int)")
    spec = http_spec(monkeypatch, source_dsn, state_dsn, crm_server.base_url)
    assert pull_pipeline(spec, "crm").changes == 0  # slot
    return spec


def writes(source_dsn, n_keys: int, versions: int) -> None:
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        for k in range(1, n_keys + 1):
            conn.execute("INSERT INTO contacts VALUES (%s, %s, 0)", (k, f"c{k}@x.io"))
        for v in range(1, versions + 1):
            for k in range(1, n_keys + 1):
                conn.execute("UPDATE contacts SET version = %s WHERE id = %s", (v, k))


def sync(spec, now=None):
    pull_pipeline(spec, "crm")
    return deliver_pipeline(spec, "crm")[0]


def sweep(spec, now):
    return sweep_target(spec, "crm", "api", now=now)


def versions_seen(crm_server) -> dict[str, list[int]]:
    seen: dict[str, list[int]] = {}
    for w in crm_server.received()["writes"]:
        if w["method"] == "PUT" and w.get("outcome") == "applied":
            seen.setdefault(w["id"], []).append(int(w["body"]["version"]))
    return seen


def assert_in_order_once(crm_server, n_keys, versions):
    seen = versions_seen(crm_server)
    assert sorted(seen, key=int) == [str(k) for k in range(1, n_keys + 1)]
    for k, vs in seen.items():
        assert vs == sorted(vs), f"key {k} out of order: {vs}"
    records = crm_server.records("contacts")
    assert {k: int(r["version"]) for k, r in records.items()} == {
        str(k): versions for k in range(1, n_keys + 1)}
    assert crm_server.stats()["max_in_flight_per_key"] <= 1


def test_changes_reach_the_api_in_key_order(crm, crm_server, source_dsn):
    writes(source_dsn, 10, 5)
    report = sync(crm)
    assert report.changes == 60 and report.held_changes == 0
    assert_in_order_once(crm_server, 10, 5)
    rec = crm_server.records("contacts")["3"]
    assert rec["email_address"] == "c3@x.io"  # the mapping applies
    execute(source_dsn, "DELETE FROM contacts WHERE id = 3")
    sync(crm)
    assert "3" not in crm_server.records("contacts")


def test_outage_then_recovery_delivers_everything_once_in_order(crm, crm_server, source_dsn):
    crm_server.set_faults(outage=True, retry_after_s=0)
    writes(source_dsn, 5, 4)
    report = sync(crm)
    assert report.changes == 25 and report.held_changes == 25  # heads held, the rest parked
    # More changes during the outage park behind the held heads, in order.
    execute(source_dsn, "UPDATE contacts SET version = 5")
    assert sync(crm).held_changes == 5
    health = target_health(crm, "crm")[0]
    assert health.held == 30 and health.dead_letters == 0
    crm_server.set_faults()  # recovered
    swept = sweep(crm, datetime.now(timezone.utc) + LATER)
    assert swept.keys == 5 and swept.delivered == 30 and swept.dead_letters == 0
    assert_in_order_once(crm_server, 5, 5)
    assert crm_server.received()["duplicates"] == 0
    assert target_health(crm, "crm")[0].held == 0


def test_poison_record_goes_to_dead_letters_while_others_flow(crm, crm_server, source_dsn):
    crm_server.set_faults(poison=[{"resource": "contacts", "id": "2", "status": 422}])
    writes(source_dsn, 4, 3)
    report = sync(crm)
    # Key 2: its insert is refused (terminal) → it and the 3 updates behind it are dead.
    assert report.dead_letters == 4 and report.held_changes == 0
    records = crm_server.records("contacts")
    assert sorted(records, key=int) == ["1", "3", "4"]
    assert all(int(r["version"]) == 3 for r in records.values())
    health = target_health(crm, "crm")[0]
    assert health.dead_letters == 4
    head = health.latest_dead_letters[-1]
    assert "HTTP 422" in head["reason"] and head["last_status"] == 422
    # A later change of key 2 parks behind its dead letters instead of overtaking them.
    execute(source_dsn, "UPDATE contacts SET version = 4 WHERE id = 2")
    assert sync(crm).held_changes == 1
    # The API is fixed; the operator redrives: everything for key 2 arrives, in order.
    crm_server.set_faults()
    assert resolve_dead_letters(crm, "crm", "api", action="redrive", key_like='%"2"]') == 4
    swept = sweep(crm, datetime.now(timezone.utc) + timedelta(seconds=1))
    assert swept.delivered == 5
    assert versions_seen(crm_server)["2"] == [0, 1, 2, 3, 4]
    assert target_health(crm, "crm")[0].dead_letters == 0


def test_discard_releases_the_changes_parked_behind(crm, crm_server, source_dsn):
    crm_server.set_faults(poison=[{"resource": "contacts", "id": "1", "status": 400}])
    writes(source_dsn, 1, 1)
    assert sync(crm).dead_letters == 2
    crm_server.set_faults()
    execute(source_dsn, "UPDATE contacts SET version = 7 WHERE id = 1")
    assert sync(crm).held_changes == 1
    with pytest.raises(ValueError):
        resolve_dead_letters(crm, "crm", "api", action="discard", reason=" ")
    assert resolve_dead_letters(crm, "crm", "api", action="discard",
                                reason="bad email, fixed by hand") == 2
    sweep(crm, datetime.now(timezone.utc) + timedelta(seconds=1))
    assert crm_server.records("contacts")["1"]["version"] == "7"
    resolved = rows(_state_dsn(crm), "SELECT resolution FROM sync_state.dead_letter")
    assert {r[0] for r in resolved} == {"discarded: bad email, fixed by hand"}


def test_max_attempts_turn_a_retry_into_a_dead_letter(monkeypatch, source_dsn, state_dsn,
                                                      crm_server):
    execute(source_dsn, "CREATE TABLE contacts (id int PRIMARY KEY, email text, version int)")
    spec = http_spec(monkeypatch, source_dsn, state_dsn, crm_server.base_url, max_attempts=3)
    pull_pipeline(spec, "crm")
    crm_server.set_faults(error_rate=1.0)
    writes(source_dsn, 1, 1)
    assert sync(spec).held_changes == 2
    now = datetime.now(timezone.utc)
    assert sweep(spec, now + LATER).rescheduled == 1  # attempt 2
    last = sweep(spec, now + 2 * LATER)               # attempt 3 = max
    assert last.dead_letters == 2
    dead = target_health(spec, "crm")[0].latest_dead_letters
    assert any("gave up after 3 attempts" in d["reason"] for d in dead)


def test_crash_between_send_and_record_has_no_double_effect(crm, crm_server, source_dsn):
    writes(source_dsn, 3, 2)
    pull_pipeline(crm, "crm")
    with pytest.raises(InjectedCrash):
        deliver_pipeline(crm, "crm", faults=Faults(["after_send"]))
    applied_before = crm_server.received()["applied"]
    assert applied_before == 9
    deliver_pipeline(crm, "crm")  # replay: same idempotency keys
    received = crm_server.received()
    assert received["applied"] == 9 and received["duplicates"] == 9
    assert_in_order_once(crm_server, 3, 2)


def test_retry_after_is_honoured(crm, crm_server, source_dsn):
    crm_server.set_faults(rate_limit_every=2, retry_after_s=1)
    writes(source_dsn, 4, 0)
    report = sync(crm)
    assert report.held_changes == 0  # the sink waited Retry-After and retried inline
    assert len(crm_server.records("contacts")) == 4
    statuses = [w["status"] for w in crm_server.received()["writes"]]
    assert 429 in statuses


def _state_dsn(spec) -> str:
    return spec.state.resolve("state")


def test_sweep_killed_mid_way_loses_and_duplicates_nothing(crm, crm_server, source_dsn):
    crm_server.set_faults(outage=True, retry_after_s=0)
    writes(source_dsn, 3, 2)
    assert sync(crm).held_changes == 9
    crm_server.set_faults()
    later = datetime.now(timezone.utc) + LATER
    # The sweep sent everything, then "died" before recording it.
    with pytest.raises(InjectedCrash):
        sweep_target(crm, "crm", "api", now=later, faults=Faults(["after_send"]))
    assert target_health(crm, "crm")[0].held == 9  # nothing was released
    swept = sweep(crm, later)  # the restarted sweep re-sends with the same keys
    assert swept.delivered == 9
    received = crm_server.received()
    assert received["applied"] == 9 and received["duplicates"] == 9
    assert_in_order_once(crm_server, 3, 2)
