"""Convergence of a two-way link under random interleavings (hypothesis).

Each example starts a fresh link between two empty sides and runs a few rounds. In a round,
both sides make random inserts, updates, deletes and key changes on a handful of keys; the
directions are delivered in a random order, sometimes with a crash injected mid-window; then
the link is synced until quiet. The oracle works from the rows themselves: for each key, the
side that changed it since the last agreed state wins; when both changed it to different
versions the policy decides (``source_priority`` of crm; a delete loses to a change). After
every round both sides must be equal to the oracle's state, and the conflict log must hold
exactly the keys both sides changed differently.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sync_pipelines.engine import deliver_pipeline, link_conflicts, pull_pipeline
from sync_pipelines.engine.faults import Faults, InjectedCrash

from .support.links import create_sides, directions, drop_origins, link_spec, start, sync
from .support.pipelines import execute, rows

EXAMPLES = int(os.environ.get("LINK_EXAMPLES", "20"))
"""Examples per run: 20 in CI; ``LINK_EXAMPLES=200`` for a longer hunt."""
KEYS = st.integers(min_value=1, max_value=5)
OP = st.one_of(
    st.tuples(st.just("insert"), KEYS, st.integers(0, 3)),
    st.tuples(st.just("update"), KEYS, st.integers(0, 3)),
    st.tuples(st.just("rename"), KEYS, st.integers(0, 3)),
    st.tuples(st.just("delete"), KEYS, st.just(0)),
    st.tuples(st.just("rekey"), KEYS, KEYS),
)
ROUND = st.fixed_dictionaries({
    "crm": st.lists(OP, max_size=4),
    "billing": st.lists(OP, max_size=4),
    "first": st.sampled_from(["crm", "billing"]),
    "crash": st.sampled_from([None, "after_send", "after_apply"]),
})


def apply_op(dsn: str, name_col: str, op: tuple[str, int, int]) -> None:
    kind, k, v = op
    if kind == "insert":
        execute(dsn, f"INSERT INTO accounts (id, {name_col}, balance) "  # noqa: S608
                     f"VALUES ({k}, 'n{v}', {v}) ON CONFLICT (id) DO NOTHING")
    elif kind == "update":
        execute(dsn, f"UPDATE accounts SET balance = {v} WHERE id = {k}")  # noqa: S608
    elif kind == "rename":
        execute(dsn, f"UPDATE accounts SET {name_col} = 'r{v}' WHERE id = {k}")  # noqa: S608
    elif kind == "delete":
        execute(dsn, f"DELETE FROM accounts WHERE id = {k}")  # noqa: S608
    elif k != v:  # rekey: the key itself changes (a delete of k and an insert of v)
        execute(dsn, f"UPDATE accounts SET id = {v} WHERE id = {k} AND NOT EXISTS "  # noqa: S608
                     f"(SELECT 1 FROM accounts WHERE id = {v})")


def snapshot(dsn: str, name_col: str) -> dict[int, tuple[Any, ...]]:
    return {r[0]: tuple(r[1:]) for r in rows(
        dsn, f"SELECT id, {name_col}, balance, updated_at FROM accounts")}  # noqa: S608


def expected(agreed: dict[int, Any], a: dict[int, Any], b: dict[int, Any]
             ) -> tuple[dict[int, Any], set[int]]:
    """The state both sides must reach, and the keys that conflict."""
    out, conflicts = {}, set()
    for k in set(agreed) | set(a) | set(b):
        base, va, vb = agreed.get(k), a.get(k), b.get(k)
        changed_a, changed_b = va != base, vb != base
        if changed_a and changed_b and va != vb:
            conflicts.add(k)
            win = va if (va is not None and vb is not None) else (va if vb is None else vb)
        elif changed_b:
            win = vb
        else:
            win = va
        if win is not None:
            out[k] = win
    return out, conflicts


def drop_slots(dsn: str, name: str) -> None:
    for (slot,) in rows(dsn, "SELECT slot_name FROM pg_replication_slots"):
        if slot.startswith(f"sync_{name}_"):
            with contextlib.suppress(Exception):
                execute(dsn, f"SELECT pg_drop_replication_slot('{slot}')")


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rounds=st.lists(ROUND, min_size=1, max_size=4))
def test_random_interleavings_converge_to_what_the_policy_dictates(
        monkeypatch, source_dsn, target_dsn, state_dsn, rounds):
    a, b = source_dsn, target_dsn
    execute(a, "DROP TABLE IF EXISTS accounts, apply_log CASCADE",
            "DROP FUNCTION IF EXISTS log_apply CASCADE")
    execute(b, "DROP TABLE IF EXISTS accounts, apply_log CASCADE",
            "DROP FUNCTION IF EXISTS log_apply CASCADE")
    create_sides(a, b)
    spec, name = link_spec(monkeypatch, a, b, state_dsn, conflict={
        "policy": "source_priority", "priority": "crm"})
    a_to_b, b_to_a = directions(spec, name)
    try:
        start(spec, name)
        agreed: dict[int, Any] = {}
        all_conflicts: set[tuple[int, int]] = set()
        for n, rnd in enumerate(rounds):
            for op in rnd["crm"]:
                apply_op(a, "name", op)
            for op in rnd["billing"]:
                apply_op(b, "title", op)
            want, conflicts = expected(agreed, snapshot(a, "name"), snapshot(b, "title"))
            all_conflicts |= {(n, k) for k in conflicts}
            order = (a_to_b, b_to_a) if rnd["first"] == "crm" else (b_to_a, a_to_b)
            for i, p in enumerate(order):
                pull_pipeline(spec, p)
                faults = Faults([rnd["crash"]]) if rnd["crash"] and i == 0 else Faults()
                with contextlib.suppress(InjectedCrash):
                    deliver_pipeline(spec, p, faults=faults)
            sync(spec, name)
            got_a, got_b = snapshot(a, "name"), snapshot(b, "title")
            assert got_a == got_b, (n, rnd)
            assert got_a == want, (n, rnd, got_a, want)
            agreed = got_a
            logged = [c for c in link_conflicts(spec, name, limit=1000)]
            assert len(logged) == len(all_conflicts), (n, rnd, [(c.key, c.reason)
                                                               for c in logged])
    finally:
        drop_slots(a, name)
        drop_slots(b, name)
        drop_origins(state_dsn)
