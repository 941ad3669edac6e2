"""Unit tests for the pgoutput v1 decoder, driven by golden bytes captured from PostgreSQL.

The golden file is produced by ``golden/capture_pgoutput.py``; no server is needed here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
import random
import struct
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sync_pipelines.engine.wire.pgoutput import (
    UNCHANGED_TOAST,
    Begin,
    Column,
    Commit,
    DecodeError,
    Delete,
    Insert,
    LogicalMessage,
    Message,
    Origin,
    Relation,
    Truncate,
    TypeMsg,
    Update,
    decode_message,
    format_lsn,
    parse_lsn,
)

GOLDEN = Path(__file__).parent / "golden" / "pgoutput_v1.json"
BIG = "0123456789abcdef" * 640

TYPES_COLUMNS = [
    # (name, type oid, type modifier, is_key)
    ("id", 23, -1, True),
    ("big_id", 20, -1, False),
    ("amount", 1700, ((12 << 16) | 2) + 4, False),  # numeric(12,2)
    ("label", 25, -1, False),
    ("code", 1043, 16 + 4, False),  # varchar(16)
    ("flag", 16, -1, False),
    ("created_at", 1184, -1, False),
    ("day", 1082, -1, False),
    ("token", 2950, -1, False),
    ("doc", 3802, -1, False),
    ("tags", 1009, -1, False),
    ("nums", 1007, -1, False),
    ("ratio", 701, -1, False),
    ("raw", 17, -1, False),
    ("big", 25, -1, False),
]

ROW1 = (
    "1",
    "9007199254740993",
    "12345.67",
    'héllo "world", \\ ünïcode ✓',
    "ABC",
    "t",
    "2024-03-01 12:34:56.123456+00",
    "2024-02-29",
    "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    '{"a": [1, 2], "b": null}',
    '{x,"with space","with,comma","quo\\"te",NULL,"NULL",""}',
    "{{1,2},{3,NULL}}",
    "NaN",
    "\\x00ff10",
    "small",
)

T = TypeVar("T")


@cache
def golden() -> tuple[tuple[dict[str, str], Message], ...]:
    rows = json.loads(GOLDEN.read_text(encoding="utf-8"))["messages"]
    return tuple((row, decode_message(bytes.fromhex(row["hex"]))) for row in rows)


def messages() -> list[Message]:
    return [m for _, m in golden()]


def of_type(cls: type[T]) -> list[T]:
    return [m for m in messages() if isinstance(m, cls)]


def relations_named(name: str) -> list[Relation]:
    return [r for r in of_type(Relation) if r.name == name]


def rel_id(name: str) -> int:
    return relations_named(name)[0].relation_id


def changes_for(name: str, cls: type[T]) -> list[T]:
    rid = rel_id(name)
    return [m for m in of_type(cls) if m.relation_id == rid]  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------
# Golden messages
# --------------------------------------------------------------------------------------------


def test_golden_file_shape() -> None:
    data = json.loads(GOLDEN.read_text(encoding="utf-8"))
    assert data["description"]
    assert all(set(row) == {"lsn", "xid", "hex"} for row in data["messages"])
    kinds = {type(m).__name__ for m in messages()}
    assert kinds == {
        "Begin",
        "Commit",
        "Relation",
        "TypeMsg",
        "Insert",
        "Update",
        "Delete",
        "Truncate",
        "Origin",
        "LogicalMessage",
    }


def test_memoryview_and_bytearray_decode_identically() -> None:
    for row, msg in golden():
        raw = bytes.fromhex(row["hex"])
        assert decode_message(memoryview(raw)) == msg
        assert decode_message(bytearray(raw)) == msg
        # A memoryview slice of a larger buffer (how a socket reader would hand it over).
        framed = b"\xff" * 3 + raw + b"\xee"
        assert decode_message(memoryview(framed)[3:-1]) == msg


def test_transactions_are_bracketed_and_lsns_consistent() -> None:
    open_begin: tuple[dict[str, str], Begin] | None = None
    transactions = 0
    for row, msg in golden():
        if isinstance(msg, Begin):
            assert open_begin is None, "nested Begin"
            assert msg.xid == int(row["xid"])
            assert msg.commit_ts.tzinfo is timezone.utc
            open_begin = (row, msg)
        elif isinstance(msg, Commit):
            assert open_begin is not None, "Commit without Begin"
            begin_row, begin = open_begin
            assert begin.final_lsn == msg.commit_lsn
            assert begin.commit_ts == msg.commit_ts
            assert msg.flags == 0
            assert msg.end_lsn > msg.commit_lsn
            # The slot reports a commit row at the end LSN of the transaction.
            assert parse_lsn(row["lsn"]) == msg.end_lsn
            assert row["xid"] == begin_row["xid"]
            open_begin = None
            transactions += 1
        elif isinstance(msg, LogicalMessage) and not msg.transactional:
            assert open_begin is None
            assert row["xid"] == "0"
        else:
            assert open_begin is not None, f"{msg!r} outside a transaction"
            assert row["xid"] == open_begin[0]["xid"]
    assert open_begin is None
    assert transactions == 9  # ten scenario transactions, one of them only a non-tx message
    commits = of_type(Commit)
    assert [c.commit_lsn for c in commits] == sorted(c.commit_lsn for c in commits)


def test_relation_golden_types() -> None:
    rel = relations_named("golden_types")[0]
    assert rel.namespace == "public"
    assert rel.qualified_name == "public.golden_types"
    assert rel.replica_identity == "d"
    assert [(c.name, c.type_oid, c.type_modifier, c.is_key) for c in rel.columns] == TYPES_COLUMNS
    assert rel.key_columns == ("id",)
    assert all(isinstance(c, Column) for c in rel.columns)


def test_relation_replica_identity_full_and_type_message() -> None:
    rel = relations_named("golden_full")[0]
    assert rel.replica_identity == "f"
    # With REPLICA IDENTITY FULL every column is flagged as part of the key.
    assert rel.key_columns == ("id", "note", "feeling")
    (mood,) = {t for t in of_type(TypeMsg)}  # sent twice, identical
    assert (mood.namespace, mood.name) == ("public", "mood")
    assert rel.columns[2].type_oid == mood.type_oid
    # The Type message precedes the Relation that uses it.
    msgs = messages()
    assert msgs.index(mood) < msgs.index(rel)


def test_inserts_values_as_text_null_and_toast_value() -> None:
    row1, row2, row3 = changes_for("golden_types", Insert)[:3]
    assert row1.new == ROW1
    assert row2.new == ("2",) + (None,) * 14
    assert row3.new[0] == "3"
    assert row3.new[3] == "toasty"
    assert row3.new[14] == BIG  # full value in the INSERT, although stored out of line


def test_update_leaves_toast_unchanged() -> None:
    upd = changes_for("golden_types", Update)[0]
    assert upd.old is None and not upd.old_is_key
    assert upd.new[0] == "3"
    assert upd.new[3] == "changed"
    assert upd.new[1] is None  # SQL NULL ...
    assert upd.new[14] is UNCHANGED_TOAST  # ... is not the same as an unsent TOAST value
    assert UNCHANGED_TOAST is not None


def test_key_changing_update_sends_old_key() -> None:
    upd = changes_for("golden_types", Update)[1]
    assert upd.old_is_key
    assert upd.old == ("3",) + (None,) * 14  # key columns only; the rest NULL
    assert upd.new[0] == "30"
    assert upd.new[14] is UNCHANGED_TOAST


def test_logical_messages() -> None:
    tx_msg, nontx_msg = of_type(LogicalMessage)
    assert tx_msg == LogicalMessage(True, tx_msg.lsn, "golden", b"hello")
    assert nontx_msg == LogicalMessage(False, nontx_msg.lsn, "golden-nt", b"\x00\x01\xff")
    assert 0 < tx_msg.lsn < nontx_msg.lsn


def test_schema_change_sends_second_relation() -> None:
    rels = relations_named("golden_types")
    first, second = rels[0], rels[1]
    assert first.relation_id == second.relation_id
    assert len(first.columns) == 15
    assert len(second.columns) == 16
    assert second.columns[:15] == first.columns
    assert second.columns[15] == Column("extra", 25, -1, False)
    insert4 = next(i for i in changes_for("golden_types", Insert) if i.new[0] == "4")
    assert len(insert4.new) == 16
    assert insert4.new[15] == "added"
    msgs = messages()
    assert msgs.index(second) < msgs.index(insert4)


def test_replica_identity_full_update_and_delete() -> None:
    inserts = changes_for("golden_full", Insert)
    assert [i.new for i in inserts] == [
        ("1", "a", "happy"),
        ("2", None, "sad"),
        ("3", "from-origin", None),
    ]
    (upd,) = changes_for("golden_full", Update)
    assert not upd.old_is_key
    assert upd.old == ("1", "a", "happy")
    assert upd.new == ("1", "b", "happy")
    (dele,) = changes_for("golden_full", Delete)
    assert dele == Delete(rel_id("golden_full"), ("2", None, "sad"), False)


def test_delete_by_primary_key() -> None:
    (dele,) = changes_for("golden_types", Delete)
    assert dele.old_is_key
    assert dele.old == ("1",) + (None,) * 15


def test_origin_message() -> None:
    (origin,) = of_type(Origin)
    assert origin == Origin(parse_lsn("0/ABCDEF01"), "golden_origin")
    msgs = messages()
    begin = msgs[msgs.index(origin) - 1]
    assert isinstance(begin, Begin)
    # pg_replication_origin_xact_setup also sets the transaction's commit timestamp.
    assert begin.commit_ts == datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def test_truncate() -> None:
    (trunc,) = of_type(Truncate)
    assert trunc == Truncate((rel_id("golden_types"), rel_id("golden_full")), True, True)


def test_messages_are_frozen_slotted_and_hashable() -> None:
    for msg in messages():
        assert not hasattr(msg, "__dict__")
        hash(msg)
        field = dataclasses.fields(msg)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(msg, field, None)


def test_unchanged_toast_singleton() -> None:
    assert repr(UNCHANGED_TOAST) == "UNCHANGED_TOAST"
    assert type(UNCHANGED_TOAST)() is UNCHANGED_TOAST
    assert copy.deepcopy(UNCHANGED_TOAST) is UNCHANGED_TOAST
    assert pickle.loads(pickle.dumps(UNCHANGED_TOAST)) is UNCHANGED_TOAST
    assert UNCHANGED_TOAST != None  # noqa: E711 - explicitly not SQL NULL


# --------------------------------------------------------------------------------------------
# Hand-built messages and malformed input
# --------------------------------------------------------------------------------------------


def tuple_data(*values: Any) -> bytes:
    out = struct.pack(">H", len(values))
    for v in values:
        if v is None:
            out += b"n"
        elif v is UNCHANGED_TOAST:
            out += b"u"
        else:
            raw = v.encode() if isinstance(v, str) else v
            out += b"t" + struct.pack(">I", len(raw)) + raw
    return out


def test_hand_built_insert_and_update_without_old() -> None:
    ins = b"I" + struct.pack(">I", 7) + b"N" + tuple_data("1", None, UNCHANGED_TOAST, "")
    assert decode_message(ins) == Insert(7, ("1", None, UNCHANGED_TOAST, ""))
    upd = b"U" + struct.pack(">I", 7) + b"O" + tuple_data("a") + b"N" + tuple_data("b")
    assert decode_message(upd) == Update(7, ("a",), False, ("b",))


def test_begin_commit_timestamps() -> None:
    # 86_400_000_000 us after the PostgreSQL epoch (2000-01-01 UTC).
    begin = b"B" + struct.pack(">QqI", 0x16_B374D848, 86_400_000_000, 42)
    assert decode_message(begin) == Begin(
        0x16_B374D848, datetime(2000, 1, 2, tzinfo=timezone.utc), 42
    )
    commit = b"C" + struct.pack(">BQQq", 0, 10, 20, -1)
    assert decode_message(commit).commit_ts == datetime(  # type: ignore[union-attr]
        1999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc
    )


@pytest.mark.parametrize(
    ("data", "msg_type", "offset", "fragment"),
    [
        # Nothing at all.
        (b"", "?", 0, "empty"),
        # Unknown type byte.
        (b"Z\x00\x00", "Z", 0, "unknown message type"),
        # Protocol v2 streaming is out of scope.
        (b"S\x00\x00\x00\x01\x01", "S", 0, "streaming"),
        # Begin cut short.
        (b"B\x00\x00\x00", "B", 4, "truncated"),
        # Insert with an 'O' marker where 'N' is required.
        (b"I\x00\x00\x00\x07O" + tuple_data("x"), "I", 5, "'N'"),
        # Binary tuple data is not supported.
        (b"I\x00\x00\x00\x07N\x00\x01b\x00\x00\x00\x01x", "I", 8, "binary"),
        # Unknown tuple data kind.
        (b"I\x00\x00\x00\x07N\x00\x02n?", "I", 9, "unknown tuple data kind '?'"),
        # Text value longer than the data.
        (b"I\x00\x00\x00\x07N\x00\x01t\x00\x00\x00\x09abc", "I", 16, "truncated"),
        # Extra byte after a complete message.
        (b"I\x00\x00\x00\x07N" + tuple_data("x") + b"!", "I", 14, "trailing"),
        # Invalid UTF-8 in a text value.
        (b"I\x00\x00\x00\x07N" + tuple_data(b"ok\xff\xfe"), "I", 15, "UTF-8"),
        # A multi-byte character cut by the end of data is truncation, not bad UTF-8.
        (b"I\x00\x00\x00\x07N\x00\x01t\x00\x00\x00\x02\xc3", "I", 14, "truncated"),
        # Invalid UTF-8 in a relation name.
        (b"R\x00\x00\x00\x07pub\xfflic\x00", "R", 8, "UTF-8"),
        # Relation namespace without NUL terminator.
        (b"R\x00\x00\x00\x07public", "R", 5, "unterminated string"),
        # Update whose old tuple is followed by neither 'N' nor anything.
        (b"U\x00\x00\x00\x07K" + tuple_data("x"), "U", 14, "<end of data>"),
        # Delete needs 'K' or 'O'.
        (b"D\x00\x00\x00\x07N" + tuple_data("x"), "D", 5, "'K' or 'O'"),
        # Truncate announcing more relation ids than present.
        (b"T\x00\x00\x00\x03\x00\x00\x00\x00\x01", "T", 10, "truncated"),
    ],
)
def test_decode_errors(data: bytes, msg_type: str, offset: int, fragment: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_message(data)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.msg_type == msg_type
    assert err.offset == offset
    assert fragment in str(err)
    assert f"{msg_type!r}" in str(err) and f"offset {offset}" in str(err)


def test_every_truncation_of_golden_messages_raises() -> None:
    for row, _ in golden():
        raw = bytes.fromhex(row["hex"])
        cuts = range(len(raw)) if len(raw) < 300 else range(0, len(raw), max(1, len(raw) // 60))
        for cut in cuts:
            with pytest.raises(DecodeError):
                decode_message(raw[:cut])
        with pytest.raises(DecodeError, match="trailing"):
            decode_message(raw + b"\x00")


# --------------------------------------------------------------------------------------------
# LSNs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lsn", "text"),
    [
        (0, "0/0"),
        (0x16_B374D848, "16/B374D848"),
        (0xFFFFFFFF, "0/FFFFFFFF"),
        (1 << 32, "1/0"),
        (0xFFFFFFFF_FFFFFFFF, "FFFFFFFF/FFFFFFFF"),
    ],
)
def test_lsn_round_trip(lsn: int, text: str) -> None:
    assert format_lsn(lsn) == text
    assert parse_lsn(text) == lsn
    assert parse_lsn(text.lower()) == lsn


@pytest.mark.parametrize("text", ["", "16", "16/", "/1", "1/2/3", "G/0", "123456789/0", "-1/0"])
def test_parse_lsn_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_lsn(text)


def test_format_lsn_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        format_lsn(-1)
    with pytest.raises(ValueError):
        format_lsn(1 << 64)


def test_mutated_golden_messages_raise_only_decode_error() -> None:
    # Deterministic fuzzing: flip bytes of real messages; anything but DecodeError is a bug.
    rng = random.Random(1234)
    samples = [bytes.fromhex(row["hex"]) for row, _ in golden() if len(row["hex"]) < 2000]
    for _ in range(3000):
        raw = bytearray(rng.choice(samples))
        for _ in range(rng.randint(1, 3)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        try:
            decode_message(raw)
        except DecodeError:
            pass
