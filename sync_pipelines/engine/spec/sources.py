"""Sources that are not PostgreSQL: records pushed by webhooks, or polled from a list endpoint.

Each declares its **record types**: for every table name the pipeline lists under ``tables:``,
how one JSON record becomes a row — its key, its fields (a JSON path and a type per column) and
what makes it a delete. Those rows are staged like rows from the slot and go through the same
mapping, per-key order, retries and dead letters.

Validated like the rest of the spec: a mistake names the file, the pipeline and the field.
"""

from __future__ import annotations

import builtins
import fnmatch
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FieldType = Literal["text", "int", "float", "decimal", "bool", "timestamptz", "date", "json"]
"""How a JSON value becomes a column (PostgreSQL text format): ``text`` takes strings (and
numbers, written as they are), ``int``/``float``/``decimal`` numbers or numeric strings,
``bool`` true/false, ``timestamptz``/``date`` ISO 8601 strings, ``json`` any JSON value."""

_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


def _path(v: str) -> str:
    if not _PATH.match(v):
        raise ValueError(f"{v!r} is not a JSON path like 'id' or 'data.owner.email'")
    return v


class FieldSpec(_Model):
    """One column of a record type."""

    path: str
    """Where the value is in the record, dotted for nested objects (``owner.email``)."""
    type: FieldType = "text"
    required: bool = False
    """A record without it (or with ``null``) is refused (422) instead of staged as NULL."""

    @field_validator("path")
    @classmethod
    def _check_path(cls, v: str) -> str:
        return _path(v)


class DeleteWhen(_Model):
    """What makes a record a delete: its event type, or one of its fields."""

    event_type: list[str] = Field(default_factory=list)
    """Webhook event types (glob patterns, e.g. ``contact.deleted``) that delete the key."""
    field: str | None = None
    """A field of the record that marks a delete (e.g. ``deleted``)..."""
    equals: Any = True
    """...when it equals this value."""

    @field_validator("field")
    @classmethod
    def _check_field(cls, v: str | None) -> str | None:
        return _path(v) if v is not None else None


class RecordSpec(_Model):
    """How one JSON record becomes a row of a table."""

    key: builtins.list[str]
    """Fields (by column name, see ``fields``) that identify a record."""
    fields: dict[str, FieldSpec]
    """Column name → where its value is and its type."""
    delete_when: DeleteWhen = Field(default_factory=DeleteWhen)
    event_types: builtins.list[str] = Field(default_factory=lambda: ["*"])
    """Webhooks only: event types (glob patterns) that are records of this table."""
    data: str | None = None
    """Webhooks only: where the record is in the event body (``data``); default the body."""
    list: str | None = None
    """Polling only: the paged list endpoint, e.g. ``GET /contacts`` (``updated_since``,
    ``cursor`` and ``limit`` are added as query parameters)."""
    updated_at: str | None = None
    """Polling only: the field (column name) that holds the record's change time; the poll's
    cursor runs on (this, key)."""

    @field_validator("fields", mode="before")
    @classmethod
    def _short_fields(cls, v: Any) -> Any:
        if isinstance(v, dict):  # `email: email` or `email: {path: ..., type: ...}`
            return {k: ({"path": f} if isinstance(f, str) else f) for k, f in v.items()}
        return v

    @field_validator("data")
    @classmethod
    def _check_data(cls, v: str | None) -> str | None:
        return _path(v) if v is not None else None

    @model_validator(mode="after")
    def _key_and_cursor_are_fields(self) -> RecordSpec:
        if not self.key:
            raise ValueError("key must name at least one field")
        unknown = [k for k in self.key if k not in self.fields]
        if unknown:
            raise ValueError(f"key names {unknown}, which are not under `fields:`")
        if self.updated_at is not None and self.updated_at not in self.fields:
            raise ValueError(f"updated_at names {self.updated_at!r}, which is not under "
                             "`fields:`")
        return self

    def is_event(self, event_type: str | None) -> bool:
        return any(fnmatch.fnmatchcase(event_type or "", p) for p in self.event_types)


class WebhookSourceSpec(_Model):
    """Records pushed to the receiver (``sync-pipelines serve``) as Standard Webhooks."""

    kind: Literal["webhook"]
    secret_env: str
    """Environment variable holding the signing secret(s), ``whsec_...``; several, separated
    by spaces, while a secret is being rotated."""
    max_body_bytes: int = Field(default=256 * 1024, ge=1, le=64 * 1024 * 1024)
    """A bigger request is refused with 413 before it is read whole."""
    type_field: str = "type"
    """Where the event type is in the body."""
    records: dict[str, RecordSpec]
    """Table name (as under the pipeline's ``tables:``) → its record type."""
    ignore_event_types: builtins.list[str] = Field(default_factory=builtins.list)
    """Event types (glob patterns) the sender sends but no table wants: a verified event of
    one is answered 200 ``{"ignored": true}`` and nothing is staged (any other event type no
    record type takes is a 422)."""
    max_wait_seconds: float = Field(default=30.0, ge=0, le=300)
    """Longest ``Prefer: wait=N`` honoured (synchronous request/reply)."""

    @field_validator("type_field")
    @classmethod
    def _check_type_field(cls, v: str) -> str:
        return _path(v)


class PollAuthSpec(_Model):
    bearer_token_env: str | None = None


class HttpPollSourceSpec(_Model):
    """Records read from an API's list endpoints on a schedule, with a cursor on change time."""

    kind: Literal["http_poll"]
    base_url_env: str
    """Environment variable holding the API's base URL."""
    auth: PollAuthSpec = Field(default_factory=PollAuthSpec)
    interval_seconds: float = Field(default=30.0, ge=1)
    """Least time between two polls (the sensor ticks more often)."""
    overlap_seconds: float = Field(default=5.0, ge=0)
    """Each poll re-reads this far back before its cursor, so rows that share a change time
    with the last one read, or were written late, are not missed (what was already staged is
    dropped by content)."""
    page_size: int = Field(default=500, ge=1, le=10_000)
    max_pages: int = Field(default=200, ge=1)
    """Pages read per table by one poll (the next poll goes on from its cursor)."""
    timeout_seconds: float = Field(default=10.0, gt=0)
    records: dict[str, RecordSpec]

    @model_validator(mode="after")
    def _lists(self) -> HttpPollSourceSpec:
        for table, r in self.records.items():
            if r.list is None or r.updated_at is None:
                raise ValueError(f"records.{table}: a polled record type needs `list:` and "
                                 "`updated_at:`")
            parts = r.list.split()
            if len(parts) != 2 or parts[0].upper() != "GET" or not parts[1].startswith("/"):
                raise ValueError(f"records.{table}.list: {r.list!r} must look like "
                                 "'GET /contacts'")
        return self
