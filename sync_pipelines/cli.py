"""Command line: ``sync-pipelines demo`` starts everything on an embedded PostgreSQL.

``demo`` starts (or reuses) a PostgreSQL from the pip-installed wheel under ``.sync_home/``,
creates the Dagster storage, state, CRM source and reporting target databases, seeds the CRM,
starts a live change generator and runs ``dagster dev`` with ``DAGSTER_HOME`` set, so run
history persists between sessions. ``demo --smoke`` does the same setup, then runs a bounded
round in process instead of the UI: one sensor tick and the delivery runs it requests, then
today's reconciliation run, through the same Dagster instance, and exits 0 only if the
targets then match the source and the reconciliation finds no drift. The webhook receiver
(``sync-pipelines serve``, its own process) serves the spec's webhook pipelines, and the CRM
API is told to send its signed webhooks there.

It prints what runs where (UI, CRM API, receiver, a ``psql`` line per database);
``demo --psql NAME`` opens a shell on one. Ctrl-C or SIGTERM stops Dagster and all its
processes first, then the receiver, the generator and the CRM API, then the embedded server
(its data directory stays for next time): nothing the demo started outlives it.

``serve`` runs the webhook receiver for a spec (see :mod:`sync_pipelines.engine.receiver`).
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from sync_pipelines.crm_service.server import CrmServer
from sync_pipelines.engine import WebhookSourceSpec, load_spec, pull_pipeline
from sync_pipelines.engine.runtime.embedded import EmbeddedPostgres, ensure_database, start_embedded

DATABASES = {"dagster": "dagster", "state": "sync_state", "source": "crm", "target": "reporting"}


def _repo_file(name: str) -> Path:
    path = Path.cwd() / name
    if not path.exists():
        sys.exit(f"sync-pipelines: {name} not found in {Path.cwd()}; run from the project folder")
    return path


def start_crm() -> CrmServer:
    """The reference CRM API (an HTTP target of the demo spec) on 127.0.0.1, with a token and
    a webhook signing secret (both only in the environment)."""
    token = os.environ.get("SYNC_CRM_TOKEN") or secrets.token_urlsafe(24)
    secret = os.environ.get("SYNC_WEBHOOK_SECRET") or (
        "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())
    crm = CrmServer(bearer_token=token).start()
    os.environ.update({"SYNC_CRM_URL": crm.base_url, "SYNC_CRM_TOKEN": token,
                       "SYNC_WEBHOOK_SECRET": secret})
    return crm


def _free_port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_receiver(spec_path: Path, crm: CrmServer) -> tuple[subprocess.Popen[bytes], str]:
    """``sync-pipelines serve`` for the spec's webhook pipelines, and the CRM's webhooks
    pointed at it; returns the process and its base URL."""
    import httpx

    port = _free_port(8787)
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "sync_pipelines.cli", "serve", "--spec",
                             str(spec_path), "--port", str(port)], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"sync-pipelines: the webhook receiver exited ({proc.returncode})")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("sync-pipelines: the webhook receiver did not start in 30 s")
        time.sleep(0.1)
    spec = load_spec(spec_path)
    for name, p in spec.pipelines.items():
        if isinstance(p.source, WebhookSourceSpec):  # the CRM has one webhook endpoint
            crm.configure_webhooks(
                f"{url}/ingest/{name}", os.environ["SYNC_WEBHOOK_SECRET"], retry_after_s=0.5,
                event_types=sorted({t for r in p.source.records.values()
                                    for t in r.event_types}))
            break
    return proc, url


def prepare_environment(home: Path, spec: Path) -> EmbeddedPostgres:
    """Start the embedded server, create the databases, and export the environment."""
    from sync_pipelines.demo import generator

    home.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    pg = start_embedded(home / "pg")
    print(f"embedded PostgreSQL {pg.version} ready in {time.monotonic() - t0:.1f}s "
          f"(data in {home / 'pg'})")
    for name in DATABASES.values():
        ensure_database(pg.uri, name)
    source = pg.dsn(DATABASES["source"])
    generator.apply_schema(source)
    generator.apply_reporting_schema(pg.dsn(DATABASES["target"]))
    dagster_home = home / "dagster"
    dagster_home.mkdir(exist_ok=True)
    shutil.copyfile(_repo_file("dagster.yaml"), dagster_home / "dagster.yaml")
    os.environ.update({
        "DAGSTER_HOME": str(dagster_home),
        "SYNC_DAGSTER_PG_URL": pg.sqlalchemy_url(DATABASES["dagster"]),
        "SYNC_STATE_DSN": pg.dsn(DATABASES["state"]),
        "SYNC_SOURCE_DSN": source,
        "SYNC_TARGET_DSN": pg.dsn(DATABASES["target"]),
        "SYNC_SPEC": str(spec),
    })
    # Create publications and slots before seeding, so the seed rows flow through the stream
    # too (an initial backfill of rows that predate the slot is a separate feature).
    spec_model = load_spec(spec)
    for name in spec_model.pipelines:
        pull_pipeline(spec_model, name)
    if generator.seed(source):
        generator.seed_tasks(source)
        print("seeded the demo CRM (customers, contacts, deals, tasks)")
    return pg


def smoke(spec_path: Path, crm: CrmServer) -> int:
    """One sensor tick per pipeline and its delivery runs, in process, against the persistent
    instance; then a check of every target, and today's reconciliation of CDC pipelines."""
    import dagster as dg

    import sync_pipelines.engine as engine
    from sync_pipelines.definitions import build_definitions
    from sync_pipelines.defs.resources import SyncEngine
    from sync_pipelines.demo.generator import ChangeGenerator
    from sync_pipelines.engine import load_spec

    spec = load_spec(spec_path)
    defs = build_definitions(str(spec_path))
    instance = dg.DagsterInstance.get()
    resources = {"sync": SyncEngine(spec_path=str(spec_path))}
    for name in _smoke_order(spec):
        pipeline = spec.pipelines[name]
        sensor = defs.resolve_sensor_def(f"{name}_replication_sensor")
        kind = pipeline.source.kind
        if kind == "postgres" and pipeline.link is None:
            gen = ChangeGenerator(os.environ["SYNC_SOURCE_DSN"], rate=200, seed_value=1)
            gen.start()
            time.sleep(2)
            gen.stop()
            gen.join()
            print(f"{name}: generated {gen.transactions} CRM transactions")
        if pipeline.link is not None and pipeline.link.api_side is not None:
            missing = _edit_contact(pipeline, crm)  # an edit on this side of the link
            if missing:
                print(f"{name}: {missing}")
                return 1
        elif pipeline.link is not None:
            _edit_task(pipeline, first=name.endswith(f"_{pipeline.link.first_side}_to_"
                                                     f"{pipeline.link.target_side}"))
        elif kind == "webhook":  # what the crm pipeline wrote to the CRM API, pushed back
            sent, stats = _webhooks_sent(crm)
            if not sent:
                print(f"{name}: the CRM API's webhooks were not all accepted: {stats}")
                return 1
            print(f"{name}: the CRM API sent {sent} signed webhooks to the receiver")
        if kind == "http_poll":  # the set-up polled moments ago: poll now, not in 10 s
            engine.pull_pipeline(spec, name, force=True)
        runs = _tick(sensor, instance, resources, defs)
        if not runs:
            print(f"{name}: the sensor requested no delivery run")
            return 1
        drift = (_contacts_drift(crm) if pipeline.link is not None and pipeline.link.api_side
                 else _link_drift() if pipeline.link is not None
                 else engine.compare_tables(spec, name) + _crm_drift(spec, name)
                 if kind == "postgres" else _api_drift(spec, name, crm))
        if drift:
            print(f"{name}: target differs from source: {drift}")
            return 1
        print(f"{name}: target matches source after {runs} delivery run(s)")
        if kind != "postgres" or pipeline.link is not None:
            continue  # reconciliation reads a SQL source into one-way targets
        # The day's reconciliation, as its schedule runs it once the day has ended: today's
        # partition (the demo's rows changed today; a new pipeline has no earlier day).
        today = datetime.now(ZoneInfo(pipeline.reconcile.timezone)).strftime("%Y-%m-%d")
        result = defs.resolve_job_def(f"{name}_reconcile_job").execute_in_process(
            instance=instance, partition_key=today, resources=resources,
            raise_on_error=False)
        mats = result.asset_materializations_for_node(f"sync__{name}__reconciliation")
        if not result.success or not mats:
            print(f"{name}: the reconciliation run failed")
            return 1
        md = mats[0].metadata
        compared, total = md["rows_compared"].value, md["drift_total"].value
        if total or md["not_compared"].value:
            print(f"{name}: reconciliation found {total} drifted key(s), "
                  f"{md['not_compared'].value} table(s) not compared")
            return 1
        print(f"{name}: reconciliation for {today}: {compared} rows compared, no drift")
    return 0


def _smoke_order(spec: Any) -> list[str]:
    """The spec's pipelines, a link's direction out of an API after its direction into it:
    the API's records reach the database first, so the database side has rows to edit."""
    names = list(spec.pipelines)
    for name in list(names):
        link = spec.pipelines[name].link
        if link is not None and link.api_side == link.source_side:
            names.remove(name)
            names.insert(names.index(f"{link.name}_{link.target_side}_to_{link.api_side}"),
                         name)
    return names


def _edit_contact(pipeline: Any, crm: CrmServer) -> str | None:
    """Rename a contact on the side this direction of the contacts link reads: in the CRM
    API (a GET and a PUT of the whole record, as a client of the API would) or in
    reporting's contact_book. Returns what was missing when there was nothing to edit."""
    import httpx
    import psycopg

    link = pipeline.link
    if link.source_side == link.api_side:
        headers = {"Authorization": f"Bearer {os.environ['SYNC_CRM_TOKEN']}",
                   "Idempotency-Key": f"demo-edit-{time.time_ns()}"}
        # The lowest id the API holds: the change generator deletes customers at random, and
        # a customer's contacts go with it, so no fixed id is sure to exist.
        held = crm.records("contacts")
        if not held:
            return "the CRM API holds no contact to edit"
        contact = min(held, key=int)
        with httpx.Client(base_url=crm.base_url, headers=headers) as client:
            record = client.get(f"/contacts/{contact}").raise_for_status().json()
            record["full_name"] = f"{record.get('full_name')} (edited in the CRM API)"
            client.put(f"/contacts/{contact}", json=record).raise_for_status()
        return None
    with psycopg.connect(os.environ["SYNC_TARGET_DSN"], autocommit=True) as conn:
        edited = conn.execute(
            "UPDATE contact_book SET full_name = full_name || ' (edited in reporting)' "
            "WHERE id = (SELECT id FROM contact_book ORDER BY id OFFSET 1 LIMIT 1)").rowcount
    return None if edited == 1 else "reporting's contact_book has no second contact to edit"


def _contacts_drift(crm: CrmServer) -> list[str]:
    """The contacts link's two sides: reporting's contact_book against the CRM API's
    contacts, on the fields the link carries."""
    import psycopg

    with psycopg.connect(os.environ["SYNC_TARGET_DSN"]) as conn:
        book = {str(r[0]): tuple(r[1:]) for r in conn.execute(
            "SELECT id, first_name, last_name, full_name, email FROM contact_book")}
    api = {k: (r.get("first_name"), r.get("last_name"), r.get("full_name"),
               r.get("email_address")) for k, r in crm.records("contacts").items()}
    differ = sorted(k for k in set(book) | set(api) if book.get(k) != api.get(k))
    return [f"contacts: {len(differ)} of {len(api)} differ (e.g. id {differ[0]}: "
            f"{book.get(differ[0])} vs {api.get(differ[0])})"] if differ else []


def _edit_task(pipeline: Any, *, first: bool) -> None:
    """Rename a task on the side this link direction reads."""
    import psycopg

    assert pipeline.link is not None
    dsn = os.environ[pipeline.postgres_source.dsn_env]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE tasks SET title = title || %s, updated_at = now() WHERE id = %s",
                     (f" (edited in {pipeline.link.source_side})", 1 if first else 2))


def _link_drift() -> list[str]:
    """The demo link's two sides, row by row."""
    import psycopg

    sides = []
    for env in ("SYNC_SOURCE_DSN", "SYNC_TARGET_DSN"):
        with psycopg.connect(os.environ[env]) as conn:
            sides.append(conn.execute("SELECT id, title, status, assignee, updated_at FROM tasks "
                                      "ORDER BY id").fetchall())
    return [] if sides[0] == sides[1] else [
        f"tasks differ: {len(sides[0])} rows in crm, {len(sides[1])} in reporting"]


def _webhooks_sent(crm: CrmServer, timeout_s: float = 60.0) -> tuple[int, dict[str, Any]]:
    """Wait for the CRM's webhook queue to drain; the number it sent, and its counters."""
    deadline = time.monotonic() + timeout_s
    stats = crm.webhooks()
    while stats["pending"] and time.monotonic() < deadline:
        time.sleep(0.2)
        stats = crm.webhooks()
    return (0 if stats["pending"] or stats["dropped"] else int(stats["sent"])), stats


def _api_drift(spec, name: str, crm: CrmServer) -> list[str]:  # type: ignore[no-untyped-def]
    """The reporting tables of an API pipeline against the CRM API's records (by id)."""
    import psycopg
    from psycopg import sql

    problems = []
    with psycopg.connect(os.environ["SYNC_TARGET_DSN"]) as conn:
        for table in spec.pipelines[name].tables:
            schema, _, resource = table.partition(".")
            have = {str(r[0]) for r in conn.execute(sql.SQL("SELECT id FROM {}").format(
                sql.Identifier(schema, resource)))}
            want = set(crm.records(resource))
            if have != want:
                problems.append(f"{table}: {len(have - want)} extra, {len(want - have)} "
                                f"missing of {len(want)}")
    return problems


def _crm_drift(spec, name: str) -> list[str]:  # type: ignore[no-untyped-def]
    """Record counts in the reference CRM against the source (rows the filter keeps)."""
    import httpx
    import psycopg

    problems = []
    resources = {"public.customers": "companies", "public.contacts": "contacts",
                 "public.deals": "deals"}
    records = httpx.get(f"{os.environ['SYNC_CRM_URL']}/_admin/records").json()
    with psycopg.connect(os.environ["SYNC_SOURCE_DSN"]) as conn:
        for table, resource in resources.items():
            where = " WHERE stage <> 'spam'" if resource == "deals" else ""
            row = conn.execute(f"SELECT count(*) FROM {table}{where}").fetchone()  # noqa: S608
            want, have = (row[0] if row else 0), len(records.get(resource, {}))
            if want != have:
                problems.append(f"crm_api/{resource}: {have} records, source has {want}")
    return problems


def _tick(sensor, instance, resources, defs) -> int:  # type: ignore[no-untyped-def]
    """One sensor tick, then each delivery run it asked for (one per target), in process."""
    import dagster as dg

    with dg.build_sensor_context(instance=instance, resources=resources) as ctx:
        result = sensor(ctx)
    requests = result.run_requests if isinstance(result, dg.SensorResult) else []
    for event in (result.asset_events if isinstance(result, dg.SensorResult) else []):
        instance.report_runless_asset_event(event)
    for rr in requests or []:
        job = defs.resolve_job_def(rr.job_name)
        run = job.execute_in_process(run_config=rr.run_config, instance=instance, tags=rr.tags)
        print(f"  run {run.run_id[:8]} for {rr.run_key}: "
              f"{'success' if run.success else 'FAILED'}")
        if not run.success:
            raise SystemExit(1)
    return len(requests or [])


def where_things_are(pg: EmbeddedPostgres, crm: CrmServer, receiver_url: str, port: int,
                     home: Path) -> str:
    """What runs where, ready to paste (no secrets: the embedded server trusts local
    connections on its socket; the CRM token stays in the environment)."""
    rows = [("Dagster UI", f"http://127.0.0.1:{port}"),
            ("CRM API (HTTP target)", f"{crm.base_url}   (what it received: "
                                      f"{crm.base_url}/_admin/received)"),
            ("webhook receiver", f"{receiver_url}/ingest/<pipeline>   (the CRM's webhooks: "
                                 f"{crm.base_url}/_admin/webhooks)")]
    roles = {"crm": "source", "reporting": "Postgres target", "sync_state": "state",
             "dagster": "Dagster storage"}
    for db in DATABASES.values():
        rows.append((f"database {db} ({roles.get(db, db)})", f'psql "{pg.dsn(db)}"'))
    width = max(len(a) for a, _ in rows)
    lines = [f"  {a:<{width}}  {b}" for a, b in rows]
    lines.append(f"  {'':<{width}}  (or: sync-pipelines demo --home {home} --psql <database>)")
    return "\n".join(["what runs where:", *lines])


def psql(home: Path, database: str) -> int:
    """A psql shell on one of the demo's embedded databases (the server is started if the demo
    is not running; it stops again after the shell when nobody else uses it)."""
    if database not in DATABASES.values():
        print(f"sync-pipelines: no demo database {database!r} "
              f"(databases: {', '.join(DATABASES.values())})", file=sys.stderr)
        return 2
    from sync_pipelines.engine.runtime.embedded import client_program

    pg = start_embedded(home / "pg")
    program = client_program("psql", pg.version)
    if program is None:
        print(f"no psql program found; connect with: {pg.dsn(database)}", file=sys.stderr)
        return 1
    return subprocess.call([str(program), pg.dsn(database)])


class _Stop(Exception):
    """SIGINT or SIGTERM: stop everything, Dagster first."""


def _stop_group(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """Stop ``dagster dev`` and every process it started (its own process group): SIGINT,
    then SIGTERM, then SIGKILL, until the group is empty."""
    pgid = proc.pid
    for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            proc.poll()
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return  # the whole group is gone
            time.sleep(0.2)


def demo(args: argparse.Namespace) -> int:
    home = Path(args.home).resolve()
    if args.psql:
        return psql(home, args.psql)

    def stop(signum: int, frame: object) -> None:
        raise _Stop()

    # Ctrl-C (the terminal signals our process group, not Dagster's: it runs in its own) and
    # SIGTERM (a service manager, `timeout`) take the same path: Dagster and all its children
    # first, then the generator and the CRM API, then PostgreSQL — nothing outlives the demo.
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    spec = _repo_file(args.spec).resolve()
    workspace = _repo_file("workspace.yaml").resolve()
    crm = pg = gen = dagster = receiver = None
    try:
        crm = start_crm()
        pg = prepare_environment(home, spec)
        receiver, receiver_url = start_receiver(spec, crm)
        if args.smoke:
            return smoke(spec, crm)
        from sync_pipelines.demo.generator import ChangeGenerator

        gen = ChangeGenerator(os.environ["SYNC_SOURCE_DSN"], rate=args.rate)
        gen.start()
        print(f"change generator: ~{args.rate} CRM transactions/s into database 'crm'")
        print(where_things_are(pg, crm, receiver_url, args.port, home))
        print("Ctrl-C stops everything.", flush=True)
        # Run from DAGSTER_HOME, where its dagster.yaml is: from the project folder Dagster
        # warns that the folder's dagster.yaml "will not be used" (it is the same settings).
        dagster = subprocess.Popen(
            [sys.executable, "-m", "dagster", "dev", "-w", str(workspace), "-h", "127.0.0.1",
             "-p", str(args.port)], cwd=os.environ["DAGSTER_HOME"], start_new_session=True)
        return dagster.wait()
    except _Stop:
        print("\nstopping: Dagster, then the receiver, the CRM API and the generator, then "
              "PostgreSQL",
              flush=True)
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut this short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if dagster is not None:
            _stop_group(dagster)
        if receiver is not None:
            receiver.terminate()
            try:
                receiver.wait(10)
            except subprocess.TimeoutExpired:
                receiver.kill()
        if gen is not None:
            gen.stop()
        if crm is not None:
            crm.stop()
        if pg is not None:
            pg.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sync-pipelines")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run the demo on an embedded PostgreSQL")
    d.add_argument("--home", default=".sync_home", help="folder for data (default .sync_home)")
    d.add_argument("--spec", default="sync.yaml", help="sync spec (default sync.yaml)")
    d.add_argument("--port", type=int, default=3000, help="Dagster UI port (default 3000)")
    d.add_argument("--rate", type=float, default=5.0, help="demo transactions per second")
    d.add_argument("--smoke", action="store_true",
                   help="run one sensor tick and its delivery runs in process, check, and exit")
    d.add_argument("--psql", metavar="DATABASE",
                   help="open a psql shell on one of the demo's databases "
                   f"({', '.join(DATABASES.values())}) and exit")
    r = sub.add_parser("serve", help="run the webhook receiver for the spec's webhook pipelines")
    r.add_argument("--spec", default=os.environ.get("SYNC_SPEC", "sync.yaml"),
                   help="sync spec (default $SYNC_SPEC or sync.yaml)")
    r.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    r.add_argument("--port", type=int, default=8787, help="port to listen on (8787)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return demo(args)


def serve(args: argparse.Namespace) -> int:
    from sync_pipelines.engine import SyncError
    from sync_pipelines.engine.receiver import serve as run

    try:
        spec = load_spec(args.spec)
        print(f"webhook receiver on http://{args.host}:{args.port}/ingest/<pipeline> for: "
              + ", ".join(p for p, s in spec.pipelines.items() if s.source.kind == "webhook"),
              flush=True)
        run(spec, host=args.host, port=args.port)
    except SyncError as err:
        print(f"sync-pipelines serve: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
