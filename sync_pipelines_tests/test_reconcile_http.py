"""Reconciling a source table against the reference CRM through its paged list endpoint
(:mod:`sync_pipelines.engine.reconcile.http`): a real CRM on 127.0.0.1 filled by the real
engine, a real PostgreSQL source, drift injected straight into the CRM (and the source).

Covers: exact drift sets (missing, extra, different with field names), the comparison rules
(filtered rows are absent, fields the record leaves out are not compared, ``5`` equals
``"5"``), ids the API orders as strings, many pages, recheck after a fix, bearer auth, HTTP
errors, the ``unsupported`` result, the spec's ``list:`` validation. Not the Dagster layer
nor the confirmation pass that uses these results.
"""

from __future__ import annotations

import itertools
from typing import Any

import httpx
import psycopg
import pytest

from sync_pipelines.engine.errors import SpecError, TerminalDeliveryError, TransientDeliveryError
from sync_pipelines.engine.reconcile.drift import KeyDrift
from sync_pipelines.engine.reconcile.http import compare_http, fingerprint, recheck_http
from sync_pipelines.engine.spec import SyncSpec, parse_spec

from .support.pipelines import execute, sync_until_idle

TABLE = "public.contacts"
_idem = itertools.count()


def http_spec(monkeypatch: Any, source_dsn: str, state_dsn: str, base_url: str, *,
              list_endpoint: str | None = "GET /contacts", auth: dict[str, Any] | None = None,
              ) -> SyncSpec:
    monkeypatch.setenv("R_SOURCE_DSN", source_dsn)
    monkeypatch.setenv("R_STATE_DSN", state_dsn)
    monkeypatch.setenv("R_CRM_URL", base_url)
    endpoints = {"upsert": "PUT /contacts/{id}", "delete": "DELETE /contacts/{id}"}
    if list_endpoint is not None:
        endpoints["list"] = list_endpoint
    return parse_spec({
        "state": {"dsn_env": "R_STATE_DSN"},
        "pipelines": {"crm": {
            "source": {"dsn_env": "R_SOURCE_DSN"},
            "tables": {"contacts": {
                "columns": {"email": "email_address"},
                "exclude": ["secret"],
                "filter": [{"column": "active", "op": "=", "value": True}],
            }},
            "targets": {"api": {
                "kind": "http", "base_url_env": "R_CRM_URL", "auth": auth or {},
                "tables": {"contacts": endpoints},
            }},
        }},
    })


def make_source(source_dsn: str) -> None:
    # boolean, inet and char(n): types whose cast to text differs from their output function.
    execute(source_dsn, "CREATE TABLE contacts (id int PRIMARY KEY, email text, version int, "
                        "active boolean NOT NULL DEFAULT true, addr inet DEFAULT '10.0.0.1', "
                        "code char(4) DEFAULT 'ab', secret text DEFAULT 'pw')")


def fill(spec: SyncSpec, source_dsn: str, n: int, inactive: tuple[int, ...] = ()) -> None:
    """``n`` contacts written to the source and delivered to the CRM by the engine."""
    sync_until_idle(spec)  # creates the slot
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO contacts (id, email, version) "
                     "SELECT g, 'c' || g || '@x.io', 0 FROM generate_series(1, %s) g", (n,))
        conn.execute("UPDATE contacts SET active = false WHERE id = ANY(%s)", (list(inactive),))
    sync_until_idle(spec)


def row(k: int) -> dict[str, Any]:
    """Contact ``k`` as the engine sends it (text forms as pgoutput gives them)."""
    return {"id": str(k), "email_address": f"c{k}@x.io", "version": "0", "active": "t",
            "addr": "10.0.0.1", "code": "ab  "}


def put(base_url: str, record_id: str, body: dict[str, Any], **headers: str) -> None:
    r = httpx.put(f"{base_url}/contacts/{record_id}", json=body,
                  headers={"Idempotency-Key": f"test-{next(_idem)}", **headers})
    assert r.status_code == 200, r.text


def delete(base_url: str, record_id: str, **headers: str) -> None:
    r = httpx.delete(f"{base_url}/contacts/{record_id}",
                     headers={"Idempotency-Key": f"test-{next(_idem)}", **headers})
    assert r.status_code == 204, r.text


def compare(spec: SyncSpec, source_dsn: str, **kwargs: Any):
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        return compare_http(conn, spec.pipelines["crm"], "contacts", "api", **kwargs)


def kinds(drift: list[KeyDrift]) -> list[tuple[tuple[str | None, ...], str, tuple[str, ...]]]:
    return [(d.key, d.kind, d.fields) for d in drift]


@pytest.fixture
def crm(monkeypatch, source_dsn, state_dsn, crm_server) -> SyncSpec:
    make_source(source_dsn)
    return http_spec(monkeypatch, source_dsn, state_dsn, crm_server.base_url)


def test_a_synced_table_has_no_drift(crm, crm_server, source_dsn):
    fill(crm, source_dsn, 20, inactive=(4,))
    assert len(crm_server.records("contacts")) == 19
    result = compare(crm, source_dsn)
    assert result.method == "http-list" and result.drift == [] and not result.truncated
    # Row 4 fails the filter and is not in the API: neither side counts it.
    assert (result.source_rows, result.target_rows, result.compared_keys) == (19, 19, 19)
    assert result.target_table == "/contacts" and result.note is None


def test_injected_drift_is_found_exactly(crm, crm_server, source_dsn):
    fill(crm, source_dsn, 12, inactive=(11,))
    url = crm_server.base_url
    records = crm_server.records("contacts")
    assert records["3"] == row(3)  # the mapped row as sent, secret excluded
    # Cases, each a key:
    put(url, "3", {**records["3"], "email_address": "changed@x.io"})  # 3: one field differs
    put(url, "4", {**records["4"], "version": "9", "active": "f"})    # 4: two fields differ
    delete(url, "5")                                                  # 5: missing in the API
    put(url, "6", {"id": "6", "email_address": "c6@x.io"})  # 6: fields left out: not compared
    put(url, "7", {**records["7"], "version": 0, "extra": 1})  # 7: 0 equals "0"; extra ignored
    put(url, "8", {**records["8"], "version": None})            # 8: null differs from "0"
    put(url, "11", {"id": "11", "email_address": "c11@x.io"})   # 11: filtered out → extra
    put(url, "99", {"id": "99"})                                # 99: not in the source → extra
    put(url, "abc", {"id": "abc"})  # abc: not an integer; the API now orders ids as strings
    # 12: changed in the source and not synced yet → different; 13: new, not synced → missing.
    execute(source_dsn, "UPDATE contacts SET version = 1 WHERE id = 12",
            "INSERT INTO contacts (id, email, version) VALUES (13, 'c13@x.io', 0)")
    result = compare(crm, source_dsn, page_size=4, fetch_rows=3)
    assert kinds(result.drift) == [
        (("3",), "different", ("email_address",)),
        (("4",), "different", ("version", "active")),
        (("5",), "missing", ()),
        (("8",), "different", ("version",)),
        (("11",), "extra", ()),
        (("12",), "different", ("version",)),
        (("13",), "missing", ()),
        (("99",), "extra", ()),
        (("abc",), "extra", ()),
    ]
    assert (result.missing, result.extra, result.different) == (2, 3, 4)
    by_key = {d.key: d for d in result.drift}
    assert by_key[("11",)].source_fingerprint is None
    assert by_key[("abc",)].source_fingerprint is None
    assert by_key[("5",)].source_fingerprint == fingerprint(row(5))
    # 12 source rows pass the filter (1-10, 12, 13); the API has 1-4, 6-10, 12 and 11, 99, abc.
    assert (result.source_rows, result.target_rows, result.compared_keys) == (12, 13, 15)


def test_more_records_than_one_page(crm, crm_server, source_dsn):
    fill(crm, source_dsn, 1_200)
    delete(crm_server.base_url, "1000")
    put(crm_server.base_url, "7", {"id": "7", "email_address": "other@x.io"})
    gets: list[httpx.Request] = []
    with httpx.Client(base_url=crm_server.base_url,
                      event_hooks={"request": [gets.append]}) as client:
        result = compare(crm, source_dsn, page_size=100, fetch_rows=250, client=client)
    assert len(gets) == 12  # 1,199 records, 100 a page
    assert gets[1].url.params["cursor"] == "100" and gets[1].url.params["limit"] == "100"
    assert kinds(result.drift) == [(("7",), "different", ("email_address",)),
                                   (("1000",), "missing", ())]
    assert (result.source_rows, result.target_rows, result.compared_keys) == (1200, 1199, 1200)


def test_max_drift_truncates_the_list_not_the_counts(crm, crm_server, source_dsn):
    fill(crm, source_dsn, 10)
    for k in (2, 4, 6, 8):
        delete(crm_server.base_url, str(k))
    result = compare(crm, source_dsn, max_drift=2)
    assert result.truncated and result.total == 2
    assert all(d.kind == "missing" for d in result.drift)
    assert (result.source_rows, result.target_rows) == (10, 6)


def test_recheck_sees_the_same_drift_then_none_after_a_fix(crm, crm_server, source_dsn):
    fill(crm, source_dsn, 6)
    url = crm_server.base_url
    record_2 = crm_server.records("contacts")["2"]
    put(url, "2", {**record_2, "version": "5"})
    delete(url, "3")
    put(url, "42", {"id": "42"})
    put(url, "x y", {"id": "x y"})  # an id that needs quoting in the path
    result = compare(crm, source_dsn)
    keys = [d.key for d in result.drift]
    assert keys == [("2",), ("3",), ("42",), ("x y",)]
    with psycopg.connect(source_dsn) as conn:  # in a transaction of its own: left as it was
        conn.execute("SELECT 1")
        again = recheck_http(conn, crm.pipelines["crm"], "contacts", "api", keys)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    assert again == {d.key: d for d in result.drift}
    # Fix the API by hand: everything agrees again.
    put(url, "2", record_2)
    put(url, "3", row(3))
    delete(url, "42")
    delete(url, "x y")
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        after = recheck_http(conn, crm.pipelines["crm"], "contacts", "api", keys)
        assert after == {k: None for k in keys}
        # A key that has changed in the source meanwhile: its fingerprint tells.
        conn.execute("UPDATE contacts SET version = 7 WHERE id = 2")
        moved = recheck_http(conn, crm.pipelines["crm"], "contacts", "api", [("2",)])[("2",)]
    assert moved is not None and moved.kind == "different" and moved.fields == ("version",)
    assert moved.source_fingerprint != again[("2",)].source_fingerprint
    assert compare(crm, source_dsn).drift == [moved]


def test_without_a_list_endpoint_nothing_is_compared(monkeypatch, source_dsn, state_dsn,
                                                     crm_server):
    make_source(source_dsn)
    spec = http_spec(monkeypatch, source_dsn, state_dsn, crm_server.base_url, list_endpoint=None)
    fill(spec, source_dsn, 3)
    delete(crm_server.base_url, "1")  # real drift, and still: no pretending
    sent: list[httpx.Request] = []
    with httpx.Client(base_url=crm_server.base_url,
                      event_hooks={"request": [sent.append]}) as client:
        result = compare(spec, source_dsn, client=client)
    assert result.method == "unsupported" and result.drift == [] and sent == []
    assert result.note == "target api gives no list endpoint for public.contacts: not compared"


def test_bearer_auth_from_the_environment(monkeypatch, source_dsn, state_dsn, make_crm_server):
    server = make_crm_server(bearer_token="s3cret-token")
    make_source(source_dsn)
    spec = http_spec(monkeypatch, source_dsn, state_dsn, server.base_url,
                     auth={"bearer_token_env": "R_CRM_TOKEN"})
    monkeypatch.setenv("R_CRM_TOKEN", "s3cret-token")
    fill(spec, source_dsn, 5)
    delete(server.base_url, "2", Authorization="Bearer s3cret-token")
    assert kinds(compare(spec, source_dsn).drift) == [(("2",), "missing", ())]
    monkeypatch.setenv("R_CRM_TOKEN", "wrong")
    with pytest.raises(TerminalDeliveryError) as err:
        compare(spec, source_dsn)
    message = str(err.value)
    assert "pipeline 'crm', target 'api', table public.contacts: GET /contacts: HTTP 401" in message
    assert "wrong" not in message and "s3cret" not in message
    monkeypatch.delenv("R_CRM_TOKEN")
    with pytest.raises(SpecError, match="R_CRM_TOKEN is not set"):
        compare(spec, source_dsn)


def test_api_errors_are_clear_and_leave_the_source_connection_clean(crm, crm_server,
                                                                     source_dsn):
    fill(crm, source_dsn, 3)
    crm_server.set_faults(outage=True, retry_after_s=0)
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        with pytest.raises(TransientDeliveryError,
                           match=r"target 'api', table public.contacts: GET /contacts: HTTP 503"):
            compare_http(conn, crm.pipelines["crm"], "contacts", "api")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        temp = conn.execute("SELECT count(*) FROM pg_class WHERE relpersistence = 't' "
                            "AND relname LIKE '\\_sync\\_reconcile%'").fetchone()
        assert temp == (0,)
        crm_server.set_faults()

        def bad_page(request: httpx.Request) -> httpx.Response:
            return httpx.Response(200, json={"items": [{"name": "no id"}], "next_cursor": None})

        with httpx.Client(base_url="http://api.test", transport=httpx.MockTransport(bad_page)
                          ) as client, pytest.raises(TerminalDeliveryError,
                                                     match="a record has no key field 'id'"):
            compare_http(conn, crm.pipelines["crm"], "contacts", "api", client=client)
        # And the same connection compares fine afterwards.
        assert compare_http(conn, crm.pipelines["crm"], "contacts", "api").drift == []
        with httpx.Client(base_url="http://127.0.0.1:9", timeout=2) as down, pytest.raises(
                TransientDeliveryError, match="GET /contacts: connection error"):
            compare_http(conn, crm.pipelines["crm"], "contacts", "api", client=down)


@pytest.mark.parametrize("endpoint", [
    "POST /contacts",        # not GET
    "GET contacts",          # no leading slash
    "GET /contacts/{id}",    # placeholders make no sense for a list
    "GET",                   # no path
])
def test_list_endpoint_is_validated(endpoint):
    with pytest.raises(SpecError, match=r"tables\.public\.contacts\.list"):
        parse_spec({"pipelines": {"crm": {
            "tables": ["contacts"],
            "targets": {"api": {"kind": "http", "base_url_env": "X", "tables": {
                "contacts": {"upsert": "PUT /contacts/{id}", "list": endpoint}}}},
        }}})


def test_duplicate_records_and_a_stuck_cursor(crm, source_dsn):
    """Against a scripted API: a record listed twice is compared once and counted in the note;
    a next_cursor that does not move is an error, not an endless loop."""
    make_rows = "INSERT INTO contacts (id, email, version) VALUES (1, 'c1@x.io', 0), " \
                "(2, 'c2@x.io', 0)"
    execute(source_dsn, make_rows)
    pages = {None: {"items": [row(1), row(2)], "next_cursor": "2"},
             "2": {"items": [{**row(2), "version": "1"}], "next_cursor": None}}

    def api(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/contacts" and request.url.params["limit"] == "2"
        return httpx.Response(200, json=pages[request.url.params.get("cursor")])

    with httpx.Client(base_url="http://api.test", transport=httpx.MockTransport(api)) as client:
        result = compare(crm, source_dsn, page_size=2, client=client)
        assert result.drift == [] and result.target_rows == 3 and result.compared_keys == 2
        assert result.note == "the API listed 1 key(s) more than once; each was compared once"
        pages["2"]["next_cursor"] = "2"
        with pytest.raises(TerminalDeliveryError, match="next_cursor '2' repeats the cursor"):
            compare(crm, source_dsn, page_size=2, client=client)
