"""Pull-based flow control: the demand budget, transactions larger than it, zero demand,
overlapping pulls and an idle slot.

Checks, against real PostgreSQL, what a pull stages (``sync_state.batch`` in the state DB) and
where it leaves the slot (``confirmed_flush_lsn`` in ``pg_replication_slots``). Covers
:mod:`sync_pipelines.engine.capture.puller` through ``pull_pipeline``; delivery is only used to make
room in the budget. Does not touch the Dagster sensor, which merely calls ``pull_pipeline``.
"""

from __future__ import annotations

import psycopg

from sync_pipelines.engine.pipeline import deliver_pipeline, pull_pipeline
from sync_pipelines.engine.staging.store import StateStore
from sync_pipelines.engine.wire.pgoutput import parse_lsn

from .support.pipelines import assert_tables_equal, execute, make_spec, rows, sync_until_idle


def undelivered(state_dsn: str) -> int:
    """Changes staged and not yet delivered: what the budget limits."""
    return rows(state_dsn, "SELECT coalesce(sum(n_changes), 0)::int FROM sync_state.batch")[0][0]


def confirmed_flush(source_dsn: str) -> int:
    return parse_lsn(rows(source_dsn, "SELECT confirmed_flush_lsn::text FROM "
                                      "pg_replication_slots WHERE slot_name = 'sync_crm'")[0][0])


def current_lsn(source_dsn: str) -> int:
    return parse_lsn(rows(source_dsn, "SELECT pg_current_wal_lsn()::text")[0][0])


def record_peeks(monkeypatch) -> list[int]:
    """The ``upto_nchanges`` of every peek from now on (the real peek still runs)."""
    from sync_pipelines.engine.capture.source import Source

    asked: list[int] = []
    peek = Source.peek

    def recorded(self, upto_nchanges, fetch_chunk):
        asked.append(upto_nchanges)
        return peek(self, upto_nchanges, fetch_chunk)

    monkeypatch.setattr(Source, "peek", recorded)
    return asked


def setup(monkeypatch, source_dsn, target_dsn, state_dsn, *, budget: int, batch: int):
    execute(source_dsn, "CREATE TABLE items (id int PRIMARY KEY, v int, note text)",
            "CREATE TABLE other (id int PRIMARY KEY, v int)")
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["items"],
                     policy={"demand_budget": budget, "batch_size": batch})
    assert pull_pipeline(spec, "crm").changes == 0  # creates the slot
    return spec


def small_transactions(source_dsn: str, n: int) -> int:
    """``n`` transactions of 1-3 changes each; returns the number of changes."""
    changes = 0
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        for i in range(n):
            with conn.transaction():
                conn.execute("INSERT INTO items VALUES (%s, 0, 'n')", (i,))
                changes += 1
                if i % 2:
                    conn.execute("UPDATE items SET v = v + 1 WHERE id = %s", (i - 1,))
                    changes += 1
                if i % 5 == 4:
                    conn.execute("DELETE FROM items WHERE id = %s", (i - 3,))
                    changes += 1
    return changes


def test_budget_is_never_exceeded_with_many_small_transactions(
    monkeypatch, source_dsn, target_dsn, state_dsn
):
    budget = 120
    spec = setup(monkeypatch, source_dsn, target_dsn, state_dsn, budget=budget, batch=25)
    total = small_transactions(source_dsn, 400)
    assert total > 5 * budget
    staged = 0
    peak = 0
    stopped_by_demand = 0
    for _ in range(500):
        report = pull_pipeline(spec, "crm")
        held = undelivered(state_dsn)
        # The budget bounds what is held after every pull, and a pull never takes more than
        # the demand it computed.
        assert held <= budget, f"{held} undelivered changes staged, budget {budget}"
        assert report.changes <= report.demand
        assert report.demand == budget - report.undelivered_before
        staged += report.changes
        peak = max(peak, held)
        stopped_by_demand += report.stopped_by_demand
        # Deliver only the oldest batch: the budget stays under pressure.
        oldest = rows(state_dsn, "SELECT min(batch_id) FROM sync_state.batch")[0][0]
        if oldest is None and report.changes == 0:
            break
        deliver_pipeline(spec, "crm", upto_batch=oldest)
    else:
        raise AssertionError("pipeline did not drain")
    assert staged == total  # nothing lost, nothing staged twice
    assert peak > budget - 25, f"the budget was never approached (peak {peak})"
    assert stopped_by_demand > 0, "no pull was ever limited by demand"
    assert_tables_equal(source_dsn, target_dsn, "items")


def test_transaction_larger_than_budget_alone_is_taken_whole_in_batches(
    monkeypatch, source_dsn, target_dsn, state_dsn
):
    # Nothing else is staged, so waiting cannot make room: the pull takes the whole
    # transaction (the slot can only pass it whole), in batch-size chunks.
    budget, size, batch = 300, 1000, 50
    spec = setup(monkeypatch, source_dsn, target_dsn, state_dsn, budget=budget, batch=batch)
    rows(source_dsn, "INSERT INTO items SELECT g, g, 'big' FROM generate_series(1, %s) g "
                     "RETURNING NULL", (size,))  # one transaction
    report = pull_pipeline(spec, "crm")
    assert report.changes == size and not report.stopped_by_demand
    assert all(b.n_changes <= batch for b in report.batches), report.batches
    commit_lsn = report.batches[0].first.commit_lsn
    assert confirmed_flush(source_dsn) > commit_lsn
    # The mailbox is over budget now, so the next tick pulls nothing until delivery.
    rows(source_dsn, "INSERT INTO items VALUES (%s, 0, 'after') RETURNING NULL", (size + 1,))
    assert "demand" in (pull_pipeline(spec, "crm").skipped or "")
    deliver_pipeline(spec, "crm")
    sync_until_idle(spec)
    assert_tables_equal(source_dsn, target_dsn, "items")


def test_transaction_larger_than_budget_waits_behind_held_changes(
    monkeypatch, source_dsn, target_dsn, state_dsn
):
    budget, size = 300, 1000
    spec = setup(monkeypatch, source_dsn, target_dsn, state_dsn, budget=budget, batch=50)
    n_small = small_transactions(source_dsn, 100)
    assert n_small < budget
    slot_before = confirmed_flush(source_dsn)
    rows(source_dsn, "INSERT INTO items SELECT g, g, 'big' FROM generate_series(1000, %s) g "
                     "RETURNING NULL", (999 + size,))  # one transaction
    first = pull_pipeline(spec, "crm")
    # The small transactions plus what fits of the big one: never more than the budget while
    # something else is held.
    assert first.changes == budget and first.stopped_by_demand
    assert undelivered(state_dsn) == budget
    big_commit = first.batches[-1].last.commit_lsn
    assert slot_before < confirmed_flush(source_dsn) < big_commit  # slot before the big one
    assert "demand" in (pull_pipeline(spec, "crm").skipped or "")
    deliver_pipeline(spec, "crm")
    # Mailbox empty: the rest of the big transaction is taken whole, after what was staged.
    second = pull_pipeline(spec, "crm")
    assert second.changes == n_small + size - budget
    assert confirmed_flush(source_dsn) > big_commit
    sync_until_idle(spec)
    assert_tables_equal(source_dsn, target_dsn, "items")


def test_zero_demand_skips_and_stages_nothing(monkeypatch, source_dsn, target_dsn, state_dsn):
    budget = 100
    spec = setup(monkeypatch, source_dsn, target_dsn, state_dsn, budget=budget, batch=40)
    small_transactions(source_dsn, 200)
    first = pull_pipeline(spec, "crm")
    assert first.changes == budget and first.stopped_by_demand
    batches_before = rows(state_dsn, "SELECT batch_id, n_changes FROM sync_state.batch")
    pipeline_before = rows(state_dsn, "SELECT staged_lsn, staged_seq, advanced_lsn "
                                      "FROM sync_state.pipeline")
    slot_before = confirmed_flush(source_dsn)

    second = pull_pipeline(spec, "crm")  # nothing was delivered: no room
    assert second.skipped is not None and "demand" in second.skipped, second.skipped
    assert second.changes == 0 and second.batches == () and second.demand == 0
    assert rows(state_dsn, "SELECT batch_id, n_changes FROM sync_state.batch") == batches_before
    assert rows(state_dsn, "SELECT staged_lsn, staged_seq, advanced_lsn "
                           "FROM sync_state.pipeline") == pipeline_before
    assert confirmed_flush(source_dsn) == slot_before

    deliver_pipeline(spec, "crm")  # room again: pulling resumes
    assert pull_pipeline(spec, "crm").changes > 0
    sync_until_idle(spec)
    assert_tables_equal(source_dsn, target_dsn, "items")


def test_overlapping_pull_is_skipped(monkeypatch, source_dsn, target_dsn, state_dsn):
    spec = setup(monkeypatch, source_dsn, target_dsn, state_dsn, budget=1000, batch=100)
    small_transactions(source_dsn, 50)
    slot_before = confirmed_flush(source_dsn)
    with StateStore.connect(state_dsn) as other:  # a pull in another process holds the lock
        assert other.try_lock("pull:crm")
        report = pull_pipeline(spec, "crm")
        assert report.skipped is not None and "another pull" in report.skipped, report.skipped
        assert report.changes == 0
        assert undelivered(state_dsn) == 0
        assert confirmed_flush(source_dsn) == slot_before
        other.unlock("pull:crm")
        assert pull_pipeline(spec, "crm").changes > 0  # released: the next tick pulls


def test_idle_slot_advances_over_unrelated_changes(monkeypatch, source_dsn, target_dsn,
                                                   state_dsn):
    spec = setup(monkeypatch, source_dsn, target_dsn, state_dsn, budget=1000, batch=100)
    slot_before = confirmed_flush(source_dsn)
    execute(source_dsn, "INSERT INTO other SELECT g, g FROM generate_series(1, 500) g",
            "UPDATE other SET v = v + 1")
    after_writes = current_lsn(source_dsn)
    report = pull_pipeline(spec, "crm")
    assert report.changes == 0 and report.batches == ()
    assert undelivered(state_dsn) == 0
    slot = confirmed_flush(source_dsn)
    # The slot moved over the unrelated WAL: an idle pipeline does not hold it back.
    assert slot >= after_writes > slot_before, (slot, after_writes, slot_before)
    assert report.advanced_to == slot
    assert rows(state_dsn, "SELECT advanced_lsn FROM sync_state.pipeline") == [(slot,)]


def test_a_draining_delivery_takes_what_is_staged_while_it_runs_and_lets_others_in(
        monkeypatch, source_dsn, target_dsn, state_dsn):
    """A Dagster delivery run keeps delivering while the sensor stages (``keep_draining``),
    ends once nothing new came for ``run_idle_seconds``, and between passes leaves the
    target's lock free (a sweep or a conflict resolution is not kept out)."""
    import threading
    import time

    from sync_pipelines.engine.pipeline import deliver_target, open_state

    execute(source_dsn, "CREATE TABLE items (id int PRIMARY KEY, v int, note text)")
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["items"],
                     policy={"run_drain_seconds": 30, "run_idle_seconds": 1.5})
    pull_pipeline(spec, "crm")
    execute(source_dsn, "INSERT INTO items SELECT g, 0, 'a' FROM generate_series(1, 100) g")
    pull_pipeline(spec, "crm")
    reports, progress = [], []

    def run() -> None:
        reports.append(deliver_target(spec, "crm", "replica", keep_draining=True,
                                      progress=progress.append))

    t0 = time.monotonic()
    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(0.6)
    lock_free = False
    with open_state(spec) as state:  # the run idles between passes: the lock is free then
        for _ in range(20):
            if state.try_lock("deliver:crm:replica"):
                state.unlock("deliver:crm:replica")
                lock_free = True
                break
            time.sleep(0.05)
    execute(source_dsn, "INSERT INTO items SELECT g, 0, 'b' FROM generate_series(101, 150) g")
    pull_pipeline(spec, "crm")  # staged while the run is going on: it takes these too
    worker.join(timeout=30)
    elapsed = time.monotonic() - t0
    [report] = reports
    assert lock_free
    assert (report.changes, len(report.batches)) == (150, 2)
    assert [p.changes for p in progress] == [100, 150]  # one progress report per window
    assert 1.5 < elapsed < 10  # ended by the idle time, not the 30 s bound
    assert_tables_equal(source_dsn, target_dsn, "items")
    # Without keep_draining (the engine's default, and every test's) a delivery ends at once.
    execute(source_dsn, "UPDATE items SET v = 1")
    pull_pipeline(spec, "crm")
    t0 = time.monotonic()
    assert sum(r.changes for r in deliver_pipeline(spec, "crm")) == 150
    assert time.monotonic() - t0 < 1.5


def test_a_draining_delivery_is_bounded_in_time(monkeypatch, source_dsn, target_dsn,
                                                state_dsn):
    """A steady stream does not keep one run going for ever: it stops at run_drain_seconds
    (between windows) and the rest is the next run's."""
    import threading
    import time

    from sync_pipelines.engine.pipeline import deliver_target

    execute(source_dsn, "CREATE TABLE items (id int PRIMARY KEY, v int, note text)")
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["items"],
                     policy={"run_drain_seconds": 2, "run_idle_seconds": 5})
    pull_pipeline(spec, "crm")
    stop = threading.Event()

    def stream() -> None:  # a change and a pull every 0.2 s, like a busy source and sensor
        i = 0
        while not stop.is_set():
            i += 1
            with psycopg.connect(source_dsn, autocommit=True) as conn:
                conn.execute("INSERT INTO items VALUES (%s, 0, 's')", (i,))
            pull_pipeline(spec, "crm")
            time.sleep(0.2)

    feeder = threading.Thread(target=stream)
    feeder.start()
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        report = deliver_target(spec, "crm", "replica", keep_draining=True)
        elapsed = time.monotonic() - t0
    finally:
        stop.set()
        feeder.join()
    assert 2 <= elapsed < 4
    assert len(report.batches) >= 3  # it kept taking new batches while within the bound
    sync_until_idle(spec)
    assert_tables_equal(source_dsn, target_dsn, "items")


def test_a_pull_waits_until_half_the_budget_is_free(monkeypatch, source_dsn, target_dsn,
                                                    state_dsn):
    """Each peek re-reads the slot's WAL from its restart point, so refills come in halves of
    the budget, not in the slivers delivery frees batch by batch."""
    budget = 100
    spec = setup(monkeypatch, source_dsn, target_dsn, state_dsn, budget=budget, batch=20)
    small_transactions(source_dsn, 300)
    first = pull_pipeline(spec, "crm")
    assert first.changes == budget and first.stopped_by_demand
    deliver_pipeline(spec, "crm", upto_batch=first.batches[1].batch_id)  # frees about 40
    assert 0 < budget - undelivered(state_dsn) < budget // 2
    waiting = pull_pipeline(spec, "crm")
    assert waiting.changes == 0 and "under half the budget" in (waiting.skipped or "")
    deliver_pipeline(spec, "crm", upto_batch=first.batches[2].batch_id)  # about 60 in all
    assert budget - undelivered(state_dsn) >= budget // 2
    refill = pull_pipeline(spec, "crm")
    assert 0 < refill.changes <= refill.demand and undelivered(state_dsn) <= budget
    sync_until_idle(spec)
    assert_tables_equal(source_dsn, target_dsn, "items")


def test_a_tick_keeps_pulling_while_a_run_delivers(monkeypatch, source_dsn, target_dsn,
                                                   state_dsn):
    """With keep_pulling_s, one tick stages more than a budget while a draining delivery
    frees room — never more than the budget at once; without a run under way, one pull."""
    import threading

    from sync_pipelines.engine.pipeline import deliver_target

    budget = 100
    execute(source_dsn, "CREATE TABLE items (id int PRIMARY KEY, v int, note text)")
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["items"],
                     policy={"demand_budget": budget, "batch_size": 20,
                             "run_idle_seconds": 1.5})
    assert pull_pipeline(spec, "crm").changes == 0
    total = small_transactions(source_dsn, 400)
    alone = pull_pipeline(spec, "crm", keep_pulling_s=10, keep_pulling=lambda: False)
    assert alone.changes == budget  # nobody delivers: one pull, as before

    peak = [0]
    run = threading.Thread(target=deliver_target, args=(spec, "crm", "replica"),
                           kwargs={"keep_draining": True})

    def delivering() -> bool:
        peak[0] = max(peak[0], undelivered(state_dsn))
        return run.is_alive()

    run.start()
    tick = pull_pipeline(spec, "crm", keep_pulling_s=30, keep_pulling=delivering)
    run.join(timeout=60)
    assert tick.changes == total - budget, tick
    assert len(tick.batches) >= (total - budget) // 20 and tick.skipped is None
    assert peak[0] <= budget
    deliver_pipeline(spec, "crm")
    assert_tables_equal(source_dsn, target_dsn, "items")


def test_a_tick_peeks_one_batch_first_while_a_run_waits(monkeypatch, source_dsn, target_dsn,
                                                        state_dsn):
    """The server decodes a whole peek before its first row: while a delivery run drains and
    nothing is staged, a tick peeks about one batch first (the run has work sooner), then the
    rest of the budget at once; a tick with no run under way peeks the whole budget."""
    asked = record_peeks(monkeypatch)
    budget, batch = 1000, 100
    spec = setup(monkeypatch, source_dsn, target_dsn, state_dsn, budget=budget, batch=batch)
    slack = len(spec.pipelines["crm"].tables) + 8
    with psycopg.connect(source_dsn, autocommit=True) as conn:  # 250 transactions of 10
        for lo in range(0, 2500, 10):
            conn.execute("INSERT INTO items SELECT g, 0, 'n' "
                         "FROM generate_series(%s::int, %s::int) g", (lo, lo + 9))
    asked.clear()
    alone = pull_pipeline(spec, "crm", keep_pulling_s=10, keep_pulling=lambda: False)
    assert alone.changes == budget and asked == [3 * budget + slack]  # one peek, as before
    deliver_pipeline(spec, "crm")
    assert undelivered(state_dsn) == 0

    asked.clear()
    answers = iter([True, True])  # a run drains: at the start, and after the first pull
    tick = pull_pipeline(spec, "crm", keep_pulling_s=10, keep_pulling=lambda: next(answers,
                                                                                  False))
    # (about 1.2 rows per change here: BEGIN and COMMIT of each transaction of 10)
    assert len(asked) == 2 and asked[0] < 2 * batch + slack < asked[1], asked
    first = tick.batches[0]
    assert first.n_changes <= batch + 10  # (whole transactions)
    assert tick.changes == budget and undelivered(state_dsn) == budget
    sync_until_idle(spec)
    assert_tables_equal(source_dsn, target_dsn, "items")


def test_a_following_tick_stages_changes_as_they_come_while_a_run_delivers(
        monkeypatch, source_dsn, target_dsn, state_dsn):
    """With ``follow``, a tick that has caught up goes on pulling every FOLLOW_S while a run
    delivers, so a change committed during the tick is staged (and delivered) within about
    that long instead of at the next tick; once no run is under way it ends."""
    import threading
    import time

    from sync_pipelines.engine.pipeline import FOLLOW_S, deliver_target

    execute(source_dsn, "CREATE TABLE items (id int PRIMARY KEY, v int, note text)")
    spec = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                     state_dsn=state_dsn, tables=["items"],
                     policy={"run_idle_seconds": 2.5})
    assert pull_pipeline(spec, "crm").changes == 0
    execute(source_dsn, "INSERT INTO items VALUES (0, 0, 'first')")
    assert pull_pipeline(spec, "crm").changes == 1
    run = threading.Thread(target=deliver_target, args=(spec, "crm", "replica"),
                           kwargs={"keep_draining": True})

    def writer() -> None:
        with psycopg.connect(source_dsn, autocommit=True) as conn:
            for i in range(1, 9):
                time.sleep(0.3)
                conn.execute("INSERT INTO items VALUES (%s, 0, 'later')", (i,))

    run.start()
    writing = threading.Thread(target=writer)
    writing.start()
    started = time.monotonic()
    tick = pull_pipeline(spec, "crm", keep_pulling_s=30, keep_pulling=run.is_alive,
                         follow=True)
    ended = time.monotonic()
    writing.join()
    run.join(timeout=30)
    assert tick.changes == 8 and len(tick.batches) >= 3, tick  # staged as they came
    # It ended because the run did (idle 2.5 s after the last change), not at its bound.
    assert ended - started < 15
    delivered = rows(target_dsn, "SELECT count(*) FROM items")[0][0]
    assert delivered == 9
    # Not following: one pull, whatever the run does.
    execute(source_dsn, "INSERT INTO items VALUES (100, 0, 'alone')")
    alone = pull_pipeline(spec, "crm", keep_pulling_s=30, keep_pulling=lambda: True)
    assert alone.changes == 1 and alone.duration_s < 5 * FOLLOW_S
    deliver_pipeline(spec, "crm")
    assert_tables_equal(source_dsn, target_dsn, "items")


def test_a_peek_asks_for_the_rows_its_pull_will_take(monkeypatch, source_dsn, target_dsn,
                                                     state_dsn):
    """The server materialises a whole peek before its first row: a pull asks for about the
    rows its demand needs at the slot's measured rows per change (the worst case, three,
    until it has measured), and a workload whose transactions shrink still drains whole."""
    asked = record_peeks(monkeypatch)
    budget = 1000
    spec = setup(monkeypatch, source_dsn, target_dsn, state_dsn, budget=budget, batch=250)
    asked.clear()
    slack = len(spec.pipelines["crm"].tables) + 8
    # Transactions of 200 changes: about one row per change.
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        for lo in range(10_000, 14_000, 200):
            conn.execute("INSERT INTO items SELECT g, 0, 'n' "
                         "FROM generate_series(%s::int, %s::int) g", (lo, lo + 199))
    reports = []
    while (report := pull_pipeline(spec, "crm")).changes or undelivered(state_dsn):
        reports.append(report)
        deliver_pipeline(spec, "crm")
    assert sum(r.changes for r in reports) == 4000
    assert asked[0] == 3 * budget + slack  # nothing measured yet: the worst case
    assert all(upto <= 1.3 * budget + slack for upto in asked[1:]), asked
    # One-change transactions now, three rows each: the first pull asks for too few rows,
    # says there is more, and the next ones ask for enough.
    asked.clear()
    total = 4000 + small_transactions(source_dsn, 1500)
    more = []
    while (report := pull_pipeline(spec, "crm")).changes or undelivered(state_dsn):
        reports.append(report)
        more.append(report.more)
        deliver_pipeline(spec, "crm")
    assert more[0] and reports[-len(more)].changes < budget, (more, asked)
    assert max(asked[1:]) > 2 * budget  # the estimate caught up
    assert sum(r.changes for r in reports) == total
    assert_tables_equal(source_dsn, target_dsn, "items")
