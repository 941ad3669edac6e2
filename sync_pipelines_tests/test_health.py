"""Standing health: the slot's lag in bytes and seconds (heartbeats), a slot lost to
``max_slot_wal_keep_size`` stopping the pipeline with the recovery named and the recovery
bringing the target back; the health sensor and the executable checks in Dagster.

Real PostgreSQL throughout. The lost-slot test starts its own server (a small
``max_slot_wal_keep_size`` must not touch the shared one); the others use the session's.
Thresholds are applied by the Dagster layer (:mod:`sync_pipelines.defs.health`), so the checks'
grades are read from there. Not covered here: the UI itself (test_browser).
"""

from __future__ import annotations

import threading
import time

import dagster as dg
import psycopg
import pytest
import yaml

from sync_pipelines.definitions import build_definitions
from sync_pipelines.defs.health import slot_evaluation, target_evaluations
from sync_pipelines.defs.resources import SyncEngine
from sync_pipelines.engine import (
    SlotLostError,
    deliver_pipeline,
    load_spec,
    pull_pipeline,
    recover_pipeline,
    slot_health,
    target_health,
)
from sync_pipelines.engine.runtime.embedded import ensure_database, start_embedded

from .support.pipelines import assert_tables_equal, execute, make_spec, rows, sync_until_idle

WARN, ERROR = dg.AssetCheckSeverity.WARN, dg.AssetCheckSeverity.ERROR


def grade(spec, name="crm"):
    _, _, passed, severity, metadata = slot_evaluation(spec.pipelines[name],
                                                       slot_health(spec, name))
    return ("pass" if passed else severity.value), metadata


def test_slot_lag_grows_while_the_sensor_is_stopped(monkeypatch, source_dsn, target_dsn,
                                                     state_dsn):
    execute(source_dsn, "CREATE TABLE items (id int PRIMARY KEY, v int)",
            "CREATE TABLE noise (id bigserial PRIMARY KEY, pad text)")
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["items"], policy={
                         "heartbeat_seconds": 0.2, "slot_lag_warn_seconds": 1.5,
                         "slot_lag_error_seconds": 3.0, "slot_lag_warn_mb": 512,
                         "slot_lag_error_mb": 4096})
    pull_pipeline(spec, "crm")  # slot; its heartbeat comes with the next pull
    time.sleep(0.3)
    pull_pipeline(spec, "crm")
    assert grade(spec)[0] == "pass"
    assert slot_health(spec, "crm").lag_seconds < 1.5
    time.sleep(1.8)  # no pulls: nothing confirms a heartbeat
    assert grade(spec)[0] == "WARN"
    behind = slot_health(spec, "crm").behind_bytes
    execute(source_dsn, "INSERT INTO noise (pad) SELECT repeat('x', 1000) "
                        "FROM generate_series(1, 3000)")  # ~3 MB of WAL the slot is behind
    assert slot_health(spec, "crm").behind_bytes > behind + 3_000_000
    time.sleep(1.5)
    state, metadata = grade(spec)
    assert state == "ERROR" and metadata["lag_seconds"] >= 3.0, metadata
    pull_pipeline(spec, "crm")  # the sensor is back
    time.sleep(0.3)
    pull_pipeline(spec, "crm")
    assert grade(spec)[0] == "pass"


def test_an_idle_source_with_unrelated_writes_keeps_a_small_lag(monkeypatch, source_dsn,
                                                                target_dsn, state_dsn):
    execute(source_dsn, "CREATE TABLE items (id int PRIMARY KEY, v int)",
            "CREATE TABLE noise (id bigserial PRIMARY KEY, pad text)")
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["items"], policy={"heartbeat_seconds": 0.5})
    pull_pipeline(spec, "crm")
    seen = []
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        for _ in range(12):  # 3 s of writes the pipeline does not capture, sensor ticking
            conn.execute("INSERT INTO noise (pad) SELECT repeat('y', 500) "
                         "FROM generate_series(1, 200)")
            pull_pipeline(spec, "crm")
            seen.append(slot_health(spec, "crm").heartbeat_at)
            time.sleep(0.25)
    health = slot_health(spec, "crm")
    assert len({s for s in seen if s is not None}) >= 3  # heartbeats keep passing the slot
    assert health.lag_seconds is not None and health.lag_seconds < 1.5
    assert health.behind_bytes < 1024 * 1024  # the slot moves although nothing is ours


def test_target_checks_grade_backlog_retry_queue_and_dead_letters(monkeypatch, source_dsn,
                                                                  target_dsn, state_dsn):
    execute(source_dsn, "CREATE TABLE items (id int PRIMARY KEY, v int)")
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["items"],
                     policy={"backlog_warn": 5, "backlog_error": 50})
    pull_pipeline(spec, "crm")
    execute(source_dsn, "INSERT INTO items SELECT g, g FROM generate_series(1, 20) g")
    pull_pipeline(spec, "crm")
    [h] = target_health(spec, "crm")
    assert (h.backlog_changes, h.backlog_batches) == (20, 1) and h.backlog_age_s >= 0
    graded = {name: (passed, sev) for _, name, passed, sev, _ in
              target_evaluations(spec.pipelines["crm"], h)}
    assert graded["backlog"] == (False, WARN)
    assert graded["retry_queue"][0] and graded["dead_letters"][0]
    deliver_pipeline(spec, "crm")
    [h] = target_health(spec, "crm")
    assert h.backlog_changes == 0


@pytest.fixture
def small_wal_server(pg_tmp_path):
    """A server of our own whose slots are lost past 1 MB of retained WAL."""
    server = start_embedded(pg_tmp_path / "data", fast=True)
    try:
        execute(server.uri, "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'",
                "SELECT pg_reload_conf()")
        yield server
    finally:
        server.stop()


def test_a_lost_slot_stops_the_pipeline_and_recovery_brings_the_target_back(
        small_wal_server, monkeypatch):
    uri = small_wal_server.uri
    source, target, state = (ensure_database(uri, n) for n in ("shop", "replica", "state"))
    execute(source, "CREATE TABLE items (id int PRIMARY KEY, v int, note text)",
            "CREATE TABLE junk (id bigserial PRIMARY KEY, pad text)",
            "INSERT INTO items SELECT g, g, 'n' FROM generate_series(1, 500) g")
    spec = make_spec(monkeypatch, source_dsn=source, target_dsn=target, state_dsn=state,
                     tables=["items"])
    pull_pipeline(spec, "crm")
    execute(source, "INSERT INTO items SELECT g, g, 'n' FROM generate_series(501, 800) g")
    sync_until_idle(spec)  # 300 rows reach the target through the stream
    # The pipeline stops (its sensor is off); meanwhile the application goes on, and so much WAL
    # is written that the slot is invalidated at the next checkpoint.
    execute(source, "UPDATE items SET v = -v WHERE id <= 100",
            "DELETE FROM items WHERE id BETWEEN 501 AND 550",
            "INSERT INTO items SELECT g, g, 'late' FROM generate_series(900, 950) g")
    for _ in range(4):
        execute(source, "INSERT INTO junk (pad) SELECT repeat(md5(g::text), 40) "
                        "FROM generate_series(1, 20000) g", "SELECT pg_switch_wal()",
                "CHECKPOINT")
    assert rows(source, "SELECT wal_status FROM pg_replication_slots") == [("lost",)]
    with pytest.raises(SlotLostError) as err:
        pull_pipeline(spec, "crm")
    message = str(err.value)
    assert "wal_status 'lost'" in message and "crm_recover_job" in message, message
    assert "backfill" in message and "reconcile" in message
    state_grade, metadata = grade(spec)
    assert state_grade == "ERROR" and "recover" in metadata["problem"].text
    stop = threading.Event()

    def pump() -> None:  # the sensor and the delivery runs, back on
        while not stop.is_set():
            try:
                pull_pipeline(spec, "crm")
                deliver_pipeline(spec, "crm")
            except SlotLostError:
                pass  # until the recovery has recreated the slot
            stop.wait(0.1)

    thread = threading.Thread(target=pump)
    thread.start()
    try:
        report = recover_pipeline(spec, "crm")
    finally:
        stop.set()
        thread.join(60)
    assert report.slot_recreated
    assert report.reconciliation is not None and report.reconciliation.drift == 50  # deletes
    sync_until_idle(spec)
    assert_tables_equal(source, target, "items")
    assert grade(spec)[0] == "pass"


def test_health_sensor_reports_finished_evaluations_and_checks_run_on_demand(
        tmp_path, monkeypatch, source_dsn, target_dsn, state_dsn,
        dagster_instance: dg.DagsterInstance):
    execute(source_dsn, "CREATE TABLE items (id int PRIMARY KEY, v int)")
    monkeypatch.setenv("H_SOURCE_DSN", source_dsn)
    monkeypatch.setenv("H_TARGET_DSN", target_dsn)
    monkeypatch.setenv("H_STATE_DSN", state_dsn)
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump({
        "state": {"dsn_env": "H_STATE_DSN"},
        "pipelines": {"crm": {
            "source": {"dsn_env": "H_SOURCE_DSN"}, "tables": ["items"],
            "targets": {"reporting": {"dsn_env": "H_TARGET_DSN"}, "copy": {
                "dsn_env": "H_TARGET_DSN", "checkpoint_schema": "copy_checkpoint"}},
            "policy": {"backlog_warn": 0}, "initial_backfill": False}}}))
    spec = load_spec(path)
    pull_pipeline(spec, "crm")
    execute(source_dsn, "INSERT INTO items VALUES (1, 1)")
    pull_pipeline(spec, "crm")  # staged, not delivered: the backlog check warns
    defs = build_definitions(str(path))
    resources = {"sync": SyncEngine(spec_path=str(path))}
    sensor = defs.get_sensor_def("crm_health_sensor")
    with dg.build_sensor_context(instance=dagster_instance, resources=resources) as ctx:
        result = sensor(ctx)
    assert isinstance(result, dg.SensorResult) and not result.run_requests
    evaluations = {(e.asset_key.path[-1], e.check_name): e for e in result.asset_events}
    assert set(evaluations) == {("source", "slot_lag"), *(
        (t, c) for t in ("reporting", "copy") for c in ("backlog", "retry_queue",
                                                         "dead_letters"))}
    backlog = evaluations[("reporting", "backlog")]
    assert not backlog.passed and backlog.severity == WARN
    assert backlog.metadata["changes"].value == 1
    # On demand: the checks are executable, one at a time (the Checks tab's Execute).
    one = dg.AssetCheckKey(dg.AssetKey(["sync", "crm", "delivered", "copy"]), "dead_letters")
    ad_hoc = dg.define_asset_job("one_check", selection=dg.AssetSelection.checks(one))
    job = dg.Definitions.merge(defs, dg.Definitions(jobs=[ad_hoc])).resolve_job_def("one_check")
    run = job.execute_in_process(instance=dagster_instance, resources=resources)
    assert run.success
    [evaluation] = run.get_asset_check_evaluations()
    assert (evaluation.asset_key, evaluation.check_name, evaluation.passed) == (
        one.asset_key, "dead_letters", True)
    assert defs.resolve_job_def("crm_health_job").execute_in_process(
        instance=dagster_instance, resources=resources).success
    # No delivery run plans them: a delivery run evaluates no check.
    deliver = defs.resolve_job_def("crm_deliver_reporting_job").execute_in_process(
        instance=dagster_instance, resources=resources)
    assert deliver.success and not deliver.get_asset_check_evaluations()
