#!/usr/bin/env python
"""Push and poll sources: what the webhook receiver accepts per second, how fast it answers,
and how fast the poller reads an API — each against a ceiling measured in the same run.

* **Async webhooks.** N concurrent senders (keep-alive connections) post signed Standard
  Webhooks to ``sync-pipelines serve`` (its own process, one uvicorn worker, as deployed); the
  figures are accepted webhooks/s and the ack latency p50/p99. The **ceiling** is a bare
  starlette endpoint on uvicorn, same machine, same senders, same bodies, that only inserts the
  body into a table in one transaction (a pool of async psycopg connections, one per sender) —
  no signature check, no parsing, no dedup. Target: receiver / ceiling ≥ 0.7.
* **Sync request/reply.** One sender, ``Prefer: wait=10``, on an idle pipeline with a
  PostgreSQL target: latency p50/p95 of an answer that carries the target's outcome.
* **Poller.** The reference CRM (its own process) holds R contacts; the figure is rows/s of
  polls (``updated_since`` pages, hash dedup, staging with the cursor) from an empty cursor to
  the end. Its ceiling is the same pages fetched with the same client, thrown away.

Every answer is checked (every accepted webhook staged once, every synchronous answer
"delivered", every polled row staged once); a wrong answer exits 1.

Usage::

    python benchmarks/bench_ingest.py            # 6,000 webhooks × 2 sides, 20,000 rows
    python benchmarks/bench_ingest.py --quick    # a smoke run, checks answers
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from machine import machine_info  # noqa: E402

from sync_pipelines.engine import load_spec  # noqa: E402
from sync_pipelines.engine.capture.poller import poll  # noqa: E402
from sync_pipelines.engine.delivery.sinks.http_wire import (  # noqa: E402
    Connection,
    Origin,
    header_block,
    request_bytes,
)
from sync_pipelines.engine.pipeline import open_state  # noqa: E402
from sync_pipelines.engine.runtime.embedded import ensure_database, start_embedded  # noqa: E402

SECRET = "whsec_" + "YmVuY2gtaW5nZXN0LXNpZ25pbmcta2V5LTMyLWJ5dGVz"
TARGET_RATIO = 0.7
PY_SPY = ""


# -- processes -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def serving(argv: list[str], url: str, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{argv[2:4]} exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{argv} did not start") from None
                time.sleep(0.05)
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes its profile on SIGINT
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def ceiling_app(dsn: str, pool_size: int) -> Any:
    """The bare endpoint: the body into a table, one transaction per request."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    pool: asyncio.Queue[psycopg.AsyncConnection[Any]] = asyncio.Queue()

    async def ingest(request: Request) -> JSONResponse:
        body = await request.body()
        conn = await pool.get()
        try:
            await conn.execute("INSERT INTO inbox (body) VALUES (%s)", (body,))
        finally:
            pool.put_nowait(conn)
        return JSONResponse({"ok": True}, status_code=202)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({})

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        for _ in range(pool_size):
            pool.put_nowait(await psycopg.AsyncConnection.connect(dsn, autocommit=True))
        yield

    return Starlette(routes=[Route("/ingest/bench", ingest, methods=["POST"]),
                             Route("/healthz", health)], lifespan=lifespan)


def run_ceiling(port: int, dsn: str, pool_size: int) -> None:
    import uvicorn

    uvicorn.run(ceiling_app(dsn, pool_size), host="127.0.0.1", port=port, log_level="warning",
                access_log=False)


# -- senders ---------------------------------------------------------------------------------


def signed(n: int, prefix: str) -> list[tuple[bytes, dict[str, str]]]:
    from standardwebhooks import Webhook

    hook = Webhook(SECRET)
    now = dt.datetime.now(dt.timezone.utc)
    out = []
    for i in range(n):
        body = json.dumps({"type": "item.updated", "data": {
            "id": i, "version": 1, "qty": i % 97, "note": f"item {i} of {prefix}"}},
            separators=(",", ":"))
        wid = f"{prefix}-{i}"
        out.append((body.encode(), {
            "webhook-id": wid, "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": hook.sign(wid, now, body), "content-type": "application/json"}))
    return out


async def blast(url: str, requests: list[tuple[bytes, dict[str, str]]], senders: int
                ) -> dict[str, Any]:
    """``senders`` concurrent keep-alive senders share the requests; each waits for its
    answer before sending the next. The senders use the HTTP sink's own HTTP/1.1 wire
    (``http_wire``, ~0.1 ms of CPU per request) rather than httpx (~2–3 ms here): on two cores
    the sender shares the CPU with the server it measures, and an expensive sender would
    compress every ratio toward 1."""
    origin = Origin.parse(url.rsplit("/ingest/", 1)[0])
    path = "/ingest/" + url.rsplit("/ingest/", 1)[1]
    fixed = header_block([("Host", origin.host_header)])
    wire = [request_bytes("POST", path, fixed, header_block(list(headers.items())), body)
            for body, headers in requests]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    queue = iter(wire)

    async def sender() -> None:
        conn = await Connection.open(origin, None, keep=4096, body_cap=1 << 20)
        try:
            for request in queue:
                t0 = time.perf_counter()
                if not conn.reusable:
                    conn = await Connection.open(origin, None, keep=4096, body_cap=1 << 20)
                r = await conn.exchange(request)
                latencies.append(time.perf_counter() - t0)
                statuses[r.status] = statuses.get(r.status, 0) + 1
        finally:
            conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(senders)))
    wall = time.perf_counter() - started
    latencies.sort()
    accepted = sum(v for k, v in statuses.items() if 200 <= k < 300)
    return {"accepted": accepted, "statuses": statuses, "wall_s": round(wall, 3),
            "per_s": round(accepted / wall, 1),
            "p50_ms": round(1000 * latencies[len(latencies) // 2], 2),
            "p99_ms": round(1000 * latencies[int(len(latencies) * 0.99)], 2)}


# -- the three measurements ------------------------------------------------------------------


def measure(url: str, pid: int, warm: int, n: int, prefix: str, senders: int
            ) -> dict[str, Any]:
    """A warm-up, then ``n`` requests; with the CPU the server and this sender spent on them."""
    asyncio.run(blast(url, signed(warm, "warm"), senders))
    requests = signed(n, prefix)
    server0, client0 = cpu_seconds(pid), time.process_time()
    result = asyncio.run(blast(url, requests, senders))
    result["server_cpu_ms_per_request"] = round(1000 * (cpu_seconds(pid) - server0) / n, 3)
    result["sender_cpu_ms_per_request"] = round(1000 * (time.process_time() - client0) / n, 3)
    return result


def bench_webhooks(env: dict[str, str], spec_path: Path, ceiling_dsn: str, state_dsn: str,
                   n: int, senders: int) -> dict[str, Any]:
    warm = max(200, n // 20)
    port_r, port_c = _free_port(), _free_port()
    results: dict[str, Any] = {}
    argv = [sys.executable, "-m", "sync_pipelines.cli", "serve", "--spec", str(spec_path),
            "--port", str(port_r)]
    if PY_SPY:  # a wall-clock profile of the receiver (pip install py-spy)
        argv = ["py-spy", "record", "-o", PY_SPY, "-f", "speedscope", "--", *argv]
    with serving(argv, f"http://127.0.0.1:{port_r}/healthz", env) as proc:
        results["receiver"] = measure(f"http://127.0.0.1:{port_r}/ingest/bench", proc.pid,
                                      warm, n, "r", senders)
    with serving([sys.executable, __file__, "--ceiling-server", str(port_c), ceiling_dsn,
                  str(senders)], f"http://127.0.0.1:{port_c}/healthz", env) as proc:
        results["ceiling"] = measure(f"http://127.0.0.1:{port_c}/ingest/bench", proc.pid,
                                     warm, n, "c", senders)
    with psycopg.connect(state_dsn) as conn:
        receipts = conn.execute("SELECT count(*) FROM sync_state.webhook_receipt WHERE "
                                "webhook_id LIKE 'r-%'").fetchone()[0]
        staged = conn.execute("SELECT coalesce(sum(n_changes), 0) FROM sync_state.batch "
                              "WHERE pipeline = 'bench'").fetchone()[0]
    with psycopg.connect(ceiling_dsn) as conn:
        inbox = conn.execute("SELECT count(*) FROM inbox").fetchone()[0]
    results["checks"] = {
        "every_accepted_webhook_has_a_receipt": receipts == results["receiver"]["accepted"] == n,
        "every_webhook_staged_once": int(staged) == n + warm,
        "ceiling_stored_every_body": inbox == n + warm,
    }
    results["ratio"] = round(results["receiver"]["per_s"] / results["ceiling"]["per_s"], 3)
    return results


def bench_sync(env: dict[str, str], spec_path: Path, target_dsn: str, n: int) -> dict[str, Any]:
    port = _free_port()
    latencies, outcomes = [], {}
    with serving([sys.executable, "-m", "sync_pipelines.cli", "serve", "--spec", str(spec_path),
                  "--port", str(port)], f"http://127.0.0.1:{port}/healthz", env), httpx.Client(
            base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        # Its own pipeline and target: the async phase's staged changes are another's.
        for body, headers in signed(n + 5, "s"):
            t0 = time.perf_counter()
            r = client.post("/ingest/sync", content=body, headers={**headers,
                                                                   "prefer": "wait=10"})
            latencies.append(time.perf_counter() - t0)
            status = (r.status_code, r.json().get("targets", {}).get("replica", {}).get(
                "status"))
            outcomes[status] = outcomes.get(status, 0) + 1
    lat = sorted(latencies[5:])  # the first few open connections and warm the sink
    with psycopg.connect(target_dsn) as conn:
        rows = conn.execute("SELECT count(*) FROM items").fetchone()[0]
    return {"requests": n, "p50_ms": round(1000 * statistics.median(lat), 1),
            "p95_ms": round(1000 * lat[int(len(lat) * 0.95)], 1),
            "outcomes": {f"{k[0]} {k[1]}": v for k, v in outcomes.items()},
            "checks": {"every_answer_delivered": outcomes.get((200, "delivered")) == n + 5,
                       "target_has_every_row": rows == n + 5}}


def bench_poll(env: dict[str, str], spec_path: Path, rows: int) -> dict[str, Any]:
    port = _free_port()
    crm = f"http://127.0.0.1:{port}"
    env = {**env, "BENCH_CRM_URL": crm}
    os.environ["BENCH_CRM_URL"] = crm
    with serving([sys.executable, "-m", "sync_pipelines.crm_service", "--port", str(port),
                  "--log-level", "warning"], f"{crm}/contacts", env), httpx.Client(
            base_url=crm, timeout=30) as client:
        for start in range(0, rows, 1000):
            client.post("/contacts/batch", headers={"Idempotency-Key": f"b{start}"}, json={
                "upserts": [{"id": str(i), "version": 1, "email": f"c{i}@example.com",
                             "name": f"Contact {i}"} for i in range(start, min(rows,
                                                                                start + 1000))]
            }).raise_for_status()
        spec = load_spec(str(spec_path))
        pipeline = spec.pipelines["polled"]
        # Ceiling: the same pages, the same client, nothing done with them.
        t0 = time.perf_counter()
        fetched, cursor = 0, None
        while True:
            params: dict[str, Any] = {"updated_since": "1970-01-01T00:00:00+00:00",
                                      "limit": pipeline.source.page_size}
            if cursor:
                params["cursor"] = cursor
            page = client.get("/contacts", params=params).json()
            fetched += len(page["items"])
            cursor = page.get("next_cursor")
            if not cursor:
                break
        ceiling_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        staged = 0
        with open_state(spec) as state:
            while True:
                report = poll(state, pipeline, client=client, force=True)
                staged += report.staged
                if not report.more:
                    break
            poll_s = time.perf_counter() - t0
            again = poll(state, pipeline, client=client, force=True)  # the overlap: nothing new
    return {"rows": rows, "rows_per_s": round(staged / poll_s), "ceiling_rows_per_s": round(
        fetched / ceiling_s), "ratio": round((staged / poll_s) / (fetched / ceiling_s), 3),
        "checks": {"every_row_staged_once": staged == rows == fetched,
                   "a_repeat_poll_stages_nothing": again.staged == 0}}


# -- main --------------------------------------------------------------------------------------


def spec_doc() -> dict[str, Any]:
    items = {"key": ["id"], "data": "data", "event_types": ["item.*"],
             "fields": {"id": {"path": "id", "type": "int", "required": True},
                        "version": {"path": "version", "type": "int"},
                        "qty": {"path": "qty", "type": "int"}, "note": "note"}}
    return {
        "state": {"dsn_env": "BENCH_STATE_DSN"},
        "pipelines": {
            "bench": {"source": {"kind": "webhook", "secret_env": "BENCH_SECRET",
                                 "records": {"items": items}},
                      "tables": ["items"], "targets": {"replica": {"dsn_env": "BENCH_SINK_DSN"}},
                      "policy": {"demand_budget": 10_000_000}},
            "sync": {"source": {"kind": "webhook", "secret_env": "BENCH_SECRET",
                                "records": {"items": items}},
                     "tables": ["items"], "targets": {"replica": {"dsn_env": "BENCH_TARGET_DSN"}}},
            "polled": {"source": {"kind": "http_poll", "base_url_env": "BENCH_CRM_URL",
                                  "page_size": 500, "max_pages": 10_000, "records": {
                                      "crm.contacts": {
                                          "list": "GET /contacts", "updated_at": "updated_at",
                                          "key": ["id"], "fields": {
                                              "id": {"path": "id", "required": True},
                                              "version": {"path": "version", "type": "int"},
                                              "email": "email", "name": "name",
                                              "updated_at": {"path": "updated_at",
                                                             "type": "timestamptz"}}}}},
                       "tables": ["crm.contacts"],
                       "targets": {"replica": {"dsn_env": "BENCH_TARGET_DSN"}},
                       "policy": {"demand_budget": 10_000_000}},
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--senders", type=int, default=16)
    parser.add_argument("--ceiling-server", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--py-spy", metavar="FILE", help="profile the receiver into FILE")
    args = parser.parse_args()
    global PY_SPY
    PY_SPY = args.py_spy or ""
    if args.ceiling_server:
        port, dsn, pool = args.ceiling_server
        run_ceiling(int(port), dsn, int(pool))
        return 0
    n_hooks, n_sync, n_rows = (600, 30, 3000) if args.quick else (6000, 200, 20_000)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        pg = start_embedded(Path(tmp) / "pg", fast=False)
        try:
            dsns = {}
            for db in ("state", "sink", "target", "ceiling"):
                ensure_database(pg.uri, f"ingest_{db}")
                dsns[db] = pg.dsn(f"ingest_{db}")
            with psycopg.connect(dsns["ceiling"], autocommit=True) as conn:
                conn.execute("CREATE TABLE inbox (id bigserial PRIMARY KEY, body bytea NOT NULL, "
                             "received_at timestamptz NOT NULL DEFAULT now())")
            env = {**os.environ, "BENCH_STATE_DSN": dsns["state"], "BENCH_SINK_DSN": dsns["sink"],
                   "BENCH_TARGET_DSN": dsns["target"], "BENCH_SECRET": SECRET,
                   "BENCH_CRM_URL": "http://127.0.0.1:1"}
            os.environ.update({k: v for k, v in env.items() if k.startswith("BENCH_")})
            spec_path = Path(tmp) / "sync.yaml"
            spec_path.write_text(yaml.safe_dump(spec_doc()))
            out: dict[str, Any] = {"machine": machine_info(("starlette", "uvicorn", "httpx",
                                                             "psycopg", "standardwebhooks")),
                                   "server": pg.version, "senders": args.senders}
            out["webhooks_async"] = bench_webhooks(env, spec_path, dsns["ceiling"],
                                                   dsns["state"], n_hooks, args.senders)
            out["webhooks_sync"] = bench_sync(env, spec_path, dsns["target"], n_sync)
            out["poller"] = bench_poll(env, spec_path, n_rows)
        finally:
            pg.stop()
    report(out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    checks = {f"{k}.{c}": ok for k in ("webhooks_async", "webhooks_sync", "poller")
              for c, ok in out[k]["checks"].items()}
    bad = [c for c, ok in checks.items() if not ok]
    if bad:
        print(f"WRONG ANSWERS: {bad}")
        return 1
    return 0


def report(out: dict[str, Any]) -> None:
    m = out["machine"]
    print(f"machine: {m.get('cpu_model', '?')}, {m.get('usable_cpus')} usable CPUs, "
          f"{m.get('python')}, PostgreSQL {out['server']}, {out['senders']} senders")
    a = out["webhooks_async"]
    r, c = a["receiver"], a["ceiling"]
    print(f"{'':28}{'accepted/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'answers':>24}")
    for name, x in (("receiver (sync-pipelines)", r), ("ceiling (bare insert)", c)):
        print(f"{name:28}{x['per_s']:>12,.0f}{x['p50_ms']:>10}{x['p99_ms']:>10}"
              f"{json.dumps(x['statuses']):>24}")
    print(f"receiver / ceiling: {a['ratio']:.2f} (target ≥ {TARGET_RATIO}); CPU ms per "
          f"request, server/sender: receiver {r['server_cpu_ms_per_request']}/"
          f"{r['sender_cpu_ms_per_request']}, ceiling {c['server_cpu_ms_per_request']}/"
          f"{c['sender_cpu_ms_per_request']}")
    s = out["webhooks_sync"]
    print(f"sync request/reply, idle pipeline → PostgreSQL: p50 {s['p50_ms']} ms, "
          f"p95 {s['p95_ms']} ms over {s['requests']} ({s['outcomes']})")
    p = out["poller"]
    print(f"poller: {p['rows_per_s']:,} rows/s over {p['rows']:,} rows; the same pages fetched "
          f"and dropped: {p['ceiling_rows_per_s']:,} rows/s (ratio {p['ratio']:.2f})")
    for k in ("webhooks_async", "webhooks_sync", "poller"):
        for check, ok in out[k]["checks"].items():
            print(f"  {'ok ' if ok else 'BAD'} {k}: {check}")


if __name__ == "__main__":
    sys.exit(main())
