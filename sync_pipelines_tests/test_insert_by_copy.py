"""New keys' raw rows COPYed straight into a PostgreSQL target, and where they must not be.

A window's rows of keys the source inserted go into the target table by one text COPY in a
savepoint (:meth:`PostgresSink._insert_by_copy`); the table refusing them (a key it already
has, a value it refuses) rolls the savepoint back and the same rows are upserted, as before.
Checked end to end on a real server, the statement that wrote each row recorded by a trigger
(``current_query()``):

* an empty target gets the inserts by COPY, hostile text (tab, newline, carriage return,
  backslash, ``\\N`` and ``\\.`` as text, empty, NULL, multi-byte) equal to the source, and a
  key inserted then updated in one window lands with its last value;
* a target that already has some of the keys ends equal to the source (the upsert's
  semantics), with no dead letter, and takes no more COPYs;
* tables where a COPY would do what the upsert does not — no unique index on the key, a
  deferrable one, a ``GENERATED ALWAYS`` identity key, row security — never get one: delivery
  behaves exactly as the upsert does (refused, nothing written).
"""

from __future__ import annotations

from contextlib import closing

import psycopg
import pytest

from sync_pipelines.engine import deliver_pipeline, pull_pipeline, target_health
from sync_pipelines.engine.delivery.sinks.registry import open_sink
from sync_pipelines.engine.errors import TerminalDeliveryError

from .support.pipelines import execute, make_spec, rows

pytestmark = pytest.mark.pg_versions

HOSTILE = ["tab\there", "new\nline\r\nend", "back\\slash\\N", "\\N", "\\.", "", None,
           "naïve — 東京 🚀", "\r", "\\"]

WRITTEN_BY = """
CREATE TABLE written_by (id bigint, statement text);
CREATE FUNCTION note_statement() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO written_by VALUES (NEW.id, split_part(ltrim(current_query()), ' ', 1));
  RETURN NEW;
END $$;
"""


def _spec(monkeypatch, source_dsn, target_dsn, state_dsn, batch_size=500):
    s = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                  state_dsn=state_dsn, tables={"notes": {}},
                  policy={"batch_size": batch_size, "retry": {"max_attempts": 1}})
    pull_pipeline(s, "crm")
    return s


def _target(target_dsn: str, ddl: str) -> None:
    execute(target_dsn, WRITTEN_BY, f"CREATE TABLE notes ({ddl})",
            "CREATE TRIGGER written_by BEFORE INSERT ON notes "
            "FOR EACH ROW EXECUTE FUNCTION note_statement()")


def _statements(target_dsn: str) -> dict[str, int]:
    return dict(rows(target_dsn, "SELECT statement, count(*) FROM written_by GROUP BY 1"))


@pytest.fixture
def source(source_dsn):
    execute(source_dsn, "CREATE TABLE notes (id bigint PRIMARY KEY, body text, n int)")
    return source_dsn


def test_new_keys_are_copied_and_equal_the_source(monkeypatch, source, target_dsn,
                                                  state_dsn):
    _target(target_dsn, "id bigint PRIMARY KEY, body text, n int, extra text DEFAULT 'd'")
    spec = _spec(monkeypatch, source, target_dsn, state_dsn, batch_size=5000)  # one window
    with closing(psycopg.connect(source)) as conn:
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO notes VALUES (%s, %s, %s)",
                            [(i, v, i) for i, v in enumerate(HOSTILE)])
        conn.execute("INSERT INTO notes SELECT g, 'row ' || g, g FROM generate_series(100, 1099) g")
        conn.execute("UPDATE notes SET body = 'changed' WHERE id = 100")  # same window
        conn.commit()
    pull_pipeline(spec, "crm")
    report = deliver_pipeline(spec, "crm")[0]
    assert report.changes == len(HOSTILE) + 1001 and report.dead_letters == 0
    assert rows(target_dsn, "SELECT id, body, n FROM notes ORDER BY id") == rows(
        source, "SELECT id, body, n FROM notes ORDER BY id")
    assert rows(target_dsn, "SELECT DISTINCT extra FROM notes") == [("d",)]  # defaults apply
    assert _statements(target_dsn) == {"COPY": len(HOSTILE) + 1000}
    # Later updates go by upsert, as before.
    execute(source, "UPDATE notes SET n = -n WHERE id < 5")
    pull_pipeline(spec, "crm")
    deliver_pipeline(spec, "crm")
    assert rows(target_dsn, "SELECT id, n FROM notes WHERE id < 5 ORDER BY id") == [
        (i, -i) for i in range(5)]


def test_keys_the_target_already_has_are_upserted(monkeypatch, source, target_dsn,
                                                  state_dsn):
    _target(target_dsn, "id bigint PRIMARY KEY, body text, n int")
    execute(target_dsn, "INSERT INTO notes SELECT g, 'stale', 0 FROM generate_series(1, 50) g",
            "TRUNCATE written_by")
    spec = _spec(monkeypatch, source, target_dsn, state_dsn)
    # Two transactions of 500: two windows (batch_size 500), the first with 50 known keys.
    execute(source, "INSERT INTO notes SELECT g, 'new ' || g, g FROM generate_series(1, 500) g")
    execute(source, "INSERT INTO notes SELECT g, 'new ' || g, g FROM generate_series(501, 1000) g")
    pull_pipeline(spec, "crm")
    report = deliver_pipeline(spec, "crm")[0]
    assert report.changes == 1000 and report.dead_letters == 0
    assert rows(target_dsn, "SELECT id, body, n FROM notes ORDER BY id") == rows(
        source, "SELECT id, body, n FROM notes ORDER BY id")
    # The refused COPY left nothing behind, and after it this sink upserts: the second
    # window's new keys too. (The upsert's BEFORE INSERT trigger fires for a known key too.)
    assert _statements(target_dsn) == {"INSERT": 1000}


@pytest.mark.parametrize("ddl, setup, refusal", [
    ("id bigint, body text, n int", "", "no unique index on the key columns"),
    ("id bigint UNIQUE DEFERRABLE, body text, n int", "", "make it NOT DEFERRABLE"),
    ("id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, body text, n int", "",
     "GENERATED ALWAYS"),
    # (the tests connect as a superuser, whom row security lets write: the upsert does)
    ("id bigint PRIMARY KEY, body text, n int",
     "ALTER TABLE notes ENABLE ROW LEVEL SECURITY; ALTER TABLE notes FORCE ROW LEVEL SECURITY",
     None),
], ids=["no-unique-index", "deferrable", "identity-always", "row-security"])
def test_tables_a_copy_would_treat_otherwise_get_none(monkeypatch, source, target_dsn,
                                                      state_dsn, ddl, setup, refusal):
    _target(target_dsn, ddl)
    if setup:
        execute(target_dsn, *setup.split("; "))
    spec = _spec(monkeypatch, source, target_dsn, state_dsn)
    with closing(open_sink(spec.pipelines["crm"], "replica")) as sink:
        sink._keys["public.notes"] = ["id"]
        assert not sink._takes_copy("public.notes", ["id"])
    execute(source, "INSERT INTO notes SELECT g, 'b', g FROM generate_series(1, 20) g")
    pull_pipeline(spec, "crm")
    if refusal is None:
        assert deliver_pipeline(spec, "crm")[0].dead_letters == 0
        assert _statements(target_dsn) == {"INSERT": 20}
        return
    try:
        report = deliver_pipeline(spec, "crm")[0]
    except TerminalDeliveryError as err:  # the upsert's own refusal, as before
        assert refusal in str(err)
    else:
        assert report.dead_letters == 20, report
        reasons = [d["reason"] for d in target_health(spec, "crm")[0].latest_dead_letters]
        assert reasons and all(refusal in r for r in reasons), reasons
    assert rows(target_dsn, "SELECT count(*) FROM written_by") == [(0,)]


def test_a_plain_table_with_a_composite_key_takes_copy(monkeypatch, source, target_dsn,
                                                       state_dsn):
    """The catalog check matches the key's columns in any order, and only exactly them."""
    _target(target_dsn, "id bigint, body text, n int, PRIMARY KEY (n, id)")
    execute(target_dsn, "CREATE TABLE wide (a int, b int, c int, UNIQUE (a, b, c))",
            'CREATE TABLE "Mixed" ("Zed" int, "alpha" int, PRIMARY KEY ("Zed", alpha))')
    spec = _spec(monkeypatch, source, target_dsn, state_dsn)
    with closing(open_sink(spec.pipelines["crm"], "replica")) as sink:
        assert sink._takes_copy("public.notes", ["id", "n"])
        assert not sink._takes_copy("public.notes", ["id"])
        assert not sink._takes_copy("public.wide", ["a", "b"])
        assert sink._takes_copy("public.Mixed", ["alpha", "Zed"])
