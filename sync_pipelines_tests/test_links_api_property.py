"""Convergence of a link between PostgreSQL and an HTTP API under random interleavings
(hypothesis).

Each example starts a fresh link between an empty table and an empty API (the reference CRM,
its changes arriving as signed webhooks through the receiver, or by polling its feed — both
are drawn). In a round, the database makes random inserts, updates, deletes and key changes
on a handful of keys, and the API's clients random PUTs and DELETEs; the directions are
delivered in a random order, sometimes with a crash injected mid-window; then the link is
synced until quiet. The oracle works from the rows themselves: for each key, the side that
changed it since the last agreed state wins; when both changed it to different versions the
policy decides (``source_priority`` of the database; a delete loses to a change). After every
round both sides must equal the oracle's state, and the conflict log must hold exactly the
keys both sides changed differently.
"""

from __future__ import annotations

import contextlib
import os
import time
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sync_pipelines.engine import deliver_pipeline, link_conflicts, pull_pipeline
from sync_pipelines.engine.faults import Faults, InjectedCrash

from .support.crm_api import delete, put
from .support.links import drop_origins
from .support.pipelines import execute
from .support.receiver import SECRET, ReceiverServer
from .test_links_api import POLL, SIDE_DDL, WEBHOOK, api_link, api_rows, db_rows, step
from .test_links_property import drop_slots, expected

EXAMPLES = int(os.environ.get("LINK_EXAMPLES", "20"))
"""Examples per run: 20 in CI; ``LINK_EXAMPLES=200`` for a longer hunt."""
KEYS = st.integers(min_value=1, max_value=5)
DB_OP = st.one_of(
    st.tuples(st.just("insert"), KEYS, st.integers(0, 3)),
    st.tuples(st.just("update"), KEYS, st.integers(0, 3)),
    st.tuples(st.just("rename"), KEYS, st.integers(0, 3)),
    st.tuples(st.just("delete"), KEYS, st.just(0)),
    st.tuples(st.just("rekey"), KEYS, KEYS),
)
API_OP = st.one_of(
    st.tuples(st.just("put"), KEYS, st.integers(0, 3)),
    st.tuples(st.just("edit"), KEYS, st.integers(0, 3)),
    st.tuples(st.just("delete"), KEYS, st.just(0)),
)
ROUND = st.fixed_dictionaries({
    "db": st.lists(DB_OP, max_size=4),
    "api": st.lists(API_OP, max_size=4),
    "first": st.sampled_from(["db", "api"]),
    "crash": st.sampled_from([None, "after_send", "after_apply"]),
})


def db_op(dsn: str, op: tuple[str, int, int]) -> None:
    kind, k, v = op
    if kind == "insert":
        execute(dsn, "INSERT INTO people (id, name, mail, score) VALUES "  # noqa: S608
                     f"({k}, 'n{v}', 'm{v}@x', {v}) ON CONFLICT (id) DO NOTHING")
    elif kind == "update":
        execute(dsn, f"UPDATE people SET score = {v} WHERE id = {k}")  # noqa: S608
    elif kind == "rename":
        execute(dsn, f"UPDATE people SET name = 'r{v}' WHERE id = {k}")  # noqa: S608
    elif kind == "delete":
        execute(dsn, f"DELETE FROM people WHERE id = {k}")  # noqa: S608
    elif k != v:  # rekey: a delete of k and an insert of v
        execute(dsn, f"UPDATE people SET id = {v} WHERE id = {k} AND NOT EXISTS "  # noqa: S608
                     f"(SELECT 1 FROM people WHERE id = {v})")


def api_op(crm: Any, op: tuple[str, int, int]) -> None:
    kind, k, v = op
    current = crm.records("contacts").get(str(k))
    if kind == "put":  # a whole new record (or a replacement)
        put(crm, {"id": k, "name": f"a{v}", "email": f"a{v}@x", "score": v})
    elif kind == "edit" and current is not None:  # one field of an existing record
        put(crm, {**{f: current.get(f) for f in ("id", "name", "email", "score")},
                  "email": f"e{v}@x"})
    elif kind == "delete" and current is not None:
        delete(crm, k)


def settle_webhooks(crm: Any) -> None:
    deadline = time.monotonic() + 30
    while crm.webhooks()["pending"] and time.monotonic() < deadline:
        time.sleep(0.02)


def normalise(r: dict[int, Any]) -> dict[int, Any]:
    return {k: (v[0], v[1], None if v[2] is None else Decimal(v[2]).normalize())
            for k, v in r.items()}


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rounds=st.lists(ROUND, min_size=1, max_size=4), webhooks=st.booleans())
def test_random_interleavings_with_an_api_converge_to_what_the_policy_dictates(
        monkeypatch, source_dsn, state_dsn, crm_server, rounds, webhooks):
    db = source_dsn
    execute(db, "DROP TABLE IF EXISTS people, apply_log CASCADE",
            "DROP FUNCTION IF EXISTS log_apply CASCADE", *SIDE_DDL)
    crm_server.reset()
    spec, name, to_api, to_db = api_link(
        monkeypatch, db, state_dsn, crm_server, {"policy": "source_priority", "priority": "db"},
        changes=WEBHOOK if webhooks else POLL)
    with contextlib.ExitStack() as stack:
        if webhooks:
            receiver = stack.enter_context(ReceiverServer(spec))
            crm_server.configure_webhooks(f"{receiver.url}/ingest/{to_db}", SECRET,
                                          retry_after_s=0.05, event_types=["contact.*"])
        try:
            pull_pipeline(spec, to_api)
            agreed: dict[int, Any] = {}
            all_conflicts: set[tuple[int, int]] = set()
            for n, rnd in enumerate(rounds):
                for op in rnd["db"]:
                    db_op(db, op)
                for op in rnd["api"]:
                    api_op(crm_server, op)
                if webhooks:
                    settle_webhooks(crm_server)
                want, conflicts = expected(agreed, normalise(db_rows(db)),
                                           normalise(api_rows(crm_server)))
                all_conflicts |= {(n, k) for k in conflicts}
                order = (to_api, to_db) if rnd["first"] == "db" else (to_db, to_api)
                for i, p in enumerate(order):
                    pull_pipeline(spec, p, force=True)
                    faults = Faults([rnd["crash"]]) if rnd["crash"] and i == 0 else Faults()
                    with contextlib.suppress(InjectedCrash):
                        deliver_pipeline(spec, p, faults=faults)
                for _ in range(30):  # until quiet, the webhooks of each step delivered
                    moved = step(spec, to_api)
                    if webhooks:
                        settle_webhooks(crm_server)
                    moved += step(spec, to_db)
                    if not moved:
                        break
                got_db, got_api = normalise(db_rows(db)), normalise(api_rows(crm_server))
                assert got_db == got_api, (n, rnd)
                assert got_db == want, (n, rnd, got_db, want)
                agreed = got_db
                logged = link_conflicts(spec, name, limit=1000)
                assert len(logged) == len(all_conflicts), (n, rnd, [(c.key, c.reason)
                                                                   for c in logged])
        finally:
            if webhooks:
                crm_server.configure_webhooks(None)
            drop_slots(db, name)
            drop_origins(state_dsn)
