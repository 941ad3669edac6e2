"""Changes as the engine passes them between stages: a stream position and a decoded row change.

Contract: :class:`Position` orders every change of a pipeline's stream — its transaction's
commit LSN, then its index in the transaction — and :data:`START` is before all of them.
:func:`decode_change` turns a staged pgoutput row message (kept raw in the mailbox, the retry
queue and the dead letters) into a :class:`StoredChange` of text values, the form mapping
reads. Pure: no I/O, nothing kept.

Values stay in PostgreSQL's text format; ``None`` is SQL NULL. A value an UPDATE left out as
unchanged (a TOASTed value it did not touch) is ``None`` too, and its column index is listed in
``unchanged`` — except under REPLICA IDENTITY FULL, where the old row carries it and it is
filled in from there.
"""

from __future__ import annotations

from typing import NamedTuple

from ..errors import StateError
from .pgoutput import UNCHANGED_TOAST, Delete, Insert, Update, Value, decode_message


class Position(NamedTuple):
    """Where a change sits in the stream: its transaction's commit LSN and its index in it."""

    commit_lsn: int
    seq: int


START = Position(0, -1)
"""The position before every change."""


class StoredChange(NamedTuple):
    """A staged change as read back for delivery, its message decoded into text values."""

    commit_lsn: int
    seq: int
    batch_id: int
    relation_id: int
    op: str
    new_values: list[str | None] | None
    old_values: list[str | None] | None
    unchanged: list[int] | None

    @property
    def position(self) -> Position:
        return Position(self.commit_lsn, self.seq)


def _values(tup: tuple[Value, ...]) -> tuple[list[str | None], list[int] | None]:
    """Text values with unchanged-TOAST markers replaced by None, and those markers' indexes."""
    if UNCHANGED_TOAST not in tup:
        return list(tup), None  # type: ignore[arg-type]
    unchanged = [i for i, v in enumerate(tup) if v is UNCHANGED_TOAST]
    return [None if v is UNCHANGED_TOAST else v for v in tup], unchanged  # type: ignore[misc]


def decode_change(commit_lsn: int, seq: int, batch_id: int, relation_id: int, op: str,
                   message: bytes) -> StoredChange:
    if op == "T":
        return StoredChange(commit_lsn, seq, batch_id, relation_id, op, None, None, None)
    msg = decode_message(message)
    new = old = unchanged = None
    if isinstance(msg, Insert):
        new, unchanged = _values(msg.new)
    elif isinstance(msg, Update):
        new, unchanged = _values(msg.new)
        old = _values(msg.old)[0] if msg.old is not None else None
        if unchanged and msg.old is not None and not msg.old_is_key:
            # REPLICA IDENTITY FULL: the old row carries (detoasted) the values the new row
            # left out as unchanged, so the stream did carry them after all.
            for i in unchanged:
                if msg.old[i] is not UNCHANGED_TOAST:
                    new[i] = msg.old[i]  # type: ignore[assignment]
            unchanged = [i for i in unchanged if msg.old[i] is UNCHANGED_TOAST] or None
    elif isinstance(msg, Delete):
        old = _values(msg.old)[0]
    else:
        raise StateError(f"staged change at {Position(commit_lsn, seq)} holds a "
                         f"{type(msg).__name__} message, not a row change")
    return StoredChange(commit_lsn, seq, batch_id, relation_id, op, new, old, unchanged)
