"""Bounded memory (invariant 4): one 200,000-row transaction passes end to end while the
pulling and the delivering process each stay far below what holding it in memory takes.

The pull and the delivery run in fresh subprocesses (``support/memory_worker.py``), each
reporting its peak RSS (``VmHWM``). The demand budget is larger than the transaction, so a
single pull has to take all of it — the worst case for the puller. A third subprocess decodes
the whole transaction into one list, as a hold-it-all implementation would: its peak must
exceed the bound, which shows the bound can catch such an implementation.

Covers ingest (server-side cursor, chunked staging), the state store and delivery on real
PostgreSQL. Does not cover the Dagster sensor/run processes or the 1M-row case of the design
(the same code path, five times longer).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from sync_pipelines.engine.pipeline import pull_pipeline

from .support.pipelines import execute, make_spec, rows

pytestmark = pytest.mark.pg_versions

ROWS = 200_000
BATCH = 5_000
BOUND_MB = 150  # measured: pull ~65 MB, deliver ~80 MB, hold-it-all ~185 MB
REPO = Path(__file__).resolve().parents[1]


def run_worker(mode: str, spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "sync_pipelines_tests.support.memory_worker", mode,
         json.dumps(spec)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"{mode} worker failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table_digest(dsn: str) -> tuple[int, str]:
    """Row count and an md5 over every row's text form, in key order (computed server-side)."""
    return rows(dsn, "SELECT count(*), md5(string_agg(b::text, '|' ORDER BY id)) FROM big b")[0]


def test_200k_row_transaction_with_bounded_memory(monkeypatch, source_dsn, target_dsn,
                                                  state_dsn):
    execute(source_dsn, "CREATE TABLE big (id bigint PRIMARY KEY, n int, amount numeric(12, 2), "
                        "created timestamptz, label text, body text)")
    raw = {
        "state": {"dsn_env": "T_STATE_DSN"},
        "pipelines": {"crm": {
            "source": {"dsn_env": "T_SOURCE_DSN"},
            "tables": ["big"],
            "targets": {"replica": {"dsn_env": "T_TARGET_DSN"}},
            "policy": {"demand_budget": 1_000_000, "batch_size": BATCH, "fetch_chunk": 2_000},
        }},
    }
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["big"])  # sets the T_*_DSN variables
    assert pull_pipeline(spec, "crm").changes == 0  # creates the slot before the transaction
    with psycopg.connect(source_dsn) as conn:  # one transaction
        conn.execute("INSERT INTO big SELECT g, g %% 1000, g * 0.01, "
                     "'2024-01-01 00:00+00'::timestamptz + g * interval '1 second', "
                     "'label ' || g, repeat(md5(g::text), 4) FROM generate_series(1, %s) g",
                     (ROWS,))

    hold = run_worker("hold", raw)
    assert hold["changes"] == ROWS
    assert hold["peak_rss_mb"] > BOUND_MB, (
        f"the control (whole transaction in memory) peaked at {hold['peak_rss_mb']} MB, under "
        f"the {BOUND_MB} MB bound: the bound would not catch such an implementation")

    pulled = run_worker("pull", raw)
    assert pulled["changes"] == ROWS
    assert pulled["peak_rss_mb"] < BOUND_MB, (
        f"pull of a {ROWS}-row transaction peaked at {pulled['peak_rss_mb']} MB "
        f"(bound {BOUND_MB} MB; holding it all takes {hold['peak_rss_mb']} MB)")
    # Staged in chunks: many batches, none larger than two batch sizes.
    n_batches, biggest = rows(state_dsn, "SELECT count(*), max(n_changes) FROM sync_state.batch")[0]
    assert n_batches >= ROWS // (2 * BATCH) and biggest <= 2 * BATCH

    delivered = run_worker("deliver", raw)
    assert delivered["changes"] == ROWS
    assert delivered["peak_rss_mb"] < BOUND_MB, (
        f"delivery of a {ROWS}-row transaction peaked at {delivered['peak_rss_mb']} MB "
        f"(bound {BOUND_MB} MB; holding it all takes {hold['peak_rss_mb']} MB)")

    print(f"peak RSS: pull {pulled['peak_rss_mb']} MB, deliver {delivered['peak_rss_mb']} MB, "
          f"hold-it-all {hold['peak_rss_mb']} MB (bound {BOUND_MB} MB)")
    assert table_digest(target_dsn) == table_digest(source_dsn)
    assert rows(state_dsn, "SELECT count(*) FROM sync_state.batch") == [(0,)]
