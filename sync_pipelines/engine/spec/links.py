"""Two-way links: two PostgreSQL databases kept in sync both ways, with a conflict policy.

A link under ``links:`` lists its two **sides** (a name and a DSN variable each) and, per
table, its name on each side, the column renames between them and the conflict policy. It
expands into two ordinary pipelines, ``<link>_<a>_to_<b>`` and ``<link>_<b>_to_<a>``: each
direction has its own slot, runs, assets and checks, and the asset graph stays acyclic. Each
carries a :class:`LinkRole` that the delivery path reads: where the link writes, under which
replication origin, and how a conflict is decided. See :mod:`...links` for what happens to a
change of a linked table.

Validation names the link, the table and the field, like the rest of the spec.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Policy = Literal["last_writer_wins", "source_priority", "field_merge", "manual"]
FieldPolicy = Literal["last_writer_wins", "source_priority", "manual"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ConflictSpec(_Model):
    """How a key changed on both sides since they last agreed is decided."""

    policy: Policy = "last_writer_wins"
    """``last_writer_wins`` (the version with the later ``timestamp`` wins whole),
    ``source_priority`` (the ``priority`` side wins), ``field_merge`` (fields changed on one
    side only are taken from that side; a field changed on both is decided by ``fallback``), or
    ``manual`` (the key is held as a conflict until an operator resolves it; other keys flow)."""
    timestamp: str | None = None
    """Column (first side's name) ordering versions for ``last_writer_wins``."""
    priority: str | None = None
    """The side that wins under ``source_priority`` and breaks ``last_writer_wins`` ties
    (default: the first side)."""
    fallback: FieldPolicy = "last_writer_wins"
    """``field_merge``: how a field changed on both sides is decided."""
    fields: dict[str, FieldPolicy] = Field(default_factory=dict)
    """Per-field overrides (first side's column names): how that field is decided when both
    sides changed it, whatever the table's policy decides for the rest of the row."""
    delete: Literal["update_wins", "delete_wins"] = "update_wins"
    """A key deleted on one side and changed on the other: by default the changed row wins and
    the deleted side gets it back."""


class LinkTableSpec(_Model):
    """One table of a link, named as on the first side."""

    as_: str | None = Field(default=None, alias="as")
    """Its name on the second side (default: the same)."""
    columns: dict[str, str] = Field(default_factory=dict)
    """Renames, ``first-side column: second-side column``; other columns keep their name."""
    conflict: ConflictSpec = Field(default_factory=ConflictSpec)


class LinkSideSpec(_Model):
    name: str
    """How the side is called (direction pipelines and targets are named after it)."""
    dsn_env: str
    """Environment variable with the side's DSN (it is both a source and a target)."""
    publication: str | None = None
    slot: str | None = None


class LinkSpec(_Model):
    """Two PostgreSQL databases kept in sync both ways."""

    sides: list[LinkSideSpec]
    """Exactly two; table names and columns are the first one's."""
    tables: dict[str, LinkTableSpec]
    policy: dict[str, Any] = Field(default_factory=dict)
    """The pipeline policy (batch size, budget, retries) of both directions."""
    conflict_warn: int = Field(default=1, ge=0)
    """The ``conflicts`` check warns at this many conflicts in the last day (held ones count
    always)..."""
    conflict_error: int = Field(default=100, ge=1)
    """...and fails at this many."""

    @field_validator("sides")
    @classmethod
    def _two(cls, v: list[LinkSideSpec]) -> list[LinkSideSpec]:
        if len(v) != 2:
            raise ValueError(f"a link has exactly two sides, got {len(v)}")
        if v[0].name == v[1].name:
            raise ValueError(f"the two sides have the same name {v[0].name!r}")
        for side in v:
            if not re.fullmatch(r"[a-z][a-z0-9_]*", side.name):
                raise ValueError(f"side name {side.name!r} must match [a-z][a-z0-9_]*")
        return v

    @field_validator("tables", mode="before")
    @classmethod
    def _tables(cls, v: Any) -> Any:
        if isinstance(v, list):
            v = {t: {} for t in v}
        if isinstance(v, dict):
            return {_qualify(str(k)): ({} if m is None else m) for k, m in v.items()}
        return v

    @model_validator(mode="after")
    def _policies(self) -> LinkSpec:
        names = [s.name for s in self.sides]
        for table, t in self.tables.items():
            c = t.conflict
            if c.priority is not None and c.priority not in names:
                raise ValueError(f"tables.{table}.conflict.priority: {c.priority!r} is not a "
                                 f"side of this link ({', '.join(names)})")
            uses_time = c.policy == "last_writer_wins" or (
                c.policy == "field_merge" and c.fallback == "last_writer_wins") or (
                "last_writer_wins" in c.fields.values())
            if uses_time and not c.timestamp:
                raise ValueError(f"tables.{table}.conflict: last_writer_wins needs "
                                 "`timestamp:` (the column that orders versions)")
        return self

    @property
    def side_names(self) -> tuple[str, str]:
        return self.sides[0].name, self.sides[1].name

    def side(self, name: str) -> LinkSideSpec:
        return next(s for s in self.sides if s.name == name)


def _qualify(name: str) -> str:
    return name if "." in name else f"public.{name}"


def direction_name(link: str, src: str, dst: str) -> str:
    return f"{link}_{src}_to_{dst}"


def origin_name(link: str, into: str) -> str:
    """The replication origin the link's writes into side ``into`` carry."""
    return f"sync_{link}_into_{into}"


def expand(links: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The two pipeline documents of every valid link (an invalid one is left to the
    ``links:`` field's own validation, which names the problem)."""
    out: dict[str, dict[str, Any]] = {}
    for name, raw in links.items():
        try:
            link = LinkSpec.model_validate(raw)
        except ValueError:  # pydantic's ValidationError
            continue
        a, b = link.side_names
        for src, dst in ((a, b), (b, a)):
            tables: dict[str, Any] = {}
            for table, t in link.tables.items():
                other = _qualify(t.as_) if t.as_ else table
                if src == a:
                    tables[table] = {"target_table": other, "columns": dict(t.columns)}
                else:
                    tables[other] = {"target_table": table,
                                     "columns": {v: k for k, v in t.columns.items()}}
            side = link.side(src)
            source: dict[str, Any] = {"dsn_env": side.dsn_env}
            if side.publication:
                source["publication"] = side.publication
            if side.slot:
                source["slot"] = side.slot
            out[direction_name(name, src, dst)] = {
                "source": source, "tables": tables,
                "targets": {dst: {"kind": "postgres", "dsn_env": link.side(dst).dsn_env,
                                  "create_tables": False}},
                "policy": link.policy, "initial_backfill": False,
                "link": {"name": name, "source_side": src, "target_side": dst,
                         "first_side": a, "tables": {
                             table: {"other": _qualify(t.as_) if t.as_ else table,
                                     "columns": dict(t.columns),
                                     "conflict": t.conflict.model_dump()}
                             for table, t in link.tables.items()},
                         "conflict_warn": link.conflict_warn,
                         "conflict_error": link.conflict_error},
            }
    return out


class LinkTableRole(_Model):
    other: str
    """The table's name on the second side."""
    columns: dict[str, str] = Field(default_factory=dict)
    conflict: ConflictSpec


class LinkRole(_Model):
    """A pipeline's part in a link (set by :func:`expand`, not written by hand)."""

    name: str
    source_side: str
    target_side: str
    first_side: str
    tables: dict[str, LinkTableRole]
    """By first-side table name."""
    conflict_warn: int = 1
    conflict_error: int = 100

    @property
    def origin(self) -> str:
        """The origin this direction's writes into its target carry."""
        return origin_name(self.name, self.target_side)

    @property
    def skip_origin(self) -> str:
        """The origin of the other direction's writes into this direction's source: captured
        changes under it are the link's own and are dropped."""
        return origin_name(self.name, self.source_side)

    @property
    def forward(self) -> bool:
        """Whether this direction goes from the first side to the second."""
        return self.source_side == self.first_side

    def table_of_target(self, target_table: str) -> tuple[str, LinkTableRole]:
        """(first-side name, role) of the linked table written as ``target_table``."""
        for first, role in self.tables.items():
            if (role.other if self.forward else first) == target_table:
                return first, role
        raise KeyError(target_table)

    def to_first_names(self, first: str, row: dict[str, Any]) -> dict[str, Any]:
        """A row as written into the target (target-side names) → first-side names."""
        if not self.forward:
            return dict(row)
        back = {v: k for k, v in self.tables[first].columns.items()}
        return {back.get(c, c): v for c, v in row.items()}

    def from_first_names(self, first: str, row: dict[str, Any]) -> dict[str, Any]:
        """First-side names → the target's names."""
        if not self.forward:
            return dict(row)
        cols = self.tables[first].columns
        return {cols.get(c, c): v for c, v in row.items()}


