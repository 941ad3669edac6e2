"""Two-way links: two systems kept in sync both ways, with a conflict policy.

A link under ``links:`` lists its two **sides** — a PostgreSQL database (a name and a DSN
variable), or, as the second side, an HTTP API (its base URL, credentials, per table the
requests that write, delete and read one record, and how its changes come in: a webhook or
poll source) — and, per table, its name on each side, the column renames between them and the
conflict policy. It
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

from .sources import HttpPollSourceSpec, WebhookSourceSpec

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


def _request(v: str, methods: tuple[str, ...]) -> str:
    parts = v.split()
    if len(parts) != 2 or parts[0] not in methods or not parts[1].startswith("/"):
        raise ValueError(f"{v!r} must look like '{methods[0]} /contacts/{{id}}'")
    return v


class ApiTableSpec(_Model):
    """How the link writes, deletes and reads one record of a table of an HTTP API side."""

    upsert: str
    """e.g. ``PUT /contacts/{id}`` (the body is the record, in the API's field names)."""
    delete: str | None = None
    """e.g. ``DELETE /contacts/{id}``; without it a delete cannot cross to the API."""
    get: str
    """e.g. ``GET /contacts/{id}``: the link reads the API's current record before it writes,
    to tell a conflict (the API changed the key since both sides agreed) from an update."""
    managed: list[str] = Field(default_factory=list)
    """Fields the API sets itself (a change time, a version): sent and received, but left out
    when versions are compared and when an echo of the link's own write is recognised."""

    @field_validator("upsert")
    @classmethod
    def _upsert(cls, v: str) -> str:
        return _request(v, ("PUT", "POST", "PATCH"))

    @field_validator("delete")
    @classmethod
    def _delete(cls, v: str | None) -> str | None:
        return None if v is None else _request(v, ("DELETE",))

    @field_validator("get")
    @classmethod
    def _get(cls, v: str) -> str:
        return _request(v, ("GET",))


class LinkSideSpec(_Model):
    name: str
    """How the side is called (direction pipelines and targets are named after it)."""
    kind: Literal["postgres", "http"] = "postgres"
    dsn_env: str | None = None
    """PostgreSQL: environment variable with the side's DSN (it is both a source and a
    target)."""
    publication: str | None = None
    slot: str | None = None
    base_url_env: str | None = None
    """HTTP API: environment variable with its base URL."""
    auth: dict[str, Any] | None = None
    """HTTP API: credentials, as an http target's ``auth:``."""
    changes: WebhookSourceSpec | HttpPollSourceSpec | None = Field(
        default=None, discriminator="kind")
    """HTTP API: how its changes come in — a ``webhook`` or ``http_poll`` source whose
    ``records:`` name the side's tables."""
    tables: dict[str, ApiTableSpec] = Field(default_factory=dict)
    """HTTP API: per table (the side's name, as under ``changes.records``) its requests."""
    timeout_seconds: float = Field(default=10.0, gt=0)
    concurrency: int = Field(default=16, ge=1, le=512)

    @model_validator(mode="after")
    def _kind(self) -> LinkSideSpec:
        where = f"side {self.name!r}"
        if self.kind == "postgres":
            if not self.dsn_env:
                raise ValueError(f"{where}: a PostgreSQL side needs `dsn_env:`")
            extra = [f for f in ("base_url_env", "auth", "changes") if getattr(self, f)]
            if extra or self.tables:
                raise ValueError(f"{where}: {', '.join(extra or ['tables'])} belong to an "
                                 "HTTP API side (`kind: http`)")
            return self
        if self.dsn_env or self.publication or self.slot:
            raise ValueError(f"{where}: an HTTP API side has no dsn_env/publication/slot")
        if not self.base_url_env:
            raise ValueError(f"{where}: an HTTP API side needs `base_url_env:`")
        if self.changes is None:
            raise ValueError(f"{where}: an HTTP API side needs `changes:` (a webhook or "
                             "http_poll source: how its changes come in)")
        return self


class LinkSpec(_Model):
    """Two systems kept in sync both ways."""

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
    echo_ttl_seconds: float = Field(default=86400.0, gt=0)
    """An HTTP API side: how long a write of the link is remembered, to recognise it when the
    API's webhook or poll brings it back (longer than the API can take to send it)."""

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

    @model_validator(mode="after")
    def _api_side(self) -> LinkSpec:
        first, second = self.sides
        if first.kind == "http":
            raise ValueError("sides: the first side must be PostgreSQL (table and column "
                             "names are its); put the HTTP API second")
        if second.kind != "http":
            return self
        assert second.changes is not None
        for table, t in self.tables.items():
            other = _qualify(t.as_) if t.as_ else table
            where = f"tables.{table} (on side {second.name!r}: {other})"
            if other not in second.tables:
                raise ValueError(f"{where}: side {second.name!r} has no requests for it "
                                 f"under `tables:` ({', '.join(second.tables) or 'none'})")
            record = second.changes.records.get(other)
            if record is None:
                raise ValueError(f"{where}: side {second.name!r} has no record type for it "
                                 "under `changes.records:`")
            nested = [f for f, fs in record.fields.items() if "." in fs.path]
            if nested:
                raise ValueError(f"{where}: fields {nested} have nested paths; a linked "
                                 "record's fields are top-level")
            unknown = [c for c in t.columns.values() if c not in record.fields]
            if unknown:
                raise ValueError(f"{where}: columns rename to {unknown}, which the record "
                                 "type has no field for")
            bad = [m for m in second.tables[other].managed if m not in record.fields]
            if bad:
                raise ValueError(f"{where}: managed names {bad}, which the record type has "
                                 "no field for")
            ts = t.conflict.timestamp
            if ts and t.columns.get(ts, ts) not in record.fields:
                raise ValueError(f"{where}: conflict.timestamp {t.conflict.timestamp!r} is "
                                 "not a field of the record type")
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
        api = link.side(b) if link.side(b).kind == "http" else None
        roles = {table: _table_role(table, t, api) for table, t in link.tables.items()}
        for src, dst in ((a, b), (b, a)):
            tables: dict[str, Any] = {}
            for table, r in roles.items():
                if src == a:
                    tables[table] = {"target_table": r.other, "columns": dict(r.columns)}
                    if r.api is not None:  # only the record's fields cross to the API
                        tables[table]["include"] = list(r.api.types)
                else:
                    back = {v: k for k, v in link.tables[table].columns.items()}
                    tables[r.other] = {"target_table": table, "columns": back}
            out[direction_name(name, src, dst)] = {
                "source": _source(link.side(src)), "tables": tables,
                "targets": {dst: _target(link.side(dst), roles)},
                "policy": link.policy, "initial_backfill": False,
                "link": {"name": name, "source_side": src, "target_side": dst,
                         "first_side": a, "api_side": api.name if api else None,
                         "api_connection": None if api is None else {
                             "base_url_env": api.base_url_env, "auth": api.auth,
                             "timeout_seconds": api.timeout_seconds,
                             "concurrency": api.concurrency},
                         "tables": {t: r.model_dump() for t, r in roles.items()},
                         "conflict_warn": link.conflict_warn,
                         "conflict_error": link.conflict_error,
                         "echo_ttl_seconds": link.echo_ttl_seconds},
            }
    return out


def _table_role(table: str, t: LinkTableSpec, api: LinkSideSpec | None) -> LinkTableRole:
    other = _qualify(t.as_) if t.as_ else table
    if api is None:
        return LinkTableRole(other=other, columns=dict(t.columns), conflict=t.conflict)
    assert api.changes is not None
    record, requests = api.changes.records[other], api.tables[other]
    back = {v: k for k, v in t.columns.items()}
    # First-side column → the record's field → its JSON name: what the API reads and sends.
    paths = {back.get(f, f): fs.path for f, fs in record.fields.items()}
    return LinkTableRole(
        other=other, columns={c: p for c, p in paths.items() if c != p}, conflict=t.conflict,
        api=ApiTableRole(
            get=requests.get, types={back.get(f, f): fs.type for f, fs in record.fields.items()},
            managed=[back.get(m, m) for m in requests.managed]))


def _source(side: LinkSideSpec) -> dict[str, Any]:
    if side.kind == "http":
        assert side.changes is not None
        return side.changes.model_dump(mode="json", exclude_unset=True) | {
            "kind": side.changes.kind}
    source: dict[str, Any] = {"dsn_env": side.dsn_env}
    if side.publication:
        source["publication"] = side.publication
    if side.slot:
        source["slot"] = side.slot
    return source


def _target(side: LinkSideSpec, roles: dict[str, LinkTableRole]) -> dict[str, Any]:
    if side.kind == "postgres":
        return {"kind": "postgres", "dsn_env": side.dsn_env, "create_tables": False}
    target: dict[str, Any] = {
        "kind": "http", "base_url_env": side.base_url_env,
        "concurrency": side.concurrency, "timeout_seconds": side.timeout_seconds,
        "tables": {table: {"upsert": side.tables[r.other].upsert,
                           "delete": side.tables[r.other].delete}
                   for table, r in roles.items()}}
    if side.auth:
        target["auth"] = side.auth
    return target


class ApiTableRole(_Model):
    """A linked table whose second side is an HTTP API."""

    get: str
    """The request that reads one record (``GET /contacts/{id}``)."""
    types: dict[str, str]
    """First-side column → the record field's type: the linked columns, and how their text is
    put in one form before versions are compared (see :func:`...links.canon.canonical`)."""
    managed: list[str] = Field(default_factory=list)
    """First-side names of the fields the API sets itself: not compared, not in echoes."""


class ApiConnection(_Model):
    """How the link reaches its API side (both directions read records through it)."""

    base_url_env: str
    auth: dict[str, Any] | None = None
    timeout_seconds: float = 10.0
    concurrency: int = 16


class LinkTableRole(_Model):
    other: str
    """The table's name on the second side."""
    columns: dict[str, str] = Field(default_factory=dict)
    """First-side column → second-side column (for an API: the record's JSON field)."""
    conflict: ConflictSpec
    api: ApiTableRole | None = None


class LinkRole(_Model):
    """A pipeline's part in a link (set by :func:`expand`, not written by hand)."""

    name: str
    source_side: str
    target_side: str
    first_side: str
    api_side: str | None = None
    """The second side, when it is an HTTP API (its changes come through a webhook or poll
    source, its writes go through requests; see :mod:`...links.resolver`)."""
    api_connection: ApiConnection | None = None
    tables: dict[str, LinkTableRole]
    """By first-side table name."""
    conflict_warn: int = 1
    conflict_error: int = 100
    echo_ttl_seconds: float = 86400.0

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


