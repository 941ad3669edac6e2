"""The key a change is held under: one text per (target table, key values).

Contract: :func:`change_key` names the key of a mapped change — that of its last row operation
(a key-changing UPDATE is held under its new key; a TRUNCATE under the table's ``"*"``) — in the
stored form :func:`key_text` gives: JSON ``[table, value, ...]`` with values as sent. The retry
queue, the dead letters and reconciliation compare keys in this form. Pure.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from .mapper import Delete, TargetOp, Upsert


def change_key(table: str, ops: Sequence[TargetOp]) -> str:
    """The key a change is held under: that of its last row operation (a key-changing UPDATE
    is held under its new key; a TRUNCATE under the table's ``"*"``)."""
    key: Sequence[Any] = ("*",)
    for op in ops:
        if isinstance(op, Upsert | Delete):
            key = op.key
    return key_text(table, key)


def key_text(table: str, key: Sequence[Any]) -> str:
    """The stored form of a key: JSON ``[table, value, ...]`` (values as sent)."""
    return json.dumps([table, *[v if v is None or isinstance(v, str) else str(v) for v in key]])
