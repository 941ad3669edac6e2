"""Build specs for tests and compare source and target tables."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from sync_pipelines.engine.faults import NO_FAULTS, Faults
from sync_pipelines.engine.pipeline import deliver_pipeline, pull_pipeline
from sync_pipelines.engine.spec import SyncSpec, parse_spec


def make_spec(
    monkeypatch: Any,
    *,
    source_dsn: str,
    target_dsn: str,
    state_dsn: str,
    tables: Any,
    name: str = "crm",
    policy: dict[str, Any] | None = None,
    target: dict[str, Any] | None = None,
    reconcile: dict[str, Any] | None = None,
) -> SyncSpec:
    """A one-pipeline spec whose DSN environment variables point at the given databases."""
    monkeypatch.setenv("T_SOURCE_DSN", source_dsn)
    monkeypatch.setenv("T_TARGET_DSN", target_dsn)
    monkeypatch.setenv("T_STATE_DSN", state_dsn)
    return parse_spec({
        "state": {"dsn_env": "T_STATE_DSN"},
        "pipelines": {name: {
            "source": {"dsn_env": "T_SOURCE_DSN"},
            "tables": tables,
            "targets": {"replica": {"dsn_env": "T_TARGET_DSN", **(target or {})}},
            "policy": policy or {},
            "reconcile": reconcile or {},
        }},
    })


def sync_until_idle(spec: SyncSpec, name: str = "crm", *, faults: Faults = NO_FAULTS,
                    max_rounds: int = 1000) -> int:
    """Alternate pull and deliver (as sensor ticks and runs would) until the slot is drained."""
    total = 0
    for _ in range(max_rounds):
        report = pull_pipeline(spec, name, faults=faults)
        delivered = deliver_pipeline(spec, name, faults=faults)
        total += report.changes
        if report.changes == 0 and all(r.changes == 0 for r in delivered):
            return total
    raise AssertionError("pipeline did not become idle")


@contextmanager
def pipeline_running(spec: SyncSpec, name: str = "crm", pause_s: float = 0.1) -> Iterator[None]:
    """Pull and deliver in a background thread, as the sensor and the delivery runs would,
    while the body runs (a backfill or a reconciliation relies on them)."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            pull_pipeline(spec, name)
            deliver_pipeline(spec, name)
            stop.wait(pause_s)

    thread = threading.Thread(target=loop, name="pipeline-pump")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(60)


def rows(dsn: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(query, params).fetchall()


def execute(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for s in statements:
            conn.execute(s)


def assert_tables_equal(source_dsn: str, target_dsn: str, source: str, target: str | None = None,
                        columns: str = "*", key: str = "1") -> None:
    # Table and column names come from the tests themselves, never from input.
    src = rows(source_dsn, f"SELECT {columns} FROM {source} ORDER BY {key}")  # noqa: S608
    tgt = rows(target_dsn, f"SELECT {columns} FROM {target or source} ORDER BY {key}")  # noqa: S608
    assert len(src) == len(tgt), f"{len(src)} rows in source, {len(tgt)} in target"
    for a, b in zip(src, tgt, strict=True):
        assert a == b, f"source {a} != target {b}"
