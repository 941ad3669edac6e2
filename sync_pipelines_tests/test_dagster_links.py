"""The Dagster layer over a two-way link: two direction pipelines with their own assets (the
graph stays acyclic), a ``conflicts`` check per direction that warns while a key is held, and
``<link>_conflicts_job`` resolving it from launchpad config. Real PostgreSQL sides and state;
Dagster's instance is an ephemeral test one."""

from __future__ import annotations

import dagster as dg
import pytest
import yaml

from sync_pipelines.definitions import build_definitions
from sync_pipelines.defs.health import evaluate
from sync_pipelines.defs.resources import SyncEngine

from .support.links import assert_sides_equal, create_sides, drop_origins, start, sync
from .support.pipelines import execute

pytestmark = pytest.mark.usefixtures("dagster_instance")


def test_link_in_dagster(tmp_path, monkeypatch, source_dsn, target_dsn, state_dsn,
                         dagster_instance):
    a, b = source_dsn, target_dsn
    create_sides(a, b)
    monkeypatch.setenv("DL_A", a)
    monkeypatch.setenv("DL_B", b)
    monkeypatch.setenv("DL_STATE", state_dsn)
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump({
        "state": {"dsn_env": "DL_STATE"},
        "links": {"ldag": {
            "sides": [{"name": "crm", "dsn_env": "DL_A"}, {"name": "billing", "dsn_env": "DL_B"}],
            "tables": {"accounts": {"columns": {"name": "title"},
                                    "conflict": {"policy": "manual"}}}}},
    }))
    try:
        defs = build_definitions(str(path))
        dg.Definitions.validate_loadable(defs)
        jobs = {j.name for j in defs.resolve_all_job_defs()}
        assert {"ldag_crm_to_billing_deliver_billing_job",
                "ldag_billing_to_crm_deliver_crm_job", "ldag_conflicts_job"} <= jobs
        graph = defs.resolve_asset_graph()
        assert dg.AssetKey(["sync", "ldag_crm_to_billing", "delivered", "billing"]) in (
            graph.get_all_asset_keys())
        sync_res = SyncEngine(spec_path=str(path))
        spec = sync_res.spec()
        start(spec, "ldag")
        execute(a, "INSERT INTO accounts (id, name, balance) VALUES (1, 'one', 1)")
        sync(spec, "ldag")
        execute(a, "UPDATE accounts SET balance = 10 WHERE id = 1")
        execute(b, "UPDATE accounts SET balance = 20 WHERE id = 1")
        sync(spec, "ldag")
        # The check of the direction that met the conflict warns, naming the job to use.
        checks = {}
        for name in ("ldag_crm_to_billing", "ldag_billing_to_crm"):
            for _key, check, passed, severity, md in evaluate(sync_res, spec.pipelines[name]):
                if check == "conflicts":
                    checks[name] = (passed, severity, md)
        assert set(checks) == {"ldag_crm_to_billing", "ldag_billing_to_crm"}
        held = [c for c in checks.values() if c[2]["held"] == 1]
        assert held and all(not passed and sev == dg.AssetCheckSeverity.WARN
                            for passed, sev, _ in checks.values())
        assert "ldag_conflicts_job" in str(held[0][2]["next_step"])
        # The operator lists what is held (no config), then resolves it.
        job = defs.resolve_job_def("ldag_conflicts_job")
        listing = job.execute_in_process(instance=dagster_instance)
        assert listing.success
        [conflict] = _held_metadata(listing)
        result = job.execute_in_process(instance=dagster_instance, run_config={"ops": {
            "ldag_conflicts": {"config": {"resolutions": [
                {"conflict_id": conflict["conflict_id"], "take": "billing",
                 "values": {"name": "decided"}}]}}}})
        assert result.success
        final = assert_sides_equal(a, b)
        assert final[1][:2] == ("decided", 20)
        bad = job.execute_in_process(instance=dagster_instance, raise_on_error=False,
                                     run_config={"ops": {"ldag_conflicts": {"config": {
                                         "resolutions": [{"conflict_id": conflict["conflict_id"],
                                                          "take": "crm"}]}}}})
        assert not bad.success
        failure = bad.get_step_failure_events()[0].step_failure_data.error
        assert "resolved already" in failure.message
    finally:
        drop_origins(state_dsn)


def _held_metadata(result: dg.ExecuteInProcessResult) -> list[dict]:
    for event in result.all_node_events:
        if event.event_type_value == "STEP_OUTPUT":
            md = event.event_specific_data.metadata
            return md["held"].value
    return []
