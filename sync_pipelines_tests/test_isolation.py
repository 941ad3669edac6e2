"""Targets are isolated: a target that is down never delays the pipeline's other targets, its
failures show against its own runs and asset only, and once it is back it catches up in order
with nothing applied twice — in the engine, and through Dagster's sensor and per-target jobs.

Real PostgreSQL: a source, two Postgres targets (one made unreachable by pointing its DSN at a
closed port on 127.0.0.1), the state DB; and the reference CRM on 127.0.0.1 as an HTTP target.
Target-side triggers (:mod:`.support.versioned`) and the CRM's received log catch double
applies and reordering. Not covered: the run queue's tag limits (dagster.yaml), which only a
daemon applies.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import yaml

from sync_pipelines.definitions import build_definitions
from sync_pipelines.defs.resources import SyncEngine
from sync_pipelines.engine import (
    deliver_target,
    delivery_backlog,
    load_spec,
    pull_pipeline,
    target_health,
)
from sync_pipelines.engine.errors import TerminalDeliveryError, TransientDeliveryError

from .support.pipelines import assert_tables_equal, execute, rows
from .support.versioned import (
    TARGET_DDL,
    assert_versions_increase,
    create_versioned_tables,
    run_workload,
)

DOWN = "postgresql://sync@127.0.0.1:1/nowhere"  # nothing listens on port 1


def write_spec(tmp_path: Path, monkeypatch, source_dsn, state_dsn, a_dsn, b_dsn, crm_url):
    monkeypatch.setenv("I_SOURCE_DSN", source_dsn)
    monkeypatch.setenv("I_STATE_DSN", state_dsn)
    monkeypatch.setenv("I_A_DSN", a_dsn)
    monkeypatch.setenv("I_B_DSN", b_dsn)
    monkeypatch.setenv("I_CRM_URL", crm_url)
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump({
        "state": {"dsn_env": "I_STATE_DSN"},
        "pipelines": {"iso": {
            "source": {"dsn_env": "I_SOURCE_DSN"},
            "tables": ["items"],
            "targets": {
                "a": {"dsn_env": "I_A_DSN"},
                "b": {"dsn_env": "I_B_DSN"},
                "api": {"kind": "http", "base_url_env": "I_CRM_URL", "concurrency": 8,
                        "tables": {"items": {"upsert": "PUT /contacts/{id}",
                                             "delete": "DELETE /contacts/{id}"}}},
            },
            "policy": {"batch_size": 5, "redeliver_after_seconds": 3600},
            "initial_backfill": False,
        }},
    }))
    return path


@pytest.fixture
def iso(tmp_path, monkeypatch, source_dsn, target_dsn, state_dsn, make_database, crm_server):
    other = make_database("t_tgt_b")
    create_versioned_tables(source_dsn, target_dsn)
    execute(other, *TARGET_DDL)
    path = write_spec(tmp_path, monkeypatch, source_dsn, state_dsn, target_dsn, other,
                      crm_server.base_url)
    pull_pipeline(load_spec(path), "iso")  # the slot
    return {"path": path, "a": target_dsn, "b": other, "source": source_dsn}


def api_versions_increase(crm_server) -> None:
    seen: dict[str, list[int]] = {}
    for w in crm_server.received()["writes"]:
        if w["method"] == "PUT" and w.get("outcome") == "applied":
            seen.setdefault(w["id"], []).append(int(w["body"]["version"]))
    bad = {k: v for k, v in seen.items() if any(x >= y for x, y in zip(v, v[1:], strict=False))}
    assert not bad, f"written twice or out of order at the API: {dict(list(bad.items())[:3])}"
    assert crm_server.received()["duplicates"] == 0


def api_matches_source(crm_server, source_dsn) -> None:
    source = {str(i): str(v) for i, v in rows(source_dsn, "SELECT id, version FROM items")}
    records = {k: r["version"] for k, r in crm_server.records("contacts").items()}
    assert records == source


def test_a_target_that_is_down_holds_up_nobody(iso, monkeypatch, crm_server):
    spec = load_spec(iso["path"])
    monkeypatch.setenv("I_A_DSN", DOWN)
    staged_while_down = 0
    for r in range(24):
        run_workload(iso["source"], transactions=4, seed=r, first_id=1000 * r + 1)
        pulled = pull_pipeline(spec, "iso")
        assert pulled.batches
        staged_while_down += len(pulled.batches)
        newest = pulled.batches[-1].batch_id
        for healthy in ("b", "api"):  # every batch of this round, in this round
            report = deliver_target(spec, "iso", healthy)
            assert report.batches and report.batches[-1] == newest, (healthy, report)
        with pytest.raises(TransientDeliveryError, match="target 'a'.*cannot connect"):
            deliver_target(spec, "iso", "a")
    assert staged_while_down >= 20
    backlog = {b.target: b for b in delivery_backlog(spec, "iso")}
    assert backlog["a"].batches == staged_while_down
    assert backlog["b"].batches == backlog["api"].batches == 0
    assert_tables_equal(iso["source"], iso["b"], "items")
    api_matches_source(crm_server, iso["source"])

    monkeypatch.setenv("I_A_DSN", iso["a"])  # the server is back
    caught_up = deliver_target(spec, "iso", "a")
    assert len(caught_up.batches) == staged_while_down
    for dsn in (iso["a"], iso["b"]):
        assert_tables_equal(iso["source"], dsn, "items")
        assert_versions_increase(dsn)
    api_versions_increase(crm_server)
    # Staged changes were kept until the last target had them, and then collected.
    assert rows(spec.state.resolve("state"), "SELECT count(*) FROM sync_state.batch") == [(0,)]


def test_through_dagster_a_failing_target_fails_only_its_own_runs(
        iso, monkeypatch, crm_server, dagster_instance: dg.DagsterInstance):
    defs = build_definitions(str(iso["path"]))
    dg.Definitions.validate_loadable(defs)
    sensor = defs.get_sensor_def("iso_replication_sensor")
    resources = {"sync": SyncEngine(spec_path=str(iso["path"]))}
    monkeypatch.setenv("I_A_DSN", DOWN)

    def tick_and_run() -> dict[str, dg.ExecuteInProcessResult]:
        with dg.build_sensor_context(instance=dagster_instance, resources=resources) as ctx:
            result = sensor(ctx)
        assert isinstance(result, dg.SensorResult), result
        runs = {}
        for rr in result.run_requests or []:
            target = rr.tags["sync/target"].split("/")[1]
            runs[target] = defs.resolve_job_def(rr.job_name).execute_in_process(
                run_config=rr.run_config, instance=dagster_instance, tags=rr.tags,
                resources=resources, raise_on_error=False)
        return runs

    for r in range(5):
        run_workload(iso["source"], transactions=4, seed=r, first_id=1000 * r + 1)
        runs = tick_and_run()
        assert set(runs) == {"a", "b", "api"}  # one run per target that has work
        for healthy in ("b", "api"):
            assert runs[healthy].success
            [mat] = runs[healthy].asset_materializations_for_node(
                f"sync__iso__delivered__{healthy}")
            assert mat.asset_key == dg.AssetKey(["sync", "iso", "delivered", healthy])
            assert mat.metadata["changes"].value > 0
        failed = runs["a"]
        assert not failed.success
        failure = failed.get_step_failure_events()[0]
        assert failure.step_key == "sync__iso__delivered__a"  # against its own asset only
        description = failure.event_specific_data.user_failure_data.description
        assert "target 'a'" in description and "cannot connect" in description
    assert_tables_equal(iso["source"], iso["b"], "items")
    api_matches_source(crm_server, iso["source"])

    monkeypatch.setenv("I_A_DSN", iso["a"])
    run_workload(iso["source"], transactions=2, seed=99, first_id=90_001)
    runs = tick_and_run()
    assert all(run.success for run in runs.values()) and "a" in runs
    for dsn in (iso["a"], iso["b"]):
        assert_tables_equal(iso["source"], dsn, "items")
        assert_versions_increase(dsn)
    api_versions_increase(crm_server)


def test_targets_that_fail_for_good_say_why_and_leave_the_others_running(
        tmp_path, monkeypatch, source_dsn, target_dsn, state_dsn, make_database,
        make_crm_server):
    """A Postgres target whose table is missing with create_tables off, and an API that
    refuses the credentials: each fails its own delivery with the reason (the variable named,
    never its value); the healthy target gets everything; nothing is dead-lettered, so fixing
    the cause is all it takes."""
    strict = make_database("t_tgt_strict")
    create_versioned_tables(source_dsn, target_dsn)
    api = make_crm_server(bearer_token="the-right-token")
    path = write_spec(tmp_path, monkeypatch, source_dsn, state_dsn, strict, target_dsn,
                      api.base_url)
    doc = yaml.safe_load(path.read_text())
    targets = doc["pipelines"]["iso"]["targets"]
    targets["a"]["create_tables"] = False
    targets["api"]["auth"] = {"bearer_token_env": "I_CRM_TOKEN"}
    path.write_text(yaml.safe_dump(doc))
    monkeypatch.setenv("I_CRM_TOKEN", "a-stale-token")
    spec = load_spec(path)
    pull_pipeline(spec, "iso")
    run_workload(source_dsn, transactions=10, seed=3)
    pull_pipeline(spec, "iso")
    with pytest.raises(TerminalDeliveryError, match="target 'a'.*public.items does not exist; "
                       "create it or set create_tables: true"):
        deliver_target(spec, "iso", "a")
    with pytest.raises(TerminalDeliveryError) as refused:
        deliver_target(spec, "iso", "api")
    assert "target 'api': the API refused the credentials (HTTP 401" in str(refused.value)
    assert "$I_CRM_TOKEN" in str(refused.value) and "stale" not in str(refused.value)
    assert deliver_target(spec, "iso", "b").changes > 0  # the healthy one is not held up
    assert_tables_equal(source_dsn, target_dsn, "items")
    health = {h.target: h for h in target_health(spec, "iso")}
    assert health["api"].dead_letters == health["api"].held == 0
    monkeypatch.setenv("I_CRM_TOKEN", "the-right-token")
    execute(strict, *TARGET_DDL)
    for t in ("a", "api"):
        assert deliver_target(spec, "iso", t).changes > 0
    assert_tables_equal(source_dsn, strict, "items")
    source = {str(i): str(v) for i, v in rows(source_dsn, "SELECT id, version FROM items")}
    assert {k: r["version"] for k, r in api.records("contacts").items()} == source
