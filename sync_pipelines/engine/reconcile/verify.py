"""Verify: does a Postgres target hold exactly what the mapping makes of the source?

Contract: :func:`compare_table` streams both tables in key order through server-side cursors
(memory bounded by the fetch size, never a whole table), maps each source row with the
pipeline's own :class:`~..mapping.mapper.TableMapper`, and counts keys missing in the target, extra
in the target, and different — with a small sample of each. Values are compared in PostgreSQL
text form. Read-only on both sides. Used by the demo's smoke check, the benchmark and tests;
the end-of-day reconciliation builds on the same walk.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from ..capture.source import describe_relation
from ..mapping.mapper import TableMapper
from ..spec import PipelineSpec
from ..wire import pgtypes
from ..wire.pgtypes import TEXT_FORMAT_SETTINGS


@dataclass
class TableDrift:
    table: str
    compared: int = 0
    missing: int = 0
    extra: int = 0
    different: int = 0
    sample: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.missing or self.extra or self.different)

    def note(self, text: str) -> None:
        if len(self.sample) < 10:
            self.sample.append(text)


def _stream(conn: psycopg.Connection[Any], query: sql.Composable, chunk: int
            ) -> Iterator[tuple[Any, ...]]:
    with conn.transaction(), conn.cursor(name="sync_verify") as cur:
        cur.itersize = chunk
        cur.execute(query)
        yield from cur


def _text(v: Any) -> str | None:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "t" if v else "f"
    return str(v)


def compare_table(source: psycopg.Connection[Any], target: psycopg.Connection[Any],
                  pipeline: PipelineSpec, table: str, *, chunk: int = 5000) -> TableDrift:
    rel = describe_relation(source, table)
    tm = TableMapper(pipeline.name, table, pipeline.tables[table], rel)
    drift = TableDrift(table)
    src_cols = [c.name for c in rel.columns]
    src_keys = [src_cols[i] for i in tm.key_idx]
    key_oids = [rel.columns[i].type_oid for i in tm.key_idx]
    tgt_cols = [c.name for c in tm.columns]

    def select(table_name: str, cols: list[str], keys: list[str]) -> sql.Composed:
        return sql.SQL("SELECT {} FROM {} ORDER BY {}").format(
            sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in cols),
            sql.Identifier(*table_name.split(".")),
            sql.SQL(", ").join(map(sql.Identifier, keys)))

    def typed_key(values: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(pgtypes.to_python(o, v) for o, v in zip(key_oids, values, strict=True))

    src_iter = (
        r for r in _stream(source, select(table, src_cols, src_keys), chunk)
        if tm.passes(list(r), frozenset())
    )
    tgt_key_idx = [tgt_cols.index(k) for k in tm.key_names]
    tgt_iter = _stream(target, select(tm.target_table, tgt_cols, tm.key_names), chunk)
    s = next(src_iter, None)
    t = next(tgt_iter, None)
    while s is not None or t is not None:
        sk = typed_key(tuple(s[i] for i in tm.key_idx)) if s is not None else None
        tk = typed_key(tuple(t[i] for i in tgt_key_idx)) if t is not None else None
        if t is None or (sk is not None and sk < tk):  # type: ignore[operator]
            drift.missing += 1
            drift.note(f"missing in target: {sk}")
            s = next(src_iter, None)
        elif s is None or tk < sk:  # type: ignore[operator]
            drift.extra += 1
            drift.note(f"extra in target: {tk}")
            t = next(tgt_iter, None)
        else:
            drift.compared += 1
            expected = {k: _text(v) for k, v in tm.row(list(s), frozenset()).items()}
            actual = dict(zip(tgt_cols, t, strict=True))
            diff = [k for k, v in expected.items() if actual.get(k) != v]
            if diff:
                drift.different += 1
                drift.note(f"different at {sk}: {', '.join(diff)}")
            s = next(src_iter, None)
            t = next(tgt_iter, None)
    return drift


def compare_pipeline(source_dsn: str, target_dsn: str, pipeline: PipelineSpec
                     ) -> list[TableDrift]:
    with psycopg.connect(source_dsn) as src, psycopg.connect(target_dsn) as tgt:
        for conn in (src, tgt):
            conn.execute(TEXT_FORMAT_SETTINGS)
        return [compare_table(src, tgt, pipeline, t) for t in pipeline.tables]
