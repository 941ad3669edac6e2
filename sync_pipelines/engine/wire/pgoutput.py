"""Decoder for PostgreSQL's ``pgoutput`` logical replication protocol (version 1).

Contract
--------
This module is a pure function of bytes: :func:`decode_message` takes the payload of one
``XLogData`` frame (or one ``data`` value of ``pg_logical_slot_*_binary_changes``) and returns
one immutable message object. It never opens a socket, never talks to a server, keeps no state
between calls and performs no type conversion beyond text decoding (see
:mod:`sync_pipelines.engine.wire.pgtypes` for that). Relation bookkeeping (mapping ``relation_id``
to the latest :class:`Relation`) is the caller's job.

Scope: protocol version 1 with default options, i.e. no streaming of in-progress
transactions (``streaming`` off), no two-phase messages and no binary tuple data. Logical
decoding messages (``messages 'true'``) are supported.

Column values are delivered in text format and decoded as UTF-8, which is what the server
sends when the replication connection runs with ``client_encoding=UTF8`` (psycopg's default).
SQL ``NULL`` is ``None``; a TOASTed value that did not change in an UPDATE (and hence was not
sent) is the distinct sentinel :data:`UNCHANGED_TOAST`.

Errors
------
Any malformed input - unknown message type byte, unknown tuple data kind, data that ends
before the message does, trailing bytes after it, a missing string terminator or invalid
UTF-8 - raises :class:`DecodeError` (a :class:`ValueError`) naming the message type and the
byte offset where decoding failed. Binary-format tuple data (kind ``'b'``) also raises
:class:`DecodeError`: it is only sent when the ``binary`` option is requested, which this
decoder does not support. No other exception type escapes :func:`decode_message`.

Wire conventions
----------------
All integers are big-endian. ``String`` is NUL-terminated. LSNs are ``uint64``; timestamps are
``int64`` microseconds since 2000-01-01 00:00:00 UTC (the PostgreSQL epoch).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Final

__all__ = [
    "UNCHANGED_TOAST",
    "Begin",
    "Column",
    "Commit",
    "DecodeError",
    "Delete",
    "Insert",
    "LogicalMessage",
    "Message",
    "Origin",
    "Relation",
    "Truncate",
    "TypeMsg",
    "Update",
    "Value",
    "decode_message",
    "format_lsn",
    "parse_lsn",
]


class DecodeError(ValueError):
    """Raised when bytes are not a well-formed pgoutput v1 message.

    ``msg_type`` is the message type character (``"?"`` if there was no byte at all) and
    ``offset`` the byte position within the message where decoding failed.
    """

    def __init__(self, reason: str, *, msg_type: str = "?", offset: int = 0) -> None:
        super().__init__(f"pgoutput message {msg_type!r} at offset {offset}: {reason}")
        self.reason = reason
        self.msg_type = msg_type
        self.offset = offset


class _UnchangedToast:
    """Type of :data:`UNCHANGED_TOAST`; there is exactly one instance."""

    __slots__ = ()
    _instance: _UnchangedToast | None = None

    def __new__(cls) -> _UnchangedToast:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED_TOAST"

    def __reduce__(self) -> str:
        # Pickle/copy as the module-level singleton.
        return "UNCHANGED_TOAST"


UNCHANGED_TOAST: Final = _UnchangedToast()
"""An out-of-line (TOASTed) value that an UPDATE left unchanged; the server did not send it.

Distinct from ``None`` (SQL NULL): the column still holds its previous value.
"""

Value = str | None | _UnchangedToast
"""One column value of a tuple: text representation, ``None`` for NULL, or UNCHANGED_TOAST."""


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Column:
    """One column of a :class:`Relation`.

    Wire: ``Int8 flags`` (bit 1 = part of the replica identity key), ``String name``,
    ``Int32 type OID``, ``Int32 type modifier`` (``-1`` when there is none).
    """

    name: str
    type_oid: int
    type_modifier: int
    is_key: bool


@dataclass(frozen=True, slots=True)
class Relation:
    """``'R'``: describes a table; sent before the first change touching it in a session
    and again whenever its definition (or the publication) changes.

    Wire: ``Int32 relation OID``, ``String namespace`` (empty for ``pg_catalog``),
    ``String name``, ``Int8 replica identity`` (``d`` default, ``n`` nothing, ``f`` full,
    ``i`` index), ``Int16 column count`` then that many :class:`Column` entries.
    """

    relation_id: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[Column, ...]

    @property
    def qualified_name(self) -> str:
        """``"namespace.name"`` (``"pg_catalog"`` when the server sent an empty namespace)."""
        return f"{self.namespace or 'pg_catalog'}.{self.name}"

    @property
    def key_columns(self) -> tuple[str, ...]:
        """Names of the replica identity columns, in table order."""
        return tuple(c.name for c in self.columns if c.is_key)


@dataclass(frozen=True, slots=True)
class Begin:
    """``'B'``: start of a committed transaction.

    Wire: ``Int64 final LSN`` (LSN of the commit record), ``Int64 commit timestamp``,
    ``Int32 xid``.
    """

    final_lsn: int
    commit_ts: datetime
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    """``'C'``: end of the transaction opened by the preceding :class:`Begin`.

    Wire: ``Int8 flags`` (currently always 0), ``Int64 commit LSN``, ``Int64 end LSN``
    (just past the commit record; the position to confirm once the transaction is
    durable downstream), ``Int64 commit timestamp``.
    """

    flags: int
    commit_lsn: int
    end_lsn: int
    commit_ts: datetime


@dataclass(frozen=True, slots=True)
class Insert:
    """``'I'``: a new row.

    Wire: ``Int32 relation OID``, ``Byte1 'N'``, TupleData of the new row.

    TupleData is ``Int16 column count`` followed, per column, by a kind byte: ``'n'`` NULL,
    ``'u'`` unchanged TOAST value (no payload), ``'t'`` text (``Int32 length`` + bytes) or
    ``'b'`` binary (same layout; unsupported here).
    """

    relation_id: int
    new: tuple[Value, ...]


@dataclass(frozen=True, slots=True)
class Update:
    """``'U'``: a changed row.

    Wire: ``Int32 relation OID``, then optionally ``Byte1 'K'`` + TupleData of the old key
    (sent when the key changed; non-key columns are NULL) or ``Byte1 'O'`` + TupleData of the
    whole old row (REPLICA IDENTITY FULL), then ``Byte1 'N'`` + TupleData of the new row.
    ``old`` is ``None`` when no old tuple was sent; ``old_is_key`` tells ``'K'`` from ``'O'``.
    """

    relation_id: int
    old: tuple[Value, ...] | None
    old_is_key: bool
    new: tuple[Value, ...]


@dataclass(frozen=True, slots=True)
class Delete:
    """``'D'``: a removed row.

    Wire: ``Int32 relation OID``, ``Byte1 'K'`` (old key only, other columns NULL) or
    ``Byte1 'O'`` (whole old row, REPLICA IDENTITY FULL), TupleData.
    """

    relation_id: int
    old: tuple[Value, ...]
    old_is_key: bool


@dataclass(frozen=True, slots=True)
class Truncate:
    """``'T'``: one TRUNCATE statement, possibly over several tables.

    Wire: ``Int32 relation count``, ``Int8 options`` (bit 1 CASCADE, bit 2 RESTART IDENTITY),
    then that many ``Int32`` relation OIDs.
    """

    relation_ids: tuple[int, ...]
    cascade: bool
    restart_identity: bool


@dataclass(frozen=True, slots=True)
class Origin:
    """``'O'``: the transaction was replayed from another node (replication origin).

    Wire: ``Int64 commit LSN on the origin server``, ``String origin name``.
    """

    lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class TypeMsg:
    """``'Y'``: describes a non-built-in data type used by a following :class:`Relation`.

    Wire: ``Int32 type OID``, ``String namespace`` (empty for ``pg_catalog``),
    ``String name``.
    """

    type_oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    """``'M'``: payload of ``pg_logical_emit_message`` (needs option ``messages 'true'``).

    Wire: ``Int8 flags`` (bit 1 = transactional), ``Int64 LSN``, ``String prefix``,
    ``Int32 length``, content bytes. Non-transactional messages arrive outside Begin/Commit.
    """

    transactional: bool
    lsn: int
    prefix: str
    content: bytes


Message = (
    Begin
    | Commit
    | Origin
    | Relation
    | TypeMsg
    | Insert
    | Update
    | Delete
    | Truncate
    | LogicalMessage
)
"""Any decoded pgoutput v1 message."""


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------

_PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=timezone.utc)

_I32: Final = struct.Struct(">I")
_H16: Final = struct.Struct(">H")
_BEGIN: Final = struct.Struct(">QqI")  # final lsn, commit ts, xid
_COMMIT: Final = struct.Struct(">BQQq")  # flags, commit lsn, end lsn, commit ts
_ORIGIN: Final = struct.Struct(">Q")
_REL_HEAD: Final = struct.Struct(">I")
_REL_TAIL: Final = struct.Struct(">cH")  # replica identity, column count
_COL_TAIL: Final = struct.Struct(">Ii")  # type oid, type modifier
_ID_KIND: Final = struct.Struct(">Ic")  # relation oid, tuple marker
_TRUNC_HEAD: Final = struct.Struct(">IB")
_MSG_HEAD: Final = struct.Struct(">BQ")

# Tuple data kind bytes.
_K_TEXT: Final = ord("t")
_K_NULL: Final = ord("n")
_K_TOAST: Final = ord("u")
_K_BINARY: Final = ord("b")


class _Fail(Exception):
    """Internal: malformed data at ``offset``; converted to DecodeError by decode_message."""

    def __init__(self, reason: str, offset: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.offset = offset


def _timestamp(micros: int, offset: int) -> datetime:
    try:
        return _PG_EPOCH + timedelta(microseconds=micros)
    except OverflowError:
        raise _Fail(f"timestamp {micros} out of range", offset) from None


def _string(buf: bytes, pos: int) -> tuple[str, int]:
    """Read a NUL-terminated UTF-8 string starting at ``pos``; return it and the next offset."""
    end = buf.find(b"\x00", pos)
    if end < 0:
        raise _Fail("unterminated string", pos)
    try:
        return buf[pos:end].decode(), end + 1
    except UnicodeDecodeError as exc:
        raise _Fail(f"invalid UTF-8 in string: {exc.reason}", pos + exc.start) from None


def _tuple(buf: bytes, pos: int) -> tuple[tuple[Value, ...], int]:
    """Read TupleData at ``pos``; return the values and the next offset.

    A text value running past the end of ``buf`` is not checked here: it leaves the returned
    offset beyond ``len(buf)``, which decode_message reports as truncation.
    """
    (ncols,) = _H16.unpack_from(buf, pos)
    pos += 2
    values: list[Value] = []
    append = values.append
    unpack_len = _I32.unpack_from
    start = pos
    try:
        for _ in range(ncols):
            kind = buf[pos]
            if kind == _K_TEXT:
                start = pos + 5
                pos = start + unpack_len(buf, pos + 1)[0]
                append(buf[start:pos].decode())
            elif kind == _K_NULL:
                pos += 1
                append(None)
            elif kind == _K_TOAST:
                pos += 1
                append(UNCHANGED_TOAST)
            elif kind == _K_BINARY:
                raise _Fail(
                    "binary tuple data ('b') is unsupported; do not request binary mode", pos
                )
            else:
                raise _Fail(f"unknown tuple data kind {chr(kind)!r}", pos)
    except UnicodeDecodeError as exc:
        if pos > len(buf):  # the value was cut short, possibly mid-character
            raise _Fail(f"truncated: needs {pos} bytes, got {len(buf)}", len(buf)) from None
        raise _Fail(f"invalid UTF-8 in text value: {exc.reason}", start + exc.start) from None
    return tuple(values), pos


def _begin(buf: bytes) -> tuple[Begin, int]:
    lsn, ts, xid = _BEGIN.unpack_from(buf, 1)
    return Begin(lsn, _timestamp(ts, 9), xid), 1 + _BEGIN.size


def _commit(buf: bytes) -> tuple[Commit, int]:
    flags, lsn, end_lsn, ts = _COMMIT.unpack_from(buf, 1)
    return Commit(flags, lsn, end_lsn, _timestamp(ts, 18)), 1 + _COMMIT.size


def _origin(buf: bytes) -> tuple[Origin, int]:
    (lsn,) = _ORIGIN.unpack_from(buf, 1)
    name, pos = _string(buf, 1 + _ORIGIN.size)
    return Origin(lsn, name), pos


def _relation(buf: bytes) -> tuple[Relation, int]:
    (rel_id,) = _REL_HEAD.unpack_from(buf, 1)
    namespace, pos = _string(buf, 1 + _REL_HEAD.size)
    name, pos = _string(buf, pos)
    ident, ncols = _REL_TAIL.unpack_from(buf, pos)
    pos += _REL_TAIL.size
    columns: list[Column] = []
    for _ in range(ncols):
        flags = buf[pos]
        col_name, pos = _string(buf, pos + 1)
        type_oid, typmod = _COL_TAIL.unpack_from(buf, pos)
        pos += _COL_TAIL.size
        columns.append(Column(col_name, type_oid, typmod, bool(flags & 1)))
    return Relation(rel_id, namespace, name, ident.decode("latin-1"), tuple(columns)), pos


def _type(buf: bytes) -> tuple[TypeMsg, int]:
    (type_oid,) = _I32.unpack_from(buf, 1)
    namespace, pos = _string(buf, 5)
    name, pos = _string(buf, pos)
    return TypeMsg(type_oid, namespace, name), pos


def _insert(buf: bytes) -> tuple[Insert, int]:
    rel_id, marker = _ID_KIND.unpack_from(buf, 1)
    if marker != b"N":
        raise _Fail(f"expected new tuple marker 'N', got {marker.decode('latin-1')!r}", 5)
    new, pos = _tuple(buf, 6)
    return Insert(rel_id, new), pos


def _update(buf: bytes) -> tuple[Update, int]:
    rel_id, marker = _ID_KIND.unpack_from(buf, 1)
    old: tuple[Value, ...] | None = None
    old_is_key = False
    pos = 6
    if marker == b"K" or marker == b"O":
        old_is_key = marker == b"K"
        old, pos = _tuple(buf, pos)
        marker = buf[pos : pos + 1]
        pos += 1
    if marker != b"N":
        shown = marker.decode("latin-1") if marker else "<end of data>"
        raise _Fail(f"expected tuple marker 'K', 'O' or 'N', got {shown!r}", pos - 1)
    new, pos = _tuple(buf, pos)
    return Update(rel_id, old, old_is_key, new), pos


def _delete(buf: bytes) -> tuple[Delete, int]:
    rel_id, marker = _ID_KIND.unpack_from(buf, 1)
    if marker != b"K" and marker != b"O":
        raise _Fail(f"expected old tuple marker 'K' or 'O', got {marker.decode('latin-1')!r}", 5)
    old, pos = _tuple(buf, 6)
    return Delete(rel_id, old, marker == b"K"), pos


def _truncate(buf: bytes) -> tuple[Truncate, int]:
    nrels, options = _TRUNC_HEAD.unpack_from(buf, 1)
    pos = 1 + _TRUNC_HEAD.size
    if pos + 4 * nrels > len(buf):
        raise _Fail(f"truncated: {nrels} relation ids announced", len(buf))
    ids = struct.unpack_from(f">{nrels}I", buf, pos)
    pos += 4 * nrels
    return Truncate(ids, bool(options & 1), bool(options & 2)), pos


def _logical_message(buf: bytes) -> tuple[LogicalMessage, int]:
    flags, lsn = _MSG_HEAD.unpack_from(buf, 1)
    prefix, pos = _string(buf, 1 + _MSG_HEAD.size)
    (length,) = _I32.unpack_from(buf, pos)
    start = pos + 4
    pos = start + length
    return LogicalMessage(bool(flags & 1), lsn, prefix, buf[start:pos]), pos


_DECODERS: Final[dict[int, Callable[[bytes], tuple[Message, int]]]] = {
    ord("B"): _begin,
    ord("C"): _commit,
    ord("O"): _origin,
    ord("R"): _relation,
    ord("Y"): _type,
    ord("I"): _insert,
    ord("U"): _update,
    ord("D"): _delete,
    ord("T"): _truncate,
    ord("M"): _logical_message,
}

# Message types that exist in later protocol versions / with options this decoder rejects.
_UNSUPPORTED: Final = {
    ord("S"): "stream start (protocol v2 streaming)",
    ord("E"): "stream stop (protocol v2 streaming)",
    ord("c"): "stream commit (protocol v2 streaming)",
    ord("A"): "stream abort (protocol v2 streaming)",
    ord("b"): "begin prepare (two-phase, protocol v3)",
    ord("P"): "prepare (two-phase, protocol v3)",
    ord("K"): "commit prepared (two-phase, protocol v3)",
    ord("r"): "rollback prepared (two-phase, protocol v3)",
    ord("p"): "stream prepare (two-phase, protocol v3)",
}


def decode_message(data: bytes | bytearray | memoryview) -> Message:
    """Decode one complete pgoutput v1 message.

    ``data`` must hold exactly one message (its first byte is the message type). Raises
    :class:`DecodeError` on anything malformed, including trailing bytes.
    """
    buf = data if type(data) is bytes else bytes(data)
    if not buf:
        raise DecodeError("empty message", msg_type="?", offset=0)
    kind = buf[0]
    decoder = _DECODERS.get(kind)
    if decoder is None:
        what = _UNSUPPORTED.get(kind, "unknown message type")
        raise DecodeError(f"{what} is not supported", msg_type=chr(kind), offset=0)
    try:
        message, end = decoder(buf)
    except _Fail as exc:
        raise DecodeError(exc.reason, msg_type=chr(kind), offset=exc.offset) from None
    except (struct.error, IndexError):
        raise DecodeError(
            f"truncated: data ended after {len(buf)} bytes", msg_type=chr(kind), offset=len(buf)
        ) from None
    if end != len(buf):
        if end > len(buf):
            raise DecodeError(
                f"truncated: needs {end} bytes, got {len(buf)}", msg_type=chr(kind), offset=len(buf)
            )
        raise DecodeError(
            f"{len(buf) - end} trailing byte(s) after the message", msg_type=chr(kind), offset=end
        )
    return message


# --------------------------------------------------------------------------------------------
# LSNs
# --------------------------------------------------------------------------------------------

_U32_MAX: Final = 0xFFFFFFFF


def format_lsn(lsn: int) -> str:
    """Format an LSN the way PostgreSQL prints ``pg_lsn``: ``"16/B374D848"`` (upper hex)."""
    if not 0 <= lsn <= 0xFFFFFFFFFFFFFFFF:
        raise ValueError(f"LSN out of range: {lsn}")
    return f"{lsn >> 32:X}/{lsn & _U32_MAX:X}"


def parse_lsn(text: str) -> int:
    """Parse ``"16/B374D848"`` (either case) into an integer LSN; ``ValueError`` if malformed."""
    hi, sep, lo = text.strip().partition("/")
    if not sep or not _is_hex32(hi) or not _is_hex32(lo):
        raise ValueError(f"invalid LSN: {text!r}")
    return (int(hi, 16) << 32) | int(lo, 16)


def _is_hex32(part: str) -> bool:
    return 0 < len(part) <= 8 and all(c in "0123456789abcdefABCDEF" for c in part)


# -- encoding (for rows the engine itself places in the stream: backfill and repair) ---------


def encode_tuple(values: Sequence[str | None]) -> bytes:
    """TupleData of text values (``None`` → ``'n'``), the inverse of the decoder's reading."""
    out = bytearray(_H16.pack(len(values)))
    for v in values:
        if v is None:
            out += b"n"
        else:
            raw = v.encode()
            out += b"t" + _I32.pack(len(raw)) + raw
    return bytes(out)


def encode_update(relation_id: int, values: Sequence[str | None]) -> bytes:
    """An ``'U'`` message with only the new tuple: "the row now reads ``values``"."""
    return b"U" + _I32.pack(relation_id) + b"N" + encode_tuple(values)


def encode_delete(relation_id: int, values: Sequence[str | None]) -> bytes:
    """A ``'D'`` message with a key tuple (``'K'``): non-key columns are ``None``."""
    return b"D" + _I32.pack(relation_id) + b"K" + encode_tuple(values)
