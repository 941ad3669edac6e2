"""Unit tests for text-format → Python conversion (sync_pipelines.engine.wire.pgtypes)."""

from __future__ import annotations

import json
import math
import uuid
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from sync_pipelines.engine.wire.pgoutput import UNCHANGED_TOAST, Insert, Relation, decode_message
from sync_pipelines.engine.wire.pgtypes import OID_NAMES, converter, parse_array, to_python

UTC = timezone.utc
NAN = float("nan")
U1 = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"


def same(actual: Any, expected: Any) -> bool:
    """Equality that also checks types (True vs 1) and treats NaN as equal to NaN."""
    if type(actual) is not type(expected):
        return False
    if isinstance(expected, list):
        return len(actual) == len(expected) and all(map(same, actual, expected))
    if isinstance(expected, float) and math.isnan(expected):
        return math.isnan(actual)
    if isinstance(expected, Decimal) and expected.is_nan():
        return actual.is_nan()
    if isinstance(expected, (datetime, time)):
        return actual == expected and actual.utcoffset() == expected.utcoffset()
    return bool(actual == expected)


CASES: list[tuple[int, str, Any]] = [
    # --- bool
    (16, "t", True),  # PostgreSQL's boolean output
    (16, "f", False),
    (16, "true", True),  # tolerated spelling
    # --- integers and oid
    (21, "-32768", -32768),  # smallint minimum
    (23, "2147483647", 2147483647),  # integer maximum
    (20, "-9223372036854775808", -(2**63)),  # bigint minimum
    (20, "9007199254740993", 9007199254740993),  # beyond float precision, stays exact
    (26, "4294967295", 4294967295),  # oid is unsigned 32-bit
    # --- numeric
    (1700, "12345.67", Decimal("12345.67")),  # keeps scale exactly
    (1700, "-0.000001", Decimal("-0.000001")),  # small negative
    (1700, "100.00", Decimal("100.00")),  # trailing zeros (scale) preserved
    (1700, "NaN", Decimal("NaN")),  # numeric NaN
    (1700, "Infinity", Decimal("Infinity")),  # numeric infinity (PostgreSQL 14+)
    (1700, "-Infinity", Decimal("-Infinity")),
    # --- floats
    (700, "1.5", 1.5),  # real
    (701, "0.1", 0.1),  # double precision, shortest round-trip output
    (701, "1.2345678901234567e+300", 1.2345678901234567e300),  # exponent form
    (701, "NaN", NAN),
    (701, "Infinity", math.inf),
    (701, "-Infinity", -math.inf),
    (700, "-0", -0.0),  # negative zero
    # --- character types stay text
    (25, 'héllo "world", \\ ✓', 'héllo "world", \\ ✓'),  # text is not unescaped
    (1043, "ABC", "ABC"),  # varchar
    (1042, "ab   ", "ab   "),  # bpchar keeps blank padding
    (19, "pg_class", "pg_class"),  # name
    (18, "x", "x"),  # "char"
    (1186, "1 day 02:03:04", "1 day 02:03:04"),  # interval is left as text
    # --- uuid, json
    (2950, U1, uuid.UUID(U1)),
    (114, '{"a": [1, null]}', {"a": [1, None]}),  # json object
    (3802, '"str"', "str"),  # jsonb scalar string
    (3802, "null", None),  # JSON null (not SQL NULL) -> None as well
    (3802, "1.5", 1.5),  # jsonb number
    # --- bytea
    (17, "\\x00ff10", b"\x00\xff\x10"),  # hex output (default)
    (17, "\\x", b""),  # empty bytea
    (17, "abc", b"abc"),  # escape output, printable only
    (17, "a\\\\b\\000\\377", b"a\\b\x00\xff"),  # escape output with \\ and octal escapes
    # --- date
    (1082, "2024-02-29", date(2024, 2, 29)),  # leap day
    (1082, "infinity", date.max),  # documented mapping
    (1082, "-infinity", date.min),
    # --- timestamp (naive)
    (1114, "2024-03-01 12:34:56", datetime(2024, 3, 1, 12, 34, 56)),
    (1114, "2024-03-01 12:34:56.5", datetime(2024, 3, 1, 12, 34, 56, 500000)),  # trimmed digits
    (1114, "0001-01-01 00:00:00", datetime(1, 1, 1)),  # earliest representable
    (1114, "infinity", datetime.max),
    (1114, "-infinity", datetime.min),
    # --- timestamptz (aware, normalised to UTC)
    (1184, "2024-03-01 12:34:56.123456+00", datetime(2024, 3, 1, 12, 34, 56, 123456, tzinfo=UTC)),
    (1184, "2024-03-01 12:34:56+05:30", datetime(2024, 3, 1, 7, 4, 56, tzinfo=UTC)),  # IST
    (1184, "2024-03-01 00:00:00-03", datetime(2024, 3, 1, 3, 0, tzinfo=UTC)),  # hour-only offset
    (1184, "1900-01-01 00:00:00+00:53:28", datetime(1899, 12, 31, 23, 6, 32, tzinfo=UTC)),  # LMT
    (1184, "infinity", datetime.max.replace(tzinfo=UTC)),  # documented mapping
    (1184, "-infinity", datetime.min.replace(tzinfo=UTC)),
    # UTC would underflow datetime.min: the original offset is kept instead.
    (
        1184,
        "0001-01-01 00:30:00+01",
        datetime(1, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=1))),
    ),
    # --- time / timetz
    (1083, "12:34:56", time(12, 34, 56)),
    (1083, "12:34:56.789", time(12, 34, 56, 789000)),
    (1083, "24:00:00", time.max),  # PostgreSQL allows 24:00:00; documented mapping
    (1266, "12:34:56+05:30", time(12, 34, 56, tzinfo=timezone(timedelta(hours=5, minutes=30)))),
    # --- arrays
    (1007, "{1,2,3}", [1, 2, 3]),  # int4[] fast path
    (1007, "{}", []),  # empty array
    (1007, "{1,NULL,3}", [1, None, 3]),  # NULL element
    (1016, "{-9223372036854775808}", [-(2**63)]),  # int8[]
    (1005, "{{1,2},{3,NULL}}", [[1, 2], [3, None]]),  # int2[] two dimensions
    (1007, "{{{1}},{{2}}}", [[[1]], [[2]]]),  # three dimensions
    (1007, "[0:1]={7,8}", [7, 8]),  # non-default lower bound decoration is dropped
    (1007, "[1:1][3:4]={{7,8}}", [[7, 8]]),  # ... also for several dimensions
    (1007, " { 1 , 2 } ", [1, 2]),  # whitespace around tokens (input syntax) is ignored
    # text[] with every quoting rule PostgreSQL uses on output:
    (
        1009,
        '{x,"with space","with,comma","quo\\"te",NULL,"NULL",""}',
        ["x", "with space", "with,comma", 'quo"te', None, "NULL", ""],
    ),
    (1009, '{"back\\\\slash"}', ["back\\slash"]),  # escaped backslash
    (1009, '{"{}","}",","}', ["{}", "}", ","]),  # structural characters inside quotes
    (1009, '{héllo,"ü ✓"}', ["héllo", "ü ✓"]),  # non-ASCII, quoted and bare
    (1009, "{null,NuLl}", [None, None]),  # unquoted NULL is case-insensitive
    (1009, "{NULLX,xNULL}", ["NULLX", "xNULL"]),  # ... but must be the whole element
    (1009, '{"a\\nb"}', ["anb"]),  # backslash escapes any character (not C escapes)
    (1009, '{"line\nbreak"}', ["line\nbreak"]),  # literal newline inside quotes
    (1009, '{{a,"b c"},{NULL,d}}', [["a", "b c"], [None, "d"]]),  # 2-D text
    (1015, '{"a b",c}', ["a b", "c"]),  # varchar[]
    (1000, "{t,f,NULL}", [True, False, None]),  # bool[]
    (1231, "{1.5,NaN,-Infinity}", [Decimal("1.5"), Decimal("NaN"), Decimal("-Infinity")]),
    (2951, "{" + U1 + "}", [uuid.UUID(U1)]),  # uuid[]
    (1182, "{2024-01-01,infinity}", [date(2024, 1, 1), date.max]),  # date[]
    (
        1185,  # timestamptz[]: elements with spaces are quoted
        '{"2024-03-01 12:34:56+00","2024-03-01 12:34:56+05:30"}',
        [datetime(2024, 3, 1, 12, 34, 56, tzinfo=UTC), datetime(2024, 3, 1, 7, 4, 56, tzinfo=UTC)],
    ),
    (3807, '{"{\\"a\\": 1}",NULL}', [{"a": 1}, None]),  # jsonb[]: element JSON is escaped
    (1001, '{"\\\\x0102"}', [b"\x01\x02"]),  # bytea[]: the \x prefix's backslash is escaped
    (1022, "{NaN,Infinity,1.5}", [NAN, math.inf, 1.5]),  # float8[]
    # --- unknown OIDs pass through unchanged
    (869, "192.168.0.1/24", "192.168.0.1/24"),  # inet is not covered
    (16385, "happy", "happy"),  # a user-defined enum
    (99999, "{1,2}", "{1,2}"),  # an unknown array type is not parsed
]


@pytest.mark.parametrize(("oid", "text", "expected"), CASES)
def test_to_python(oid: int, text: str, expected: Any) -> None:
    got = to_python(oid, text)
    assert same(got, expected), f"{got!r} != {expected!r}"
    assert same(converter(oid)(text), expected)


ERRORS: list[tuple[int, str]] = [
    (16, "yes"),  # not a PostgreSQL boolean output
    (23, "abc"),  # not an integer
    (23, "1.5"),  # integers do not take fractions
    (1700, "12,5"),  # not a numeric
    (701, "fast"),  # not a float
    (2950, "nope"),  # not a uuid
    (3802, "{bad json"),  # invalid JSON
    (17, "\\xzz"),  # invalid hex
    (17, "a\\q"),  # invalid escape in escape-format bytea
    (1082, "0044-03-15 BC"),  # BC dates are not representable
    (1114, "10000-01-01 00:00:00"),  # years beyond 9999 are not representable
    (1114, "2024-13-01 00:00:00"),  # month out of range
    (1184, "2024-03-01 12:34:56"),  # timestamptz without offset: DateStyle is not ISO
    (1184, "03/01/2024 12:34:56 PST"),  # non-ISO DateStyle
    (1083, "25:00:00"),  # not a time
    (1007, "1,2"),  # array without braces
    (1007, "{1,2"),  # unbalanced
    (1007, "{1}}"),  # unbalanced the other way
    (1007, "{1,,2}"),  # empty element
    (1007, "{,1}"),  # leading delimiter
    (1009, '{"abc}'),  # unterminated quote
    (1009, '{"a"b}'),  # element after a quoted element without delimiter
    (1007, "{1}x"),  # junk after the array
    (1007, "{1}{2}"),  # two arrays
    (1007, "{{1},2"),  # unbalanced nested
    (1007, "{x}"),  # element fails its converter
]


@pytest.mark.parametrize(("oid", "text"), ERRORS)
def test_to_python_rejects(oid: int, text: str) -> None:
    with pytest.raises(ValueError):
        to_python(oid, text)


def test_none_stays_none_for_every_oid() -> None:
    for oid in [*OID_NAMES, 0, 99999]:
        assert to_python(oid, None) is None


def test_unchanged_toast_is_not_a_value() -> None:
    with pytest.raises(TypeError, match="UNCHANGED_TOAST"):
        to_python(25, UNCHANGED_TOAST)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        to_python(23, 5)  # type: ignore[arg-type]


def test_converter_for_unknown_oid_is_identity() -> None:
    conv = converter(424242)
    assert conv("anything {1,2}") == "anything {1,2}"


def test_oid_names() -> None:
    assert OID_NAMES[23] == "integer"
    assert OID_NAMES[20] == "bigint"
    assert OID_NAMES[1184] == "timestamp with time zone"
    assert OID_NAMES[1007] == "integer[]"
    assert OID_NAMES[1009] == "text[]"
    assert OID_NAMES[3802] == "jsonb"
    # Every named OID has a dedicated converter, and the brief's required OIDs are all named.
    required = {16, 21, 23, 20, 26, 1700, 700, 701, 25, 1043, 1042, 19, 18, 2950, 114, 3802}
    required |= {1082, 1114, 1184, 1083, 1186, 17, 1000, 1005, 1007, 1016, 1009, 1015, 1231}
    required |= {2951, 1182, 1185}
    assert required <= OID_NAMES.keys()
    # Array types are named after their element type, which is covered too.
    arrays = {oid: name for oid, name in OID_NAMES.items() if name.endswith("[]")}
    assert len(arrays) == len(OID_NAMES) // 2
    assert {name[:-2] for name in arrays.values()} == set(OID_NAMES.values()) - set(arrays.values())


def test_parse_array_default_element_is_text() -> None:
    assert parse_array('{a,"b,c",NULL}') == ["a", "b,c", None]


def test_golden_row_converts() -> None:
    """The golden INSERT of row 1 converts column by column using the Relation's type OIDs."""
    golden = Path(__file__).parent / "golden" / "pgoutput_v1.json"
    msgs = [
        decode_message(bytes.fromhex(r["hex"]))
        for r in json.loads(golden.read_text(encoding="utf-8"))["messages"]
    ]
    rel = next(m for m in msgs if isinstance(m, Relation) and m.name == "golden_types")
    ins = next(m for m in msgs if isinstance(m, Insert) and m.relation_id == rel.relation_id)
    row = {
        col.name: to_python(col.type_oid, value)  # type: ignore[arg-type]
        for col, value in zip(rel.columns, ins.new, strict=True)
    }
    expected = {
        "id": 1,
        "big_id": 9007199254740993,
        "amount": Decimal("12345.67"),
        "label": 'héllo "world", \\ ünïcode ✓',
        "code": "ABC",
        "flag": True,
        "created_at": datetime(2024, 3, 1, 12, 34, 56, 123456, tzinfo=UTC),
        "day": date(2024, 2, 29),
        "token": uuid.UUID(U1),
        "doc": {"a": [1, 2], "b": None},
        "tags": ["x", "with space", "with,comma", 'quo"te', None, "NULL", ""],
        "nums": [[1, 2], [3, None]],
        "ratio": NAN,
        "raw": b"\x00\xff\x10",
        "big": "small",
    }
    assert row.keys() == expected.keys()
    for name, value in expected.items():
        assert same(row[name], value), f"{name}: {row[name]!r} != {value!r}"
