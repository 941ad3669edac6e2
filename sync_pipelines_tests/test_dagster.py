"""The Dagster layer: definitions load (and an invalid spec fails with a clear message), the
replication sensor ticks with build_sensor_context, the delivery job runs in process and
materializes its assets, a failed run is visible, and the engine never imports dagster.
Real PostgreSQL for source, target and state; Dagster's instance is an ephemeral test one."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from sync_pipelines.definitions import build_definitions
from sync_pipelines.defs.resources import SyncEngine
from sync_pipelines.engine.errors import SpecError

from .support.pipelines import assert_tables_equal, execute

ENGINE = Path(__file__).resolve().parent.parent / "sync_pipelines" / "engine"


pytestmark = pytest.mark.usefixtures("dagster_instance")


def write_spec(tmp_path: Path, monkeypatch, source_dsn, target_dsn, state_dsn, **policy) -> Path:
    monkeypatch.setenv("D_SOURCE_DSN", source_dsn)
    monkeypatch.setenv("D_TARGET_DSN", target_dsn)
    monkeypatch.setenv("D_STATE_DSN", state_dsn)
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump({
        "state": {"dsn_env": "D_STATE_DSN"},
        "pipelines": {"crm": {
            "source": {"dsn_env": "D_SOURCE_DSN"},
            "tables": {"public.accounts": {"columns": {"name": "account_name"}}},
            "targets": {"reporting": {"dsn_env": "D_TARGET_DSN"}},
            "policy": policy,
        }},
    }))
    return path


def tick(defs: dg.Definitions, instance: dg.DagsterInstance, spec: Path):
    sensor = defs.get_sensor_def("crm_replication_sensor")
    with dg.build_sensor_context(
        instance=instance, resources={"sync": SyncEngine(spec_path=str(spec))}
    ) as ctx:
        return sensor(ctx)


def test_engine_never_imports_dagster():
    offenders = []
    for path in ENGINE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "dagster"]
    assert not offenders, offenders
    assert len(list(ENGINE.rglob("*.py"))) > 10  # the walk really saw the engine


def test_definitions_load_from_spec(tmp_path, monkeypatch, source_dsn, target_dsn, state_dsn):
    spec = write_spec(tmp_path, monkeypatch, source_dsn, target_dsn, state_dsn)
    defs = build_definitions(str(spec))
    dg.Definitions.validate_loadable(defs)
    assert defs.get_sensor_def("crm_replication_sensor").default_status == (
        dg.DefaultSensorStatus.RUNNING)
    job = defs.resolve_job_def("crm_deliver_reporting_job")
    assert job.executor_def is dg.in_process_executor
    assert job.tags["sync/target"] == "crm/reporting"
    graph = defs.resolve_asset_graph()
    delivered = dg.AssetKey(["sync", "crm", "delivered", "reporting"])
    staged = dg.AssetKey(["sync", "crm", "staged"])
    assert graph.get(delivered).parent_keys == {staged}
    assert graph.get(staged).parent_keys == {dg.AssetKey(["sync", "crm", "source"])}


# Invalid specs: each must fail loading with the file, the pipeline and the field named.
BAD_SPECS = [
    # unknown filter operator
    ({"tables": {"t": {"filter": [{"column": "a", "op": "~"}]}}, "targets": {"x": {}}},
     "tables.public.t.filter.0.op"),
    # a pipeline without targets
    ({"tables": ["t"], "targets": {}}, "targets"),
    # an unknown key (typo) in a table mapping
    ({"tables": {"t": {"exlude": ["a"]}}, "targets": {"x": {}}}, "exlude"),
    # an http target naming a table the pipeline does not capture
    ({"tables": ["t"], "targets": {"api": {"kind": "http", "base_url_env": "X",
                                           "tables": {"u": {"upsert": "PUT /u/{id}"}}}}},
     "target 'api' lists table(s) public.u"),
    # an http endpoint that is not a request line
    ({"tables": ["t"], "targets": {"api": {"kind": "http", "base_url_env": "X",
                                           "tables": {"t": {"upsert": "GET t"}}}}},
     "targets.api.http.tables.public.t.upsert"),
    # a negative budget
    ({"tables": ["t"], "targets": {"x": {}}, "policy": {"demand_budget": -1}},
     "policy.demand_budget"),
]


@pytest.mark.parametrize(("body", "field"), BAD_SPECS)
def test_invalid_spec_names_file_pipeline_field(tmp_path, body, field):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"pipelines": {"crm": body}}))
    with pytest.raises(SpecError) as err:
        build_definitions(str(path))
    assert str(path) in str(err.value) and "'crm'" in str(err.value)
    assert field in str(err.value)


def test_dagster_definitions_validate_cli_reports_bad_spec(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"pipelines": {"crm": {"tables": ["t"], "targets": {}}}}))
    env = {**os.environ, "SYNC_SPEC": str(path)}
    proc = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-m",
         "sync_pipelines.definitions"],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert f"{path}: pipeline 'crm', targets: Value error, at least one target" in (
        proc.stdout + proc.stderr)


def test_sensor_ticks_and_delivery_job_runs(tmp_path, monkeypatch, source_dsn, target_dsn,
                                            state_dsn):
    execute(source_dsn, "CREATE TABLE accounts (id int PRIMARY KEY, name text, tier int)")
    spec = write_spec(tmp_path, monkeypatch, source_dsn, target_dsn, state_dsn)
    defs = build_definitions(str(spec))
    with dg.instance_for_test() as instance:
        first = tick(defs, instance, spec)  # creates publication and slot; nothing to pull
        assert isinstance(first, dg.SkipReason) and "no new changes" in first.skip_message
        execute(source_dsn,
                "INSERT INTO accounts SELECT g, 'acct ' || g, g % 3 FROM generate_series(1, 50) g",
                "UPDATE accounts SET tier = 9 WHERE id <= 10", "DELETE FROM accounts WHERE id = 50")
        result = tick(defs, instance, spec)
        assert isinstance(result, dg.SensorResult)
        [request] = result.run_requests
        assert request.run_key == "crm-reporting-batch-1"
        assert request.tags["sync/target"] == "crm/reporting"
        assert request.job_name == "crm_deliver_reporting_job"
        [staged] = result.asset_events
        assert staged.metadata["changes"].value == 61
        run = defs.resolve_job_def("crm_deliver_reporting_job").execute_in_process(
            run_config=request.run_config, instance=instance, tags=request.tags)
        assert run.success
        [mat] = run.asset_materializations_for_node("sync__crm__delivered__reporting")
        assert mat.asset_key == dg.AssetKey(["sync", "crm", "delivered", "reporting"])
        assert mat.metadata["changes"].value == 61
        assert mat.metadata["deletes"].value == 1
        assert_tables_equal(source_dsn, target_dsn, "accounts", columns="id, tier")
        names = {r[0] for r in _rows(target_dsn, "SELECT account_name FROM accounts")}
        assert "acct 1" in names
        # Nothing new: the sensor says so instead of requesting an empty run.
        again = tick(defs, instance, spec)
        assert isinstance(again, dg.SkipReason)


def test_a_steady_stream_gets_one_draining_run_not_one_run_per_batch(
        tmp_path, monkeypatch, source_dsn, target_dsn, state_dsn):
    execute(source_dsn, "CREATE TABLE accounts (id int PRIMARY KEY, name text, tier int)")
    spec = write_spec(tmp_path, monkeypatch, source_dsn, target_dsn, state_dsn)
    defs = build_definitions(str(spec))
    job = defs.resolve_job_def("crm_deliver_reporting_job")

    def draining(request: dg.RunRequest) -> bool:
        return request.run_config["ops"]["sync__crm__delivered__reporting"]["config"][
            "keep_draining"]

    cursor: list[str | None] = [None]

    def tick_with_cursor(instance: dg.DagsterInstance):  # as the daemon does
        sensor = defs.get_sensor_def("crm_replication_sensor")
        with dg.build_sensor_context(instance=instance, cursor=cursor[0], resources={
                "sync": SyncEngine(spec_path=str(spec))}) as ctx:
            result = sensor(ctx)
            cursor[0] = (result.cursor if isinstance(result, dg.SensorResult) else ctx.cursor)
        return result

    with dg.instance_for_test() as instance:
        tick_with_cursor(instance)
        execute(source_dsn, "INSERT INTO accounts VALUES (1, 'a', 1)")
        # A first batch after a quiet tick: a run that delivers what is there and ends.
        [first] = tick_with_cursor(instance).run_requests
        assert not draining(first)
        # Changes on consecutive ticks: the stream is steady, the run asked for drains it.
        execute(source_dsn, "INSERT INTO accounts VALUES (2, 'b', 1)")
        [second] = tick_with_cursor(instance).run_requests
        assert draining(second)
        # While that run is going on (started, draining), newly staged batches are its own:
        # the sensor asks for no second run.
        started = instance.create_run_for_job(job, run_config=second.run_config,
                                              tags=second.tags,
                                              status=dg.DagsterRunStatus.STARTED)
        execute(source_dsn, "INSERT INTO accounts VALUES (3, 'c', 1)")
        assert tick_with_cursor(instance).run_requests == []
        instance.report_run_canceled(started)
        # Once it ended, what it left is asked for; a quiet tick ends the steady stream.
        [third] = tick_with_cursor(instance).run_requests
        assert not draining(third)  # this tick staged nothing new: no longer steady
        run = job.execute_in_process(run_config=third.run_config, instance=instance,
                                     tags=third.tags)
        assert run.success
        assert_tables_equal(source_dsn, target_dsn, "accounts", columns="id, tier")


def test_a_backlog_beyond_the_demand_budget_gets_a_draining_run(
        tmp_path, monkeypatch, source_dsn, target_dsn, state_dsn):
    execute(source_dsn, "CREATE TABLE accounts (id int PRIMARY KEY, name text, tier int)")
    spec = write_spec(tmp_path, monkeypatch, source_dsn, target_dsn, state_dsn,
                      demand_budget=20)
    defs = build_definitions(str(spec))
    with dg.instance_for_test() as instance:
        tick(defs, instance, spec)
        execute(source_dsn, *(f"INSERT INTO accounts VALUES ({i}, 'a', 1)"  # noqa: S608
                              for i in range(1, 51)))  # 50 transactions
        # One tick stages what the budget allows; more is waiting in the slot, so the run
        # keeps taking what the next ticks stage instead of ending after 20 changes.
        [request] = tick(defs, instance, spec).run_requests
        assert request.run_config["ops"]["sync__crm__delivered__reporting"]["config"][
            "keep_draining"]


def test_failed_delivery_run_is_visible_and_redelivered(tmp_path, monkeypatch, source_dsn,
                                                        target_dsn, state_dsn):
    execute(source_dsn, "CREATE TABLE accounts (id int PRIMARY KEY, name text, tier int)")
    spec = write_spec(tmp_path, monkeypatch, source_dsn, target_dsn, state_dsn,
                      redeliver_after_seconds=5)
    defs = build_definitions(str(spec))
    job = defs.resolve_job_def("crm_deliver_reporting_job")
    with dg.instance_for_test() as instance:
        tick(defs, instance, spec)
        execute(source_dsn, "INSERT INTO accounts VALUES (1, 'a', 1)")
        [request] = tick(defs, instance, spec).run_requests
        monkeypatch.setenv("D_TARGET_DSN", "postgresql://sync@127.0.0.1:1/nowhere")
        run = job.execute_in_process(run_config=request.run_config, instance=instance,
                                     tags=request.tags, raise_on_error=False)
        assert not run.success
        failure = run.get_step_failure_events()[0].event_specific_data.user_failure_data
        assert "target 'reporting'" in failure.description
        assert "cannot connect" in failure.description
        assert failure.metadata["transient"].value is True
        # The batch is still held; once the redelivery delay passes, the sensor asks again.
        execute(state_dsn,
                "UPDATE sync_state.delivery SET requested_at = now() - interval '1 hour'")
        retry = tick(defs, instance, spec)
        [again] = retry.run_requests
        assert again.run_key.startswith("crm-reporting-redeliver-1-")
        monkeypatch.setenv("D_TARGET_DSN", target_dsn)
        assert job.execute_in_process(run_config=again.run_config, instance=instance,
                                      tags=again.tags).success
        assert _rows(target_dsn, "SELECT id, account_name FROM accounts") == [(1, "a")]


def _rows(dsn, query):
    from .support.pipelines import rows

    return rows(dsn, query)
