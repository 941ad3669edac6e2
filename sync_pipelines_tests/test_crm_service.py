"""The reference CRM service (:mod:`sync_pipelines.crm_service`) over real HTTP on 127.0.0.1.

Covers the resource routes (CRUD, paging, batch), the idempotency contract, validation,
authentication, fault injection (latency, 429, seeded 500s, outage, poison records), the
received log, the in-flight statistics and ``python -m sync_pipelines.crm_service``. Uses the
``crm_server`` / ``make_crm_server`` fixtures of ``sync_pipelines_tests.fixtures.crm``. Does
not touch PostgreSQL, the engine or Dagster.
"""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from sync_pipelines.crm_service.server import CrmServer


@pytest.fixture
def http(crm_server: CrmServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=crm_server.base_url, timeout=10.0) as client:
        yield client


def key() -> dict[str, str]:
    """A fresh idempotency key header."""
    return {"Idempotency-Key": uuid.uuid4().hex}


def put(http: httpx.Client, path: str, body: Any, **headers: str) -> httpx.Response:
    return http.put(path, json=body, headers={**key(), **headers})


# -- resources --------------------------------------------------------------------------------


def test_put_get_delete_round_trip(http: httpx.Client, crm_server: CrmServer) -> None:
    response = put(http, "/contacts/7", {"id": 7, "name": "Ada"})
    assert response.status_code == 200
    assert response.json() == {"id": 7, "name": "Ada"}
    # a body without id gets the path id (as a string)
    assert put(http, "/companies/c1", {"name": "Acme"}).json() == {"name": "Acme", "id": "c1"}
    assert http.get("/contacts/7").json() == {"id": 7, "name": "Ada"}
    assert put(http, "/contacts/7", {"id": 7, "name": "Ada L."}).status_code == 200
    assert http.get("/contacts/7").json()["name"] == "Ada L."

    assert http.delete("/contacts/7", headers=key()).status_code == 204
    assert http.get("/contacts/7").status_code == 404
    # deleting a missing record is idempotent
    assert http.delete("/contacts/7", headers=key()).status_code == 204
    assert crm_server.records() == {
        "contacts": {},
        "companies": {"c1": {"name": "Acme", "id": "c1"}},
        "deals": {},
    }


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/tickets/1", None, 404),  # unknown resource, read
        ("PUT", "/tickets/1", {"a": 1}, 404),  # unknown resource, write
        ("GET", "/tickets", None, 404),  # unknown resource, list
        ("PUT", "/deals/1", {"id": 2}, 422),  # body id differs from the path id
        ("PUT", "/deals/1", {"id": True}, 422),  # a boolean is no id
        ("PUT", "/deals/1", [1, 2], 400),  # not an object
        ("PUT", "/deals/1", "x", 400),  # not an object
        ("POST", "/deals/1", {}, 405),  # no POST on a record
        ("POST", "/deals/batch", {"upserts": [{"name": "no id"}]}, 400),  # upsert without id
        ("POST", "/deals/batch", {"deletes": [None]}, 400),  # bad delete id
        ("POST", "/deals/batch", {"upserts": {}}, 400),  # upserts not a list
        ("POST", "/deals/batch", {"replace": []}, 400),  # unknown field
    ],
)
def test_validation(http: httpx.Client, method: str, path: str, body: Any, status: int) -> None:
    response = http.request(method, path, json=body, headers=key())
    assert response.status_code == status
    assert "error" in response.json()


def test_invalid_json_is_400(http: httpx.Client, crm_server: CrmServer) -> None:
    response = http.put("/contacts/1", content=b"{not json", headers=key())
    assert response.status_code == 400
    response = http.put("/contacts/1", content=b'{"x": NaN}', headers=key())
    assert response.status_code == 400
    assert [w["status"] for w in crm_server.received()["writes"]] == [400, 400]
    assert crm_server.records("contacts") == {}


def test_paging_orders_integer_ids_numerically(http: httpx.Client) -> None:
    ids = [17, 3, 25, 1, 10, 2, 11, 9, 24, 4, 5, 6, 7, 8, 12, 13, 14, 15, 16, 18, 19, 20, 21, 22]
    batch = {"upserts": [{"id": i, "n": i} for i in ids]}
    assert http.post("/deals/batch", json=batch, headers=key()).json() == {
        "upserted": len(ids),
        "deleted": 0,
    }
    seen: list[int] = []
    cursor: str | None = None
    pages = 0
    while True:
        params = {"limit": 10} | ({"cursor": cursor} if cursor else {})
        page = http.get("/deals", params=params).json()
        seen += [item["id"] for item in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(ids)
    assert pages == 3


def test_paging_orders_other_ids_as_strings(http: httpx.Client) -> None:
    for record_id in ["b", "10", "a", "9"]:
        put(http, f"/companies/{record_id}", {})
    first = http.get("/companies", params={"limit": 3}).json()
    assert [r["id"] for r in first["items"]] == ["10", "9", "a"]
    assert first["next_cursor"] == "a"
    rest = http.get("/companies", params={"limit": 3, "cursor": "a"}).json()
    assert rest == {"items": [{"id": "b"}], "next_cursor": None}
    assert http.get("/companies", params={"limit": 4}).json()["next_cursor"] is None


@pytest.mark.parametrize("limit", ["0", "1001", "x", "-1"])
def test_page_limit_bounds(http: httpx.Client, limit: str) -> None:
    assert http.get("/contacts", params={"limit": limit}).status_code == 400


def test_batch_applies_upserts_then_deletes(http: httpx.Client, crm_server: CrmServer) -> None:
    put(http, "/contacts/1", {"v": 0})
    body = {
        "upserts": [{"id": 2, "v": 1}, {"id": 3, "v": 1}, {"id": 2, "v": 2}],
        "deletes": [1, "3", 99],
    }
    response = http.post("/contacts/batch", json=body, headers=key())
    assert response.status_code == 200
    assert response.json() == {"upserted": 3, "deleted": 3}
    assert crm_server.records("contacts") == {"2": {"id": 2, "v": 2}}
    assert crm_server.received()["writes"][-1]["ids"] == ["2", "3", "2", "1", "3", "99"]


# -- idempotency ------------------------------------------------------------------------------


def test_duplicate_key_is_answered_from_store_and_not_reapplied(
    http: httpx.Client, crm_server: CrmServer
) -> None:
    first = http.put("/contacts/1", json={"v": 1}, headers={"Idempotency-Key": "k1"})
    put(http, "/contacts/1", {"v": 2})  # a later write under another key
    again = http.put("/contacts/1", json={"v": 1}, headers={"Idempotency-Key": "k1"})
    assert (again.status_code, again.json()) == (first.status_code, first.json())
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert http.get("/contacts/1").json() == {"v": 2, "id": "1"}  # not applied again

    # a 204 is replayed as a 204
    assert http.delete("/deals/5", headers={"Idempotency-Key": "d5"}).status_code == 204
    assert http.delete("/deals/5", headers={"Idempotency-Key": "d5"}).status_code == 204

    received = crm_server.received()
    assert (received["applied"], received["duplicates"], received["rejected"]) == (3, 2, 0)
    assert [w["outcome"] for w in received["writes"]] == [
        "applied",
        "applied",
        "duplicate",
        "applied",
        "duplicate",
    ]


def test_key_reused_for_another_request_is_422(http: httpx.Client, crm_server: CrmServer) -> None:
    headers = {"Idempotency-Key": "shared"}
    assert http.put("/contacts/1", json={}, headers=headers).status_code == 200
    assert http.put("/contacts/2", json={}, headers=headers).status_code == 422  # other path
    assert http.delete("/contacts/1", headers=headers).status_code == 422  # other method
    assert http.post("/contacts/batch", json={}, headers=headers).status_code == 422
    assert set(crm_server.records("contacts")) == {"1"}
    assert crm_server.received()["rejected"] == 3


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", "/contacts/1", {}),
        ("DELETE", "/contacts/1", None),
        ("POST", "/contacts/batch", {"upserts": []}),
    ],
)
def test_writes_without_key_are_400(
    http: httpx.Client, crm_server: CrmServer, method: str, path: str, body: Any
) -> None:
    response = http.request(method, path, json=body)
    assert response.status_code == 400
    assert "Idempotency-Key" in response.json()["error"]
    assert http.request(method, path, json=body, headers={"Idempotency-Key": ""}).status_code == 400
    assert crm_server.received()["rejected"] == 2


def test_failed_writes_are_not_stored_under_their_key(
    http: httpx.Client, crm_server: CrmServer
) -> None:
    headers = {"Idempotency-Key": "retry-me"}
    crm_server.set_faults(error_rate=1.0)
    assert http.put("/contacts/1", json={"v": 1}, headers=headers).status_code == 500
    crm_server.set_faults()
    response = http.put("/contacts/1", json={"v": 1}, headers=headers)
    assert response.status_code == 200
    assert "Idempotent-Replayed" not in response.headers
    assert crm_server.records("contacts") == {"1": {"v": 1, "id": "1"}}


def test_custom_idempotency_header(make_crm_server: Any) -> None:
    crm = make_crm_server(idempotency_header="X-Request-Id")
    with httpx.Client(base_url=crm.base_url) as client:
        assert client.put("/contacts/1", json={}, headers=key()).status_code == 400
        ok = client.put("/contacts/1", json={}, headers={"X-Request-Id": "r1"})
        assert ok.status_code == 200
    assert crm.received()["writes"][-1]["idempotency_key"] == "r1"


# -- authentication and size limit ------------------------------------------------------------


def test_bearer_token(make_crm_server: Any) -> None:
    crm = make_crm_server(bearer_token="s3cret")
    with httpx.Client(base_url=crm.base_url) as client:
        missing = client.get("/contacts/1")
        assert missing.status_code == 401
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = {"Authorization": "Bearer nope", **key()}
        assert client.put("/contacts/1", json={}, headers=wrong).status_code == 401
        right = {"Authorization": "Bearer s3cret"}
        assert client.put("/contacts/1", json={}, headers={**right, **key()}).status_code == 200
        assert client.get("/contacts/1", headers=right).status_code == 200
        assert client.get("/_admin/stats").status_code == 200  # admin is not behind auth
    assert crm.records("contacts") == {"1": {"id": "1"}}


def test_basic_auth(make_crm_server: Any) -> None:
    crm = make_crm_server(basic=("sync", "pa:ss"))
    with httpx.Client(base_url=crm.base_url) as client:
        assert client.get("/deals", auth=("sync", "wrong")).status_code == 401
        assert client.get("/deals", auth=("other", "pa:ss")).status_code == 401
        bad = {"Authorization": "Basic !!!"}
        assert client.get("/deals", headers=bad).status_code == 401
        assert client.get("/deals", auth=("sync", "pa:ss")).status_code == 200
        token = base64.b64encode(b"sync:pa:ss").decode()
        assert client.get("/deals", headers={"Authorization": f"Basic {token}"}).status_code == 200


def test_body_too_large_is_413(make_crm_server: Any) -> None:
    crm = make_crm_server(max_body_bytes=1000)
    with httpx.Client(base_url=crm.base_url) as client:
        small = {"blob": "x" * 900}
        assert client.put("/contacts/1", json=small, headers=key()).status_code == 200
        big = {"blob": "x" * 5000}
        assert client.put("/contacts/2", json=big, headers=key()).status_code == 413

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
            yield b'{"blob": "'
            yield b"x" * 2000
            yield b'"}'

        streamed = client.put("/contacts/3", content=chunks(), headers=key())
        assert streamed.status_code == 413
        # the connection still serves the next request after a 413
        assert client.get("/contacts/1").status_code == 200
    assert set(crm.records("contacts")) == {"1"}
    assert [w["status"] for w in crm.received()["writes"]] == [200, 413, 413]


# -- fault injection --------------------------------------------------------------------------


def test_latency_is_injected_without_blocking(http: httpx.Client, crm_server: CrmServer) -> None:
    crm_server.set_faults(latency_ms=200)
    started = time.monotonic()
    assert http.get("/contacts").status_code == 200
    assert time.monotonic() - started >= 0.2

    def write(i: int) -> float:
        t0 = time.monotonic()
        with httpx.Client(base_url=crm_server.base_url) as client:
            assert client.put(f"/contacts/{i}", json={}, headers=key()).status_code == 200
        return time.monotonic() - t0

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        durations = list(pool.map(write, range(8)))
    elapsed = time.monotonic() - started
    assert min(durations) >= 0.2
    assert elapsed < 0.2 * 8 / 2  # overlapped, not serialized
    assert crm_server.stats()["max_in_flight"] >= 4


def test_rate_limit_every_nth_write(http: httpx.Client, crm_server: CrmServer) -> None:
    crm_server.set_faults(rate_limit_every=3, retry_after_s=2)
    responses = [put(http, f"/contacts/{i}", {}) for i in range(7)]
    assert [r.status_code for r in responses] == [200, 200, 429, 200, 200, 429, 200]
    assert responses[2].headers["Retry-After"] == "2"
    assert responses[2].json()["error"]
    assert http.get("/contacts/0").status_code == 200  # reads are not rate limited
    assert set(crm_server.records("contacts")) == {"0", "1", "3", "4", "6"}


def _statuses_with_seed(http: httpx.Client, crm: CrmServer, seed: int) -> list[int]:
    crm.reset()
    crm.set_faults(error_rate=0.5, seed=seed)
    return [put(http, f"/deals/{i}", {}).status_code for i in range(40)]


def test_error_rate_is_deterministic_for_a_seed(http: httpx.Client, crm_server: CrmServer) -> None:
    statuses = _statuses_with_seed(http, crm_server, seed=7)
    assert set(statuses) == {200, 500}
    assert 8 <= statuses.count(500) <= 32
    applied = {str(i) for i, s in enumerate(statuses) if s == 200}
    assert set(crm_server.records("deals")) == applied  # a 500 is never applied
    assert _statuses_with_seed(http, crm_server, seed=7) == statuses
    assert _statuses_with_seed(http, crm_server, seed=8) != statuses


def test_outage_answers_503_until_lifted(http: httpx.Client, crm_server: CrmServer) -> None:
    put(http, "/contacts/1", {})
    crm_server.set_faults(outage=True, retry_after_s=5)
    for response in (
        http.get("/contacts/1"),
        http.get("/contacts"),
        put(http, "/contacts/2", {}),
        http.post("/contacts/batch", json={}, headers=key()),
    ):
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "5"
    assert crm_server.faults()["outage"] is True  # the admin API still answers
    crm_server.set_faults(outage=False)
    assert http.get("/contacts/1").status_code == 200
    assert set(crm_server.records("contacts")) == {"1"}


def test_poison_record_is_rejected(http: httpx.Client, crm_server: CrmServer) -> None:
    crm_server.set_faults(
        poison=[{"resource": "contacts", "id": 13}, {"resource": "deals", "id": "7", "status": 409}]
    )
    response = put(http, "/contacts/13", {"name": "bad"})
    assert response.status_code == 422
    assert response.json()["rejected"] == [{"resource": "contacts", "id": "13", "status": 422}]
    assert http.delete("/deals/7", headers=key()).status_code == 409
    assert put(http, "/companies/13", {}).status_code == 200  # same id, other resource
    assert put(http, "/contacts/12", {}).status_code == 200
    batch = {"upserts": [{"id": 14}, {"id": 13}], "deletes": [12]}
    assert http.post("/contacts/batch", json=batch, headers=key()).status_code == 422
    assert set(crm_server.records("contacts")) == {"12"}  # the batch was rejected whole
    assert crm_server.received()["rejected"] == 3


@pytest.mark.parametrize(
    "faults",
    [
        {"latency": 5},  # unknown field
        {"error_rate": 1.5},  # out of range
        {"rate_limit_every": -1},  # negative
        {"outage": "yes"},  # not a boolean
        {"poison": [{"resource": "tickets", "id": 1}]},  # unknown resource
        {"poison": [{"resource": "contacts"}]},  # no id
        {"poison": [{"resource": "contacts", "id": 1, "status": 200}]},  # not an error status
    ],
)
def test_invalid_fault_config_is_400(crm_server: CrmServer, faults: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="400"):
        crm_server.set_faults(**faults)
    assert crm_server.faults()["latency_ms"] == 0  # unchanged


def test_set_faults_replaces_and_reset_clears(http: httpx.Client, crm_server: CrmServer) -> None:
    crm_server.set_faults(latency_ms=1, rate_limit_every=5)
    assert crm_server.set_faults(retry_after_s=3) == {
        "latency_ms": 0.0,
        "error_rate": 0.0,
        "rate_limit_every": 0,
        "retry_after_s": 3,
        "outage": False,
        "poison": [],
        "seed": 0,
    }
    http.put("/contacts/1", json={}, headers={"Idempotency-Key": "once"})
    crm_server.reset()
    assert crm_server.records("contacts") == {}
    assert crm_server.received() == {"writes": [], "applied": 0, "duplicates": 0, "rejected": 0}
    assert crm_server.stats()["requests"] == 0
    assert crm_server.faults()["retry_after_s"] == 1
    again = http.put("/contacts/1", json={}, headers={"Idempotency-Key": "once"})
    assert "Idempotent-Replayed" not in again.headers  # the idempotency store was cleared


# -- inspection -------------------------------------------------------------------------------


def test_received_log_in_arrival_order(http: httpx.Client, crm_server: CrmServer) -> None:
    crm_server.set_faults(rate_limit_every=4)
    http.put("/contacts/1", json={"v": 1}, headers={"Idempotency-Key": "a"})
    http.get("/contacts/1")  # reads are not logged
    http.delete("/contacts/1", headers={"Idempotency-Key": "b"})
    http.post("/deals/batch", json={"deletes": [3]}, headers={"Idempotency-Key": "c"})
    http.put("/contacts/1", json={"v": 1}, headers={"Idempotency-Key": "a"})  # 4th: 429
    http.put("/contacts/1", json={"v": 1}, headers={"Idempotency-Key": "a"})  # duplicate
    http.put("/contacts/1", json={"v": 1})  # no key

    received = crm_server.received()
    rows = [
        (w["seq"], w["method"], w["resource"], w["id"], w["idempotency_key"], w["status"])
        for w in received["writes"]
    ]
    assert rows == [
        (1, "PUT", "contacts", "1", "a", 200),
        (2, "DELETE", "contacts", "1", "b", 204),
        (3, "POST", "deals", None, "c", 200),
        (4, "PUT", "contacts", "1", "a", 429),
        (5, "PUT", "contacts", "1", "a", 200),
        (6, "PUT", "contacts", "1", None, 400),
    ]
    writes = received["writes"]
    assert writes[0]["body"] == {"v": 1}
    assert writes[1]["body"] is None
    assert writes[2]["body"] == {"deletes": [3]} and writes[2]["ids"] == ["3"]
    assert [w["outcome"] for w in writes] == [
        "applied",
        "applied",
        "applied",
        "rejected",
        "duplicate",
        "rejected",
    ]
    assert all(a["at"] <= b["at"] for a, b in zip(writes, writes[1:], strict=False))
    assert (received["applied"], received["duplicates"], received["rejected"]) == (3, 1, 2)
    # by_status counts reads too (the GET above)
    assert crm_server.stats()["by_status"] == {"200": 4, "204": 1, "400": 1, "429": 1}


def _concurrent_puts(crm: CrmServer, paths: list[str]) -> list[int]:
    barrier = threading.Barrier(len(paths))

    def send(path: str) -> int:
        with httpx.Client(base_url=crm.base_url) as client:
            barrier.wait()
            return client.put(path, json={}, headers=key()).status_code

    with ThreadPoolExecutor(len(paths)) as pool:
        return list(pool.map(send, paths))


def test_in_flight_per_key(crm_server: CrmServer) -> None:
    crm_server.set_faults(latency_ms=150)
    # distinct keys: many requests in flight, one per key
    assert _concurrent_puts(crm_server, [f"/contacts/{i}" for i in range(6)]) == [200] * 6
    stats = crm_server.stats()
    assert stats["max_in_flight"] >= 3
    assert stats["max_in_flight_per_key"] == 1
    assert set(stats["max_in_flight_by_key"]) == {f"contacts/{i}" for i in range(6)}
    assert stats["in_flight"] == 0

    # the same key from four clients at once is visible as 4 in flight for that key
    crm_server.reset()
    crm_server.set_faults(latency_ms=150)
    assert _concurrent_puts(crm_server, ["/deals/9"] * 4 + ["/deals/10"]) == [200] * 5
    stats = crm_server.stats()
    assert stats["max_in_flight_by_key"] == {"deals/9": 4, "deals/10": 1}
    assert stats["max_in_flight_per_key"] == 4
    assert stats["max_in_flight_writes"] == 5


# -- python -m sync_pipelines.crm_service -----------------------------------------------------


def test_module_entry_point_reads_token_from_environment() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "CRM_TEST_TOKEN": "from-env"}
    command = [sys.executable, "-m", "sync_pipelines.crm_service", "--port", str(port)]
    command += ["--bearer-token-env", "CRM_TEST_TOKEN", "--log-level", "warning"]
    process = subprocess.Popen(command, env=env)
    try:
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        while True:
            try:
                response = httpx.get(f"{base_url}/contacts")
                break
            except httpx.TransportError:
                assert process.poll() is None, "the server exited"
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.05)
        assert response.status_code == 401
        authorized = {"Authorization": "Bearer from-env"}
        assert httpx.get(f"{base_url}/contacts", headers=authorized).status_code == 200
    finally:
        process.terminate()
        process.wait(10)


def test_module_entry_point_rejects_unset_token_variable() -> None:
    env = {k: v for k, v in os.environ.items() if k != "CRM_TEST_UNSET"}
    command = [sys.executable, "-m", "sync_pipelines.crm_service", "--bearer-token-env"]
    result = subprocess.run(
        [*command, "CRM_TEST_UNSET"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "CRM_TEST_UNSET" in result.stderr
