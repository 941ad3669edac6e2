"""Convert PostgreSQL text-format values (as sent by pgoutput) into Python values by type OID.

Pure functions, no I/O. The text formats assumed are PostgreSQL's defaults, which the
replication connection should pin explicitly (as PostgreSQL's own subscriber does)::

    options='-c datestyle=ISO -c intervalstyle=postgres -c extra_float_digits=3'

Mapping (OID → Python):

* ``bool`` → :class:`bool`; ``int2``/``int4``/``int8``/``oid`` → :class:`int`
* ``numeric`` → :class:`~decimal.Decimal` (``NaN``/``Infinity``/``-Infinity`` included)
* ``float4``/``float8`` → :class:`float` (``NaN``/``Infinity``/``-Infinity`` included)
* ``text``/``varchar``/``bpchar``/``name``/``"char"``/``interval`` → :class:`str` unchanged
  (``bpchar`` keeps its blank padding)
* ``uuid`` → :class:`uuid.UUID`; ``json``/``jsonb`` → :func:`json.loads` result
* ``bytea`` → :class:`bytes` (``hex`` output, and the legacy ``escape`` output)
* ``date`` → :class:`~datetime.date`; ``time`` → :class:`~datetime.time`;
  ``timetz`` → aware :class:`~datetime.time`; ``timestamp`` → naive
  :class:`~datetime.datetime`; ``timestamptz`` → aware :class:`~datetime.datetime`
  normalised to UTC (the original offset is kept only if UTC would overflow ``datetime``)
* arrays of all of the above → (nested) :class:`list`; the lower-bound decoration
  (``[0:1]={...}``) is dropped
* any other OID → the text unchanged.

Values Python cannot represent, by choice:

* ``infinity``/``-infinity`` of ``date``/``timestamp``/``timestamptz`` map to ``max``/``min``
  of :class:`~datetime.date`/:class:`~datetime.datetime` (with ``tzinfo=UTC`` for
  ``timestamptz``). This is lossy only for real values equal to those bounds.
* ``time '24:00:00'`` maps to :attr:`datetime.time.max` (23:59:59.999999).
* BC dates and years above 9999 raise :class:`ValueError`.

Malformed text raises :class:`ValueError`. :data:`~.pgoutput.UNCHANGED_TOAST` is not a value
and raises :class:`TypeError` in :func:`to_python`.

:data:`TEXT_FORMAT_SETTINGS` pins the session settings that decide how values are written as
text: every connection that reads or writes values as text (the slot's, a snapshot's, a
target's) runs it, so text never depends on a server's or a role's defaults.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from .pgoutput import UNCHANGED_TOAST

__all__ = ["OID_NAMES", "TEXT_FORMAT_SETTINGS", "converter", "parse_array", "to_python"]

TEXT_FORMAT_SETTINGS = (
    "SET datestyle = 'ISO, YMD'; SET intervalstyle = 'postgres'; SET timezone = 'UTC'; "
    "SET extra_float_digits = 3; SET bytea_output = 'hex'"
)
"""Output settings of every session whose values are read or written as text."""

Converter = Callable[[str], Any]

_UTC: Final = timezone.utc

# --------------------------------------------------------------------------------------------
# Scalars
# --------------------------------------------------------------------------------------------

_BOOLS: Final = {"t": True, "f": False, "true": True, "false": False}


def _bool(text: str) -> bool:
    try:
        return _BOOLS[text]
    except KeyError:
        raise ValueError(f"invalid boolean: {text!r}") from None


def _numeric(text: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:
        raise ValueError(f"invalid numeric: {text!r}") from None


_BYTEA_ESCAPE: Final = re.compile(rb"\\(\\|[0-3][0-7]{2})")
_BYTEA_ESCAPED_TEXT: Final = re.compile(rb"(?:[^\\]|\\\\|\\[0-3][0-7]{2})*")


def _bytea(text: str) -> bytes:
    if text.startswith("\\x"):
        return bytes.fromhex(text[2:])
    # Legacy bytea_output = 'escape': printable ASCII as is, '\\' and '\ooo' octal escapes.
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"invalid bytea: {text[:40]!r}") from None
    if b"\\" not in raw:
        return raw
    if _BYTEA_ESCAPED_TEXT.fullmatch(raw) is None:
        raise ValueError(f"invalid bytea escape in {text[:40]!r}")
    return _BYTEA_ESCAPE.sub(lambda m: b"\\" if m[1] == b"\\" else bytes((int(m[1], 8),)), raw)


# PostgreSQL ISO output, used only when datetime.fromisoformat() declines (Python 3.10, or
# to produce a precise error for BC / 5+ digit years).
_DT_RE: Final = re.compile(
    r"(?P<y>\d{4,})-(?P<mo>\d\d)-(?P<d>\d\d)"
    r"(?:[ T](?P<h>\d\d):(?P<mi>\d\d):(?P<s>\d\d)(?:\.(?P<f>\d{1,6})\d*)?)?"
    r"(?:(?P<sign>[+-])(?P<oh>\d\d)(?::?(?P<om>\d\d))?(?::?(?P<os>\d\d))?)?"
    r"(?P<bc> BC)?"
)
_TIME_RE: Final = re.compile(
    r"(?P<h>\d\d):(?P<mi>\d\d):(?P<s>\d\d)(?:\.(?P<f>\d{1,6})\d*)?"
    r"(?:(?P<sign>[+-])(?P<oh>\d\d)(?::?(?P<om>\d\d))?(?::?(?P<os>\d\d))?)?"
)


def _offset(m: re.Match[str]) -> timezone | None:
    if m["sign"] is None:
        return None
    delta = timedelta(hours=int(m["oh"]), minutes=int(m["om"] or 0), seconds=int(m["os"] or 0))
    if not delta:
        return _UTC
    return timezone(-delta if m["sign"] == "-" else delta)


def _datetime_fallback(text: str) -> datetime:
    m = _DT_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"invalid timestamp: {text!r}")
    if m["bc"]:
        raise ValueError(f"BC timestamp not representable in Python: {text!r}")
    if len(m["y"]) > 4:
        raise ValueError(f"timestamp year beyond 9999 not representable in Python: {text!r}")
    return datetime(
        int(m["y"]),
        int(m["mo"]),
        int(m["d"]),
        int(m["h"] or 0),
        int(m["mi"] or 0),
        int(m["s"] or 0),
        int((m["f"] or "0").ljust(6, "0")),
        tzinfo=_offset(m),
    )


_DATE_SPECIAL: Final = {"infinity": date.max, "-infinity": date.min}
_TS_SPECIAL: Final = {"infinity": datetime.max, "-infinity": datetime.min}
_TSTZ_SPECIAL: Final = {
    "infinity": datetime.max.replace(tzinfo=_UTC),
    "-infinity": datetime.min.replace(tzinfo=_UTC),
}


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        special = _DATE_SPECIAL.get(text)
        if special is not None:
            return special
        return _datetime_fallback(text).date()


def _timestamp(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        special = _TS_SPECIAL.get(text)
        if special is not None:
            return special
        return _datetime_fallback(text)


def _timestamptz(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        special = _TSTZ_SPECIAL.get(text)
        if special is not None:
            return special
        value = _datetime_fallback(text)
    tz = value.tzinfo
    if tz is _UTC:
        return value
    if tz is None:
        raise ValueError(f"timestamptz without UTC offset (DateStyle not ISO?): {text!r}")
    try:
        return value.astimezone(_UTC)
    except OverflowError:
        return value


def _time(text: str) -> time:
    try:
        return time.fromisoformat(text)
    except ValueError:
        m = _TIME_RE.fullmatch(text)
        if m is None:
            raise ValueError(f"invalid time: {text!r}") from None
        tz = _offset(m)
        if m["h"] == "24":  # PostgreSQL allows 24:00:00; Python's time does not.
            return time.max.replace(tzinfo=tz)
        return time(
            int(m["h"]),
            int(m["mi"]),
            int(m["s"]),
            int((m["f"] or "0").ljust(6, "0")),
            tzinfo=tz,
        )


def _uuid(text: str) -> uuid.UUID:
    return uuid.UUID(text)


def _json(text: str) -> Any:
    return json.loads(text)


# --------------------------------------------------------------------------------------------
# Arrays
# --------------------------------------------------------------------------------------------

# One token of array text: a quoted element, a structural character, or an unquoted run.
_ARRAY_TOKEN: Final = re.compile(r'"((?:[^"\\]|\\.)*)"|([{},])|([^{},"]+)', re.DOTALL)
_ARRAY_UNESCAPE: Final = re.compile(r"\\(.)", re.DOTALL)
_ARRAY_DIMS: Final = re.compile(r"\s*(?:\[-?\d+:-?\d+\])+\s*=\s*")

# Parser states: what may come next.
_AFTER_OPEN: Final = 0  # element, '{' or '}'
_AFTER_COMMA: Final = 1  # element or '{'
_AFTER_ITEM: Final = 2  # ',' or '}'
_DONE: Final = 3  # nothing but whitespace


def parse_array(text: str, element: Converter = str) -> list[Any]:
    """Parse PostgreSQL array text (``{a,"b c",NULL,{1,2}}``) into nested lists.

    Unquoted ``NULL`` (any case) becomes ``None``; every other element is passed through
    ``element``. Quoted elements have backslash escapes removed. Only the ``,`` delimiter is
    supported (every built-in type except ``box``).
    """
    # Fast path: one-dimensional, nothing quoted or escaped (int/numeric/date/uuid arrays).
    if (
        text[:1] == "{"
        and text[-1:] == "}"
        and '"' not in text
        and "\\" not in text
        and "{" not in text[1:]
        and "}" not in text[:-1]
    ):
        inner = text[1:-1]
        if not inner.strip():
            return []
        out: list[Any] = []
        for part in inner.split(","):
            item = part.strip()
            if not item:
                raise ValueError(f"malformed array (empty element): {text!r}")
            out.append(None if item.upper() == "NULL" else element(item))
        return out
    return _parse_array_general(text, element)


def _parse_array_general(text: str, element: Converter) -> list[Any]:
    pos = 0
    dims = _ARRAY_DIMS.match(text)
    if dims is not None:
        pos = dims.end()
    root: list[Any] = []
    stack: list[list[Any]] = []
    state = _AFTER_COMMA  # the very first token must be '{'
    n = len(text)
    while pos < n:
        m = _ARRAY_TOKEN.match(text, pos)
        if m is None:
            raise ValueError(f"malformed array at offset {pos}: {text!r}")
        pos = m.end()
        quoted, delim, bare = m.groups()
        if bare is not None:
            bare = bare.strip()
            if not bare:
                continue  # whitespace between tokens
        if state == _DONE:
            raise ValueError(f"junk after array at offset {m.start()}: {text!r}")
        if delim == "{":
            if state == _AFTER_ITEM:
                raise ValueError(f"malformed array: unexpected '{{' at {m.start()}: {text!r}")
            child: list[Any] = []
            if stack:
                stack[-1].append(child)
            else:
                root = child
            stack.append(child)
            state = _AFTER_OPEN
        elif delim == "}":
            if state == _AFTER_COMMA or not stack:
                raise ValueError(f"malformed array: unexpected '}}' at {m.start()}: {text!r}")
            stack.pop()
            state = _AFTER_ITEM if stack else _DONE
        elif delim == ",":
            if state != _AFTER_ITEM or not stack:
                raise ValueError(f"malformed array: unexpected ',' at {m.start()}: {text!r}")
            state = _AFTER_COMMA
        else:
            if state == _AFTER_ITEM or not stack:
                raise ValueError(f"malformed array: unexpected element at {m.start()}: {text!r}")
            item = quoted if quoted is not None else (bare or "")
            if quoted is None and item.upper() == "NULL":
                stack[-1].append(None)
            else:
                if "\\" in item:
                    item = _ARRAY_UNESCAPE.sub(r"\1", item)
                stack[-1].append(element(item))
            state = _AFTER_ITEM
    if state != _DONE:
        raise ValueError(f"malformed array (unbalanced braces): {text!r}")
    return root


def _array_of(element: Converter) -> Converter:
    def convert(text: str) -> list[Any]:
        return parse_array(text, element)

    return convert


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

# scalar OID: (SQL name as format_type prints it, converter, array OID or None)
_SCALARS: Final[dict[int, tuple[str, Converter, int | None]]] = {
    16: ("boolean", _bool, 1000),
    17: ("bytea", _bytea, 1001),
    18: ('"char"', str, 1002),
    19: ("name", str, 1003),
    20: ("bigint", int, 1016),
    21: ("smallint", int, 1005),
    23: ("integer", int, 1007),
    25: ("text", str, 1009),
    26: ("oid", int, 1028),
    114: ("json", _json, 199),
    700: ("real", float, 1021),
    701: ("double precision", float, 1022),
    1042: ("character", str, 1014),
    1043: ("character varying", str, 1015),
    1082: ("date", _date, 1182),
    1083: ("time without time zone", _time, 1183),
    1114: ("timestamp without time zone", _timestamp, 1115),
    1184: ("timestamp with time zone", _timestamptz, 1185),
    1186: ("interval", str, 1187),
    1266: ("time with time zone", _time, 1270),
    1700: ("numeric", _numeric, 1231),
    2950: ("uuid", _uuid, 2951),
    3802: ("jsonb", _json, 3807),
}

_CONVERTERS: Final[dict[int, Converter]] = {}
OID_NAMES: Final[dict[int, str]] = {}
"""SQL type names (as ``format_type(oid, NULL)`` would spell them) of every covered OID."""

for _oid, (_name, _conv, _array_oid) in _SCALARS.items():
    _CONVERTERS[_oid] = _conv
    OID_NAMES[_oid] = _name
    if _array_oid is not None:
        _CONVERTERS[_array_oid] = _array_of(_conv)
        OID_NAMES[_array_oid] = f"{_name}[]"
del _oid, _name, _conv, _array_oid


def converter(type_oid: int) -> Converter:
    """Return the text → Python function for ``type_oid`` (``str`` for unknown OIDs).

    Look it up once per column and reuse it; it does not accept ``None``.
    """
    return _CONVERTERS.get(type_oid, str)


def to_python(type_oid: int, value: str | None) -> Any:
    """Convert one text-format value of type ``type_oid``; ``None`` (SQL NULL) stays ``None``.

    Raises :class:`TypeError` for :data:`UNCHANGED_TOAST` (there is no new value; the caller
    must keep the previous one) or any other non-``str`` input, and :class:`ValueError` for
    malformed text.
    """
    if value is None:
        return None
    if type(value) is not str:
        if value is UNCHANGED_TOAST:
            raise TypeError(
                "UNCHANGED_TOAST has no value of its own: keep the column's previous value"
            )
        raise TypeError(f"expected str or None, got {type(value).__name__}")
    return _CONVERTERS.get(type_oid, str)(value)
