"""One form for a linked row's values, so versions from PostgreSQL and from an HTTP API compare.

Contract: a link with an HTTP API side compares rows that come from two renderings of the same
value — PostgreSQL's text output (``2026-12-02 10:00:00+00``, ``10.50``, ``t``) and an API's
JSON turned into text by the record type (``2026-12-02 10:00:00+00:00``, ``10.5``). For each
linked column the record field's type says what the value is; :func:`canonical` puts every
value of that type in one form, and :func:`view` leaves out the fields the API sets itself, so
equal versions compare equal whichever side they came from. :func:`echo_hash` is the digest an
echo of the link's own write is recognised by; :func:`api_row` turns a row into the JSON values
the API is sent (numbers as numbers, booleans as booleans). Pure: no I/O. A value that does not
parse as its type is left as it is (it then compares by its text).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from decimal import Decimal, InvalidOperation
from typing import Any

from ..spec.links import ApiTableRole

Row = dict[str, Any]


def canonical(value: Any, type_: str) -> Any:
    """``value`` (PostgreSQL text, or a JSON value read from the API) in the one form of
    ``type_`` (a record field type)."""
    if value is None:
        return None
    if type_ == "json":
        try:
            parsed = json.loads(value) if isinstance(value, str) else value
            return json.dumps(parsed, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        except (ValueError, TypeError):
            return value
    if isinstance(value, bool):
        return ("t" if value else "f") if type_ == "bool" else json.dumps(value)
    if not isinstance(value, str):
        if isinstance(value, (dict, list)):  # noqa: UP038
            return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        value = str(value)  # a JSON number
    if type_ == "text":
        return value
    try:
        if type_ == "timestamptz":
            when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            if when.tzinfo is None:
                when = when.replace(tzinfo=dt.timezone.utc)
            return when.astimezone(dt.timezone.utc).isoformat(sep=" ")
        if type_ == "date":
            return dt.date.fromisoformat(value).isoformat()
        if type_ in ("int", "float", "decimal"):
            n = Decimal(value)
            if not n.is_finite():
                return value
            if type_ == "int" and n == n.to_integral_value():
                return str(int(n))
            return format(n.normalize(), "f")
        if type_ == "bool":
            return {"t": "t", "true": "t", "f": "f", "false": "f"}.get(value.lower(), value)
    except (ValueError, TypeError, InvalidOperation, OverflowError):
        return value
    return value


def canonical_row(row: Row | None, api: ApiTableRole) -> Row | None:
    if row is None:
        return None
    types = api.types
    return {c: canonical(v, types[c]) if c in types else v for c, v in row.items()}


def view(row: Row | None, api: ApiTableRole) -> Row | None:
    """What is compared of a canonical row: everything but the fields the API sets itself."""
    if row is None or not api.managed:
        return row
    return {c: v for c, v in row.items() if c not in api.managed}


def echo_hash(row: Row | None, api: ApiTableRole) -> str:
    """The digest of a version (a canonical row, or ``None`` for a delete) as the API holds
    it: what a webhook or poll bringing back the link's own write carries."""
    seen = view(row, api)
    text = "deleted" if seen is None else json.dumps(seen, sort_keys=True, separators=(",", ":"),
                                                    ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def api_value(value: Any, type_: str) -> Any:
    """A text value as the JSON value the API is sent."""
    if value is None or not isinstance(value, str):
        return value
    try:
        if type_ == "int":
            return int(value)
        if type_ == "float":
            return float(value)
        if type_ == "bool":
            return {"t": True, "true": True, "f": False, "false": False}.get(value.lower(),
                                                                            value)
        if type_ == "json":
            return json.loads(value)
        if type_ == "timestamptz":
            return canonical(value, type_).replace(" ", "T", 1)
    except (ValueError, TypeError, AttributeError):
        return value
    return value  # text, decimal (exact as a string), date


def api_row(row: Row, types: dict[str, str]) -> Row:
    """A row in the API's field names (``types`` keyed by them) as JSON values."""
    return {c: api_value(v, types[c]) if c in types else v for c, v in row.items()}
