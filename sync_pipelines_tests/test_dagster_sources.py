"""The Dagster layer over the push and poll sources: definitions load (no backfill or
reconciliation for them), the replication sensor polls the API or reports what the receiver
staged (one materialization of ``staged`` per tick, with the webhooks counted), asks for each
target's delivery run, and the run brings the target level. Real PostgreSQL, the reference
CRM and the receiver on 127.0.0.1; Dagster's instance is an ephemeral test one."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import yaml

from sync_pipelines.definitions import build_definitions
from sync_pipelines.defs.resources import SyncEngine
from sync_pipelines.engine import load_spec

from .support.crm_api import batch_put
from .support.pipelines import rows
from .support.receiver import SECRET, ReceiverServer, event, sign

pytestmark = pytest.mark.usefixtures("dagster_instance")

CONTACTS = {"key": ["id"], "fields": {"id": {"path": "id", "required": True},
                                      "version": {"path": "version", "type": "int"},
                                      "email": "email"}}


def write_spec(tmp_path: Path, monkeypatch, state_dsn, target_dsn, source) -> Path:
    monkeypatch.setenv("S_STATE_DSN", state_dsn)
    monkeypatch.setenv("S_TARGET_DSN", target_dsn)
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump({
        "state": {"dsn_env": "S_STATE_DSN"},
        "pipelines": {"app": {
            "source": source, "tables": list(source["records"]),
            "targets": {"reporting": {"dsn_env": "S_TARGET_DSN"}},
            "initial_backfill": False,
        }},
    }))
    return path


def tick(defs, instance, spec_path):
    """One sensor tick, given the cursor the last one left (as the daemon does)."""
    sensor = defs.get_sensor_def("app_replication_sensor")
    with dg.build_sensor_context(instance=instance, cursor=_cursors.get(str(spec_path)),
                                 resources={"sync": SyncEngine(spec_path=str(spec_path))}) as ctx:
        result = sensor(ctx)
        if isinstance(result, dg.SensorResult) and result.cursor is not None:
            _cursors[str(spec_path)] = result.cursor
        return result


_cursors: dict[str, str] = {}


def run_requested(defs, instance, result) -> None:
    assert isinstance(result, dg.SensorResult), result
    [request] = result.run_requests
    assert request.job_name == "app_deliver_reporting_job"
    job = defs.resolve_job_def(request.job_name)
    assert job.execute_in_process(instance=instance, run_config=request.run_config,
                                  tags=request.tags,
                                  resources={"sync": SyncEngine(spec_path=str(
                                      _spec_of[id(defs)]))}).success


_spec_of: dict[int, Path] = {}


def test_poll_source_in_dagster(tmp_path, monkeypatch, state_dsn, target_dsn, crm_server,
                                dagster_instance):
    monkeypatch.setenv("S_CRM_URL", crm_server.base_url)
    spec = write_spec(tmp_path, monkeypatch, state_dsn, target_dsn, {
        "kind": "http_poll", "base_url_env": "S_CRM_URL", "records": {"crm.contacts": {
            "key": ["id"], "fields": {**CONTACTS["fields"], "updated_at": {
                "path": "updated_at", "type": "timestamptz"}},
            "list": "GET /contacts", "updated_at": "updated_at",
            "delete_when": {"field": "deleted", "equals": True}}}})
    defs = build_definitions(str(spec))
    _spec_of[id(defs)] = spec
    dg.Definitions.validate_loadable(defs)
    names = {j.name for j in defs.resolve_all_job_defs()}
    assert "app_deliver_reporting_job" in names
    assert not any("backfill" in n or "reconcile" in n for n in names), names
    source = defs.resolve_assets_def(dg.AssetKey(["sync", "app", "source"]))
    assert "polled from the API" in (source.descriptions_by_key[
        dg.AssetKey(["sync", "app", "source"])] or "")
    batch_put(crm_server, [{"id": str(i), "version": 1, "email": f"c{i}@x"}
                           for i in range(1, 26)])
    result = tick(defs, dagster_instance, spec)
    [mat] = result.asset_events
    assert mat.asset_key == dg.AssetKey(["sync", "app", "staged"])
    assert mat.metadata["changes"].value == 25
    run_requested(defs, dagster_instance, result)
    assert rows(target_dsn, "SELECT count(*) FROM crm.contacts")[0][0] == 25
    delivered = dagster_instance.get_latest_materialization_event(
        dg.AssetKey(["sync", "app", "delivered", "reporting"]))
    assert delivered is not None
    assert delivered.asset_materialization.metadata["changes"].value == 25


def test_webhook_source_in_dagster(tmp_path, monkeypatch, state_dsn, target_dsn,
                                   dagster_instance):
    monkeypatch.setenv("S_SECRET", SECRET)
    spec = write_spec(tmp_path, monkeypatch, state_dsn, target_dsn, {
        "kind": "webhook", "secret_env": "S_SECRET", "records": {"contacts": {
            **CONTACTS, "data": "data", "event_types": ["contact.*"]}}})
    defs = build_definitions(str(spec))
    _spec_of[id(defs)] = spec
    dg.Definitions.validate_loadable(defs)
    with ReceiverServer(load_spec(str(spec))) as receiver:
        for i in range(3):
            body = event("contact.updated", {"id": str(i), "version": 1, "email": "e"})
            assert receiver.post("app", body, sign(SECRET, f"w{i}", body)).status_code == 202
    result = tick(defs, dagster_instance, spec)
    [mat] = result.asset_events
    assert mat.metadata["webhooks"].value == 3
    assert mat.metadata["webhooks_by_table"].value == {"public.contacts": 3}
    run_requested(defs, dagster_instance, result)
    assert rows(target_dsn, "SELECT count(*) FROM contacts")[0][0] == 3
    # The next tick has nothing new to report: the cursor moved past those batches.
    assert isinstance(tick(defs, dagster_instance, spec), dg.SkipReason)
