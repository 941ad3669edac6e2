"""JSON records (from webhooks or a polled API) → the rows the rest of the engine knows.

Contract: :class:`RecordType` turns one JSON record of a record type (spec ``source.records``)
into a staged change exactly like one read from a slot: a pgoutput ``'U'`` message ("the row now
reads …", every column in PostgreSQL text format) or a ``'D'`` with the key, under a
:class:`~..wire.pgoutput.Relation` built from the declared fields (a stable made-up OID per
table, the key columns flagged). From the mailbox on, nothing tells these rows from CDC rows:
mapping, compaction, per-key order, sinks, retries and dead letters are the same code.

A record that does not fit — a key field missing, a value of the wrong type, a body that is not
an object — raises :class:`RecordError` naming the table and the field, and nothing of it is
staged. Pure: no I/O.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import json
import zlib
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from ..spec.sources import FieldSpec, RecordSpec
from ..wire.pgoutput import Column, Relation, encode_delete, encode_update

# PostgreSQL type OIDs of the field types (what a created target column gets).
TYPE_OIDS = {"text": 25, "int": 20, "float": 701, "decimal": 1700, "bool": 16,
             "timestamptz": 1184, "date": 1082, "json": 3802}


class RecordError(ValueError):
    """A record that does not match its record type; the message names table and field."""


def relation_oid(table: str) -> int:
    """A stable OID for a record type (above the range PostgreSQL hands out to user objects)."""
    return 0x70000000 + (zlib.crc32(table.encode()) & 0x0FFFFFFF)


def get_path(obj: Any, path: str | tuple[str, ...]) -> Any:
    """``obj["a"]["b"]`` for ``"a.b"`` (or ``("a", "b")``); None where a step is missing."""
    for part in path.split(".") if isinstance(path, str) else path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


_BOOL_TEXT = {"true": "t", "t": "t", "false": "f", "f": "f"}


def field_text(table: str, name: str, f: FieldSpec, v: Any) -> str | None:
    """A JSON value as PostgreSQL text of the field's type."""
    t = f.type
    if t == "text" and isinstance(v, str):
        return v  # the common case first
    where = f"{table}: field {name!r} ({f.path})"
    if v is None:
        if f.required:
            raise RecordError(f"{where} is required")
        return None
    try:
        if t == "json":
            return json.dumps(v, separators=(",", ":"), ensure_ascii=False)
        if isinstance(v, (dict, list)):  # noqa: UP038
            raise RecordError(f"{where}: expected a {t}, got a JSON {type(v).__name__}")
        if t == "text":
            return v if isinstance(v, str) else json.dumps(v)
        if t == "bool":
            if isinstance(v, bool):
                return "t" if v else "f"
            # APIs that send booleans as text ("true", or PostgreSQL's "t") are common.
            if isinstance(v, str) and v.strip().lower() in _BOOL_TEXT:
                return _BOOL_TEXT[v.strip().lower()]
            raise RecordError(f"{where}: expected true or false, got {v!r}")
        if t == "int":
            if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                raise ValueError
            return str(int(v))
        if t in ("float", "decimal"):
            if isinstance(v, bool):
                raise ValueError
            n = Decimal(str(v))
            if not n.is_finite():
                raise ValueError
            return str(n)
        if t == "timestamptz":
            when = dt.datetime.fromisoformat(str(v).replace("Z", "+00:00"))
            if when.tzinfo is None:
                when = when.replace(tzinfo=dt.timezone.utc)
            return when.astimezone(dt.timezone.utc).isoformat(sep=" ")
        if t == "date":
            return dt.date.fromisoformat(str(v)).isoformat()
    except (ValueError, TypeError, InvalidOperation, OverflowError):
        raise RecordError(f"{where}: {v!r} is not a valid {t}") from None
    raise AssertionError(t)  # pragma: no cover - the spec's Literal


@dataclass(frozen=True)
class Row:
    """One record as a staged change: ``op`` ``'U'`` (upsert) or ``'D'`` (delete)."""

    table: str
    op: str
    key: tuple[str | None, ...]
    values: tuple[str | None, ...]
    message: bytes


class RecordType:
    """One table of a webhook or polling source."""

    def __init__(self, table: str, spec: RecordSpec) -> None:
        self.table = table
        self.spec = spec
        self.names = list(spec.fields)
        namespace, _, name = table.partition(".")
        self.relation = Relation(relation_oid(table), namespace, name, "d", tuple(
            Column(n, TYPE_OIDS[f.type], -1, n in spec.key) for n, f in spec.fields.items()))
        self.key_idx = [self.names.index(k) for k in spec.key]
        self._fields = [(n, f, tuple(f.path.split("."))) for n, f in spec.fields.items()]

    def _deleted(self, record: dict[str, Any], event_type: str | None) -> bool:
        d = self.spec.delete_when
        if event_type is not None and any(fnmatch.fnmatchcase(event_type, p)
                                          for p in d.event_type):
            return True
        return d.field is not None and get_path(record, d.field) == d.equals

    def row(self, record: Any, event_type: str | None = None) -> Row:
        """The staged change of one record (raises :class:`RecordError`)."""
        if not isinstance(record, dict):
            raise RecordError(f"{self.table}: expected a JSON object, got "
                              f"{type(record).__name__}")
        values = [field_text(self.table, n, f, get_path(record, parts))
                  for n, f, parts in self._fields]
        key = tuple(values[i] for i in self.key_idx)
        for name, v in zip(self.spec.key, key, strict=True):
            if v is None:
                raise RecordError(f"{self.table}: key field {name!r} "
                                  f"({self.spec.fields[name].path}) is missing")
        oid = self.relation.relation_id
        if self._deleted(record, event_type):
            only_key: list[str | None] = [None] * len(values)
            for i in self.key_idx:
                only_key[i] = values[i]
            return Row(self.table, "D", key, tuple(only_key), encode_delete(oid, only_key))
        return Row(self.table, "U", key, tuple(values), encode_update(oid, values))
