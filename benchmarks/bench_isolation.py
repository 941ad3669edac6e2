#!/usr/bin/env python
"""Target isolation: a healthy target's delivery rate with another target up, and with it down.

One pipeline, one source table, four Postgres targets on one embedded server, and the same
staged changes for all of them (pulled once, kept staged until every target has them):

* phase **both up**: targets ``up_a`` and ``up_b`` are delivered at once, each by its own
  process (as two Dagster runs would be); the figure is ``up_b``'s changes/s;
* phase **one down**: ``down_a``'s DSN points at a closed port and its process keeps trying
  (a failing run every second, as the sensor would ask for one); ``down_b`` is delivered at
  the same time; the figure is ``down_b``'s changes/s.

The ratio one-down / both-up is the target (≥ 0.9): a target that is down must not slow the
others. Both phases run in the same run on the same staged data, so the ratio is not at the
mercy of this shared machine's speed of the day. At the end ``down_a`` is brought back and
catches up; every target must equal the source.

Usage::

    python benchmarks/bench_isolation.py            # 200,000 changes
    python benchmarks/bench_isolation.py --quick    # 20,000 changes, for CI (checks answers)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
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
    SyncError,
    deliver_target,
    delivery_backlog,
    parse_spec,
    pull_pipeline,
)
from sync_pipelines.engine.runtime.embedded import ensure_database, start_embedded  # noqa: E402

TARGETS = ("up_a", "up_b", "down_a", "down_b")
DOWN = "postgresql://bench@127.0.0.1:1/nowhere"
TARGET_RATIO = 0.9


def spec_doc() -> dict[str, Any]:
    return {
        "state": {"dsn_env": "ISO_STATE_DSN"},
        "pipelines": {"iso": {
            "source": {"dsn_env": "ISO_SOURCE_DSN"},
            "tables": ["events"],
            "targets": {t: {"dsn_env": f"ISO_{t.upper()}_DSN"} for t in TARGETS},
            "policy": {"demand_budget": 10_000_000, "batch_size": 5_000},
            "initial_backfill": False,
        }},
    }


def drain(target: str, env: dict[str, str], out: Any) -> None:
    """Deliver ``target`` until it has nothing left; report changes and seconds."""
    os.environ.update(env)
    spec = parse_spec(spec_doc())
    started = time.monotonic()
    changes = 0
    while True:
        report = deliver_target(spec, "iso", target)
        changes += report.changes
        if not report.batches:
            break
    out.put((target, changes, time.monotonic() - started))


def keep_failing(target: str, env: dict[str, str], stop: Any, out: Any) -> None:
    """A target that is down: a delivery attempt every second until told to stop."""
    os.environ.update(env)
    spec = parse_spec(spec_doc())
    attempts = failures = 0
    while not stop.is_set():
        attempts += 1
        try:
            deliver_target(spec, "iso", target)
        except SyncError:
            failures += 1
        stop.wait(1.0)
    out.put((target, attempts, failures))


def digest(dsn: str) -> tuple[int, str | None]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*), md5(string_agg(e::text, ',' ORDER BY id)) "
                           "FROM events e").fetchone()
        assert row is not None
        return int(row[0]), row[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n = 20_000 if args.quick else 200_000
    tmp = Path(tempfile.mkdtemp(prefix="bench-iso-"))
    pg = start_embedded(tmp / "pg", fast=False)
    try:
        env = {"ISO_SOURCE_DSN": ensure_database(pg.uri, "source"),
               "ISO_STATE_DSN": ensure_database(pg.uri, "state")}
        for t in TARGETS:
            env[f"ISO_{t.upper()}_DSN"] = ensure_database(pg.uri, f"t_{t}")
        os.environ.update(env)
        with psycopg.connect(env["ISO_SOURCE_DSN"], autocommit=True) as conn:
            conn.execute("CREATE TABLE events (id bigint PRIMARY KEY, kind text, v int, "
                         "note text)")
        spec = parse_spec(spec_doc())
        pull_pipeline(spec, "iso")  # the slot
        with psycopg.connect(env["ISO_SOURCE_DSN"], autocommit=True) as conn:
            for start in range(0, n, 1_000):  # 1,000-row transactions: 75% inserts, 25% updates
                with conn.transaction():
                    conn.execute("INSERT INTO events SELECT g, 'k' || (g %% 7), 0, "
                                 "repeat('x', 40) FROM generate_series(%s::bigint, %s) g",
                                 (start + 1, start + 750))
                    conn.execute("UPDATE events SET v = v + 1 WHERE id BETWEEN %s AND %s",
                                 (start + 1, start + 250))
        staged = 0
        while (r := pull_pipeline(spec, "iso")).changes:
            staged += r.changes
        print(f"staged {staged:,} changes for {len(TARGETS)} targets", file=sys.stderr)
        ctx = mp.get_context("spawn")
        out = ctx.Queue()

        # Phase 1: both up, delivered at once.
        procs = [ctx.Process(target=drain, args=(t, env, out)) for t in ("up_a", "up_b")]
        for p in procs:
            p.start()
        up = {t: (c, s) for t, c, s in (out.get(timeout=3600) for _ in procs)}
        for p in procs:
            p.join()

        # Phase 2: down_a is down and keeps failing while down_b is delivered.
        down_env = {**env, "ISO_DOWN_A_DSN": DOWN}
        stop = ctx.Event()
        failing = ctx.Process(target=keep_failing, args=("down_a", down_env, stop, out))
        failing.start()
        time.sleep(1.5)  # it is failing already when the healthy delivery starts
        healthy = ctx.Process(target=drain, args=("down_b", env, out))
        healthy.start()
        first = out.get(timeout=3600)
        healthy.join()
        stop.set()
        second = out.get(timeout=60)
        failing.join()
        results = {first[0]: first, second[0]: second}
        _, down_changes, down_s = results["down_b"]
        _, attempts, failures = results["down_a"]

        # down_a is back: it catches up, and every target equals the source.
        backlog = {b.target: b for b in delivery_backlog(spec, "iso")}
        behind = backlog["down_a"].changes
        caught = ctx.Process(target=drain, args=("down_a", env, out))
        caught.start()
        _, caught_changes, caught_s = out.get(timeout=3600)
        caught.join()
        source = digest(env["ISO_SOURCE_DSN"])
        equal = {t: digest(env[f"ISO_{t.upper()}_DSN"]) == source for t in TARGETS}

        up_rate = up["up_b"][0] / up["up_b"][1]
        down_rate = down_changes / down_s
        ratio = down_rate / up_rate
        res = {
            "machine": machine_info(("dagster", "psycopg")),
            "load_average": os.getloadavg(),
            "changes": staged,
            "both_up": {"up_b_changes_per_s": round(up_rate), "up_a_changes_per_s":
                        round(up["up_a"][0] / up["up_a"][1])},
            "one_down": {"down_b_changes_per_s": round(down_rate),
                         "down_a_attempts": attempts, "down_a_failures": failures},
            "ratio_one_down_to_both_up": round(ratio, 3),
            "caught_up": {"changes": caught_changes, "behind_before": behind,
                          "changes_per_s": round(caught_changes / caught_s)},
            "targets_equal_source": equal,
        }
        m = res["machine"]
        print(f"machine: {m.get('cpu_model')}, {m.get('usable_cpus')} CPUs, "
              f"{m.get('ram_gb')} GB, load average {res['load_average'][0]:.2f}; "
              f"git {m.get('git')}")
        print(f"{staged:,} staged changes (75% inserts, 25% updates, 1,000-row transactions), "
              "4 Postgres targets on one embedded PostgreSQL 18")
        print(f"both up:  healthy target {up_rate:,.0f} changes/s "
              f"(its neighbour {res['both_up']['up_a_changes_per_s']:,}/s at the same time)")
        print(f"one down: healthy target {down_rate:,.0f} changes/s while the other failed "
              f"{failures}/{attempts} delivery attempts")
        print(f"ratio one down / both up: {ratio:.2f} (target ≥ {TARGET_RATIO})")
        print(f"the down target, back: caught up {caught_changes:,} changes "
              f"({caught_changes / caught_s:,.0f}/s); targets equal to source: {equal}")
        out_dir = HERE / "results"
        out_dir.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        path = out_dir / f"isolation_{stamp}{'-quick' if args.quick else ''}.json"
        path.write_text(json.dumps(res, indent=2, default=str))
        print(f"results written to {path}")
        ok = all(equal.values()) and failures == attempts and caught_changes == behind
        return 0 if ok else 1
    finally:
        pg.stop()


if __name__ == "__main__":
    sys.exit(main())
