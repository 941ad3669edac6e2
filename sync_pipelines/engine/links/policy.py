"""Conflict policies: what a key changed on both sides since they last agreed becomes.

Contract: :func:`decide` is pure and **symmetric** — it takes the two sides' versions by side
name, never "incoming" and "local", so whichever direction of a link meets the conflict first
reaches the same decision. A version is a row (``{column: PostgreSQL text}``, first-side column
names, key columns included) or ``None`` for a deleted row; the base is what both sides last
agreed on (``None`` deleted, :data:`NO_BASE` never agreed: an insert on both sides).

* ``last_writer_wins``: the version with the later ``timestamp`` wins whole; equal or missing
  timestamps go to the priority side (deterministic).
* ``source_priority``: the priority side wins whole.
* ``field_merge``: a field changed on one side only is taken from that side; a field changed on
  both (to different values) is decided by the ``fallback`` policy.
* ``manual``: held for an operator (:attr:`Decision.held`).
* Per-field overrides decide their field whenever the two versions differ in it.
* Delete vs change: ``update_wins`` (default; the changed row, restored on the side that
  deleted it) or ``delete_wins``. Deleted on both sides: agreed.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from ..spec.links import ConflictSpec

Row = dict[str, Any]


class _NoBase:
    def __repr__(self) -> str:
        return "NO_BASE"


NO_BASE: Any = _NoBase()
"""The sides never agreed on this key (it was inserted on both)."""


@dataclass(frozen=True)
class Decision:
    row: Row | None
    """The version both sides get (None: deleted)."""
    winner: str
    """A side's name, ``merge``, ``agreed`` or ``held``."""
    reason: str
    held: bool = False


def _when(v: Any) -> dt.datetime | None:
    if v is None:
        return None
    try:
        t = dt.datetime.fromisoformat(str(v).replace(" ", "T", 1))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def decide(c: ConflictSpec, base: Row | None | Any, versions: dict[str, Row | None],
           first_side: str) -> Decision:
    """The decision for one key; ``versions`` maps both side names to their version."""
    (a, va), (b, vb) = versions.items()
    priority = c.priority or first_side
    if va is None and vb is None:
        return Decision(None, "agreed", "deleted on both sides")
    if va is None or vb is None:
        deleted, kept = (a, b) if va is None else (b, a)
        if c.delete == "delete_wins":
            return Decision(None, deleted, f"deleted on {deleted}, changed on {kept}: "
                            "delete_wins")
        return Decision(versions[kept], kept, f"deleted on {deleted}, changed on {kept}: "
                        "update_wins (the row is restored)")
    if c.policy == "manual":
        return Decision(None, "held", "manual policy: held for an operator", held=True)

    def later() -> tuple[str, str]:
        ta, tb = _when(va.get(c.timestamp or "")), _when(vb.get(c.timestamp or ""))
        if ta is not None and tb is not None and ta != tb:
            w = a if ta > tb else b
            return w, f"{c.timestamp} is later on {w}"
        return priority, f"{c.timestamp} ties or is missing: {priority} has priority"

    fields = sorted(set(va) | set(vb))
    base_row = base if isinstance(base, dict) else {}
    out: Row = {}
    why: list[str] = []
    if c.policy == "field_merge":
        row_winner = None
    elif c.policy == "source_priority":
        row_winner, row_why = priority, f"source_priority: {priority} wins"
    else:
        row_winner, row_why = later()
    for f in fields:
        fa, fb = va.get(f), vb.get(f)
        if fa == fb:
            out[f] = fa
            continue
        rule = c.fields.get(f)
        if rule is None and row_winner is None:  # field_merge
            changed_a = base is NO_BASE or fa != base_row.get(f)
            changed_b = base is NO_BASE or fb != base_row.get(f)
            if changed_a and not changed_b:
                out[f] = fa
                continue
            if changed_b and not changed_a:
                out[f] = fb
                continue
            rule = c.fallback
        if rule is None:
            assert row_winner is not None
            out[f] = versions[row_winner][f] if f in versions[row_winner] else None
            continue
        if rule == "manual":
            return Decision(None, "held", f"field {f!r} changed on both sides: manual",
                            held=True)
        if rule == "source_priority":
            w = priority
            why.append(f"{f}: {priority} has priority")
        else:
            w, reason = later()
            why.append(f"{f}: {reason}")
        out[f] = versions[w].get(f)
    if row_winner is not None and not why:
        return Decision(out, row_winner, row_why)
    winner = (row_winner if row_winner is not None and all(
        out.get(f) == versions[row_winner].get(f) for f in fields) else
        a if out == va else b if out == vb else "merge")
    head = row_why if row_winner is not None else "field_merge"
    return Decision(out, winner, "; ".join([head, *why]))
