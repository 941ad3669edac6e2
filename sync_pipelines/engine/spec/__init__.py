"""The sync spec: pipelines, sources, targets, table mappings and policies, read from YAML.

Contract: :func:`load_spec` either returns a fully validated :class:`SyncSpec` or raises
:class:`~sync_pipelines.engine.errors.SpecError` whose message names the file, the pipeline and
the field at fault, e.g.::

    sync.yaml: pipeline 'crm', tables.public.customers.filter[0].op: Input should be '=', ...

The spec never holds credentials: sources and targets name the *environment variable* that
holds their DSN; the DSN itself is read only when a connection is opened
(:meth:`DsnRef.resolve`), never at import or validation time.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from ..errors import SpecError
from .links import LinkRole, LinkSpec
from .links import expand as expand_links
from .sources import HttpPollSourceSpec, RecordSpec, WebhookSourceSpec

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,40}$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


def qualify(table: str) -> str:
    """``customers`` → ``public.customers``; ``crm.deals`` stays as it is."""
    parts = table.split(".")
    if len(parts) == 1:
        parts = ["public", parts[0]]
    if len(parts) != 2 or not all(_IDENT.match(p) for p in parts):
        raise ValueError(f"{table!r} is not a table name of the form [schema.]table")
    return ".".join(parts)


class DsnRef(_Model):
    """Where a connection string comes from: an environment variable, never the spec itself."""

    dsn_env: str
    """Name of the environment variable holding the libpq connection string."""

    def resolve(self, what: str) -> str:
        value = os.environ.get(self.dsn_env, "").strip()
        if not value:
            raise SpecError(
                f"{what}: environment variable {self.dsn_env} is not set; set it to a "
                "PostgreSQL connection string (e.g. postgresql://user@host:5432/db)"
            )
        return value


class SourceSpec(DsnRef):
    """A PostgreSQL source read through a publication and a logical replication slot."""

    kind: Literal["postgres"] = "postgres"
    dsn_env: str = "SYNC_SOURCE_DSN"
    """Environment variable holding the source DSN (needs REPLICATION or superuser)."""
    publication: str | None = None
    """Publication name; default ``sync_<pipeline>``. Created if missing."""
    slot: str | None = None
    """Logical replication slot name; default ``sync_<pipeline>``. Created if missing."""


class FilterClause(_Model):
    """One condition of a row filter; a row passes when every clause holds."""

    column: str
    """Source column the clause tests."""
    op: Literal["=", "!=", "<", "<=", ">", ">=", "in", "not_in", "is_null", "not_null"]
    """Comparison operator."""
    value: Any = None
    """Right-hand side (a list for ``in``/``not_in``; unused for ``is_null``/``not_null``)."""

    @model_validator(mode="after")
    def _check_value(self) -> FilterClause:
        if self.op in ("in", "not_in") and not isinstance(self.value, list):
            raise ValueError(f"op {self.op!r} needs a list value")
        if self.op in ("=", "!=", "<", "<=", ">", ">=") and self.value is None:
            raise ValueError(f"op {self.op!r} needs a value (use is_null/not_null for NULL)")
        return self


class DerivedField(_Model):
    """A target column computed from the source row: exactly one of the three forms."""

    constant: Any = None
    """A constant value."""
    template: str | None = None
    """A ``str.format`` template over source columns, e.g. ``"{first_name} {last_name}"``."""
    column: str | None = None
    """Copy of another source column (useful to send one column to two target columns)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> DerivedField:
        given = [n for n in ("constant", "template", "column") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of constant, template, column")
        return self


CastType = Literal["int", "float", "decimal", "str", "bool", "date", "datetime", "json"]


class TableMapping(_Model):
    """How one source table maps onto a target table."""

    target_table: str | None = None
    """Target table as ``[schema.]table``; default: the source table's qualified name."""
    key: list[str] | None = None
    """Source key columns; default: the table's replica identity (normally its primary key)."""
    columns: dict[str, str] = Field(default_factory=dict)
    """Renames: ``source_column: target_column``. Unlisted columns keep their name."""
    include: list[str] | None = None
    """If given, only these source columns are sent (plus the key)."""
    exclude: list[str] = Field(default_factory=list)
    """Source columns never sent (e.g. secrets). Key columns cannot be excluded."""
    cast: dict[str, CastType] = Field(default_factory=dict)
    """Type conversions applied to source columns before they are sent."""
    derived: dict[str, DerivedField] = Field(default_factory=dict)
    """Extra target columns computed from the source row."""
    filter: list[FilterClause] = Field(default_factory=list)
    """Row filter. A row that stops matching is deleted from the target."""

    @field_validator("target_table")
    @classmethod
    def _qualify_target(cls, v: str | None) -> str | None:
        return qualify(v) if v is not None else None

    @model_validator(mode="after")
    def _check_columns(self) -> TableMapping:
        if self.key:
            clash = set(self.key) & set(self.exclude)
            if clash:
                raise ValueError(f"key columns cannot be excluded: {sorted(clash)}")
        targets = list(self.columns.values()) + list(self.derived)
        dupes = {t for t in targets if targets.count(t) > 1}
        if dupes:
            raise ValueError(f"target columns defined twice: {sorted(dupes)}")
        return self


class PostgresTargetSpec(DsnRef):
    """A PostgreSQL target: changes are applied idempotently with a checkpoint row."""

    kind: Literal["postgres"] = "postgres"
    dsn_env: str = "SYNC_TARGET_DSN"
    """Environment variable holding the target DSN."""
    checkpoint_schema: str = "sync_checkpoint"
    """Schema in the target holding the checkpoint table (written in each apply transaction)."""
    create_tables: bool = True
    """Create a missing target table from the source relation (columns, types, key)."""
    add_columns: bool = True
    """Add target columns when the source relation gains columns mid-stream."""


class HttpTableSpec(_Model):
    """How one source table's changes are sent to an HTTP API."""

    upsert: str
    """Request for an insert or update, e.g. ``PUT /contacts/{id}``; ``{name}`` takes the
    mapped row's field (after renames)."""
    delete: str | None = None
    """Request for a delete, e.g. ``DELETE /contacts/{id}`` (only key fields are known)."""

    @field_validator("upsert", "delete")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = v.split()
        if len(parts) != 2 or parts[0] not in ("PUT", "POST", "PATCH", "DELETE") or not (
            parts[1].startswith("/")
        ):
            raise ValueError(f"{v!r} must look like 'PUT /contacts/{{id}}'")
        return v
    list: str | None = None
    """The API's paged list endpoint, e.g. ``GET /contacts``, read by reconciliation
    (:mod:`~sync_pipelines.engine.reconcile.postgres.http`); without it the table is not compared.

    Exactly one paging convention is supported (the one the reference CRM implements): each
    request appends the query parameters ``limit`` (page size) and ``cursor`` (left out on the
    first page; afterwards the previous answer's ``next_cursor``), and the answer is the JSON
    object ``{"items": [...], "next_cursor": <string or null>}``, ``null`` on the last page.
    Each item is one record carrying the key fields under the same names as the ``upsert``
    path's placeholders (``{id}`` → ``"id"``). The method must be GET and the path has no
    placeholders."""

    @field_validator("list")
    @classmethod
    def _list_endpoint(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = v.split()
        if (len(parts) != 2 or parts[0] != "GET" or not parts[1].startswith("/")
                or "{" in parts[1] or "}" in parts[1]):
            raise ValueError(f"{v!r} must look like 'GET /contacts' (method GET, a path "
                             "without placeholders; paging is added by the sync)")
        return v


class HttpAuthSpec(_Model):
    """Credentials from environment variables: a bearer token, or basic user and password."""

    bearer_token_env: str | None = None
    """Environment variable holding a bearer token."""
    basic_user_env: str | None = None
    """Environment variable holding the basic-auth user."""
    basic_password_env: str | None = None
    """Environment variable holding the basic-auth password."""

    @property
    def variables(self) -> list[str]:
        """The environment variables the credentials come from (named in errors, never their
        values)."""
        return [v for v in (self.bearer_token_env, self.basic_user_env, self.basic_password_env)
                if v]

    def credentials(self, what: str) -> tuple[dict[str, str], tuple[str, str] | None]:
        """Headers (a bearer token) and basic-auth pair, read from the environment now."""
        if self.bearer_token_env:
            token = DsnRef(dsn_env=self.bearer_token_env).resolve(f"{what} bearer token")
            return {"Authorization": f"Bearer {token}"}, None
        if self.basic_user_env and self.basic_password_env:
            return {}, (DsnRef(dsn_env=self.basic_user_env).resolve(f"{what} user"),
                        DsnRef(dsn_env=self.basic_password_env).resolve(f"{what} password"))
        return {}, None

    @model_validator(mode="after")
    def _one_kind(self) -> HttpAuthSpec:
        basic = (self.basic_user_env, self.basic_password_env)
        if self.bearer_token_env and any(basic):
            raise ValueError("give either bearer_token_env or basic_user_env/basic_password_env")
        if any(basic) and not all(basic):
            raise ValueError("basic auth needs both basic_user_env and basic_password_env")
        return self


class HttpTargetSpec(_Model):
    """An HTTP/REST API target (a CRM): one request per change, per-key order, retries."""

    kind: Literal["http"]
    base_url_env: str
    """Environment variable holding the API's base URL (e.g. https://crm.example.com/api)."""
    auth: HttpAuthSpec = Field(default_factory=HttpAuthSpec)
    tables: dict[str, HttpTableSpec]
    """Per source table (``[schema.]table``): the requests its changes become. Tables of the
    pipeline not listed here are not sent to this target."""

    @model_validator(mode="after")
    def _some_tables(self) -> HttpTargetSpec:
        if not self.tables:
            raise ValueError("an http target needs at least one table under `tables:`")
        return self
    idempotency_header: str = "Idempotency-Key"
    """Header carrying each change's stable idempotency key."""
    concurrency: int = Field(default=16, ge=1, le=512)
    """Most requests in flight at once (never two for one key)."""
    timeout_seconds: float = Field(default=10.0, gt=0)
    """Timeout of one request."""

    @field_validator("tables", mode="before")
    @classmethod
    def _qualify(cls, v: Any) -> Any:
        return {qualify(str(k)): m for k, m in v.items()} if isinstance(v, dict) else v

    def base_url(self, what: str) -> str:
        return DsnRef(dsn_env=self.base_url_env).resolve(what)

    def credentials(self, what: str) -> tuple[dict[str, str], tuple[str, str] | None]:
        """Headers (a bearer token) and basic-auth pair, read from the environment now."""
        return self.auth.credentials(what)


SOURCE_KINDS = ("postgres", "webhook", "http_poll")
"""Source kinds a spec may name (see :mod:`.sources` for the last two)."""


def _source_kind(v: Any) -> str:
    return str(v.get("kind", "postgres")) if isinstance(v, dict) else getattr(v, "kind", "")


AnySource = Annotated[
    Annotated[SourceSpec, Tag("postgres")] | Annotated[WebhookSourceSpec, Tag("webhook")]
    | Annotated[HttpPollSourceSpec, Tag("http_poll")],
    Discriminator(_source_kind),
]

TARGET_KINDS = ("postgres", "http")
"""Target kinds a spec may name (each has a sink, see ``delivery.sinks.registry``)."""


def _target_kind(v: Any) -> str:
    return str(v.get("kind", "postgres")) if isinstance(v, dict) else getattr(v, "kind", "")


TargetSpec = Annotated[
    Annotated[PostgresTargetSpec, Tag("postgres")] | Annotated[HttpTargetSpec, Tag("http")],
    Discriminator(_target_kind),
]


class RetrySpec(_Model):
    """Durable retries of changes a target refused for now (per key, in order)."""

    max_attempts: int = Field(default=8, ge=1)
    """Attempts before a change (and what waits behind it) becomes a dead letter."""
    base_delay_seconds: float = Field(default=5.0, gt=0)
    """Delay before the second attempt; doubled each time, with jitter."""
    max_delay_seconds: float = Field(default=900.0, gt=0)
    """Cap of the delay between attempts."""
    jitter: float = Field(default=0.2, ge=0, le=1)
    """Random spread of each delay (±fraction)."""


class PolicySpec(_Model):
    """Flow-control and sizing knobs of a pipeline."""

    demand_budget: int = Field(default=100_000, ge=1)
    """Most changes staged but not yet delivered; the sensor pulls only what fits."""
    batch_size: int = Field(default=10_000, ge=1)
    """Changes per batch (a batch is one delivery run's unit and one target transaction)."""
    fetch_chunk: int = Field(default=2_000, ge=1)
    """Rows fetched per round trip from the slot's server-side cursor."""
    redeliver_after_seconds: int = Field(default=30, ge=5)
    """A batch left undelivered (failed run) is requested again after this long."""
    run_drain_seconds: float = Field(default=60.0, ge=0, le=3600)
    """A delivery run (Dagster) goes on delivering what the sensor stages while it runs, up to
    this long; 0: only what was staged when it started."""
    run_idle_seconds: float = Field(default=12.0, ge=0, le=600)
    """...and ends once nothing new was staged for this long (longer than a sensor interval,
    so a steady stream keeps one run busy instead of starting one per batch)."""
    tick_pull_seconds: float = Field(default=20.0, ge=0, le=45)
    """While a pull stops at the demand budget and every target with work has a delivery run
    (which frees room as it delivers), the sensor's tick keeps pulling, up to this long:
    otherwise a backlog is staged at most one budget per sensor interval. 0: one pull per
    tick. (Kept under Dagster's 60 s sensor timeout.)"""
    retry: RetrySpec = Field(default_factory=RetrySpec)
    """Retry and dead-letter policy for changes a target refuses."""
    retry_warn: int = Field(default=100, ge=0)
    """Asset check: WARN above this many changes held for retry per target."""
    retry_error: int = Field(default=10_000, ge=0)
    """Asset check: ERROR above this many changes held for retry per target."""
    dead_letter_warn: int = Field(default=0, ge=0)
    """Asset check: WARN above this many unresolved dead letters per target."""
    dead_letter_error: int = Field(default=100, ge=0)
    """Asset check: ERROR above this many unresolved dead letters per target."""
    snapshot_chunk: int = Field(default=5_000, ge=1, le=100_000)
    """Rows read per chunk by backfill and repair (each chunk sits between two watermarks)."""
    backlog_warn: int = Field(default=50_000, ge=0)
    """Asset check ``backlog``: WARN above this many staged changes a target has not applied."""
    backlog_error: int = Field(default=90_000, ge=0)
    """Asset check ``backlog``: ERROR above this many (pulls pause at ``demand_budget``)."""
    backlog_warn_seconds: float = Field(default=300.0, ge=0)
    """Asset check ``backlog``: WARN when the oldest change a target lacks is older."""
    backlog_error_seconds: float = Field(default=3_600.0, ge=0)
    """Asset check ``backlog``: ERROR when the oldest change a target lacks is older."""
    slot_lag_warn_mb: float = Field(default=1_024.0, ge=0)
    """Asset check ``slot_lag``: WARN above this much WAL the slot keeps the source from
    recycling (MB)."""
    slot_lag_error_mb: float = Field(default=5_120.0, ge=0)
    """Asset check ``slot_lag``: ERROR above this much retained WAL (MB)."""
    slot_lag_warn_seconds: float = Field(default=300.0, ge=0)
    """Asset check ``slot_lag``: WARN when the slot's last confirmed heartbeat is older."""
    slot_lag_error_seconds: float = Field(default=900.0, ge=0)
    """Asset check ``slot_lag``: ERROR when the slot's last confirmed heartbeat is older."""
    heartbeat_seconds: float = Field(default=15.0, gt=0)
    """A pull writes a heartbeat into the source's WAL when the last is older than this, so
    an idle (or filtered-out) source still moves the slot and its lag in seconds is real."""

    @model_validator(mode="after")
    def _thresholds_in_order(self) -> PolicySpec:
        _warn_below_error(self, "retry_warn", "retry_error")
        _warn_below_error(self, "dead_letter_warn", "dead_letter_error")
        _warn_below_error(self, "backlog_warn", "backlog_error")
        _warn_below_error(self, "backlog_warn_seconds", "backlog_error_seconds")
        _warn_below_error(self, "slot_lag_warn_mb", "slot_lag_error_mb")
        _warn_below_error(self, "slot_lag_warn_seconds", "slot_lag_error_seconds")
        return self


def _warn_below_error(model: Any, warn: str, error: str) -> None:
    if getattr(model, error) < getattr(model, warn):
        raise ValueError(f"{error} ({getattr(model, error)}) is below {warn} "
                         f"({getattr(model, warn)}): an ERROR must not come before the WARN")


class ReconcileSpec(_Model):
    """End-of-day reconciliation: when it runs and what counts as a problem."""

    timezone: str = "UTC"
    """IANA time zone the days are cut in, e.g. ``Europe/Paris``."""
    at: str = "00:30"
    """Local time (``HH:MM``) after the end of each day when the day's run starts."""
    start_date: str | None = None
    """First day of the daily partitions (``YYYY-MM-DD``); default: the day the pipeline
    was first seen in the state database (today for a new one)."""
    changed_at: str | dict[str, str] | None = None
    """A change-time column (``timestamptz``/``timestamp``) the application sets on every
    write: one name for every table, or ``{table: column}``. A day's partition then compares
    the rows changed that day; without one a run compares the current state (``as_of``)."""
    full_on: Literal["monday", "tuesday", "wednesday", "thursday", "friday", "saturday",
                     "sunday", "never"] = "sunday"
    """The weekday whose scheduled run compares every row, not only that day's changes."""
    repair: bool = False
    """Scheduled runs send confirmed drift through the stream (the launchpad can override)."""
    drift_warn: int = Field(default=0, ge=0)
    """Asset check: WARN above this many drifted keys (all tables and targets)."""
    drift_error: int = Field(default=100, ge=0)
    """Asset check: ERROR above this many drifted keys."""
    confirm_timeout_seconds: float = Field(default=300.0, gt=0)
    """How long to wait for the pipeline to deliver what committed before the comparison."""
    range_rows: int = Field(default=10_000, ge=100)
    """Keys per range hashed on both servers (Postgres targets)."""

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r} (use an IANA name like "
                             "'Europe/Paris' or 'UTC')") from None
        return v

    @field_validator("at")
    @classmethod
    def _clock_time(cls, v: str) -> str:
        import re

        m = re.fullmatch(r"(\d{1,2}):(\d{2})", v.strip())
        if m is None or int(m.group(1)) > 23 or int(m.group(2)) > 59:
            raise ValueError(f"{v!r} must be a time of day like '00:30'")
        return f"{int(m.group(1)):02d}:{m.group(2)}"

    @field_validator("start_date")
    @classmethod
    def _iso_date(cls, v: str | None) -> str | None:
        from datetime import date

        if v is None:
            return v
        try:
            date.fromisoformat(v)
        except ValueError:
            raise ValueError(f"{v!r} must be a date like '2026-01-01'") from None
        return v

    @field_validator("changed_at", mode="before")
    @classmethod
    def _qualify_changed_at(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {qualify(str(k)): c for k, c in v.items()}
        return v

    @model_validator(mode="after")
    def _drift_in_order(self) -> ReconcileSpec:
        _warn_below_error(self, "drift_warn", "drift_error")
        return self

    def changed_at_of(self, table: str) -> str | None:
        """The change-time column of ``table``, if the spec names one."""
        if isinstance(self.changed_at, dict):
            return self.changed_at.get(table)
        return self.changed_at


class PipelineSpec(_Model):
    """One source, its tables and their mappings, and the targets they go to."""

    name: str = ""
    """Filled in from the key under ``pipelines:``."""
    source: AnySource = Field(default_factory=SourceSpec)
    """Where changes come from: PostgreSQL (``kind: postgres``, the default), webhooks
    (``kind: webhook``) or polling an API (``kind: http_poll``)."""
    tables: dict[str, TableMapping]
    """Source tables (``[schema.]table``) to capture, each with its mapping."""
    targets: dict[str, TargetSpec]
    """Named targets; each receives every table."""
    policy: PolicySpec = Field(default_factory=PolicySpec)
    reconcile: ReconcileSpec = Field(default_factory=ReconcileSpec)
    """End-of-day reconciliation schedule and thresholds."""
    initial_backfill: bool = True
    """Once the slot exists, read every table that was never backfilled into the stream (the
    rows that existed before the pipeline), through ``<pipeline>_backfill_job``."""
    link: LinkRole | None = None
    """Set on the two pipelines a ``links:`` entry expands into (see :mod:`.links`)."""

    @field_validator("tables", mode="before")
    @classmethod
    def _qualify_tables(cls, v: Any) -> Any:
        if isinstance(v, list):  # allow a plain list of table names
            twice = sorted({str(t) for t in v if v.count(t) > 1})
            if twice:
                raise ValueError(f"table(s) listed twice: {', '.join(twice)}")
            v = {t: {} for t in v}
        if isinstance(v, dict):
            out: dict[str, Any] = {}
            given: dict[str, str] = {}
            for k, m in v.items():
                name = qualify(str(k))
                if name in out:  # `contacts` and `public.contacts` are one table
                    raise ValueError(f"{given[name]!r} and {k!r} are the same table {name}")
                out[name], given[name] = ({} if m is None else m), str(k)
            return out
        return v

    @field_validator("tables")
    @classmethod
    def _non_empty(cls, v: dict[str, TableMapping]) -> dict[str, TableMapping]:
        if not v:
            raise ValueError("at least one table is required")
        return v

    @field_validator("targets")
    @classmethod
    def _target_names(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not v:
            raise ValueError("at least one target is required")
        for name in v:
            if not _NAME.match(name):
                raise ValueError(f"target name {name!r} must match {_NAME.pattern}")
        return v

    @model_validator(mode="after")
    def _http_tables_are_pipeline_tables(self) -> PipelineSpec:
        for name, target in self.targets.items():
            if isinstance(target, HttpTargetSpec):
                unknown = sorted(set(target.tables) - set(self.tables))
                if unknown:
                    raise ValueError(f"target {name!r} lists table(s) {', '.join(unknown)} "
                                     "that are not under the pipeline's `tables:`")
        return self

    @model_validator(mode="after")
    def _changed_at_tables_are_pipeline_tables(self) -> PipelineSpec:
        if isinstance(self.reconcile.changed_at, dict):
            unknown = sorted(set(self.reconcile.changed_at) - set(self.tables))
            if unknown:
                raise ValueError(f"reconcile.changed_at names table(s) {', '.join(unknown)} "
                                 "that are not under the pipeline's `tables:`")
        return self

    @model_validator(mode="after")
    def _one_source_per_target_table(self) -> PipelineSpec:
        seen: dict[str, str] = {}
        for table, mapping in self.tables.items():
            target_table = mapping.target_table or table
            if target_table in seen:
                # Their keys would collide, and a TRUNCATE of one would empty the other's rows.
                raise ValueError(f"tables {seen[target_table]} and {table} both map to target "
                                 f"table {target_table}; give one of them another target_table")
            seen[target_table] = table
        return self

    def source_table_of(self, target_table: str) -> str:
        """The source table a target table is fed from (one each, by validation)."""
        for table, mapping in self.tables.items():
            if (mapping.target_table or table) == target_table:
                return table
        raise KeyError(f"pipeline {self.name!r}: no table maps to {target_table}")

    @model_validator(mode="after")
    def _records_are_the_tables(self) -> PipelineSpec:
        records = getattr(self.source, "records", None)
        if records is None:
            return self
        given = {qualify(t) for t in records}
        missing = sorted(set(self.tables) - given)
        extra = sorted(given - set(self.tables))
        if missing:
            raise ValueError(f"source.records has no record type for table(s) "
                             f"{', '.join(missing)} (every table needs one)")
        if extra:
            raise ValueError(f"source.records names table(s) {', '.join(extra)} that are not "
                             "under the pipeline's `tables:`")
        return self

    @property
    def postgres_source(self) -> SourceSpec | None:
        """The PostgreSQL source, or None for a webhook or polling source."""
        return self.source if isinstance(self.source, SourceSpec) else None

    def record(self, table: str) -> RecordSpec:
        """The record type of ``table`` (webhook and polling sources)."""
        records = getattr(self.source, "records", {})
        for name, spec in records.items():
            if qualify(name) == table:
                return spec
        raise KeyError(table)

    @property
    def slot(self) -> str:
        return getattr(self.source, "slot", None) or f"sync_{self.name}"

    @property
    def publication(self) -> str:
        return getattr(self.source, "publication", None) or f"sync_{self.name}"


class StateSpec(DsnRef):
    """Where the engine keeps its own state (staged changes, batches, delivery progress)."""

    dsn_env: str = "SYNC_STATE_DSN"
    """Environment variable holding the state database DSN."""
    schema_name: str = Field(default="sync_state", alias="schema")
    """Schema holding the state tables."""


class SyncSpec(_Model):
    """The whole spec file."""

    state: StateSpec = Field(default_factory=StateSpec)
    pipelines: dict[str, PipelineSpec] = Field(default_factory=dict)
    links: dict[str, LinkSpec] = Field(default_factory=dict)
    """Two-way links; each adds its two direction pipelines to ``pipelines``."""

    @model_validator(mode="before")
    @classmethod
    def _name_pipelines(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("links"), dict):
            own = data.get("pipelines") if isinstance(data.get("pipelines"), dict) else {}
            added = expand_links(data["links"])
            clash = sorted(set(added) & set(own))
            if clash:
                raise ValueError(f"pipeline(s) {', '.join(clash)} are also the name of a "
                                 "link's direction (<link>_<side>_to_<side>); rename one")
            data = {**data, "pipelines": {**own, **added}}
        if isinstance(data, dict) and isinstance(data.get("pipelines"), dict):
            named = {}
            for name, body in data["pipelines"].items():
                if isinstance(body, dict):
                    body = {**body, "name": name}
                named[name] = body
            data = {**data, "pipelines": named}
        return data

    @field_validator("pipelines")
    @classmethod
    def _pipeline_names(cls, v: dict[str, PipelineSpec]) -> dict[str, PipelineSpec]:
        for name in v:
            if not _NAME.match(name):
                raise ValueError(f"pipeline name {name!r} must match {_NAME.pattern}")
        return v

    @model_validator(mode="after")
    def _something(self) -> SyncSpec:
        if not self.pipelines and not self.links:
            raise ValueError("at least one pipeline (or link) is required")
        return self


def _message(e: Any) -> str:
    """Pydantic's message, in plain words where its own are about its internals."""
    if e["type"] == "union_tag_invalid":
        tag = (e.get("ctx") or {}).get("tag", "?")
        what, kinds = (("source", SOURCE_KINDS) if "source" in e["loc"]
                       else ("target", TARGET_KINDS))
        return (f"kind {tag!r} is not a {what} kind this version knows; use one of: "
                f"{', '.join(kinds)}")
    return str(e["msg"])


def _describe(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        where = ""
        if len(loc) >= 2 and loc[0] == "pipelines":
            where = f"pipeline {loc[1]!r}, "
            loc = loc[2:]
        field = ".".join(loc)
        if field:
            lines.append(f"{source}: {where}{field}: {_message(e)}")
        else:
            lines.append(f"{source}: {where.rstrip(', ') or '(top level)'}: {_message(e)}")
    return "\n".join(lines)


def parse_spec(data: Any, *, source: str = "<spec>") -> SyncSpec:
    """Validate an already-parsed YAML document."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping with a 'pipelines' key")
    try:
        return SyncSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_describe(err, source)) from None


def load_spec(path: str | Path) -> SyncSpec:
    """Read and validate the spec file at ``path``."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise SpecError(f"{p}: cannot read the sync spec ({err.strerror})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as dup:
        raise SpecError(f"{p}: line {dup.line}: {dup.key!r} is given twice in the same mapping "
                        f"(first on line {dup.first}); YAML would silently keep only the "
                        "last one") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{p}: not valid YAML: {err}") from None
    return parse_spec(data, source=str(p))


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, line: int) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key, self.first, self.line = key, first, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML
    keeps the last one: two pipelines named ``crm`` would silently become one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` keys may be overridden: that is what they are for
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: the base loader reports it
            line = key_node.start_mark.line + 1
            if first is not None:
                raise _DuplicateKey(key, first, line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)
