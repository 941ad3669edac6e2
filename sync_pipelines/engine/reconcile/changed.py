"""The keys a day is responsible for: rows whose change-time column falls in the day.

Contract: :func:`changed_keys` returns the source keys whose ``changed_at`` column (named in
the spec's ``reconcile.changed_at``) lies in ``[start, end)``, and — for a Postgres target that
receives that column — the target keys whose copy of it lies there (a row deleted at the source
that day leaves no trace there, but its target copy still carries the day). A day's
reconciliation compares exactly these keys, so a past day's partition means that day, not
today's whole table. ``timestamp without time zone`` columns are read as local times of the
reconciliation's time zone. Read-only; keys are text in source key order, as everywhere in
reconciliation.

A column the table does not have, or one that is not a date/time, is a :class:`SpecError`
naming the pipeline, the field and the table's columns.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from ..errors import SpecError
from ..mapping.mapper import TableMapper
from ..wire.pgoutput import Relation
from .drift import Key

_TIME_TYPES = {1082: "date", 1114: "timestamp", 1184: "timestamptz"}


def _column(pipeline: str, table: str, rel: Relation, column: str) -> int:
    names = [c.name for c in rel.columns]
    where = f"pipeline {pipeline!r}, reconcile.changed_at"
    if column not in names:
        raise SpecError(f"{where}: table {table} has no column {column!r} "
                        f"(columns: {', '.join(names)})")
    i = names.index(column)
    if rel.columns[i].type_oid not in _TIME_TYPES:
        raise SpecError(f"{where}: column {table}.{column} is not a date or timestamp column")
    return i


def _bounds(type_oid: int, start: datetime, end: datetime) -> tuple[Any, Any]:
    if _TIME_TYPES[type_oid] == "timestamptz":
        return start, end
    # A naive column holds local times of the day's zone (start/end carry that zone).
    return start.replace(tzinfo=None), end.replace(tzinfo=None)


def _keys(conn: psycopg.Connection[Any], table: str, keys: list[str], column: str,
          bounds: tuple[Any, Any]) -> set[Key]:
    query = sql.SQL("SELECT {keys} FROM {table} WHERE {col} >= %s AND {col} < %s").format(
        keys=sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k)) for k in keys),
        table=sql.Identifier(*table.split(".")), col=sql.Identifier(column))
    with conn.transaction():
        return {tuple(r) for r in conn.execute(query, bounds).fetchall()}


def changed_keys(source: psycopg.Connection[Any], target: psycopg.Connection[Any] | None,
                 tm: TableMapper, column: str, start: datetime, end: datetime
                 ) -> tuple[set[Key], set[Key]]:
    """(source keys, target keys) changed in ``[start, end)``; the target side is empty when
    there is no Postgres target connection or the column is not sent to it."""
    i = _column(tm.pipeline, tm.source_table, tm.relation, column)
    bounds = _bounds(tm.relation.columns[i].type_oid, start, end)
    source_keys = [tm.relation.columns[j].name for j in tm.key_idx]
    found_source = _keys(source, tm.source_table, source_keys, column, bounds)
    sent = dict(tm.sent)
    if target is None or i not in sent or i in tm.casts:
        return found_source, set()
    found_target = _keys(target, tm.target_table, tm.key_names, sent[i], bounds)
    return found_source, found_target
