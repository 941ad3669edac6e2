"""Rows passed through as the source sent them (pgoutput text → text COPY, never decoded).

Unit: for every mapping of renames and column selection, :meth:`Mapper.map_raw` gives the same
key and row as decoding and mapping value by value, for hostile values (tabs, newlines,
backslashes, ``\\N`` as text, NULL, empty, multi-byte); it declines (None: the change is
decoded instead) for casts, derived fields, filters, old tuples, unchanged TOAST values and
malformed messages, and for generated hostile tuples it never raises and never takes one the
decoder refuses (but for a non-key value's encoding, which the target checks). End to end (real
PostgreSQL): such rows reach a target of many types equal to the source; a value too long for
the target's varchar(n) is refused and dead-lettered as COPY refuses it, never cut short, and
char(n) and bit(n) keep their lengths (the cast names the type, not the SQL spelling that means
length 1); a domain column goes through the decoded path and keeps its check.
"""

from __future__ import annotations

import struct
from contextlib import closing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sync_pipelines.engine import deliver_pipeline, pull_pipeline, target_health
from sync_pipelines.engine.delivery.sinks.registry import open_sink
from sync_pipelines.engine.mapping.mapper import Mapper, Upsert
from sync_pipelines.engine.staging.store import StateStore
from sync_pipelines.engine.wire.change import START, Position, decode_change
from sync_pipelines.engine.wire.copyrow import RawRow, copy_row
from sync_pipelines.engine.wire.pgoutput import encode_tuple, encode_update

from .support.pipelines import execute, make_spec, rows
from .test_mapping import CUSTOMERS, POS, ROW, mapper

pytestmark = pytest.mark.pg_versions

HOSTILE = ["7", "tab\there", "new\nline\r\n", "back\\slash\\N", "\\N", "", None,
           "naïve — 東京 🚀", '{"a": "b\\tc"}', "x" * 70_000]

PLAIN = [{}, {"columns": {"email": "mail", "first": "given"}}, {"include": ["email", "status"]},
         {"exclude": ["secret", "bio"]}, {"include": ["email"], "columns": {"id": "cid"}}]


def insert_message(values: list[str | None]) -> bytes:
    return b"I" + struct.pack("!i", CUSTOMERS.relation_id) + b"N" + encode_tuple(values)


@pytest.mark.parametrize("mapping", PLAIN)
@pytest.mark.parametrize("values", [ROW, HOSTILE], ids=["row", "hostile"])
@pytest.mark.parametrize("op", ["I", "U"])
def test_raw_rows_equal_the_decoded_mapping(mapping, values, op):
    m = mapper(mapping)
    tm = m.table_mapper(1)
    message = (insert_message(values) if op == "I"
               else encode_update(CUSTOMERS.relation_id, values))
    raw = m.map_raw(tm, op, POS, message)
    decoded = m.map(decode_change(POS.commit_lsn, POS.seq, 1, 1, op, message))
    assert raw is not None
    [r], [d] = raw, decoded
    assert isinstance(r, Upsert) and isinstance(r.row, RawRow)
    assert (r.table, r.key, r.partial, r.position) == (d.table, d.key, d.partial, d.position)
    assert dict(r.row) == d.row and list(r.row) == list(d.row)
    assert list(r.row.values()) == list(d.row.values())


@pytest.mark.parametrize("mapping", [
    {"cast": {"score": "float"}}, {"derived": {"k": {"constant": 1}}},
    {"filter": [{"column": "status", "op": "=", "value": "active"}]}])
def test_mappings_that_need_values_are_decoded(mapping):
    m = mapper(mapping)
    assert m.map_raw(m.table_mapper(1), "I", POS, insert_message(ROW)) is None


def tuple_data(*fields: bytes) -> bytes:
    """TupleData of fields given as kind + payload (``b"t..."``, ``b"n"``, ``b"u"``...)."""
    out = struct.pack("!H", len(fields))
    for f in fields:
        out += f[:1] + (struct.pack("!i", len(f) - 1) + f[1:] if f[:1] in (b"t", b"b") else b"")
    return out


def test_changes_raw_rows_cannot_carry_are_decoded():
    m = mapper({})
    tm = m.table_mapper(1)
    head = b"I" + struct.pack("!i", 1) + b"N"
    fields = [b"t" + v.encode() for v in ROW]
    good = head + tuple_data(*fields)
    assert m.map_raw(tm, "I", POS, good) is not None
    # an update whose old key comes first (a key change or REPLICA IDENTITY FULL)
    with_old = b"U" + struct.pack("!i", 1) + b"K" + tuple_data(*fields) + b"N" + tuple_data(
        *fields)
    assert m.map_raw(tm, "U", POS, with_old) is None
    assert m.map_raw(tm, "I", POS, head + tuple_data(*fields[:-1], b"u")) is None  # TOAST
    assert m.map_raw(tm, "I", POS, head + tuple_data(*fields[:-1], b"bxyz")) is None  # binary
    assert m.map_raw(tm, "I", POS, good[:-3]) is None  # truncated
    assert m.map_raw(tm, "I", POS, good + b"x") is None  # trailing bytes
    assert m.map_raw(tm, "D", POS, good) is None  # deletes are decoded (key only)
    assert m.map_raw(tm, "I", POS, head + tuple_data(b"t\xff", *fields[1:])) is None  # key
    assert m.map_raw(tm, "I", POS, head + tuple_data(*fields[:-1], b"t\xff")) is not None, \
        "only key values are decoded; the target checks the rest's encoding"


# -- hostile tuples: copy_row answers as the decoder does, or declines -----------------------

_TEXT_FIELD = st.builds(lambda v: b"t" + v.encode(), st.one_of(
    st.text(max_size=12),
    # the bytes text COPY escapes and what its lines are made of: tab, backslash, N, newlines
    st.text(alphabet=st.sampled_from("\\\t\n\rN.a"), max_size=6)))
_FIELD = st.one_of(
    _TEXT_FIELD,
    st.just(b"n"), st.just(b"u"),  # NULL, unchanged TOAST
    st.builds(lambda v: b"b" + v, st.binary(max_size=4)),  # binary
    st.just(b"t\xff\xfe"),  # a value that is not UTF-8
)


@st.composite
def _messages(draw: st.DrawFn, ncols: int) -> bytes:
    head = b"I" + struct.pack("!i", 1) + b"N"
    n = draw(st.sampled_from([ncols, ncols, ncols, ncols - 1, ncols + 1, 0]))
    # Half the tuples of text and NULL only: the kind copy_row takes.
    kinds = st.one_of(_TEXT_FIELD, st.just(b"n")) if draw(st.booleans()) else _FIELD
    fields = draw(st.lists(kinds, min_size=max(n, 0), max_size=max(n, 0)))
    message = head + tuple_data(*fields)
    cut = draw(st.sampled_from(["whole"] * 6 + ["truncated", "trailing", "negative", "head"]))
    if cut == "truncated":
        message = message[:draw(st.integers(0, max(len(message) - 1, 0)))]
    elif cut == "trailing":
        message += draw(st.binary(min_size=1, max_size=3))
    elif cut == "negative" and b"t" in message[8:]:
        at = message.index(b"t", 8)
        message = message[:at + 1] + struct.pack("!i", -3) + message[at + 5:]
    elif cut == "head":
        message = message[:draw(st.integers(0, 7))]
    return message


@settings(max_examples=300, deadline=None)
@given(data=st.data(), ncols=st.integers(1, 5))
def test_copy_row_takes_a_well_formed_tuple_and_declines_anything_else(data, ncols):
    """Hostile and malformed messages (short, long, truncated, trailing bytes, a negative
    length, TOAST, binary, a key not UTF-8) never raise from inside: copy_row declines them
    (None) and the change is decoded the ordinary way, which says what is wrong."""
    message = data.draw(_messages(ncols))
    picks = data.draw(st.one_of(st.none(), st.lists(st.integers(0, ncols - 1), unique=True,
                                                    min_size=1).map(sorted)))
    key_idx = data.draw(st.lists(st.integers(0, ncols - 1), min_size=1, max_size=2,
                                 unique=True))
    got = copy_row(message, 6, picks, key_idx)
    if got is None:
        return
    # Only key values are decoded (the target checks the encoding of the rest, see above):
    # the decoder's answer is taken with the one non-UTF-8 value made valid, on both sides.
    clean = message.replace(b"\xff\xfe", b"??")
    try:
        values = decode_change(1, 0, 1, 1, "I", clean).new_values
    except Exception:  # noqa: BLE001 (any refusal of the decoder: copy_row must refuse too)
        values = None
    assert values is not None, "copy_row took a message the decoder refuses"
    key, row = got
    assert key == tuple(values[k] for k in key_idx)
    wanted = values if picks is None else [values[j] for j in picks]
    assert RawRow(tuple(map(str, range(len(wanted)))), row.replace(b"\xff\xfe", b"??")
                  ).as_dict() == {str(i): v for i, v in enumerate(wanted)}


@pytest.fixture
def typed(monkeypatch, source_dsn, target_dsn, state_dsn):
    cols = ("id bigint PRIMARY KEY, code text, amount numeric(12,4), tags text[], doc jsonb, "
            "at timestamptz, day date, blob bytea, flag boolean, note text, secret text, "
            "country char(2), bits bit(3), codes char(3)[]")
    execute(source_dsn, f"CREATE TABLE things ({cols})",
            "CREATE TABLE memos (id bigint PRIMARY KEY, memo text)")
    # The target's own types: a narrower varchar, a coarser numeric; a domain with a check in
    # a table of its own (a domain column sends its whole table the decoded way).
    execute(target_dsn, "CREATE DOMAIN short_note AS varchar(8) CHECK (VALUE <> 'nope')",
            "CREATE TABLE things (id bigint PRIMARY KEY, code varchar(5), amount numeric(12,2), "
            "tags text[], doc jsonb, at timestamptz, day date, blob bytea, flag boolean, "
            "memo varchar(8), country char(2), bits bit(3), codes char(3)[])",
            "CREATE TABLE memos (id bigint PRIMARY KEY, memo short_note)")
    s = make_spec(monkeypatch, source_dsn=source_dsn, target_dsn=target_dsn,
                  state_dsn=state_dsn, tables={"things": {"columns": {"note": "memo"},
                                                          "exclude": ["secret"]},
                                               "memos": {}},
                  policy={"batch_size": 50, "retry": {"max_attempts": 1}})
    pull_pipeline(s, "crm")
    return s


def test_raw_rows_reach_a_typed_target_and_keep_its_rules(typed, source_dsn, target_dsn,
                                                          state_dsn):
    execute(source_dsn,
            "INSERT INTO things SELECT g, 'c' || (g % 100), g * 1.23456, "
            "ARRAY['a\tb', 'q\"uote', NULL, 'back\\slash'], "
            "jsonb_build_object('n', g, 's', E'line\\nnext'), "
            "timestamptz '2024-01-01 00:00+00' + g * interval '1 minute', "
            "date '2024-01-01' + g, decode(md5(g::text), 'hex'), g % 2 = 0, "
            "CASE WHEN g % 7 = 0 THEN NULL ELSE 'n' || g END, 's3cret', "
            "(ARRAY['DE', 'FR', 'P'])[1 + g % 3], (g % 8)::bit(3), ARRAY['ab', 'xyz'] "
            "FROM generate_series(1, 300) g",
            "UPDATE things SET code = 'toolong' WHERE id = 10",       # varchar(5) refuses it
            "UPDATE things SET note = 'much too long' WHERE id = 20",  # varchar(8) refuses it
            "UPDATE things SET note = E'tab\\there' WHERE id = 30",
            "INSERT INTO memos VALUES (1, 'fine'), (2, 'nope')")  # the domain refuses key 2
    pull_pipeline(typed, "crm")
    state = StateStore.connect(state_dsn)
    staged = state.read_staged("crm", *_span(state))
    m = Mapper(typed.pipelines["crm"], state.relation)
    raw = [m.map_raw(m.table_mapper(r[3]), r[4], Position(r[0], r[1]), r[5]) for r in staged]
    state.close()
    assert all(ops is not None and isinstance(ops[0].row, RawRow) for ops in raw), \
        "every change here passes through raw"
    with closing(open_sink(typed.pipelines["crm"], "replica")) as sink:
        assert sink._raw_casts("public.things", ["id", "code", "country", "bits"]) is not None
        assert sink._raw_casts("public.memos", ["id", "memo"]) is None  # a domain: decoded
    report = deliver_pipeline(typed, "crm")[0]
    assert report.changes == len(staged) == 305
    assert report.dead_letters == 3
    reasons = [d["reason"] for d in target_health(typed, "crm")[0].latest_dead_letters]
    assert sum("too long" in r for r in reasons) == 2, reasons
    assert any("short_note" in r for r in reasons), reasons
    assert rows(target_dsn, "SELECT id, memo FROM memos ORDER BY id") == [(1, "fine")]
    # Not cut short: key 10 keeps its previous code, key 20 its previous memo.
    assert rows(target_dsn, "SELECT code FROM things WHERE id = 10") == [("c10",)]
    assert rows(target_dsn, "SELECT memo FROM things WHERE id = 20") == [("n20",)]
    # Everything else equals the source, values converted as COPY converts them.
    expected = rows(source_dsn,
                    "SELECT id, code, amount::numeric(12,2), tags, doc, at, day, blob, flag, "
                    "note, country, bits::text, codes::text FROM things "
                    "WHERE id NOT IN (10, 20) ORDER BY id")
    got = rows(target_dsn, "SELECT id, code, amount, tags, doc, at, day, blob, flag, memo, "
                           "country, bits::text, codes::text FROM things "
                           "WHERE id NOT IN (10, 20) ORDER BY id")
    assert got == expected
    assert rows(target_dsn, "SELECT memo FROM things WHERE id = 30") == [("tab\there",)]


def test_raw_rows_of_two_relation_versions_merge_by_column(typed, source_dsn, target_dsn):
    """A column dropped mid-window: one key's rows of the two shapes are merged column by
    column (the raw row decodes itself), as decoded rows are."""
    execute(source_dsn, "INSERT INTO things (id, code, amount, tags) VALUES (1, 'a', 1, '{x}')",
            "ALTER TABLE things DROP COLUMN tags",
            "UPDATE things SET code = 'b' WHERE id = 1",
            "INSERT INTO things (id, code, amount) VALUES (2, 'c', 2)")
    pull_pipeline(typed, "crm")
    assert deliver_pipeline(typed, "crm")[0].dead_letters == 0
    # The target keeps its column; key 1's value of it is the last one the stream carried.
    assert rows(target_dsn, "SELECT id, code, amount, tags FROM things ORDER BY id") == [
        (1, "b", 1, ["x"]), (2, "c", 2, None)]


def _span(state: StateStore) -> tuple[Position, Position]:
    return START, state.batches("crm")[-1].last
