"""pgoutput tuple data → a row of PostgreSQL's binary COPY format, without decoding values.

Contract: :func:`copy_row` reads the TupleData of a staged row message and returns the row as
a binary COPY tuple of ``text`` fields — the column count, then per column its length and its
bytes as the server sent them (length -1 for NULL) — plus the key values decoded as text. A
pgoutput text value and a binary COPY ``text`` field are the same bytes behind the same 32-bit
length, so a value is sliced, never decoded, escaped or re-encoded. It returns None for any
tuple it does not take (an unchanged TOAST value, binary data, a truncated or malformed
message, a key that is not valid UTF-8): the caller decodes that change the ordinary way, which
reports what is wrong. Pure.

:class:`RawRow` carries such a row through mapping and compaction as a read-only mapping of
column → text value, decoded only if something asks (a merge with a differently shaped row, a
sink that does not take raw rows). Measured on the benchmark's 8-column rows: 2.6 µs per row
against 5.6 µs to decode the tuple and build the row dict, and no per-value work at COPY time.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping, Sequence

_I32 = struct.Struct("!i")
_H16 = struct.Struct("!H")
_TEXT, _NULL = 0x74, 0x6E  # 't', 'n'
_NULL_FIELD = b"\xff\xff\xff\xff"

COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
"""Signature, flags (no OIDs) and header extension length of a binary COPY stream."""
COPY_TRAILER = b"\xff\xff"


def copy_row(buf: bytes, pos: int, picks: Sequence[int] | None,
             key_idx: Sequence[int]) -> tuple[tuple[str | None, ...], bytes] | None:
    """The key and the binary COPY row of the TupleData at ``pos`` of ``buf``, with the
    columns ``picks`` (their indexes, in order; None: all of them), or None (see above)."""
    unpack = _I32.unpack_from
    try:
        (n,) = _H16.unpack_from(buf, pos)
        pos += 2
        fields: list[bytes] = []
        append = fields.append
        for _ in range(n):
            kind = buf[pos]
            if kind == _TEXT:
                end = pos + 5 + unpack(buf, pos + 1)[0]
                if end < pos + 5:
                    return None  # a negative length: not a value
                append(buf[pos + 1:end])
                pos = end
            elif kind == _NULL:
                append(_NULL_FIELD)
                pos += 1
            else:
                return None  # unchanged TOAST, binary, or not a tuple at all
        if pos != len(buf):
            return None  # truncated or trailing bytes: the ordinary decoder says which
        # A list comprehension, not a generator: 0.45 against 0.80 µs for a one-column key.
        key = tuple([None if fields[i] is _NULL_FIELD else fields[i][4:].decode()
                     for i in key_idx])
        if picks is not None:
            fields = [fields[i] for i in picks]  # (fewer columns than the relation: None)
    except (IndexError, struct.error, UnicodeDecodeError):
        return None
    return key, _H16.pack(len(fields)) + b"".join(fields)


def _values(data: bytes) -> list[str | None]:
    (n,) = _H16.unpack_from(data, 0)
    pos = 2
    out: list[str | None] = []
    for _ in range(n):
        (size,) = _I32.unpack_from(data, pos)
        pos += 4
        if size < 0:
            out.append(None)
        else:
            out.append(data[pos:pos + size].decode())
            pos += size
    return out


class RawRow(Mapping[str, "str | None"]):
    """A row as one binary COPY tuple of text fields, under its column names (``shape``,
    shared by every row of one table mapping)."""

    __slots__ = ("_decoded", "data", "shape")

    def __init__(self, shape: tuple[str, ...], data: bytes) -> None:
        self.shape = shape
        self.data = data
        self._decoded: dict[str, str | None] | None = None

    def as_dict(self) -> dict[str, str | None]:
        if self._decoded is None:
            self._decoded = dict(zip(self.shape, _values(self.data), strict=True))
        return self._decoded

    def values(self):  # type: ignore[override]  (one decode, not one per column)
        return self.as_dict().values()

    def items(self):  # type: ignore[override]
        return self.as_dict().items()

    def __getitem__(self, column: str) -> str | None:
        return self.as_dict()[column]

    def __iter__(self) -> Iterator[str]:
        return iter(self.shape)

    def __len__(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return f"RawRow({self.as_dict()!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RawRow):
            return self.shape == other.shape and self.data == other.data
        return Mapping.__eq__(self, other)

    __hash__ = None  # type: ignore[assignment]  (a mapping, like dict)
