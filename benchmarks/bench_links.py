#!/usr/bin/env python
"""Two-way link throughput: a PostgreSQL ↔ PostgreSQL link against the one-way pipeline.

One embedded PostgreSQL 18 (fsync on) holds four databases: ``a``, ``b`` (the link's sides),
``c`` (a one-way target) and the state. Every database has ``accounts (id int PRIMARY KEY, name
text, balance int, updated_at timestamptz)``.

* **One way**: pipeline ``a → c``; N changes written on ``a`` (inserts of N/2 keys, then an
  update of each), then drained (pull + deliver until quiet). Figure: changes/s.
* **Round trip**: link ``a ↔ b`` (last_writer_wins); the same N changes, half written on ``a``
  (its keys) and half on ``b`` (its keys), and 1% of the keys then edited on both sides before
  the link delivers — conflicts. Drained both ways until quiet. Figure: changes/s over both
  directions, and the ratio to one way (target ≥ 0.8).
* **Cost of conflict checking**: delivery time per change of the link's ``a → b`` direction
  against the one-way pipeline's, in µs (the lock, the row read ``FOR UPDATE``, the base
  lookup and write, the decision).

Checks (exit 1 when wrong): ``c`` equals ``a``; ``a`` equals ``b``; the conflict log holds
exactly the keys edited on both sides.

Usage::

    python benchmarks/bench_links.py            # N = 100,000
    python benchmarks/bench_links.py --quick    # N = 10,000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from machine import machine_info  # noqa: E402

from sync_pipelines.engine import (  # noqa: E402
    deliver_pipeline,
    link_conflicts,
    parse_spec,
    pull_pipeline,
)
from sync_pipelines.engine.runtime.embedded import ensure_database, start_embedded  # noqa: E402

DDL = ("CREATE TABLE accounts (id int PRIMARY KEY, name text, balance int, "
       "updated_at timestamptz NOT NULL DEFAULT now())")
TARGET_RATIO = 0.8


def spec_doc() -> dict[str, Any]:
    policy = {"batch_size": 5000, "demand_budget": 10_000_000}
    return {
        "state": {"dsn_env": "BL_STATE"},
        "pipelines": {"oneway": {
            "source": {"dsn_env": "BL_A"}, "tables": ["accounts"],
            "targets": {"c": {"dsn_env": "BL_C"}}, "policy": policy,
            "initial_backfill": False}},
        "links": {"bench": {
            "sides": [{"name": "a", "dsn_env": "BL_A"}, {"name": "b", "dsn_env": "BL_B"}],
            "tables": {"accounts": {"conflict": {"policy": "last_writer_wins",
                                                 "timestamp": "updated_at"}}},
            "policy": policy}},
    }


def write(dsn: str, first: int, count: int, tag: str) -> None:
    """``count`` inserts from key ``first``, then an update of each, in 1,000-row transactions."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for lo in range(first, first + count, 1000):
            hi = min(first + count, lo + 1000) - 1
            conn.execute("INSERT INTO accounts (id, name, balance) SELECT g, %s || g, g "
                         "FROM generate_series(%s::int, %s::int) g", (tag, lo, hi))
        for lo in range(first, first + count, 1000):
            hi = min(first + count, lo + 1000) - 1
            conn.execute("UPDATE accounts SET balance = balance + 1 "
                         "WHERE id BETWEEN %s::int AND %s::int", (lo, hi))


def drain(spec: Any, pipelines: list[str]) -> dict[str, float]:
    """Pull and deliver until a round moves nothing; seconds spent pulling and delivering."""
    pull_s = deliver_s = 0.0
    per: dict[str, float] = {p: 0.0 for p in pipelines}
    changes = {p: 0 for p in pipelines}
    while True:
        moved = 0
        for p in pipelines:
            t0 = time.perf_counter()
            moved += pull_pipeline(spec, p).changes
            t1 = time.perf_counter()
            n = sum(r.changes for r in deliver_pipeline(spec, p))
            t2 = time.perf_counter()
            pull_s += t1 - t0
            deliver_s += t2 - t1
            per[p] += t2 - t1
            changes[p] += n
            moved += n
        if not moved:
            return {"pull_s": pull_s, "deliver_s": deliver_s,
                    **{f"deliver_s:{p}": s for p, s in per.items()},
                    **{f"delivered:{p}": float(c) for p, c in changes.items()}}


def table(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT id, name, balance, updated_at FROM accounts ORDER BY id"
                            ).fetchall()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    n = 10_000 if args.quick else 100_000
    with tempfile.TemporaryDirectory(prefix="bench-links-") as tmp:
        pg = start_embedded(Path(tmp) / "pg", fast=False)
        try:
            dsns = {}
            for db in ("a", "b", "c", "state"):
                dsns[db] = ensure_database(pg.uri, f"links_{db}")
            for db in ("a", "b", "c"):
                with psycopg.connect(dsns[db], autocommit=True) as conn:
                    conn.execute(DDL)
            os.environ.update({"BL_A": dsns["a"], "BL_B": dsns["b"], "BL_C": dsns["c"],
                               "BL_STATE": dsns["state"]})
            spec = parse_spec(spec_doc())
            a_to_b, b_to_a = "bench_a_to_b", "bench_b_to_a"
            for p in ("oneway", a_to_b, b_to_a):
                pull_pipeline(spec, p)  # slots first
            # One way: N changes on a → c.
            write(dsns["a"], 1, n // 2, "a")
            t0 = time.perf_counter()
            one = drain(spec, ["oneway"])
            one_s = time.perf_counter() - t0
            one_way_ok = table(dsns["c"]) == table(dsns["a"])
            # The link's a → b direction would now also carry a's N changes: drain it first
            # (b was empty: no conflicts), so the round trip starts from agreed sides.
            drain(spec, [a_to_b, b_to_a])
            with psycopg.connect(dsns["a"], autocommit=True) as conn:
                conn.execute("DELETE FROM accounts")
            drain(spec, [a_to_b, b_to_a])
            # Round trip: half the changes on each side; once b has a's keys, 1% of them are
            # edited on both sides before the link delivers again.
            write(dsns["a"], 1_000_001, n // 4, "a")
            write(dsns["b"], 2_000_001, n // 4, "b")
            both = list(range(1_000_001, 1_000_001 + n // 4, 100))
            t0 = time.perf_counter()
            first = drain(spec, [a_to_b, b_to_a])
            with psycopg.connect(dsns["a"], autocommit=True) as ca, psycopg.connect(
                    dsns["b"], autocommit=True) as cb:
                ca.execute("UPDATE accounts SET balance = -1, updated_at = now() "
                           "WHERE id = ANY(%s)", (both,))
                cb.execute("UPDATE accounts SET name = 'b-edit', updated_at = now() + "
                           "interval '1 s' WHERE id = ANY(%s)", (both,))
            second = drain(spec, [a_to_b, b_to_a])
            round_s = time.perf_counter() - t0
            round_changes = n + 2 * len(both)
            conflicts = link_conflicts(spec, "bench", limit=1_000_000)
            checks = {
                "one_way_target_equals_source": one_way_ok,
                "sides_equal": table(dsns["a"]) == table(dsns["b"]),
                "a_conflict_per_key_edited_on_both": sorted(
                    int(json.loads(c.key)[0]) for c in conflicts) == both,
            }
            link_deliver_us = 1e6 * (first["deliver_s:" + a_to_b] + second[
                "deliver_s:" + a_to_b]) / max(1.0, first["delivered:" + a_to_b] + second[
                    "delivered:" + a_to_b])
            one_deliver_us = 1e6 * one["deliver_s"] / n
            out = {
                "machine": machine_info(("psycopg",)), "server": pg.version, "changes": n,
                "one_way": {"seconds": round(one_s, 2), "changes_per_s": round(n / one_s)},
                "round_trip": {"seconds": round(round_s, 2), "changes": round_changes,
                               "changes_per_s": round(round_changes / round_s),
                               "conflicts": len(conflicts)},
                "ratio": round((round_changes / round_s) / (n / one_s), 3),
                "split_s": {"one_way_pull": round(one["pull_s"], 2),
                            "one_way_deliver": round(one["deliver_s"], 2),
                            "round_trip_pull": round(first["pull_s"] + second["pull_s"], 2),
                            "round_trip_deliver": round(first["deliver_s"] + second["deliver_s"],
                                                        2)},
                "deliver_us_per_change": {"one_way": round(one_deliver_us, 1),
                                          "link_a_to_b": round(link_deliver_us, 1)},
                "checks": checks,
            }
        finally:
            pg.stop()
    m = out["machine"]
    print(f"machine: {m.get('cpu_model', '?')}, {m.get('usable_cpus')} usable CPUs, "
          f"{m.get('python')}, PostgreSQL {out['server']}, fsync on")
    print(f"one way a → c: {out['one_way']['changes_per_s']:,} changes/s "
          f"({n:,} in {out['one_way']['seconds']} s)")
    print(f"round trip a ↔ b: {out['round_trip']['changes_per_s']:,} changes/s "
          f"({out['round_trip']['changes']:,} in {out['round_trip']['seconds']} s, "
          f"{out['round_trip']['conflicts']} conflicts)")
    print(f"ratio round trip / one way: {out['ratio']:.2f} (target ≥ {TARGET_RATIO})")
    sp = out["split_s"]
    print(f"time in pulls / deliveries: one way {sp['one_way_pull']} / {sp['one_way_deliver']} s,"
          f" round trip {sp['round_trip_pull']} / {sp['round_trip_deliver']} s (a round trip "
          "decodes every change twice: the other side's capture reads the link's writes and "
          "drops them by origin)")
    d = out["deliver_us_per_change"]
    print(f"delivery per change: one way {d['one_way']} µs, link a → b {d['link_a_to_b']} µs "
          f"(+{d['link_a_to_b'] - d['one_way']:.1f} µs for the conflict check)")
    for check, ok in checks.items():
        print(f"  {'ok ' if ok else 'BAD'} {check}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
