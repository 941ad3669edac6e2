"""Reconcile, Postgres targets: which keys of a source table (seen through the pipeline's
mapping) a Postgres target is missing, holds extra, or holds with different values.

Contract: :func:`compare_postgres` returns a :class:`~.drift.TableDrift` naming every drifted
key (up to ``max_drift``) in key order; :func:`recheck_postgres` re-reads given keys on both
sides and classifies them by the same rules (``None``: equal now). Values are compared in
PostgreSQL text form (``::text`` on both servers, pinned by ``TEXT_FORMAT_SETTINGS``). Each side
is read in one ``REPEATABLE READ READ ONLY`` transaction: a consistent view per side, no writes,
so a crash leaves nothing behind. The two views are not taken at the same instant: the
confirmation pass (:mod:`.run`) tells drift from rows that moved meanwhile.

How (both methods cut the key space into ranges of ``range_rows`` source keys; the boundaries
are source keys, range ``i`` holds the keys ``k`` with ``bound[i-1] <= k < bound[i]``, the first
range is open below and the last open above, so target keys before or beyond the source's are
found as extra):

* ``range-hash`` (the mapping only renames, includes or excludes): one aggregate query per
  server returns ``count(*)`` and an order-independent hash of the mapped columns per range
  and per hash sub-bucket of the keys (~``SUB_ROWS`` keys each, so scattered drift fetches few
  rows). Only the rows of the (range, sub-bucket) groups that differ are fetched and diffed.
* ``row-by-row`` (casts, derived fields or a row filter): both tables are streamed whole, the
  source rows mapped with the pipeline's own :class:`~..mapping.mapper.TableMapper`; cast and
  derived values are cast to the target column's type by the target server, so they compare as the
  target shows them.

Ordering is never decided in Python: every row's range number is computed by each server from
the same boundaries, comparing text-like key columns ``COLLATE "C"`` on both sides, so the two
servers agree even if their collations differ. Python only compares range numbers, and matches
keys by equality (pandas merges) inside a window of complete ranges.

Memory: never a whole table. Rows come through server-side cursors, ``fetch_rows`` at a
time, two chunks ahead per side (:func:`.sql.prefetch`); the diff holds one window of
complete source groups (``fetch_rows`` rows plus at most one range, or one sub-bucket) and one
target chunk; plus the boundaries (one key per ``range_rows`` rows) and the drift kept (at most
``max_drift``; beyond it ``truncated`` is set, rows are still counted, but range-hash no longer
fetches differing groups, so ``compared_keys`` becomes a lower bound). ``source_rows`` counts
the source rows the target should hold (after the row filter). SQL: :mod:`.sql`.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import time
from collections.abc import Sequence
from contextlib import closing, suppress
from dataclasses import dataclass
from datetime import date, datetime
from datetime import time as dt_time
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from ..capture.source import describe_relation
from ..mapping.mapper import TableMapper
from ..spec import PipelineSpec, PostgresTargetSpec
from ..wire import pgtypes
from .drift import Key, KeyDrift, TableDrift
from .sql import Chunks, KeyRange, Rows, Side, catalog, prefetch, read_only

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

# numpy and pandas are imported where a comparison runs, not with the module: every Dagster
# run process imports the engine, and they are about half a second of its start-up.

SUB_ROWS = 32
"""Keys per hash sub-bucket of a range (range-hash): a drifted key costs fetching about this
many rows per side. Smaller means more groups to aggregate and send (measured on 1M rows with
0.1 % drift: 8 and 64 are slower than 16–32)."""
RECHECK_BATCH = 5_000
_NONE: frozenset[int] = frozenset()


@dataclass
class _Plan:
    tm: TableMapper
    method: str
    note: str | None
    src: Side
    tgt: Side
    norm: list[tuple[int, str]]
    """(target column position, its type): cast or derived values, rendered by the target."""


def _plan(source: psycopg.Connection[Any], target: psycopg.Connection[Any],
          pipeline: PipelineSpec, table: str, target_name: str) -> _Plan:
    if not isinstance(pipeline.targets.get(target_name), PostgresTargetSpec):
        raise ValueError(f"pipeline {pipeline.name!r}: {target_name!r} is not a postgres target")
    rel = describe_relation(source, table)
    tm = TableMapper(pipeline.name, table, pipeline.tables[table], rel)
    src_cat = catalog(source, table) or {}
    tgt_cat = catalog(target, tm.target_table)
    cols = [c.name for c in tm.columns]
    where = f"target {target_name}, {table}: not compared:"
    note = None
    if tgt_cat is None:
        note = f"{where} the target has no table {tm.target_table}"
    elif missing := [c for c in cols if c not in tgt_cat]:
        note = f"{where} {tm.target_table} lacks mapped column(s) {', '.join(missing)}"
    elif any(i in tm.casts for i in tm.key_idx):
        note = f"{where} a key column is cast, so source and target keys do not sort alike"
    tgt_cat = tgt_cat or {}
    method = "unsupported" if note else (
        "range-hash" if tm._plain and not tm.filters else "row-by-row")
    names = [c.name for c in rel.columns]
    src_keys = [names[i] for i in tm.key_idx]
    src = Side(source, table, src_keys, [src_cat[k] for k in src_keys],
               [names[i] for i, _ in tm.sent] if method == "range-hash" else names)
    tgt = Side(target, tm.target_table, tm.key_names,
               [tgt_cat.get(k, src_cat[s]) for k, s in zip(tm.key_names, src_keys, strict=True)],
               cols)
    norm = [(j, tgt_cat[c.name].full_type) for j, c in enumerate(tm.columns)
            if c.sql_type is not None and c.name in tgt_cat]
    return _Plan(tm, method, note, src, tgt, norm)


def _render(v: Any) -> str | None:
    """A mapped value as text the target column's type parses (as the sink's COPY sends it)."""
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "t" if v else "f"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, date | datetime | dt_time):
        return v.isoformat()
    if isinstance(v, dict | list):
        return json.dumps(v)
    return str(v)


def _fingerprint(values: Sequence[str | None]) -> str:
    """Digest of a mapped source row: its target columns' text, in target order."""
    return hashlib.blake2b(json.dumps(list(values)).encode(), digest_size=16).hexdigest()


class _Differ:
    """Classifies keys: a source frame (all source rows of a set of complete groups) against
    target parts (any number, each bounded). Rows hold ``lead`` columns (group numbers, or the
    requested key) then the target columns in order (``c0``…), all text; ``on`` is the key."""

    def __init__(self, plan: _Plan, result: TableDrift, lead: list[str], on: list[str],
                 max_drift: int) -> None:
        self.plan, self.result, self.max_drift = plan, result, max_drift
        self.lead = lead
        self.columns = lead + [f"c{j}" for j in range(len(plan.tgt.cols))]
        self.on = on
        self.on_pos = [self.columns.index(c) for c in on]
        self.values = [c for c in self.columns[len(lead):] if c not in on]
        self.grouped = lead != on  # rows start with their range number
        self.ranges: set[int] = set()

    def add(self, d: KeyDrift, rec: tuple[Any, ...]) -> None:
        if self.grouped:
            self.ranges.add(int(rec[0]))
        if len(self.result.drift) < self.max_drift:
            self.result.drift.append(d)
        else:
            self.result.truncated = True

    def key(self, rec: tuple[Any, ...]) -> Key:
        return tuple(rec[p] for p in self.on_pos)

    def source_rows(self, rows: Rows) -> Rows:
        """Source rows as the target should hold them (row-by-row: filtered, mapped, cast)."""
        if self.plan.method == "range-hash":
            return rows
        tm, n = self.plan.tm, len(self.lead)
        names = [c.name for c in tm.columns]
        mapped: list[list[Any]] = []
        for r in rows:
            values = list(r[n:])
            if tm.passes(values, _NONE):
                row = tm.row(values, _NONE)
                mapped.append(list(r[:n]) + [row.get(c) for c in names])
        self._normalize(mapped, n)
        return [tuple(r) for r in mapped]

    def _normalize(self, rows: list[list[Any]], n: int) -> None:
        # Cast and derived values become the text the target shows for them: the target casts
        # them to its column's type, as it did when the sink copied them in.
        norm = self.plan.norm
        if not norm or not rows:
            return
        arrays = [[_render(r[n + j]) for r in rows] for j, _ in norm]
        names = [sql.Identifier(f"v{i}") for i in range(len(norm))]
        query = sql.SQL("SELECT {} FROM unnest({}) WITH ORDINALITY AS u({}, n) ORDER BY n").format(
            sql.SQL(", ").join(sql.SQL("{}::" + t + "::text").format(v)
                               for v, (_, t) in zip(names, norm, strict=True)),
            sql.SQL(", ").join(sql.SQL("%s::text[]") for _ in norm), sql.SQL(", ").join(names))
        conn = self.plan.tgt.conn
        try:
            with conn.transaction():  # a value the column refuses must not end the compare
                out = conn.execute(query, arrays).fetchall()
        except psycopg.errors.DataError:
            out = list(zip(*arrays, strict=True))  # compared as rendered: reported different
        for r, o in zip(rows, out, strict=True):
            for (j, _), v in zip(norm, o, strict=True):
                r[n + j] = v

    def frame(self, rows: Rows) -> pd.DataFrame:
        import numpy as np
        import pandas as pd

        df = pd.DataFrame(rows, columns=self.columns, dtype=object)[self.on + self.values]
        df["_i"] = np.arange(len(df))
        return df

    def match(self, src: pd.DataFrame, src_rows: Rows, matched: np.ndarray,
              part: Rows) -> None:
        """Target rows of ``part`` against the complete source frame: extra or different."""
        import numpy as np
        import pandas as pd

        self.result.target_rows += len(part)
        tgt = pd.DataFrame(part, columns=self.columns, dtype=object)[self.on + self.values]
        tgt["_j"] = np.arange(len(tgt))
        m = tgt.merge(src, how="left", on=self.on, suffixes=("_t", "_s"), indicator=True)
        extra = (m["_merge"] == "left_only").to_numpy()
        self.result.compared_keys += int(extra.sum())
        for j in m["_j"].to_numpy()[extra]:
            self.add(KeyDrift(self.key(part[int(j)]), "extra"), part[int(j)])
        both = m.loc[~extra]
        if both.empty:
            return
        idx = both["_i"].to_numpy().astype(np.int64)
        matched[idx] = True
        diff = np.zeros((len(both), len(self.values)), dtype=bool)
        for j, c in enumerate(self.values):
            a, b = both[c + "_t"].to_numpy(), both[c + "_s"].to_numpy()
            diff[:, j] = ~((a == b) | (pd.isna(a) & pd.isna(b)))
        names, n = self.plan.tgt.cols, len(self.lead)
        for row in np.flatnonzero(diff.any(axis=1)):
            rec = src_rows[int(idx[row])]
            fields = tuple(names[int(c[1:])] for c, bad in zip(self.values, diff[row],
                                                                strict=True) if bad)
            self.add(KeyDrift(self.key(rec), "different", fields, _fingerprint(rec[n:])), rec)

    def close(self, src_rows: Rows, matched: np.ndarray) -> None:
        """Source rows no target row matched: missing."""
        import numpy as np

        n = len(self.lead)
        self.result.source_rows += len(src_rows)
        self.result.compared_keys += len(src_rows)
        for i in np.flatnonzero(~matched):
            rec = src_rows[int(i)]
            self.add(KeyDrift(self.key(rec), "missing", source_fingerprint=_fingerprint(rec[n:])),
                     rec)


def _gid(row: tuple[Any, ...]) -> tuple[int, int]:
    return row[0], row[1]


def _walk(differ: _Differ, src_chunks: Chunks, tgt_chunks: Chunks,
          window: int) -> None:
    """Both streams come ordered by group (range, sub-bucket), numbers each server computed.
    Take a window of complete source groups, diff every target row of those groups against
    it part by part, then report the source rows nothing matched."""
    import numpy as np

    with closing(prefetch(src_chunks)) as src_it, closing(prefetch(tgt_chunks)) as tgt_it:
        src_buf: Rows = []
        tgt_buf: Rows = []
        src_done = tgt_done = False
        while True:
            while not src_done and (len(src_buf) < window
                                    or _gid(src_buf[0]) == _gid(src_buf[-1])):
                chunk = next(src_it, None)
                src_done = chunk is None
                src_buf.extend(chunk or [])
            if src_done:
                cut, rows, src_buf = None, src_buf, []
            else:  # the last group may go on in the next chunk: keep it for the next window
                cut = _gid(src_buf[-1])
                i = bisect.bisect_left(src_buf, cut, key=_gid)
                if not i:  # cannot happen in group order; never spin on it
                    raise AssertionError(f"source rows out of group order near {cut}")
                rows, src_buf = src_buf[:i], src_buf[i:]
            rows = differ.source_rows(rows)
            frame = differ.frame(rows)
            matched = np.zeros(len(rows), dtype=bool)
            while True:
                if not tgt_buf and not tgt_done:
                    chunk = next(tgt_it, None)
                    tgt_done = chunk is None
                    tgt_buf = chunk or []
                if not tgt_buf:
                    break
                j = len(tgt_buf) if cut is None else bisect.bisect_left(tgt_buf, cut, key=_gid)
                if j:
                    differ.match(frame, rows, matched, tgt_buf[:j])
                    tgt_buf = tgt_buf[j:]
                if tgt_buf:
                    break  # the target is past this window
            differ.close(rows, matched)
            if cut is None:
                return


def compare_postgres(source: psycopg.Connection[Any], target: psycopg.Connection[Any],
                     pipeline: PipelineSpec, table: str, target_name: str, *,
                     range_rows: int = 10_000, fetch_rows: int = 5_000, max_drift: int = 100_000,
                     key_range: KeyRange | None = None) -> TableDrift:
    """Compare source ``table`` with its table in postgres target ``target_name``; only keys
    in ``key_range`` = (lo, hi] when given (``None``: open)."""
    started = time.monotonic()
    with read_only(source), read_only(target):
        plan = _plan(source, target, pipeline, table, target_name)
        result = TableDrift(pipeline.name, table, target_name, plan.tm.target_table,
                            plan.method, note=plan.note)
        if plan.method != "unsupported":
            _compare(plan, result, range_rows, fetch_rows, max_drift, key_range)
    result.duration_s = time.monotonic() - started
    return result


def _compare(plan: _Plan, result: TableDrift, range_rows: int, fetch_rows: int,
             max_drift: int, key_range: KeyRange | None) -> None:
    src, tgt = plan.src, plan.tgt
    bounds = src.boundaries(key_range, range_rows)
    result.ranges = len(bounds) + 1
    differ = _Differ(plan, result, ["_b", "_s"], [f"c{tgt.cols.index(k)}" for k in tgt.keys],
                     max_drift)
    if plan.method == "row-by-row":
        _walk(differ, src.all_rows(bounds, key_range, fetch_rows),
              tgt.all_rows(bounds, key_range, fetch_rows), fetch_rows)
        result.ranges_differing = len(differ.ranges)
        _sort(plan, result)
        return
    subs = max(1, range_rows // SUB_ROWS)
    differing: list[tuple[int, int]] = []
    with closing(prefetch(src.aggregates(bounds, subs, key_range))) as sa, \
            closing(prefetch(tgt.aggregates(bounds, subs, key_range))) as ta:
        # Both in group order: a merge of (range, sub) numbers, never of keys.
        s_it, t_it = itertools.chain.from_iterable(sa), itertools.chain.from_iterable(ta)
        a, b = next(s_it, None), next(t_it, None)
        while a is not None or b is not None:
            if b is None or (a is not None and a[:2] < b[:2]):
                assert a is not None
                got, a = (a[:2], a[2], 0), next(s_it, None)
            elif a is None or b[:2] < a[:2]:
                got, b = (b[:2], 0, b[2]), next(t_it, None)
            else:
                equal, got = a[2:] == b[2:], (a[:2], a[2], b[2])
                a, b = next(s_it, None), next(t_it, None)
                if equal:
                    result.source_rows += got[1]
                    result.target_rows += got[2]
                    result.compared_keys += got[1]
                    continue
            if len(differing) < max_drift:  # each holds drift: beyond, truncated anyway
                differing.append(got[0])
            else:
                result.truncated = True
                result.source_rows += got[1]
                result.target_rows += got[2]
                result.compared_keys += max(got[1], got[2])  # a lower bound
    result.ranges_differing = len({g[0] for g in differing})
    if differing:
        _walk(differ, src.rows_of(bounds, subs, key_range, differing, fetch_rows),
              tgt.rows_of(bounds, subs, key_range, differing, fetch_rows), fetch_rows)
    _sort(plan, result)


def _sort(plan: _Plan, result: TableDrift) -> None:
    """Drift in key order, as the servers sort (text byte-wise, which for UTF-8 is Python's
    str order; other types by value). Presentation only: nothing depends on it."""
    tm = plan.tm
    kinds = [(tm.relation.columns[i].type_oid, c.collatable)
             for i, c in zip(tm.key_idx, plan.src.key_cols, strict=True)]

    def sort_key(d: KeyDrift) -> tuple[Any, ...]:
        return tuple((1, 0) if v is None else (0, v if coll else pgtypes.to_python(oid, v))
                     for v, (oid, coll) in zip(d.key, kinds, strict=True))

    with suppress(TypeError, ValueError, ArithmeticError):
        result.drift.sort(key=sort_key)


def recheck_postgres(source: psycopg.Connection[Any], target: psycopg.Connection[Any],
                     pipeline: PipelineSpec, table: str, target_name: str,
                     keys: Sequence[Key]) -> dict[Key, KeyDrift | None]:
    """Re-read ``keys`` on both sides by key: each one's drift now (``None``: equal)."""
    import numpy as np

    out: dict[Key, KeyDrift | None] = {tuple(k): None for k in keys}
    with read_only(source), read_only(target):
        plan = _plan(source, target, pipeline, table, target_name)
        if plan.method == "unsupported":
            return out
        lead = [f"q{i}" for i in range(len(plan.src.keys))]
        result = TableDrift(pipeline.name, table, target_name, plan.tm.target_table, plan.method)
        # Matched on the keys as given, so the answer is keyed by exactly those.
        differ = _Differ(plan, result, lead, lead, len(out) + 1)
        wanted = list(out)
        for start in range(0, len(wanted), RECHECK_BATCH):
            batch = wanted[start:start + RECHECK_BATCH]
            rows = differ.source_rows(plan.src.by_keys(batch))
            matched = np.zeros(len(rows), dtype=bool)
            differ.match(differ.frame(rows), rows, matched, plan.tgt.by_keys(batch))
            differ.close(rows, matched)
        for d in result.drift:
            out[d.key] = d
    return out
