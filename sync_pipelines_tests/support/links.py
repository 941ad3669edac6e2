"""A two-way link between two databases of the test server, and helpers to drive it.

Both sides get ``accounts (id int PRIMARY KEY, name text, balance int, updated_at
timestamptz)`` (the second side names the column ``name`` as ``title``) and an ``apply_log``
that a trigger fills on every row write the link (or anyone) makes: a change that reached a
side twice, or came back, shows there. Link names are unique per test: replication origins
are server-wide.
"""

from __future__ import annotations

import secrets
from typing import Any

from sync_pipelines.engine import SyncSpec, deliver_pipeline, parse_spec, pull_pipeline

from .pipelines import execute, rows

APPLY_LOG_DDL = (
    "CREATE TABLE apply_log (n bigserial PRIMARY KEY, id int, op text, origin text)",
    """
    CREATE FUNCTION log_apply() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO apply_log (id, op, origin) VALUES (
            CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END, TG_OP,
            pg_replication_origin_session_is_setup()::text);
        RETURN NULL;
    END $$
    """,
)
"""An ``apply_log`` of every row write, with whether it came under a replication origin."""


def logged(table: str) -> str:
    """The trigger that logs ``table``'s row writes into ``apply_log``."""
    return (f"CREATE TRIGGER {table}_log AFTER INSERT OR UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION log_apply()")


SIDE_DDL = (
    "CREATE TABLE accounts (id int PRIMARY KEY, {name} text, balance int, "
    "updated_at timestamptz NOT NULL DEFAULT now())",
    *APPLY_LOG_DDL,
    logged("accounts"),
)


def create_sides(a_dsn: str, b_dsn: str) -> None:
    execute(a_dsn, *(s.replace("{name}", "name") for s in SIDE_DDL))
    execute(b_dsn, *(s.replace("{name}", "title") for s in SIDE_DDL))


def link_spec(monkeypatch: Any, a_dsn: str, b_dsn: str, state_dsn: str, *,
              conflict: dict[str, Any] | None = None, name: str | None = None,
              policy: dict[str, Any] | None = None) -> tuple[SyncSpec, str]:
    name = name or f"l{secrets.token_hex(3)}"
    monkeypatch.setenv("L_A_DSN", a_dsn)
    monkeypatch.setenv("L_B_DSN", b_dsn)
    monkeypatch.setenv("L_STATE_DSN", state_dsn)
    spec = parse_spec({
        "state": {"dsn_env": "L_STATE_DSN"},
        "links": {name: {
            "sides": [{"name": "crm", "dsn_env": "L_A_DSN"},
                      {"name": "billing", "dsn_env": "L_B_DSN"}],
            "tables": {"accounts": {"columns": {"name": "title"}, "conflict": conflict or {
                "policy": "last_writer_wins", "timestamp": "updated_at", "priority": "crm"}}},
            "policy": policy or {},
        }},
    })
    return spec, name


def drop_origins(dsn: str) -> None:
    """Drop the test links' replication origins: each holds one of the server's few
    replication state slots (max_replication_slots) for as long as it exists."""
    for (origin,) in rows(dsn, "SELECT roname FROM pg_replication_origin WHERE roname LIKE "
                          "'sync\\_l%%\\_into\\_%%'"):
        execute(dsn, f"SELECT pg_replication_origin_drop('{origin}')")


def directions(spec: SyncSpec, name: str) -> tuple[str, str]:
    return f"{name}_crm_to_billing", f"{name}_billing_to_crm"


def start(spec: SyncSpec, name: str) -> None:
    """Create both directions' slots (a first pull), before any test write."""
    for p in directions(spec, name):
        pull_pipeline(spec, p)


def sync(spec: SyncSpec, name: str, rounds: int = 30) -> int:
    """Pull and deliver both directions until a whole round moves nothing; the rounds taken."""
    for n in range(1, rounds + 1):
        moved = 0
        for p in directions(spec, name):
            moved += pull_pipeline(spec, p).changes
            moved += sum(r.changes for r in deliver_pipeline(spec, p))
        if moved == 0:
            return n
    raise AssertionError(f"the link did not go quiet in {rounds} rounds")


def side_rows(dsn: str, name_col: str) -> dict[int, tuple[Any, ...]]:
    return {r[0]: tuple(r[1:]) for r in rows(
        dsn, f"SELECT id, {name_col}, balance, updated_at FROM accounts ORDER BY id")}  # noqa: S608


def assert_sides_equal(a_dsn: str, b_dsn: str) -> dict[int, tuple[Any, ...]]:
    a, b = side_rows(a_dsn, "name"), side_rows(b_dsn, "title")
    assert a == b, {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
    return a
