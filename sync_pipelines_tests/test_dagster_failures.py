"""The Dagster layer for failures: the retry-sweep schedule ticks (build_schedule_context), the
sweep job runs the retry_queue / dead_letters asset checks with thresholds and tables, and the
dead-letters job redrives from launchpad-style config. Real PostgreSQL and a real HTTP CRM on
127.0.0.1; an ephemeral Dagster instance."""

from __future__ import annotations

from datetime import datetime, timezone

import dagster as dg
import pytest
import yaml

from sync_pipelines.definitions import build_definitions
from sync_pipelines.defs.resources import SyncEngine
from sync_pipelines.engine import deliver_pipeline, pull_pipeline, target_health
from sync_pipelines.engine.spec import load_spec

from .support.pipelines import execute

pytestmark = pytest.mark.usefixtures("dagster_instance")


def write_spec(tmp_path, monkeypatch, source_dsn, state_dsn, base_url):
    monkeypatch.setenv("F_SOURCE_DSN", source_dsn)
    monkeypatch.setenv("F_STATE_DSN", state_dsn)
    monkeypatch.setenv("F_CRM_URL", base_url)
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump({
        "state": {"dsn_env": "F_STATE_DSN"},
        "pipelines": {"crm": {
            "source": {"dsn_env": "F_SOURCE_DSN"},
            "tables": ["contacts"],
            "targets": {"api": {"kind": "http", "base_url_env": "F_CRM_URL", "tables": {
                "contacts": {"upsert": "PUT /contacts/{id}", "delete": "DELETE /contacts/{id}"}}}},
            "policy": {"retry": {"base_delay_seconds": 0.01, "max_delay_seconds": 0.01,
                                 "jitter": 0},
                       "dead_letter_warn": 0, "dead_letter_error": 3},
        }},
    }))
    return path


def test_schedule_asks_for_the_sweep_job(tmp_path, monkeypatch, source_dsn, state_dsn,
                                         crm_server):
    defs = build_definitions(str(write_spec(tmp_path, monkeypatch, source_dsn, state_dsn,
                                            crm_server.base_url)))
    schedule = defs.get_schedule_def("crm_retry_sweep_schedule")
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    tick = datetime(2026, 11, 24, 10, 2, tzinfo=timezone.utc)
    with dg.instance_for_test() as instance:
        ctx = dg.build_schedule_context(instance=instance, scheduled_execution_time=tick)
        [request] = list(schedule.evaluate_tick(ctx).run_requests or [])
    assert schedule.job_name == "crm_retry_sweep_job"
    assert request.tags.get("sync/pipeline") is None or request.tags["sync/pipeline"] == "crm"


def test_sweep_job_checks_and_dead_letter_redrive(tmp_path, monkeypatch, source_dsn, state_dsn,
                                                  crm_server):
    execute(source_dsn, "CREATE TABLE contacts (id int PRIMARY KEY, email text, version int)")
    path = write_spec(tmp_path, monkeypatch, source_dsn, state_dsn, crm_server.base_url)
    spec = load_spec(path)
    defs = build_definitions(str(path))
    pull_pipeline(spec, "crm")
    crm_server.set_faults(poison=[{"resource": "contacts", "id": "1", "status": 422}])
    execute(source_dsn, "INSERT INTO contacts VALUES (1, 'a', 0), (2, 'b', 0)",
            "UPDATE contacts SET version = 1")
    pull_pipeline(spec, "crm")
    deliver_pipeline(spec, "crm")
    assert target_health(spec, "crm")[0].dead_letters == 2
    resources = {"sync": SyncEngine(spec_path=str(path))}
    health = defs.get_sensor_def("crm_health_sensor")

    def checks(instance: dg.DagsterInstance) -> dict[str, dg.AssetCheckEvaluation]:
        with dg.build_sensor_context(instance=instance, resources=resources) as ctx:
            result = health(ctx)
        return {e.check_name: e for e in result.asset_events
                if e.asset_key.path[-1] == "api"}

    with dg.instance_for_test() as instance:
        sweep = defs.resolve_job_def("crm_retry_sweep_job")
        result = sweep.execute_in_process(instance=instance, resources=resources)
        assert result.success
        assert not result.get_asset_check_evaluations()  # the sweep plans no checks
        found = checks(instance)
        assert found["retry_queue"].passed
        dead = found["dead_letters"]
        assert not dead.passed and dead.severity == dg.AssetCheckSeverity.WARN
        assert dead.metadata["dead_letters"].value == 2
        latest = dead.metadata["latest"].value.records
        assert len(latest) == 2 and {r.data["table"] for r in latest} == {"public.contacts"}
        # The operator fixes the API and redrives from the launchpad.
        crm_server.set_faults()
        job = defs.resolve_job_def("crm_dead_letters_job")
        run = job.execute_in_process(instance=instance, resources=resources, run_config={
            "ops": {"crm_dead_letters": {"config": {"target": "api", "action": "redrive"}}}})
        assert run.success and run.output_for_node("crm_dead_letters") == 2
        assert run.dagster_run.tags.get("sync/operator") == "crm"
        assert sweep.execute_in_process(instance=instance, resources=resources).success
        assert checks(instance)["dead_letters"].passed
    assert crm_server.records("contacts")["1"]["version"] == "1"
    # A bad action is refused with a message, not a stack trace from inside.
    with dg.instance_for_test() as instance:
        run = defs.resolve_job_def("crm_dead_letters_job").execute_in_process(
            instance=instance, resources=resources, raise_on_error=False, run_config={
                "ops": {"crm_dead_letters": {"config": {"target": "nope"}}}})
        assert not run.success
        failure = run.get_step_failure_events()[0].event_specific_data.user_failure_data
        assert "has no target 'nope'" in failure.description
