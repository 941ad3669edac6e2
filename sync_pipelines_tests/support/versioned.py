"""A versioned table and a target-side apply log that exposes double applies and reordering.

The source table ``items`` carries a ``version`` column that every write sets from one global
sequence, so for each key the versions grow in commit order. In the target, an
``AFTER INSERT OR UPDATE`` row trigger appends ``(id, version)`` to ``apply_log`` for every row
the sink writes. If the engine applies a change twice, the same version is logged twice; if it
applies changes of a key out of order, a smaller version follows a larger one. Either way
:func:`assert_versions_increase` fails. (Compaction may skip versions — only the final state of
a key per batch is written — which is allowed: the log must be increasing, not contiguous.)
"""

from __future__ import annotations

import random
from collections import defaultdict

import psycopg

from .pipelines import execute, rows

SOURCE_DDL = (
    "CREATE SEQUENCE item_version",
    "CREATE TABLE items (id int PRIMARY KEY, version bigint NOT NULL, qty int NOT NULL, "
    "note text)",
)

TARGET_DDL = (
    "CREATE TABLE items (id int PRIMARY KEY, version bigint NOT NULL, qty int NOT NULL, "
    "note text)",
    "CREATE TABLE apply_log (n bigserial PRIMARY KEY, id int NOT NULL, version bigint NOT NULL, "
    "op text NOT NULL)",
    """
    CREATE FUNCTION log_apply() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO apply_log (id, version, op) VALUES (NEW.id, NEW.version, TG_OP);
        RETURN NULL;
    END $$
    """,
    "CREATE TRIGGER items_log AFTER INSERT OR UPDATE ON items "
    "FOR EACH ROW EXECUTE FUNCTION log_apply()",
)


def create_versioned_tables(source_dsn: str, target_dsn: str) -> None:
    execute(source_dsn, *SOURCE_DDL)
    execute(target_dsn, *TARGET_DDL)


def fail_once_on(target_dsn: str, item_id: int) -> None:
    """Make the target raise once, mid-apply, when the sink writes row ``item_id``.

    A BEFORE trigger raises a serialization failure (SQLSTATE 40001, what a concurrent writer
    can cause for real) on the first write of that row only. "First" is remembered in a
    sequence, which — unlike a table — is not rolled back with the failed transaction.
    """
    execute(
        target_dsn,
        "CREATE SEQUENCE fail_once",
        f"""
        CREATE FUNCTION fail_once() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.id = {int(item_id)} AND nextval('fail_once') = 1 THEN
                RAISE EXCEPTION 'injected target failure on item %', NEW.id
                    USING ERRCODE = 'serialization_failure';
            END IF;
            RETURN NEW;
        END $$
        """,
        "CREATE TRIGGER items_fail_once BEFORE INSERT OR UPDATE ON items "
        "FOR EACH ROW EXECUTE FUNCTION fail_once()",
    )


def run_workload(source_dsn: str, *, transactions: int, seed: int, first_id: int = 1,
                 max_ops: int = 5) -> int:
    """Many small transactions of inserts, updates and deletes; returns the number of changes.

    Every written row gets ``version = nextval('item_version')``. Ids are reused after deletes
    (a re-insert must log a higher version than the deleted row had).
    """
    rnd = random.Random(seed)
    live: set[int] = set()
    deleted: set[int] = set()
    next_id = first_id
    changes = 0
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        for _ in range(transactions):
            with conn.transaction():
                for _ in range(rnd.randint(1, max_ops)):
                    roll = rnd.random()
                    if not live or roll < 0.35:
                        if deleted and roll < 0.08:
                            item = rnd.choice(sorted(deleted))  # re-insert a deleted key
                            deleted.discard(item)
                        else:
                            item, next_id = next_id, next_id + 1
                        conn.execute(
                            "INSERT INTO items (id, version, qty, note) "
                            "VALUES (%s, nextval('item_version'), 0, %s)",
                            (item, f"note {item}"),
                        )
                        live.add(item)
                    elif roll < 0.9:
                        item = rnd.choice(sorted(live))
                        conn.execute(
                            "UPDATE items SET version = nextval('item_version'), qty = qty + 1, "
                            "note = %s WHERE id = %s",
                            (f"note {item} {rnd.random():.6f}", item),
                        )
                    else:
                        item = rnd.choice(sorted(live))
                        conn.execute("DELETE FROM items WHERE id = %s", (item,))
                        live.discard(item)
                        deleted.add(item)
                    changes += 1
    return changes


def version_log(target_dsn: str) -> dict[int, list[int]]:
    """Per id, the versions the target was written with, in the order it was written."""
    log: dict[int, list[int]] = defaultdict(list)
    for item, version in rows(target_dsn, "SELECT id, version FROM apply_log ORDER BY n"):
        log[item].append(version)
    return dict(log)


def assert_versions_increase(target_dsn: str) -> dict[int, list[int]]:
    """Fail if any id was written twice with one version or with a smaller version later."""
    log = version_log(target_dsn)
    bad = {i: v for i, v in log.items() if any(a >= b for a, b in zip(v, v[1:], strict=False))}
    assert not bad, (
        f"{len(bad)} id(s) written twice or out of order (id: versions in apply order): "
        f"{dict(list(bad.items())[:5])}"
    )
    return log
