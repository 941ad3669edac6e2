"""A live change generator for the demo CRM: realistic inserts, updates and deletes.

Contract: :func:`seed` fills an empty CRM once (idempotent: does nothing if customers exist);
:class:`ChangeGenerator` runs in a thread, committing small transactions at about ``rate``
changes per second until stopped. A crash just stops the changes; nothing else depends on it.
"""

from __future__ import annotations

import random
import threading
import time
from importlib import resources

import psycopg

INDUSTRIES = ["software", "retail", "logistics", "health", "finance", "energy", "media"]
COUNTRIES = ["US", "DE", "FR", "GB", "ES", "NL", "BR", "JP", "IN", "CA"]
FIRST = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia", "Tim"]
LAST = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson"]
STAGES = ["lead", "qualified", "proposal", "negotiation", "won", "lost", "spam"]


def apply_schema(dsn: str) -> None:
    ddl = resources.files("sync_pipelines.demo").joinpath("crm.sql").read_text()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(ddl)


TASKS_DDL = """CREATE TABLE IF NOT EXISTS tasks (
    id int PRIMARY KEY, title text NOT NULL, status text NOT NULL DEFAULT 'open',
    assignee text, updated_at timestamptz NOT NULL DEFAULT now())"""


CONTACT_BOOK_DDL = """CREATE TABLE IF NOT EXISTS contact_book (
    id bigint PRIMARY KEY, customer_id bigint, first_name text, last_name text, full_name text,
    email text, phone text, tags text, external_id text, updated_at timestamptz)"""


def apply_reporting_schema(dsn: str) -> None:
    """The reporting database's sides of the two-way links ``tasks`` (with the CRM database)
    and ``contacts`` (with the CRM API)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(TASKS_DDL)
        conn.execute(CONTACT_BOOK_DDL)


def seed_tasks(dsn: str) -> None:
    """A few tasks in the CRM (the link brings them to reporting)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO tasks (id, title, assignee) SELECT g, 'Call customer ' || g, "
                     "(ARRAY['ana', 'ben', 'chloe'])[1 + g % 3] FROM generate_series(1, 20) g "
                     "ON CONFLICT (id) DO NOTHING")


def seed(dsn: str, customers: int = 200) -> bool:
    """Fill an empty CRM; returns False if it already had data."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM customers").fetchone()
        if row and row[0]:
            return False
        rng = random.Random(7)
        for _ in range(customers):
            _insert_customer(conn, rng)
        return True


def _insert_customer(conn: psycopg.Connection, rng: random.Random) -> None:
    row = conn.execute(
        "INSERT INTO customers (name, industry, country, annual_revenue, internal_notes) "
        "VALUES (%s, %s, %s, %s, %s) RETURNING id",
        (f"{rng.choice(LAST)} {rng.choice(['Inc', 'GmbH', 'SA', 'Ltd'])} {rng.randint(1, 9999)}",
         rng.choice(INDUSTRIES), rng.choice(COUNTRIES), round(rng.uniform(1e4, 1e8), 2),
         "do not share"),
    ).fetchone()
    assert row is not None
    cid = row[0]
    for _ in range(rng.randint(1, 3)):
        f, last = rng.choice(FIRST), rng.choice(LAST)
        conn.execute(
            "INSERT INTO contacts (customer_id, first_name, last_name, email, phone, tags) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            (cid, f, last, f"{f}.{last}@example.com".lower(), f"+1-555-{rng.randint(0, 9999):04d}",
             rng.sample(["vip", "newsletter", "billing", "tech"], 2)),
        )
    conn.execute(
        "INSERT INTO deals (customer_id, title, stage, amount, close_date, properties) "
        "VALUES (%s, %s, %s, %s, current_date + %s, %s)",
        (cid, f"Deal {rng.randint(1, 99999)}", rng.choice(STAGES), round(rng.uniform(500, 5e5), 2),
         rng.randint(1, 90), psycopg.types.json.Jsonb({"source": rng.choice(["web", "event"])})),
    )


def step(conn: psycopg.Connection, rng: random.Random) -> None:
    """One small transaction of CRM activity."""
    roll = rng.random()
    if roll < 0.15:
        _insert_customer(conn, rng)
    elif roll < 0.75:
        conn.execute(
            "UPDATE deals SET stage = %s, amount = amount * %s, updated_at = now() "
            "WHERE id = (SELECT id FROM deals ORDER BY random() LIMIT 1)",
            (rng.choice(STAGES), round(rng.uniform(0.8, 1.3), 3)),
        )
    elif roll < 0.95:
        conn.execute(
            "UPDATE contacts SET phone = %s, updated_at = now() "
            "WHERE id = (SELECT id FROM contacts ORDER BY random() LIMIT 1)",
            (f"+1-555-{rng.randint(0, 9999):04d}",),
        )
    else:
        conn.execute("DELETE FROM customers WHERE id = (SELECT id FROM customers "
                     "ORDER BY random() LIMIT 1)")


class ChangeGenerator(threading.Thread):
    """Commits CRM activity at about ``rate`` transactions per second until :meth:`stop`."""

    def __init__(self, dsn: str, rate: float = 5.0, seed_value: int | None = None) -> None:
        super().__init__(name="crm-change-generator", daemon=True)
        self.dsn = dsn
        self.rate = rate
        self.rng = random.Random(seed_value)
        self._stop_event = threading.Event()
        self.transactions = 0

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self._stop_event.is_set():
                with conn.transaction():
                    step(conn, self.rng)
                self.transactions += 1
                time.sleep(1.0 / self.rate)
