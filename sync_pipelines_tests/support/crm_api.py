"""Writes to the reference CRM over its public API (each with its own Idempotency-Key)."""

from __future__ import annotations

import time

import httpx


def batch_put(crm, records) -> None:
    with httpx.Client(base_url=crm.base_url) as c:
        r = c.post("/contacts/batch", json={"upserts": records},
                   headers={"Idempotency-Key": f"b{time.monotonic_ns()}"})
        r.raise_for_status()


def put(crm, record) -> None:
    with httpx.Client(base_url=crm.base_url) as c:
        c.put(f"/contacts/{record['id']}", json=record,
              headers={"Idempotency-Key": f"p{time.monotonic_ns()}"}).raise_for_status()


def delete(crm, record_id) -> None:
    with httpx.Client(base_url=crm.base_url) as c:
        c.delete(f"/contacts/{record_id}",
                 headers={"Idempotency-Key": f"d{time.monotonic_ns()}"}).raise_for_status()
