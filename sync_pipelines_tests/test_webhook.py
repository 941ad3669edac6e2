"""The webhook source end to end: the receiver (real HTTP on 127.0.0.1) verifies Standard
Webhooks signatures, limits and validates bodies, stages each change with its dedup receipt in
one transaction before it answers, answers duplicates with the first correlation id, pushes
back at the demand budget, reports outcomes per target, and answers synchronously when asked;
then the ordinary delivery path takes the changes to a real PostgreSQL target (per-key order
and exactly-once checked with the target-side apply log) and to the reference CRM.

Not covered here: the receiver killed mid-load (test_webhook_load), polling (test_poll).
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import threading
import time

import httpx
import pytest

from sync_pipelines.engine import deliver_pipeline, parse_spec, pull_pipeline

from .support.crm_api import batch_put, delete, put
from .support.pipelines import execute, rows
from .support.receiver import OTHER_SECRET, SECRET, ReceiverServer, event, sign
from .support.versioned import TARGET_DDL, assert_versions_increase

ITEMS = {
    "key": ["id"],
    "data": "data",
    "event_types": ["item.*"],
    "delete_when": {"event_type": ["item.deleted"]},
    "fields": {"id": {"path": "id", "type": "int", "required": True},
               "version": {"path": "version", "type": "int"},
               "qty": {"path": "qty", "type": "int"},
               "note": "note"},
}


def webhook_spec(monkeypatch, state_dsn, target_dsn, *, secret=SECRET, policy=None,
                 targets=None, records=None):
    monkeypatch.setenv("W_SECRET", secret)
    monkeypatch.setenv("W_STATE_DSN", state_dsn)
    monkeypatch.setenv("W_TARGET_DSN", target_dsn)
    return parse_spec({
        "state": {"dsn_env": "W_STATE_DSN"},
        "pipelines": {"shop": {
            "source": {"kind": "webhook", "secret_env": "W_SECRET", "max_body_bytes": 4096,
                       "records": records or {"items": ITEMS}},
            "tables": list(records or {"items": ITEMS}),
            "targets": targets or {"replica": {"dsn_env": "W_TARGET_DSN"}},
            "policy": policy or {},
            "initial_backfill": False,
        }},
    })


@pytest.fixture
def shop(monkeypatch, state_dsn, target_dsn):
    execute(target_dsn, *TARGET_DDL)
    spec = webhook_spec(monkeypatch, state_dsn, target_dsn)
    with ReceiverServer(spec) as receiver:
        yield spec, receiver


def staged(state_dsn) -> int:
    return rows(state_dsn, "SELECT coalesce(sum(n_changes), 0)::int FROM sync_state.batch")[0][0] \
        if rows(state_dsn, "SELECT to_regclass('sync_state.batch') IS NOT NULL")[0][0] else 0


def item(i, version, **kw):
    return {"id": i, "version": version, "qty": kw.get("qty", 1), "note": kw.get("note", "n")}


def minutes_off(m: int) -> dt.datetime:
    """Now plus ``m`` minutes, when the request is made (not when this module was imported)."""
    return dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=m)


BODY = event("item.updated", item(1, 1))

# (what the sender does, expected status, words in the error). Nothing may be staged for any.
REFUSED = [
    # the wrong secret
    (lambda: (BODY, sign(OTHER_SECRET, "w1", BODY)), 401, "signature rejected"),
    # a body changed after signing
    (lambda: (BODY.replace('"qty":1', '"qty":9'), sign(SECRET, "w1", BODY)), 401, "signature"),
    # a timestamp six minutes old, or six minutes ahead
    (lambda: (BODY, sign(SECRET, "w1", BODY, minutes_off(-6))), 401, "too old"),
    (lambda: (BODY, sign(SECRET, "w1", BODY, minutes_off(6))), 401, "too new"),
    # no signature headers at all
    (lambda: (BODY, {"content-type": "application/json"}), 401, "missing header(s)"),
    # a body over max_body_bytes (4096)
    (lambda: (event("item.updated", {**item(1, 1), "note": "x" * 5000}),
              sign(SECRET, "w1", event("item.updated", {**item(1, 1), "note": "x" * 5000}))),
     413, "larger than 4096"),
    # signed, but not JSON
    (lambda: ("{not json", sign(SECRET, "w1", "{not json")), 400, "not valid JSON"),
    # valid JSON the record type refuses: the field is named
    (lambda: (event("item.updated", {"id": "seven", "version": 1}),
              sign(SECRET, "w1", event("item.updated", {"id": "seven", "version": 1}))),
     422, "field 'id' (id): 'seven' is not a valid int"),
    (lambda: (event("item.updated", {"version": 1}),
              sign(SECRET, "w1", event("item.updated", {"version": 1}))), 422,
     "field 'id' (id) is required"),
    (lambda: (event("order.created", item(1, 1)),
              sign(SECRET, "w1", event("order.created", item(1, 1)))), 422,
     "no record type takes event type 'order.created'"),
]


def test_ignored_event_types_are_answered_and_not_staged(monkeypatch, state_dsn, target_dsn):
    spec = webhook_spec(monkeypatch, state_dsn, target_dsn)
    spec.pipelines["shop"].source.ignore_event_types.append("order.*")
    with ReceiverServer(spec) as receiver:
        body = event("order.created", {"id": 1})
        answer = receiver.post("shop", body, sign(SECRET, "o1", body))
        assert (answer.status_code, answer.json()) == (200, {"ignored": True})
        other = event("invoice.created", {"id": 1})  # neither taken nor ignored
        assert receiver.post("shop", other, sign(SECRET, "i1", other)).status_code == 422
        forged = sign(OTHER_SECRET, "o2", body)  # ignored only once verified
        assert receiver.post("shop", body, forged).status_code == 401
    assert staged(state_dsn) == 0


@pytest.mark.parametrize(("make", "status", "words"), REFUSED)
def test_refused_requests_stage_nothing(shop, state_dsn, make, status, words):
    spec, receiver = shop
    body, headers = make()
    response = receiver.post("shop", body, headers)
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert words in message, message
    assert "whsec_" not in message and "Traceback" not in response.text
    assert staged(state_dsn) == 0


def test_unknown_pipeline_is_404(shop):
    _, receiver = shop
    response = receiver.post("nope", BODY, sign(SECRET, "w1", BODY))
    assert response.status_code == 404 and "no webhook pipeline 'nope'" in response.text


def test_accepted_then_delivered_with_status_and_a_rotated_secret(monkeypatch, state_dsn,
                                                                  target_dsn):
    execute(target_dsn, *TARGET_DDL)
    # The receiver holds the new and the old secret while the sender rotates.
    spec = webhook_spec(monkeypatch, state_dsn, target_dsn, secret=f"{OTHER_SECRET} {SECRET}")
    with ReceiverServer(spec) as receiver:
        rotated = sign(OTHER_SECRET, "w1", BODY)
        rotated["webhook-signature"] += " " + sign(SECRET, "w1", BODY)["webhook-signature"]
        first = receiver.post("shop", BODY, rotated)
        assert first.status_code == 202, first.text
        answer = first.json()
        assert first.headers["location"] == answer["status_url"]
        assert answer["duplicate"] is False
        status = receiver.client.get(answer["status_url"]).json()
        assert status["targets"] == {"replica": {"status": "staged", "batch": 1}}
        assert staged(state_dsn) == 1
        deliver_pipeline(spec, "shop")
        status = receiver.client.get(answer["status_url"]).json()
        assert status["targets"]["replica"]["status"] == "delivered"
        assert status["targets"]["replica"]["at"] is not None
        assert rows(target_dsn, "SELECT id, version, qty, note FROM items") == [(1, 1, 1, "n")]
        # The sender retries the same webhook-id: nothing new, the first correlation id.
        again = receiver.post("shop", BODY, sign(SECRET, "w1", BODY))
        assert again.status_code == 202
        assert again.json()["correlation_id"] == answer["correlation_id"]
        assert again.json()["duplicate"] is True
        assert again.json()["targets"]["replica"]["status"] == "delivered"
        assert staged(state_dsn) == 0 or rows(state_dsn, "SELECT count(*) FROM "
                                                         "sync_state.webhook_receipt") == [(1,)]
        assert receiver.client.get("/ingest/shop/status/" + "0" * 32).status_code == 404


def test_twenty_concurrent_posts_of_one_webhook_id_stage_one_change(shop, state_dsn):
    spec, receiver = shop
    answers: list = []

    def send() -> None:
        import httpx
        with httpx.Client(base_url=receiver.url, timeout=30) as c:
            answers.append(c.post("/ingest/shop", content=BODY, headers=sign(SECRET, "dup",
                                                                             BODY)))

    threads = [threading.Thread(target=send) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [a.status_code for a in answers] == [202] * 20
    assert len({a.json()["correlation_id"] for a in answers}) == 1
    assert sum(1 for a in answers if not a.json()["duplicate"]) == 1
    assert staged(state_dsn) == 1


def test_per_key_order_of_many_quick_webhooks(shop, target_dsn):
    spec, receiver = shop
    for v in range(1, 41):  # one key, forty versions, then a delete and a re-create
        body = event("item.updated", item(7, v, qty=v))
        assert receiver.post("shop", body, sign(SECRET, f"k7-{v}", body)).status_code == 202
        if v % 10 == 0:
            deliver_pipeline(spec, "shop")
    gone = event("item.deleted", {"id": 7})
    assert receiver.post("shop", gone, sign(SECRET, "k7-del", gone)).status_code == 202
    back = event("item.updated", item(7, 41, qty=41))
    assert receiver.post("shop", back, sign(SECRET, "k7-back", back)).status_code == 202
    deliver_pipeline(spec, "shop")
    assert rows(target_dsn, "SELECT id, version, qty FROM items") == [(7, 41, 41)]
    log = assert_versions_increase(target_dsn)
    assert log[7][-1] == 41


def test_back_pressure_at_the_budget_and_recovery(monkeypatch, state_dsn, target_dsn):
    execute(target_dsn, *TARGET_DDL)
    spec = webhook_spec(monkeypatch, state_dsn, target_dsn, policy={"demand_budget": 5})
    monkeypatch.setenv("W_TARGET_DSN", "postgresql://x@127.0.0.1:1/down")  # the target is down
    with ReceiverServer(spec) as receiver:
        codes = []
        for i in range(8):
            body = event("item.updated", item(i, 1))
            r = receiver.post("shop", body, sign(SECRET, f"bp{i}", body))
            codes.append(r.status_code)
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) > 0
                assert "demand budget" in r.json()["error"]
        assert codes == [202] * 5 + [429] * 3
        assert staged(state_dsn) == 5
        monkeypatch.setenv("W_TARGET_DSN", target_dsn)  # back up: delivery catches up
        deliver_pipeline(spec, "shop")
        for i in range(5, 8):  # the sender retries what was refused
            body = event("item.updated", item(i, 1))
            assert receiver.post("shop", body, sign(SECRET, f"bp{i}", body)).status_code == 202
        deliver_pipeline(spec, "shop")
    assert rows(target_dsn, "SELECT count(*) FROM items") == [(8,)]


def test_synchronous_request_reply(monkeypatch, state_dsn, target_dsn, crm_server):
    """``Prefer: wait=N``: the receiver delivers itself and answers with every target's real
    outcome — delivered, or a dead letter with its reason — or 202 at the deadline."""
    execute(target_dsn, *TARGET_DDL)
    monkeypatch.setenv("W_CRM", crm_server.base_url)
    spec = webhook_spec(monkeypatch, state_dsn, target_dsn, targets={
        "replica": {"dsn_env": "W_TARGET_DSN"},
        "api": {"kind": "http", "base_url_env": "W_CRM",
                "tables": {"items": {"upsert": "PUT /contacts/{id}"}}}})
    crm_server.set_faults(poison=[{"resource": "contacts", "id": "9", "status": 422}])
    with ReceiverServer(spec) as receiver:
        body = event("item.updated", item(1, 1))
        headers = {**sign(SECRET, "s1", body), "prefer": "wait=10"}
        start = dt.datetime.now()
        answer = receiver.post("shop", body, headers)
        took = (dt.datetime.now() - start).total_seconds()
        assert answer.status_code == 200, answer.text
        assert answer.headers["preference-applied"] == "wait=10"
        targets = answer.json()["targets"]
        assert {t: o["status"] for t, o in targets.items()} == {"replica": "delivered",
                                                                 "api": "delivered"}
        assert took < 5, took  # delivered by the receiver, not by a run through the queue
        poisoned = event("item.updated", item(9, 1))
        answer = receiver.post("shop", poisoned, {**sign(SECRET, "s9", poisoned),
                                                  "prefer": "wait=10"})
        targets = answer.json()["targets"]
        assert targets["replica"]["status"] == "delivered"
        assert targets["api"]["status"] == "dead_letter"
        assert "HTTP 422" in targets["api"]["reason"]
        # A target that cannot be reached: no outcome in time → 202 at the deadline.
        monkeypatch.setenv("W_TARGET_DSN", "postgresql://x@127.0.0.1:1/down")
        later = event("item.updated", item(2, 1))
        answer = receiver.post("shop", later, {**sign(SECRET, "s2", later),
                                               "prefer": "wait=1"})
        assert answer.status_code == 202
        assert answer.json()["targets"]["replica"]["status"] == "staged"
    assert pull_pipeline(spec, "shop").skipped.startswith("webhook source")
    assert json.loads(json.dumps(targets))  # plain JSON


def test_the_crm_sends_its_changes_by_signed_webhooks(monkeypatch, state_dsn, target_dsn,
                                                      crm_server):
    """The reference CRM's outgoing webhooks (signed, retried) into the receiver, then the
    ordinary delivery: the target ends equal to the CRM, deletes included. The receiver is
    down for the first changes, so the CRM's retries are part of the path."""
    contacts = {"key": ["id"], "data": "data", "event_types": ["contact.*"],
                "delete_when": {"event_type": ["contact.deleted"]},
                "fields": {"id": {"path": "id", "required": True},
                           "version": {"path": "version", "type": "int"},
                           "email": "email"}}
    spec = webhook_spec(monkeypatch, state_dsn, target_dsn,
                        records={"crm.contacts": contacts})
    with socket.socket() as s:  # the port the receiver will listen on, nothing there yet
        s.bind(("127.0.0.1", 0))
        receiver = ReceiverServer(spec, port=s.getsockname()[1])
    crm_server.configure_webhooks(f"{receiver.url}/ingest/shop", SECRET, retry_after_s=0.1,
                                  event_types=["contact.*"])
    with httpx.Client(base_url=crm_server.base_url) as c:  # not a contact: never sent
        c.put("/companies/1", json={"id": "1", "name": "Acme"},
              headers={"Idempotency-Key": "co-1"}).raise_for_status()
    batch_put(crm_server, [{"id": str(i), "version": 1, "email": f"c{i}@x"}
                           for i in range(1, 41)])
    time.sleep(0.5)
    assert crm_server.webhooks()["failures"] > 0  # refused connections, retried
    with receiver:
        for i in range(1, 11):
            put(crm_server, {"id": str(i), "version": 2, "email": f"new{i}@x"})
        delete(crm_server, "40")
        deadline = time.monotonic() + 30
        while crm_server.webhooks()["pending"] and time.monotonic() < deadline:
            time.sleep(0.1)
        stats = crm_server.webhooks()
        assert stats["pending"] == 0 and stats["dropped"] == 0, stats
    deliver_pipeline(spec, "shop")
    api = {k: (int(r["version"]), r.get("email"))
           for k, r in crm_server.records("contacts").items()}
    assert len(api) == 39
    target = {r[0]: (r[1], r[2]) for r in rows(
        target_dsn, "SELECT id, version, email FROM crm.contacts")}
    assert target == api
    assert rows(state_dsn, "SELECT count(*) FROM sync_state.webhook_receipt")[0][0] == 51
