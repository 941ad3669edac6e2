"""The polling source against the reference CRM over real HTTP: records read by change time and
staged with the cursor in one transaction; rows sharing one change time across page and poll
boundaries, rows changed during a poll, deletes (tombstones), a poll killed midway and an API
that answers 503 for a while — afterwards the Postgres target equals the API and nothing was
staged twice.

Real PostgreSQL (state, target) and the CRM on 127.0.0.1. Not covered: webhooks (test_webhook).
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from sync_pipelines.engine import deliver_pipeline, parse_spec, pull_pipeline
from sync_pipelines.engine.capture.poller import poll
from sync_pipelines.engine.faults import InjectedCrash
from sync_pipelines.engine.pipeline import open_state

from .support.crm_api import batch_put, delete, put
from .support.pipelines import rows

CONTACTS = {
    "list": "GET /contacts",
    "updated_at": "updated_at",
    "key": ["id"],
    "delete_when": {"field": "deleted", "equals": True},
    "fields": {"id": {"path": "id", "required": True}, "version": {"path": "version",
                                                                    "type": "int"},
               "email": "email", "updated_at": {"path": "updated_at", "type": "timestamptz"}},
}


def poll_spec(monkeypatch, state_dsn, target_dsn, crm_url, **source):
    monkeypatch.setenv("P_STATE_DSN", state_dsn)
    monkeypatch.setenv("P_TARGET_DSN", target_dsn)
    monkeypatch.setenv("P_CRM_URL", crm_url)
    return parse_spec({
        "state": {"dsn_env": "P_STATE_DSN"},
        "pipelines": {"feed": {
            "source": {"kind": "http_poll", "base_url_env": "P_CRM_URL", "interval_seconds": 1,
                       "overlap_seconds": 2, "page_size": 100, "records": {
                           "crm.contacts": CONTACTS}, **source},
            "tables": ["crm.contacts"],
            "targets": {"reporting": {"dsn_env": "P_TARGET_DSN"}},
            "initial_backfill": False,
        }},
    })


def drain(spec, rounds=50) -> int:
    staged = 0
    for _ in range(rounds):
        report = pull_pipeline(spec, "feed", force=True)
        deliver_pipeline(spec, "feed")
        staged += report.changes
        if report.changes == 0 and not report.more:
            return staged
    raise AssertionError("the poll did not settle")


def assert_target_equals_api(crm, target_dsn) -> None:
    api = {k: (int(r["version"]), r.get("email")) for k, r in crm.records("contacts").items()}
    target = {r[0]: (r[1], r[2]) for r in rows(target_dsn,
                                               "SELECT id, version, email FROM crm.contacts")}
    assert target == api


def test_a_thousand_rows_sharing_one_change_time_across_pages_and_polls(
        monkeypatch, state_dsn, target_dsn, crm_server):
    # One batch write: 1,000 records with the same updated_at. Ten pages of 100, and a poll
    # reads at most 3 pages: the next polls must go on inside the shared change time.
    spec = poll_spec(monkeypatch, state_dsn, target_dsn, crm_server.base_url, max_pages=3)
    batch_put(crm_server, [{"id": str(i), "version": 1, "email": f"c{i}@x"}
                           for i in range(1, 1001)])
    staged = drain(spec)
    assert staged == 1000  # each record once, though the overlap re-reads some
    assert_target_equals_api(crm_server, target_dsn)
    put(crm_server, {"id": "5", "version": 2, "email": "new@x"})
    delete(crm_server, "6")
    assert drain(spec) == 2
    assert_target_equals_api(crm_server, target_dsn)
    assert rows(target_dsn, "SELECT count(*) FROM crm.contacts WHERE id = '6'") == [(0,)]


def test_rows_changed_during_a_poll_are_not_missed(monkeypatch, state_dsn, target_dsn,
                                                   crm_server):
    spec = poll_spec(monkeypatch, state_dsn, target_dsn, crm_server.base_url, page_size=20)
    batch_put(crm_server, [{"id": str(i), "version": 0} for i in range(1, 301)])
    stop = threading.Event()

    def writer() -> None:
        v = 0
        while not stop.is_set():
            v += 1
            put(crm_server, {"id": str(1 + v % 300), "version": v})

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(6):
            pull_pipeline(spec, "feed", force=True)
            deliver_pipeline(spec, "feed")
    finally:
        stop.set()
        t.join(30)
    drain(spec)
    assert_target_equals_api(crm_server, target_dsn)


class CrashAfter(httpx.HTTPTransport):
    """A real HTTP transport that dies (as the process would) after ``n`` requests."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.left = n

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.left == 0:
            raise InjectedCrash("poll process killed")
        self.left -= 1
        return super().handle_request(request)


def test_a_poll_killed_midway_stages_nothing_twice(monkeypatch, state_dsn, target_dsn,
                                                   crm_server):
    spec = poll_spec(monkeypatch, state_dsn, target_dsn, crm_server.base_url, page_size=50)
    batch_put(crm_server, [{"id": str(i), "version": 1} for i in range(1, 201)])
    pipeline = spec.pipelines["feed"]
    with open_state(spec) as state, pytest.raises(InjectedCrash), httpx.Client(
            base_url=crm_server.base_url, transport=CrashAfter(2)) as client:
        poll(state, pipeline, client=client, force=True)  # dies after two pages
    assert rows(state_dsn, "SELECT sum(n_changes)::int FROM sync_state.batch") == [(100,)]
    assert drain(spec) == 100  # the rest, not the first hundred again
    assert_target_equals_api(crm_server, target_dsn)


def test_503_with_retry_after_is_waited_out(monkeypatch, state_dsn, target_dsn, crm_server):
    spec = poll_spec(monkeypatch, state_dsn, target_dsn, crm_server.base_url)
    batch_put(crm_server, [{"id": "1", "version": 1}])
    crm_server.set_faults(outage=True, retry_after_s=1)
    threading.Timer(1.5, crm_server.set_faults).start()  # the API comes back
    started = time.monotonic()
    assert pull_pipeline(spec, "feed", force=True).changes == 1
    assert time.monotonic() - started >= 1.0
    deliver_pipeline(spec, "feed")
    assert_target_equals_api(crm_server, target_dsn)

