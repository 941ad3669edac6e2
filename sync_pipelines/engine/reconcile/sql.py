"""Reconcile, Postgres targets: what each server is asked (helpers of :mod:`.reconcile`).

Contract: a :class:`Side` is one table on one server (the source table, or its target table)
with its key columns and the columns fetched as text. It builds every query the comparison
sends: the range boundaries, the per-group aggregates, the rows of chosen groups, all rows in
key order, rows by key. Identifiers go through :class:`psycopg.sql.Identifier`, values are
parameters. Everything runs inside :func:`read_only` (``REPEATABLE READ READ ONLY``), through
server-side cursors (:func:`stream`), optionally fetched ahead in a thread (:class:`prefetch`).

Key order is the servers' business, never Python's: text-like key columns (any type with a
collation) are compared ``COLLATE "C"`` (byte order) on both sides, and a row's range number is
computed by its own server from the same boundaries, so both servers put a key in the same
range even if their collations differ. Groups are numbered ``(range, sub-bucket)``; the
sub-bucket is a hash of the key's text form, the same on both sides.
"""

from __future__ import annotations

import itertools
import queue
import re
import threading
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import pq, sql

from ..wire.pgtypes import TEXT_FORMAT_SETTINGS
from .drift import Key

Rows = list[tuple[Any, ...]]
Chunks = Generator[Rows, None, None]
KeyRange = tuple[Key | None, Key | None]
_LOCAL_SETTINGS = re.sub(r"\bSET\b", "SET LOCAL", TEXT_FORMAT_SETTINGS)
_COLLATE_C = sql.SQL(' COLLATE "C"')
_cursor_ids = itertools.count()


@dataclass(frozen=True)
class Column:
    param_type: str
    """The type without modifier, for parameters (a boundary cast to varchar(10) is cut)."""
    full_type: str
    collatable: bool


def catalog(conn: psycopg.Connection[Any], table: str) -> dict[str, Column] | None:
    """The table's columns, or ``None`` if it does not exist."""
    rows = conn.execute(
        "SELECT a.attname, format_type(a.atttypid, -1), format_type(a.atttypid, a.atttypmod),"
        " t.typcollation <> 0 FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid"
        " WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped",
        (sql.Identifier(*table.split(".")).as_string(conn),)).fetchall()
    return {r[0]: Column(r[1], r[2], r[3]) for r in rows} or None


def _ids(names: Sequence[str], qualifier: str | None = None, *, text: bool = False
         ) -> sql.Composed:
    q = [qualifier] if qualifier else []
    return sql.SQL(", ").join(sql.SQL("{}::text" if text else "{}").format(
        sql.Identifier(*q, n)) for n in names)


@dataclass
class Side:
    conn: psycopg.Connection[Any]
    table: str
    keys: list[str]
    key_cols: list[Column]
    cols: list[str]
    """Columns fetched (as text), in order."""

    def ident(self) -> sql.Identifier:
        return sql.Identifier(*self.table.split("."))

    def key_list(self, qualifier: str | None = None) -> sql.Composed:
        return sql.SQL(", ").join(
            sql.Identifier(*([qualifier] if qualifier else []), k)
            + (_COLLATE_C if c.collatable else sql.SQL(""))
            for k, c in zip(self.keys, self.key_cols, strict=True))

    def key_params(self) -> sql.Composed:
        return sql.SQL("({})").format(sql.SQL(", ").join(
            sql.SQL("%s::" + c.param_type) for c in self.key_cols))

    def where(self, key_range: KeyRange | None) -> tuple[sql.Composable, list[Any]]:
        """Keys in (lo, hi]."""
        lo, hi = key_range or (None, None)
        parts, params = [], []
        for bound, op in ((lo, ">"), (hi, "<=")):
            if bound is not None:
                parts.append(sql.SQL("({}) " + op + " {}").format(self.key_list(),
                                                                  self.key_params()))
                params += list(bound)
        if not parts:
            return sql.SQL(""), []
        return sql.SQL(" WHERE ") + sql.SQL(" AND ").join(parts), params

    def bucket(self, bounds: Sequence[Key]) -> tuple[sql.Composable, list[Any]]:
        """A row's range number: how many boundaries are <= its key. A balanced CASE tree
        (log2 comparisons per row) of row comparisons, which honour each column's COLLATE
        where width_bucket over records would not."""
        params: list[Any] = []
        key = sql.SQL("({})").format(self.key_list())

        def tree(lo: int, hi: int) -> sql.Composable:
            if lo == hi:
                return sql.SQL(str(lo))
            mid = (lo + hi) // 2
            params.extend(bounds[mid])
            return sql.SQL("CASE WHEN {} < {} THEN {} ELSE {} END").format(
                key, self.key_params(), tree(lo, mid), tree(mid + 1, hi))

        return tree(0, len(bounds)), params

    def boundaries(self, key_range: KeyRange | None, range_rows: int) -> list[Key]:
        """Every ``range_rows``-th key (text form), counted by the server in key order."""
        w, params = self.where(key_range)
        return [tuple(r) for r in self.conn.execute(sql.SQL(
            "SELECT {} FROM (SELECT {}, row_number() OVER (ORDER BY {}) AS sync_rn FROM {}{}) q"
            " WHERE sync_rn %% %s = 1 AND sync_rn > 1 ORDER BY sync_rn").format(
            _ids(self.keys, text=True), _ids(self.keys), self.key_list(), self.ident(), w),
            [*params, range_rows]).fetchall()]

    def _groups(self, bounds: Sequence[Key], subs: int, key_range: KeyRange | None
                ) -> tuple[sql.Composable, sql.Composable, list[Any]]:
        bucket, params = self.bucket(bounds)
        texts = [sql.SQL("{}::text").format(sql.Identifier(k)) for k in self.keys]
        key_text = texts[0] if len(texts) == 1 else sql.SQL("ROW({})::text").format(
            sql.SQL(", ").join(texts))
        w, w_params = self.where(key_range)
        return sql.SQL("{} AS sync_b, (hashtextextended({}, 1) & 9223372036854775807) %% {} "
                       "AS sync_s").format(bucket, key_text, sql.SQL(str(subs))), w, \
            params + w_params

    def aggregates(self, bounds: Sequence[Key], subs: int, key_range: KeyRange | None,
                   ) -> Chunks:
        """``(range, sub, count, hash)`` per group in group order; the hash is order-free."""
        g, w, params = self._groups(bounds, subs, key_range)
        # Each column hashed (NULL apart from ''), xor-ed, hashed again so that a row's values
        # stay bound together (two rows swapping a value change the sum); bit_xor over rows.
        # About twice as fast as hashing ROW(...)::text.
        terms = sql.SQL(" # ").join(
            sql.SQL("coalesce(hashtextextended({}::text, {}), {})").format(
                sql.Identifier(c), sql.SQL(str(j)), sql.SQL(str(-1 - j)))
            for j, c in enumerate(self.cols))
        return stream(self.conn, sql.SQL(
            "WITH g AS MATERIALIZED (SELECT sync_b, sync_s, count(*), bit_xor(sync_h) FROM "
            "(SELECT {}, hashint8extended({}, 0) AS sync_h FROM {}{}) q GROUP BY 1, 2) "
            "SELECT * FROM g ORDER BY 1, 2").format(g, terms, self.ident(), w),
            params, 50_000, hash_groups=True)

    def rows_of(self, bounds: Sequence[Key], subs: int, key_range: KeyRange | None,
                groups: Sequence[tuple[int, int]], size: int) -> Chunks:
        """``(range, sub, *columns)`` of the rows in ``groups``, in group order."""
        g, w, params = self._groups(bounds, subs, key_range)
        # Text casts outside the scan: only the rows of the groups asked for pay for them.
        return stream(self.conn, sql.SQL(
            "SELECT sync_b, sync_s, {} FROM (SELECT {}, {} FROM {}{}) q WHERE (sync_b, sync_s)"
            " IN (SELECT * FROM unnest(%s::int[], %s::bigint[])) ORDER BY 1, 2").format(
            _ids(self.cols, "q", text=True), g, _ids(self.cols), self.ident(), w),
            params + [[d[0] for d in groups], [d[1] for d in groups]], size)

    def all_rows(self, bounds: Sequence[Key], key_range: KeyRange | None, size: int
                 ) -> Chunks:
        """``(range, 0, *columns)`` of every row, in key order (so in range order)."""
        bucket, params = self.bucket(bounds)
        w, w_params = self.where(key_range)
        # ORDER BY names the table's columns: bare, they would mean the text outputs.
        return stream(self.conn, sql.SQL(
            "SELECT {}, 0, {} FROM {} AS sync_t{} ORDER BY {}").format(
            bucket, _ids(self.cols, text=True), self.ident(), w, self.key_list("sync_t")),
            params + w_params, size)

    def by_keys(self, keys: Sequence[Key]) -> Rows:
        """``(*key as given, *columns)`` of the rows with these keys (absent ones left out)."""
        q = [sql.Identifier(f"sync_q{i}") for i in range(len(self.keys))]
        return self.conn.execute(sql.SQL(
            "SELECT {}, {} FROM unnest({}) AS q({}) JOIN {} AS sync_t ON {}").format(
            sql.SQL(", ").join(sql.SQL("q.{}").format(x) for x in q),
            _ids(self.cols, "sync_t", text=True),
            sql.SQL(", ").join(sql.SQL("%s::text[]") for _ in q), sql.SQL(", ").join(q),
            self.ident(), sql.SQL(" AND ").join(
                sql.SQL("sync_t.{} = q.{}::" + c.param_type).format(sql.Identifier(k), x)
                for k, c, x in zip(self.keys, self.key_cols, q, strict=True))),
            [[k[i] for k in keys] for i in range(len(q))]).fetchall()


@contextmanager
def read_only(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """One REPEATABLE READ READ ONLY transaction on ``conn``: a stable view, no writes. The
    text-format settings are set LOCAL: the caller's session keeps its own."""
    if conn.info.transaction_status != pq.TransactionStatus.IDLE:
        with conn.transaction():  # inside the caller's transaction: its view, a savepoint
            conn.execute(_LOCAL_SETTINGS)
            yield
        return
    saved = conn.isolation_level, conn.read_only
    conn.isolation_level, conn.read_only = psycopg.IsolationLevel.REPEATABLE_READ, True
    try:
        with conn.transaction():
            conn.execute(_LOCAL_SETTINGS)
            yield
    finally:
        with suppress(psycopg.Error):
            conn.isolation_level, conn.read_only = saved


def stream(conn: psycopg.Connection[Any], query: sql.Composed, params: list[Any],
           size: int, *, hash_groups: bool = False) -> Chunks:
    """``query``'s rows, ``size`` at a time, through a server-side cursor."""
    with conn.cursor(name=f"sync_reconcile_{next(_cursor_ids)}") as cur:
        if not hash_groups:
            cur.execute(query, params)
        else:
            # The planner cannot know there are few (range, sub-bucket) groups: it guesses one
            # per row and sorts the whole table to aggregate; hashing the groups is ~1.5x
            # faster. DECLARE plans the query, so the setting applies to this one only.
            prior = conn.execute("SELECT current_setting('enable_sort')").fetchone()
            conn.execute("SELECT set_config('enable_sort', 'off', true)")
            cur.execute(query, params)
            conn.execute("SELECT set_config('enable_sort', %s, true)",
                         [prior[0] if prior else "on"])
        while rows := cur.fetchmany(size):
            yield rows


class prefetch:  # noqa: N801 (used like a function: closing(prefetch(...)))
    """Run ``chunks`` in a thread started at once, up to ``depth`` chunks ahead: both servers
    work at the same time, and the next chunk travels while this one is diffed. Close it
    (``contextlib.closing``): the thread stops, closing the generator (and its cursor) itself,
    before the caller goes on with that connection."""

    def __init__(self, chunks: Chunks, depth: int = 2) -> None:
        self._q: queue.Queue[tuple[str, Any]] = queue.Queue(depth)
        self._stop = threading.Event()
        self._done = False
        self._worker = threading.Thread(target=self._run, args=(chunks,), daemon=True,
                                        name="sync-reconcile-fetch")
        self._worker.start()

    def _put(self, item: tuple[str, Any]) -> None:
        while not self._stop.is_set():
            with suppress(queue.Full):
                self._q.put(item, timeout=0.05)
                return

    def _run(self, chunks: Chunks) -> None:
        try:
            for chunk in chunks:
                self._put(("chunk", chunk))
                if self._stop.is_set():
                    break
            self._put(("end", None))
        except BaseException as err:  # noqa: BLE001 (handed to the consuming thread)
            self._put(("error", err))
        finally:
            with suppress(Exception):
                chunks.close()

    def __iter__(self) -> prefetch:
        return self

    def __next__(self) -> Rows:
        if self._done:
            raise StopIteration
        kind, item = self._q.get()
        if kind == "chunk":
            return item  # type: ignore[no-any-return]
        self._done = True
        if kind == "error":
            raise item
        raise StopIteration

    def close(self) -> None:
        self._stop.set()
        self._worker.join()
