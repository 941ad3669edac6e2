"""The Dagster layer of backfill and reconciliation: the definitions exist with the right
defaults, the schedule's tick asks for the day that just ended in the spec's time zone
(``build_schedule_context``), the initial-backfill sensor launches once the slot exists, the
backfill job brings pre-existing rows, and the reconciliation job materializes drift metadata,
fails its check, repairs through the stream, and a second run is clean.

Real PostgreSQL (source, target, state); Dagster's instance is an ephemeral test one. A thread
plays the replication sensor and the delivery runs (pull + deliver) while jobs run in process.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import dagster as dg
import pytest
import yaml

from sync_pipelines.definitions import build_definitions
from sync_pipelines.defs.resources import SyncEngine
from sync_pipelines.engine.pipeline import deliver_pipeline, pull_pipeline
from sync_pipelines.engine.spec import load_spec

from .support.pipelines import assert_tables_equal, execute, pipeline_running, rows

pytestmark = pytest.mark.usefixtures("dagster_instance")


def write_spec(tmp_path: Path, monkeypatch, source_dsn, target_dsn, state_dsn,
               **reconcile) -> Path:
    monkeypatch.setenv("R_SOURCE_DSN", source_dsn)
    monkeypatch.setenv("R_TARGET_DSN", target_dsn)
    monkeypatch.setenv("R_STATE_DSN", state_dsn)
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump({
        "state": {"dsn_env": "R_STATE_DSN"},
        "pipelines": {"crm": {
            "source": {"dsn_env": "R_SOURCE_DSN"},
            "tables": {"public.accounts": {"columns": {"name": "account_name"}}},
            "targets": {"reporting": {"dsn_env": "R_TARGET_DSN"}},
            "policy": {"snapshot_chunk": 700},
            "reconcile": {"timezone": "Europe/Paris", "at": "00:30", "drift_warn": 0,
                          "drift_error": 5, "confirm_timeout_seconds": 60,
                          "start_date": "2026-01-01", **reconcile},
        }},
    }))
    return path


def resources(spec: Path) -> dict[str, object]:
    return {"sync": SyncEngine(spec_path=str(spec))}


def test_definitions_and_the_schedule_asks_for_the_day_that_ended(
        tmp_path, monkeypatch, source_dsn, target_dsn, state_dsn):
    spec = write_spec(tmp_path, monkeypatch, source_dsn, target_dsn, state_dsn)
    defs = build_definitions(str(spec))
    dg.Definitions.validate_loadable(defs)
    schedule = defs.get_schedule_def("crm_reconcile_schedule")
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    assert schedule.execution_timezone == "Europe/Paris"
    assert defs.get_sensor_def("crm_initial_backfill_sensor").default_status == (
        dg.DefaultSensorStatus.RUNNING)
    job = defs.resolve_job_def("crm_reconcile_job")
    assert job.partitions_def is not None
    paris = ZoneInfo("Europe/Paris")
    for when, day in [(datetime(2026, 11, 24, 0, 30, tzinfo=paris), "2026-11-23"),
                      (datetime(2026, 3, 29, 0, 30, tzinfo=paris), "2026-03-28")]:  # DST day
        with dg.build_schedule_context(scheduled_execution_time=when,
                                       repository_def=defs.get_repository_def()) as ctx:
            [request] = schedule.evaluate_tick(ctx).run_requests or []
        assert request.partition_key == day
    # 23:30 UTC on the 23rd is already 00:30 on the 24th in Paris: the 23rd is over there.
    with dg.build_schedule_context(
            scheduled_execution_time=datetime(2026, 11, 23, 23, 30, tzinfo=ZoneInfo("UTC")),
            repository_def=defs.get_repository_def()
    ) as ctx:
        [request] = schedule.evaluate_tick(ctx).run_requests or []
    assert request.partition_key == "2026-11-23"


def test_the_days_start_where_the_pipeline_started(tmp_path, monkeypatch, source_dsn,
                                                   target_dsn, state_dsn):
    """Without a start_date, the partitions begin the day the pipeline was first seen (not at a
    fixed old date that invites hundreds of meaningless runs)."""
    execute(source_dsn, "CREATE TABLE accounts (id int PRIMARY KEY, name text, v int)")
    spec = write_spec(tmp_path, monkeypatch, source_dsn, target_dsn, state_dsn,
                      start_date=None)
    pull_pipeline(load_spec(str(spec)), "crm")
    execute(state_dsn, "UPDATE sync_state.pipeline SET created_at = now() - interval '3 days'")
    job = build_definitions(str(spec)).resolve_job_def("crm_reconcile_job")
    assert job.partitions_def is not None
    keys = job.partitions_def.get_partition_keys()
    first = (datetime.now(ZoneInfo("Europe/Paris")) - timedelta(days=3)).date().isoformat()
    assert keys[0] == first and len(keys) <= 4, keys


def test_initial_backfill_sensor_then_job_bring_existing_rows(
        tmp_path, monkeypatch, source_dsn, target_dsn, state_dsn,
        dagster_instance: dg.DagsterInstance):
    execute(source_dsn, "CREATE TABLE accounts (id int PRIMARY KEY, name text, v int)",
            "INSERT INTO accounts SELECT g, 'a' || g, g FROM generate_series(1, 2000) g")
    spec = write_spec(tmp_path, monkeypatch, source_dsn, target_dsn, state_dsn)
    defs = build_definitions(str(spec))
    sensor = defs.get_sensor_def("crm_initial_backfill_sensor")

    def tick() -> object:
        with dg.build_sensor_context(instance=dagster_instance,
                                     resources=resources(spec)) as ctx:
            return sensor(ctx)

    assert isinstance(tick(), dg.SkipReason)  # no slot yet: watermarks would be lost
    pull_pipeline(load_spec(str(spec)), "crm")  # the replication sensor's first tick
    request = tick()
    assert isinstance(request, dg.RunRequest)
    assert request.run_key == "crm-initial-backfill-public.accounts"
    with pipeline_running(load_spec(str(spec))):
        result = defs.resolve_job_def("crm_backfill_job").execute_in_process(
            instance=dagster_instance, run_config=request.run_config,
            resources=resources(spec))
        assert result.success
        [mat] = result.asset_materializations_for_node("sync__crm__backfill")
        assert mat.metadata["rows_total"].value == 2000
        assert mat.metadata["done"].value is True
        execute(source_dsn, "UPDATE accounts SET v = -1 WHERE id = 7")
    pull_pipeline(load_spec(str(spec)), "crm")
    deliver_pipeline(load_spec(str(spec)), "crm")
    assert isinstance(tick(), dg.SkipReason)  # launched once
    assert_tables_equal(source_dsn, target_dsn, "accounts", columns="id, v", key="id")


def test_initial_backfill_runs_once_and_a_killed_run_is_resumed(
        tmp_path, monkeypatch, source_dsn, target_dsn, state_dsn,
        dagster_instance: dg.DagsterInstance):
    execute(source_dsn, "CREATE TABLE accounts (id int PRIMARY KEY, name text, v int)",
            "INSERT INTO accounts SELECT g, 'a' || g, g FROM generate_series(1, 7000) g")
    spec = write_spec(tmp_path, monkeypatch, source_dsn, target_dsn, state_dsn)
    defs = build_definitions(str(spec))
    sensor = defs.get_sensor_def("crm_initial_backfill_sensor")
    job = defs.resolve_job_def("crm_backfill_job")

    def tick() -> object:
        with dg.build_sensor_context(instance=dagster_instance,
                                     resources=resources(spec)) as ctx:
            return sensor(ctx)

    pull_pipeline(load_spec(str(spec)), "crm")
    first = tick()
    assert isinstance(first, dg.RunRequest)
    # A run of the job waits in the queue: nothing new is asked for meanwhile.
    queued = dagster_instance.create_run_for_job(job, run_config=first.run_config)
    assert "queued or starting" in str(tick())
    dagster_instance.report_run_canceled(queued)
    # The run is going (its worker holds the table's lock), three chunks in: nothing new.
    worker = subprocess.Popen(
        [sys.executable, "-m", "sync_pipelines_tests.support.backfill_worker", str(spec),
         "crm", "3"], stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout is not None and worker.stdout.readline().strip() == "stalled"
        skip = tick()
        assert isinstance(skip, dg.SkipReason) and "is running" in str(skip), skip
    finally:
        worker.kill()  # the run's process is lost: its snapshot stays "running"
        worker.wait(30)
    resume = tick()
    assert isinstance(resume, dg.RunRequest), resume
    assert resume.run_key != first.run_key
    config = resume.run_config["ops"]["sync__crm__backfill"]["config"]
    assert config == {"tables": ["public.accounts"], "restart": False}
    with pipeline_running(load_spec(str(spec))):
        result = job.execute_in_process(instance=dagster_instance,
                                        run_config=resume.run_config, resources=resources(spec))
        assert result.success
        [mat] = result.asset_materializations_for_node("sync__crm__backfill")
        table = mat.metadata["tables"].value["public.accounts"]
        # Resumed after the 3 chunks of 700 the first run had recorded: copied once.
        assert (table["resumed"], table["rows_this_run"], table["rows_total"]) == (
            True, 7000 - 2100, 7000)
    pull_pipeline(load_spec(str(spec)), "crm")
    deliver_pipeline(load_spec(str(spec)), "crm")
    assert isinstance(tick(), dg.SkipReason)
    assert_tables_equal(source_dsn, target_dsn, "accounts", columns="id, v", key="id")


def test_reconcile_job_reports_drift_repairs_it_and_a_second_run_is_clean(
        tmp_path, monkeypatch, source_dsn, target_dsn, state_dsn,
        dagster_instance: dg.DagsterInstance):
    execute(source_dsn, "CREATE TABLE accounts (id int PRIMARY KEY, name text, v int)")
    spec = write_spec(tmp_path, monkeypatch, source_dsn, target_dsn, state_dsn)
    pull_pipeline(load_spec(str(spec)), "crm")
    execute(source_dsn,
            "INSERT INTO accounts SELECT g, 'a' || g, g FROM generate_series(1, 3000) g")
    defs = build_definitions(str(spec))
    job = defs.resolve_job_def("crm_reconcile_job")
    with pipeline_running(load_spec(str(spec))):
        # Wait for the inserts to arrive, then drift by hand.
        for _ in range(300):
            if rows(target_dsn, "SELECT to_regclass('public.accounts') IS NOT NULL")[0][0] and \
                    rows(target_dsn, "SELECT count(*) FROM accounts")[0][0] == 3000:
                break
            threading.Event().wait(0.1)
        execute(target_dsn, "DELETE FROM accounts WHERE id IN (10, 2000)",
                "UPDATE accounts SET account_name = 'edited' WHERE id = 11",
                "INSERT INTO accounts (id, account_name, v) VALUES (9001, 'extra', 0)")
        execute(source_dsn, "UPDATE accounts SET v = v + 1 WHERE id BETWEEN 100 AND 120")
        first = job.execute_in_process(instance=dagster_instance, partition_key="2026-11-23",
                                       resources=resources(spec), raise_on_error=False)
        assert first.success
        [mat] = first.asset_materializations_for_node("sync__crm__reconciliation")
        md = {k: v.value for k, v in mat.metadata.items()}
        assert (md["drift_missing"], md["drift_extra"], md["drift_different"],
                md["drift_total"]) == (2, 1, 1, 4)
        sample = {(r.data["key"], r.data["kind"], r.data["fields"])
                  for r in mat.metadata["sample"].value.records}
        assert sample == {("10", "missing", ""), ("2000", "missing", ""),
                          ("9001", "extra", ""), ("11", "different", "account_name")}
        [check] = first.get_asset_check_evaluations()
        assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
        fixed = job.execute_in_process(
            instance=dagster_instance, partition_key="2026-11-22", resources=resources(spec),
            run_config={"ops": {"sync__crm__reconciliation": {"config": {"repair": True}}}})
        assert fixed.success
        for _ in range(300):  # the repair goes through the stream
            if rows(target_dsn, "SELECT count(*) FROM accounts WHERE id IN (10, 2000, 9001)"
                    )[0][0] == 2:
                break
            threading.Event().wait(0.1)
        again = job.execute_in_process(instance=dagster_instance, partition_key="2026-11-21",
                                       resources=resources(spec))
        [mat] = again.asset_materializations_for_node("sync__crm__reconciliation")
        assert mat.metadata["drift_total"].value == 0
        [check] = again.get_asset_check_evaluations()
        assert check.passed
    assert_tables_equal(source_dsn, target_dsn, "accounts", columns="id, v", key="id")
    # A target table that is gone cannot be compared: that is not a clean day.
    execute(target_dsn, "DROP TABLE accounts")
    gone = job.execute_in_process(instance=dagster_instance, partition_key="2026-11-20",
                                  resources=resources(spec))
    [check] = gone.get_asset_check_evaluations()
    assert not check.passed
    assert "reporting/public.accounts" in check.metadata["could_not_compare"].value
