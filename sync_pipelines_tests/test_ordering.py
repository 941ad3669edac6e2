"""Per-key order (invariant 3): changes to one key reach the target in commit order, across
many batches and pulls and with several delivery runs started at once; and the compaction
that folds a batch into one operation per key preserves the effect of applying it in order.

The integration tests detect reordering and double applies with a trigger in the target
(:mod:`.support.versioned`); the property test checks
:func:`~sync_pipelines.engine.mapping.compaction.compact` against a dict model with
hypothesis. Not covered here: the retry queue and HTTP targets (test_http_target,
test_postgres_failures), and the Dagster run queue.
"""

from __future__ import annotations

import random
import threading
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sync_pipelines.engine.mapping.compaction import compact
from sync_pipelines.engine.mapping.mapper import Delete, TargetOp, Truncate, Upsert
from sync_pipelines.engine.pipeline import deliver_pipeline, pull_pipeline
from sync_pipelines.engine.wire.change import Position

from .support.pipelines import assert_tables_equal, make_spec, rows, sync_until_idle
from .support.versioned import assert_versions_increase, create_versioned_tables

pytestmark = pytest.mark.pg_versions

KEYS, UPDATES_PER_KEY = 10, 300


def hot_key_workload(source_dsn: str, *, seed: int) -> int:
    """10 keys, 300 updates each, in many small transactions that interleave the keys."""
    rnd = random.Random(seed)
    pending = [k for k in range(1, KEYS + 1) for _ in range(UPDATES_PER_KEY)]
    rnd.shuffle(pending)
    transactions = 0
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO items (id, version, qty, note) SELECT g, "
                     "nextval('item_version'), 0, 'new' FROM generate_series(1, %s) g", (KEYS,))
        while pending:
            n = rnd.randint(1, 4)
            with conn.transaction():
                for key in pending[:n]:
                    conn.execute("UPDATE items SET version = nextval('item_version'), "
                                 "qty = qty + 1, note = md5(random()::text) WHERE id = %s", (key,))
            del pending[:n]
            transactions += 1
    return transactions


def test_per_key_order_across_many_batches(monkeypatch, source_dsn, target_dsn, state_dsn):
    create_versioned_tables(source_dsn, target_dsn)
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["items"],
                     policy={"batch_size": 37, "demand_budget": 400})
    pull_pipeline(spec, "crm")
    assert hot_key_workload(source_dsn, seed=1) > 1000
    batches = 0
    while True:
        pulled = pull_pipeline(spec, "crm")
        delivered = deliver_pipeline(spec, "crm")
        batches += sum(len(r.batches) for r in delivered)
        if pulled.changes == 0 and all(r.changes == 0 for r in delivered):
            break
    assert batches >= (KEYS * UPDATES_PER_KEY) // 37  # many batches, each a target transaction
    assert_tables_equal(source_dsn, target_dsn, "items")
    log = assert_versions_increase(target_dsn)
    # Each key was written in many separate batches (compaction keeps one write per batch),
    # so the order check above had something to check.
    assert all(len(log[k]) > 20 for k in range(1, KEYS + 1)), {k: len(v) for k, v in log.items()}
    assert rows(target_dsn, "SELECT min(qty), max(qty) FROM items") == [
        (UPDATES_PER_KEY, UPDATES_PER_KEY)]


def test_concurrent_delivery_runs_keep_per_key_order(monkeypatch, source_dsn, target_dsn,
                                                      state_dsn):
    """Three delivery runs started at once over the same staged batches (as overlapping Dagster
    runs would): each change is applied once, per key in order."""
    create_versioned_tables(source_dsn, target_dsn)
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["items"],
                     policy={"batch_size": 37, "demand_budget": 100_000})
    pull_pipeline(spec, "crm")
    hot_key_workload(source_dsn, seed=2)
    assert pull_pipeline(spec, "crm").changes == KEYS * (UPDATES_PER_KEY + 1)

    errors: list[BaseException] = []
    applied: list[int] = []
    start = threading.Barrier(3)

    def run() -> None:
        try:
            start.wait()
            applied.extend(r.changes for r in deliver_pipeline(spec, "crm"))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sum(applied) == KEYS * (UPDATES_PER_KEY + 1)  # the batches were split, not repeated
    sync_until_idle(spec)
    assert_tables_equal(source_dsn, target_dsn, "items")
    assert_versions_increase(target_dsn)


# -- compaction: a property test against a dict model -----------------------------------------

COLUMNS = ("a", "b", "c")
TABLES = ("s.t1", "s.t2")
Model = dict[str, dict[Any, dict[str, Any]]]


def apply_upsert(table: dict[Any, dict[str, Any]], op: Upsert) -> None:
    """What the sink's INSERT ... ON CONFLICT DO UPDATE does with the columns a row carries."""
    if op.key in table:
        table[op.key] = {**table[op.key], **op.row}
    else:
        table[op.key] = {**dict.fromkeys(COLUMNS), **op.row}


def apply_one_by_one(model: Model, ops: list[TargetOp]) -> Model:
    out = {t: dict(rows_) for t, rows_ in model.items()}
    for op in ops:
        table = out[op.table]
        if isinstance(op, Truncate):
            table.clear()
        elif isinstance(op, Delete):
            table.pop(op.key, None)
        else:
            apply_upsert(table, op)
    return out


def apply_compacted(model: Model, ops: list[TargetOp]) -> Model:
    """The sink's order: truncates, then deletes, then upserts."""
    out = {t: dict(rows_) for t, rows_ in model.items()}
    compacted = compact(ops)
    for name, t_ops in compacted.items():
        if t_ops.truncate:
            out[name].clear()
    for name, t_ops in compacted.items():
        for d in t_ops.deletes:
            out[name].pop(d.key, None)
    for name, t_ops in compacted.items():
        for u in t_ops.upserts:
            apply_upsert(out[name], u)
    return out


keys = st.tuples(st.integers(0, 3))
values = st.one_of(st.none(), st.integers(0, 9), st.text("xyz", max_size=2))


@st.composite
def operations(draw: st.DrawFn) -> list[TargetOp]:
    ops: list[TargetOp] = []
    for i in range(draw(st.integers(0, 25))):
        table = draw(st.sampled_from(TABLES))
        pos = Position(100 + i // 3, i)
        kind = draw(st.sampled_from(["upsert", "upsert", "narrow", "partial", "delete",
                                     "truncate"]))
        if kind == "truncate":
            ops.append(Truncate(table, pos))
        elif kind == "delete":
            ops.append(Delete(table, draw(keys), pos))
        else:
            # A partial row leaves out some columns (unchanged TOAST): the target keeps them.
            # A narrow row is a full row of a relation version with fewer columns (after a
            # DROP COLUMN): the target keeps the columns it does not carry as well.
            cols = COLUMNS if kind == "upsert" else draw(
                st.lists(st.sampled_from(COLUMNS), unique=True, max_size=2))
            row = {c: draw(values) for c in cols}
            ops.append(Upsert(table, draw(keys), row, kind == "partial", pos))
    return ops


initial_tables = st.fixed_dictionaries({
    t: st.dictionaries(keys, st.fixed_dictionaries({c: values for c in COLUMNS}), max_size=4)
    for t in TABLES
})


@settings(max_examples=300, deadline=None)
@given(initial=initial_tables, ops=operations())
def test_compact_has_the_effect_of_applying_every_operation_in_order(initial, ops):
    assert apply_compacted(initial, ops) == apply_one_by_one(initial, ops)


@settings(max_examples=100, deadline=None)
@given(ops=operations())
def test_compact_keeps_at_most_one_operation_per_key(ops):
    for name, t_ops in compact(ops).items():
        assert name in TABLES
        final_keys = [op.key for op in t_ops.final.values()]
        assert len(final_keys) == len(set(final_keys))
        # The surviving operation of a key is its last one in the stream (positions kept).
        for key, op in t_ops.final.items():
            last = [o for o in ops if not isinstance(o, Truncate) and o.table == name
                    and o.key == key][-1]
            assert op.position == last.position


def test_compact_examples():
    """Hand-written cases the property covers, kept readable as documentation."""
    p = Position(1, 0)
    ops = [
        # full row, then a partial update of column b: merged into one full row
        Upsert("s.t1", (1,), {"a": 1, "b": 1, "c": 1}, False, p),
        Upsert("s.t1", (1,), {"b": 2}, True, p),
        # inserted then deleted: only the delete is left
        Upsert("s.t1", (2,), {"a": 1, "b": 1, "c": 1}, False, p),
        Delete("s.t1", (2,), p),
        # deleted then re-inserted by a row without column c (a later relation version): the
        # delete stays, so the target row does not keep its old c
        Delete("s.t1", (5,), p),
        Upsert("s.t1", (5,), {"a": 5, "b": 5}, False, p),
        # truncate forgets earlier operations on its table only
        Upsert("s.t2", (3,), {"a": 3, "b": 3, "c": 3}, False, p),
        Truncate("s.t2", p),
        Upsert("s.t2", (4,), {"a": 4}, True, p),
    ]
    out = compact(ops)
    assert out["s.t1"].upserts == [Upsert("s.t1", (1,), {"a": 1, "b": 2, "c": 1}, False, p),
                                   Upsert("s.t1", (5,), {"a": 5, "b": 5}, False, p)]
    assert out["s.t1"].deletes == [Delete("s.t1", (2,), p), Delete("s.t1", (5,), p)]
    assert out["s.t2"].truncate and [u.key for u in out["s.t2"].upserts] == [(4,)]
    assert out["s.t2"].upserts[0].partial


def _versioned_pipeline(monkeypatch: Any, source_dsn: str, target_dsn: str, state_dsn: str
                        ) -> Any:
    """The versioned tables, a pipeline of 50-change batches, its slot created."""
    create_versioned_tables(source_dsn, target_dsn)
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["items"],
                     policy={"batch_size": 50, "demand_budget": 100_000})
    pull_pipeline(spec, "crm")
    return spec


def test_windows_read_ahead_on_a_second_connection_keep_order_and_fail_cleanly(
        monkeypatch, source_dsn, target_dsn, state_dsn):
    """The next window is read and mapped on a second state connection while the sink applies
    one: one such connection per delivery, every change once and in order; an error there
    (here: the state database refuses the connection) fails the delivery after the windows
    already applied, and the next delivery goes on from there."""
    from contextlib import closing

    from sync_pipelines.engine.delivery.loop import deliver
    from sync_pipelines.engine.delivery.sinks.registry import open_sink
    from sync_pipelines.engine.errors import StateError
    from sync_pipelines.engine.pipeline import open_state

    spec = _versioned_pipeline(monkeypatch, source_dsn, target_dsn, state_dsn)
    pipeline = spec.pipelines["crm"]
    hot_key_workload(source_dsn, seed=3)
    pulled = pull_pipeline(spec, "crm")
    assert len(pulled.batches) > 10

    def refused() -> Any:
        raise StateError("cannot connect to the state database: refused by the test")

    with open_state(spec) as state, closing(open_sink(pipeline, "replica")) as sink:
        try:
            deliver(state, pipeline, "replica", sink, open_state=refused)
        except StateError as err:
            assert "refused by the test" in str(err)
        else:
            raise AssertionError("the read-ahead's error was lost")
        first = pulled.batches[0]
        assert state.delivered("crm", "replica") == first.last  # the window being applied
    opened = []

    def counted() -> Any:
        opened.append(open_state(spec))
        return opened[-1]

    with open_state(spec) as state, closing(open_sink(pipeline, "replica")) as sink:
        report = deliver(state, pipeline, "replica", sink, open_state=counted)
    assert len(report.batches) == len(pulled.batches) - 1 and len(opened) == 1
    assert opened[0].conn.closed
    assert_tables_equal(source_dsn, target_dsn, "items")
    assert_versions_increase(target_dsn)


def test_a_draining_run_reads_the_next_pass_ahead_and_the_rest_of_its_grown_window(
        monkeypatch, source_dsn, target_dsn, state_dsn):
    """At a pass's last window a draining run reads ahead what was staged since the pass
    began; by the next pass that window has grown by batches staged later, and only those are
    read then (the read ahead is its prefix). Every change once, in order, per key."""
    from contextlib import closing

    from sync_pipelines.engine.delivery import loop
    from sync_pipelines.engine.delivery.sinks.registry import open_sink
    from sync_pipelines.engine.pipeline import open_state

    spec = _versioned_pipeline(monkeypatch, source_dsn, target_dsn, state_dsn)
    pipeline = spec.pipelines["crm"]

    def write(first: int, n: int) -> None:  # n inserts and an update of each: 2n changes
        with psycopg.connect(source_dsn, autocommit=True) as conn:
            for i in range(first, first + n):
                conn.execute("INSERT INTO items VALUES (%s, nextval('item_version'), 0, 'a')",
                             (i,))
                conn.execute("UPDATE items SET version = nextval('item_version'), qty = 1 "
                             "WHERE id = %s", (i,))

    write(1, 100)  # 200 changes: 4 batches, two windows of 100
    staged = list(pull_pipeline(spec, "crm").batches)
    assert len(staged) == 4
    reads: list[tuple[str, Position, Position]] = []
    real_read = loop.WindowReader._read

    def spied(self: Any, after: Position, through: Position) -> Any:
        reads.append((threading.current_thread().name, after, through))
        return real_read(self, after, through)

    monkeypatch.setattr(loop.WindowReader, "_read", spied)
    windows_done = []

    def progress(report: Any) -> None:  # the sensor staging while the run delivers
        windows_done.append(report)
        if len(windows_done) in (1, 2):
            write(1000 + 100 * len(windows_done), 25)  # one batch of 50 each time
            staged.extend(pull_pipeline(spec, "crm").batches)

    with open_state(spec) as state, closing(open_sink(pipeline, "replica")) as sink:
        sink.window_changes = 100
        report = loop.deliver(state, pipeline, "replica", sink, keep_draining_s=30,
                              idle_s=0.3, progress=progress,
                              open_state=lambda: open_state(spec))
    assert report.changes == 300 and len(staged) == 6
    assert list(report.batches) == [b.batch_id for b in staged]
    assert_tables_equal(source_dsn, target_dsn, "items")
    assert_versions_increase(target_dsn)
    # Pass 1: windows [1, 2] and [3, 4]; at the second, batch 5 (staged after the first) is
    # read ahead; pass 2's window [5, 6] then reads only batch 6, on the run's own thread.
    first, second, fifth, sixth = staged[0], staged[1], staged[4], staged[5]
    main = threading.current_thread().name
    assert ("sync-read-ahead_0", loop.before(fifth), fifth.last) in reads, reads
    # On the run's own thread: only pass 1's first window, and pass 2's batch 6.
    assert [r for r in reads if r[0] == main] == [
        (main, loop.before(first), second.last), (main, fifth.last, sixth.last)], reads
