"""Reconcile one source table against an HTTP/REST target through the API's paged list endpoint.

Contract: :func:`compare_http` reads every record the API lists for the table
(:attr:`~..spec.HttpTableSpec.list`, paging convention documented there) and every source row,
maps each source row as delivery would (:class:`~..mapping.mapper.TableMapper`: row filter, renames,
casts, derived fields) and returns a :class:`~.drift.TableDrift` (``method="http-list"``) with
one :class:`~.drift.KeyDrift` per key that is missing from the API, extra in the API, or
different. A table whose target gives no ``list:`` endpoint is not compared and comes back
``method="unsupported"`` with a note saying so, as does a mapping whose API ids cannot be
matched to source keys (see *Limitations*). :func:`recheck_http` looks again at given keys,
one ``GET`` of the record and one keyed source read each: the confirmation pass uses it (with
:attr:`~.drift.KeyDrift.source_fingerprint`) to tell real drift from rows that moved meanwhile.
Neither function writes to the API or to the source's tables.

**Why a temporary table.** The API orders ids its own way (the reference CRM: numerically when
every id is an integer, else as strings), which in general is not the source's key order, so a
merge of two sorted streams is not sound. Instead the API's pages are streamed, one page at a
time, into a ``TEMPORARY`` table on the *source* connection (``COPY``), and PostgreSQL does a
``FULL JOIN`` of the source table with it on the key in text form, streamed back through a
server-side cursor. The join does not depend on either side's order; PostgreSQL spills to disk
what does not fit ``work_mem``. All of it runs in one transaction (a savepoint if the caller's
connection is already in one) that is always rolled back, so the temporary table never
outlives the call. Nothing else is written: the source connection stays otherwise read-only.

**Matching.** An API record's key is the value of its fields named like the ``upsert`` path's
placeholders (``PUT /contacts/{id}`` → ``"id"``), which must be exactly the mapping's key
fields (:attr:`~..mapping.mapper.TableMapper.key_names`); a JSON number ``13`` and the string
``"13"`` are the same key. It is matched against the source key columns' PostgreSQL text form (their
type's output function under :data:`~.source.TEXT_FORMAT_SETTINGS`, as pgoutput sends them). A
source row that fails the row filter counts as absent. Keys in the result are tuples of text
values in source key order; for an ``extra`` key they are the record's key fields.

**Comparing.** The mapped source row is encoded as delivery encodes it
(:func:`~..delivery.sinks.http_client.encode_body`) and each of its fields *present in the record*
is compared with the record's value as a string: a JSON string as it is, any other JSON value as
compact JSON (so ``5`` equals ``"5"``, ``true`` equals ``"true"``); ``null`` equals only ``null``. A
field the record leaves out is not compared (an API may omit nulls or write-only fields), and
fields only the record has (``created_at``, ...) are ignored. ``fields`` names the differing
target fields.

Memory is bounded by a constant, not by table size: one API page (``page_size`` records), one
fetch of joined rows (``fetch_rows``) and at most ``max_drift`` :class:`~.drift.KeyDrift`
entries; beyond that ``truncated`` is set and the counts go on (drift kept is the first in the
key's text order, then sorted in the key columns' own order).

What a crash does: nothing to clean up. An exception (HTTP error, bad page, lost connection)
rolls the transaction back, which drops the temporary table; a dead process makes the server
abort its transaction, same effect. A comparison is simply run again.

Consistency: the API is read page by page, then the source in one statement (one snapshot),
so a change delivered while the comparison runs can show up as drift; the confirmation pass
(:func:`recheck_http` plus fingerprints and the ledgers) filters those out. A record added or
removed in the API during paging may be missed or listed twice (a key listed twice is compared
once, as first listed, and counted in ``note``).

Limitations: the source must accept ``CREATE TEMPORARY TABLE`` (a primary, not a hot
standby), and the transaction stays open while the API is paged, holding back vacuum's horizon
for that long. A cast on a key column other than ``str`` (or ``int`` on an integer column), or
a derived field named like a key field, can change the id the API sees relative to the
source key's text form: such tables come back ``unsupported``.

Errors: HTTP 408/429/5xx, timeouts and connection errors raise
:class:`~.errors.TransientDeliveryError`; other statuses, bodies that are not the documented
JSON shape, and records without key fields raise :class:`~.errors.TerminalDeliveryError`. Both
name the pipeline, target, table and request path, never the base URL's credentials nor
headers.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import InvalidOperation
from typing import Any

import httpx
import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from ..capture.source import describe_relation
from ..delivery.sinks.http_client import ERROR_BODY_CHARS, USER_AGENT, Endpoint, encode_body
from ..errors import SpecError, TerminalDeliveryError, TransientDeliveryError
from ..http_reads import read_client
from ..mapping.mapper import TableMapper
from ..spec import HttpTargetSpec, PipelineSpec, qualify
from ..wire import pgtypes
from ..wire.pgtypes import TEXT_FORMAT_SETTINGS
from .drift import Key, KeyDrift, TableDrift

METHOD = "http-list"
_INT_OIDS = frozenset({20, 21, 23})  # int8, int2, int4
_LOCAL_SETTINGS = TEXT_FORMAT_SETTINGS.replace("SET ", "SET LOCAL ")
assert _LOCAL_SETTINGS.startswith("SET LOCAL ") and "SET LOCAL LOCAL" not in _LOCAL_SETTINGS


@dataclass(frozen=True)
class _Plan:
    """What a comparison of one table needs, resolved from the spec and the source catalog."""

    where: str
    mapper: TableMapper
    record: Endpoint
    """The upsert endpoint: its path, read with GET, is one record."""
    list_path: str | None


# -- public ----------------------------------------------------------------------------------


def compare_http(
    source: psycopg.Connection[Any],
    pipeline: PipelineSpec,
    table: str,
    target_name: str,
    *,
    page_size: int = 500,
    fetch_rows: int = 5_000,
    max_drift: int = 100_000,
    client: httpx.Client | None = None,
) -> TableDrift:
    """Compare ``table`` (``[schema.]name``) with what target ``target_name`` lists.

    ``client``: an :class:`httpx.Client` already pointing at the API (base URL, auth); by
    default one is built from the target's spec (as the sink resolves it) and closed on return.
    See the module docstring for the method, the comparison rules and the bounds.
    """
    if page_size < 1 or fetch_rows < 1 or max_drift < 0:
        raise ValueError("page_size and fetch_rows must be at least 1, max_drift at least 0")
    started = time.monotonic()
    table = qualify(table)
    tspec = _http_target(pipeline, target_name)
    table_spec = tspec.tables.get(table)
    result = TableDrift(pipeline=pipeline.name, table=table, target=target_name,
                        target_table=table, method="unsupported")
    if table_spec is None:
        result.note = f"target {target_name} does not receive {table}: not compared"
        return result
    result.target_table = (table_spec.list or table_spec.upsert).split()[1]
    if table_spec.list is None:
        result.note = f"target {target_name} gives no list endpoint for {table}: not compared"
        return result
    with source.transaction(force_rollback=True):
        source.execute(_LOCAL_SETTINGS)
        plan = _plan(source, pipeline, table, target_name, tspec)
        if isinstance(plan, str):
            result.note = plan
            return result
        result.method = METHOD
        own = client is None
        http = _open_client(pipeline, target_name, tspec) if client is None else client
        try:
            staged = _Staging(source, plan, len(plan.mapper.key_idx))
            result.target_rows = staged.load(http, page_size)
        finally:
            if own:
                http.close()
        duplicates = staged.duplicates()
        if duplicates:
            result.note = (f"the API listed {duplicates} key(s) more than once; each was "
                           "compared once")
        _diff(source, plan, staged.name, result, fetch_rows, max_drift)
    _sort(result.drift, plan.mapper)
    result.duration_s = time.monotonic() - started
    return result


def recheck_http(
    source: psycopg.Connection[Any],
    pipeline: PipelineSpec,
    table: str,
    target_name: str,
    keys: Sequence[Key],
    *,
    client: httpx.Client | None = None,
) -> dict[Key, KeyDrift | None]:
    """Look at ``keys`` again: ``GET`` each record (the upsert path; 404 = absent) and read each
    source row by key; ``None`` for a key that no longer differs.

    Raises ``ValueError`` when the table cannot be compared at all (not sent to this target,
    or ids that cannot be matched to keys: the note :func:`compare_http` would give).
    """
    table = qualify(table)
    tspec = _http_target(pipeline, target_name)
    if table not in tspec.tables:
        raise ValueError(f"target {target_name} does not receive {table}")
    out: dict[Key, KeyDrift | None] = {}
    with source.transaction(force_rollback=True):
        source.execute(_LOCAL_SETTINGS)
        plan = _plan(source, pipeline, table, target_name, tspec)
        if isinstance(plan, str):
            raise ValueError(plan)
        tm = plan.mapper
        own = client is None
        http = _open_client(pipeline, target_name, tspec) if client is None else client
        query = sql.SQL("SELECT {} FROM {} WHERE {}").format(
            _text_columns(tm), _table_ident(table),
            sql.SQL(" AND ").join(
                sql.SQL("{} = %s").format(sql.Identifier(tm.relation.columns[i].name))
                for i in tm.key_idx),
        )
        try:
            for key in keys:
                key = tuple(key)
                values = _source_row(source, query, tm, key)
                record = _fetch_record(http, plan, key)
                out[key] = _judge(tm, key, values, record)
        finally:
            if own:
                http.close()
    return out


def fingerprint(row: Mapping[str, Any]) -> str:
    """Stable digest of a mapped source row (:attr:`~.drift.KeyDrift.source_fingerprint`)."""
    return hashlib.blake2b(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()


# -- planning ----------------------------------------------------------------------------------


def _http_target(pipeline: PipelineSpec, target_name: str) -> HttpTargetSpec:
    tspec = pipeline.targets.get(target_name)
    if not isinstance(tspec, HttpTargetSpec):
        raise ValueError(f"pipeline {pipeline.name!r}: {target_name!r} is not an http target")
    return tspec


def _plan(source: psycopg.Connection[Any], pipeline: PipelineSpec, table: str,
          target_name: str, tspec: HttpTargetSpec) -> _Plan | str:
    """The plan, or why the table cannot be compared (a note)."""
    mapping = pipeline.tables[table]
    table_spec = tspec.tables[table]
    tm = TableMapper(pipeline.name, table, mapping, describe_relation(source, table))
    upsert = Endpoint.parse(table_spec.upsert)
    not_compared = f"target {target_name}, {table}: not compared:"
    if set(upsert.fields) != set(tm.key_names):
        return (f"{not_compared} the upsert path's fields {sorted(upsert.fields)} are not the "
                f"key fields {sorted(tm.key_names)}, so API ids cannot be matched to keys")
    for i, name in zip(tm.key_idx, tm.key_names, strict=True):
        cast = tm.casts.get(i)
        if cast not in (None, "str") and not (
                cast == "int" and tm.relation.columns[i].type_oid in _INT_OIDS):
            return (f"{not_compared} key column {tm.relation.columns[i].name!r} is cast to "
                    f"{cast}, which may change the id the API sees")
        if name in mapping.derived:
            return f"{not_compared} derived field {name!r} replaces a key field"
    return _Plan(
        where=f"pipeline {pipeline.name!r}, target {target_name!r}, table {table}",
        mapper=tm,
        record=upsert,
        list_path=table_spec.list.split()[1] if table_spec.list else None,
    )


def _open_client(pipeline: PipelineSpec, target: str, tspec: HttpTargetSpec) -> httpx.Client:
    """A client resolved like :func:`~..delivery.sinks.http.open_http_sink` resolves the sink."""
    what = f"pipeline {pipeline.name!r}: target {target!r}"
    secret, auth = tspec.credentials(what)
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json", **secret}
    base_url = tspec.base_url(f"{what} base URL")
    try:
        if httpx.URL(base_url).scheme not in ("http", "https") or not httpx.URL(base_url).host:
            raise ValueError("not an http(s) URL with a host")
        return read_client(base_url=base_url, headers=headers, auth=auth,
                           timeout=tspec.timeout_seconds, follow_redirects=False)
    except (httpx.InvalidURL, ValueError, TypeError):  # never echo the URL: it may hold a secret
        raise SpecError(f"{what} (base URL from ${tspec.base_url_env}): not a usable base URL; "
                        "expected http(s)://host[:port][/path]") from None


# -- the API side --------------------------------------------------------------------------------


def _request(http: httpx.Client, path: str, where: str, *, params: dict[str, Any] | None = None,
             absent_ok: bool = False) -> Any:
    """``GET path``; the decoded JSON body, or ``None`` for a 404 when ``absent_ok``."""
    shown = f"{where}: GET {path}"
    try:
        response = http.get(path, params=params)
    except httpx.TimeoutException:
        raise TransientDeliveryError(f"{shown}: timed out") from None
    except httpx.TransportError as err:
        raise TransientDeliveryError(
            f"{shown}: connection error ({type(err).__name__})") from None
    status = response.status_code
    if status == 404 and absent_ok:
        return None
    if not 200 <= status < 300:
        text = response.text.strip()[:ERROR_BODY_CHARS]
        cls = TransientDeliveryError if status in (408, 429) or status >= 500 else (
            TerminalDeliveryError)
        raise cls(f"{shown}: HTTP {status}" + (f": {text}" if text else ""))
    try:
        return response.json()
    except ValueError:
        raise TerminalDeliveryError(f"{shown}: the answer is not JSON") from None


def _api_key(record: Any, key_names: Sequence[str], shown: str) -> tuple[str, ...]:
    if not isinstance(record, dict):
        raise TerminalDeliveryError(f"{shown}: a record is not a JSON object")
    key = []
    for name in key_names:
        value = _canon(record.get(name))
        if value is None:
            raise TerminalDeliveryError(
                f"{shown}: a record has no key field {name!r} (fields: "
                f"{', '.join(sorted(map(str, record)))[:200] or 'none'})")
        key.append(value)
    return tuple(key)


class _Staging:
    """The API's records, copied page by page into a temporary table of the source session."""

    def __init__(self, source: psycopg.Connection[Any], plan: _Plan, nkeys: int) -> None:
        self.source = source
        self.plan = plan
        self.name = f"_sync_reconcile_{secrets.token_hex(4)}"
        self.keys = [f"k{i}" for i in range(nkeys)]
        cols = sql.SQL(", ").join(sql.SQL("{} text").format(sql.Identifier(k)) for k in self.keys)
        source.execute(sql.SQL("CREATE TEMPORARY TABLE {} (ord bigint, {}, rec text) "
                               "ON COMMIT DROP").format(sql.Identifier(self.name), cols))

    def load(self, http: httpx.Client, page_size: int) -> int:
        """Read every page into the table; the number of records."""
        plan = self.plan
        assert plan.list_path is not None
        copy_sql = sql.SQL("COPY {} (ord, {}, rec) FROM STDIN").format(
            sql.Identifier(self.name), sql.SQL(", ").join(map(sql.Identifier, self.keys)))
        cursor: str | None = None
        n = 0
        while True:
            params: dict[str, Any] = {"limit": page_size}
            if cursor is not None:
                params["cursor"] = cursor
            shown = f"{plan.where}: GET {plan.list_path}"
            page = _request(http, plan.list_path, plan.where, params=params)
            items = page.get("items") if isinstance(page, dict) else None
            following = page.get("next_cursor") if isinstance(page, dict) else None
            if isinstance(following, int) and not isinstance(following, bool):
                following = str(following)  # lenient: a numeric cursor is still a cursor
            if not isinstance(items, list) or not (following is None
                                                   or isinstance(following, str)):
                raise TerminalDeliveryError(
                    f"{shown}: expected {{\"items\": [...], \"next_cursor\": string or null}}")
            with self.source.cursor() as cur, cur.copy(copy_sql) as copy:
                for item in items:
                    key = _api_key(item, plan.mapper.key_names, shown)
                    copy.write_row((n, *key, json.dumps(item)))
                    n += 1
            if following is None:
                self.source.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(self.name)))
                return n
            if following == cursor:
                raise TerminalDeliveryError(
                    f"{shown}: next_cursor {following[:100]!r} repeats the cursor just read")
            cursor = following

    def duplicates(self) -> int:
        keys = sql.SQL(", ").join(map(sql.Identifier, self.keys))
        row = self.source.execute(
            sql.SQL("SELECT count(*) - count(DISTINCT ({}, true)) FROM {}").format(
                keys, sql.Identifier(self.name))).fetchone()
        return int(row[0]) if row else 0


def _fetch_record(http: httpx.Client, plan: _Plan, key: Key) -> dict[str, Any] | None:
    if any(v is None for v in key):
        return None  # no path can name it, so the API cannot have it
    path = plan.record.path(dict(zip(plan.mapper.key_names, key, strict=True)))
    record = _request(http, path, plan.where, absent_ok=True)
    if record is not None and not isinstance(record, dict):
        raise TerminalDeliveryError(f"{plan.where}: GET {path}: the answer is not a JSON object")
    return record


# -- the source side and the diff ------------------------------------------------------------


def _table_ident(table: str) -> sql.Identifier:
    return sql.Identifier(*table.split("."))


def _text_form(column: str) -> sql.Composed:
    """The column's value as its type's output function writes it, as pgoutput sends it.

    Not ``::text``: some casts to text differ from the output function (``true`` vs ``t``,
    ``inet`` with its netmask, ``char(n)`` without its padding). ``concat`` calls the output
    function; ``num_nulls`` tests the datum itself (``IS NULL`` is true for a composite value
    whose fields are all null, which pgoutput sends as ``(,)``)."""
    c = sql.Identifier(column)
    return sql.SQL("CASE WHEN num_nulls({c}) = 0 THEN concat({c}) END").format(c=c)


def _text_columns(tm: TableMapper) -> sql.Composable:
    return sql.SQL(", ").join(_text_form(c.name) for c in tm.relation.columns)


def _diff(source: psycopg.Connection[Any], plan: _Plan, staged: str, result: TableDrift,
          fetch_rows: int, max_drift: int) -> None:
    """Stream the full join of the source table and the staged records; fill ``result``."""
    tm = plan.mapper
    ncols = len(tm.relation.columns)
    nkeys = len(tm.key_idx)
    src_cols = sql.SQL(", ").join(
        sql.SQL("{} AS {}").format(_text_form(c.name), sql.Identifier(f"c{i}"))
        for i, c in enumerate(tm.relation.columns))
    a_keys = [sql.Identifier("a", f"k{j}") for j in range(nkeys)]
    s_keys = [sql.Identifier("s", f"c{i}") for i in tm.key_idx]
    plain_keys = sql.SQL(", ").join(sql.Identifier(f"k{j}") for j in range(nkeys))
    query = sql.SQL(
        "SELECT s.present, {s_all}, {a_keys}, a.rec"
        " FROM (SELECT true AS present, {src_cols} FROM {table}) s"
        " FULL JOIN (SELECT DISTINCT ON ({keys}) {keys}, rec FROM {staged}"
        "            ORDER BY {keys}, ord) a ON {on}"
        " ORDER BY {order}"
    ).format(
        s_all=sql.SQL(", ").join(sql.Identifier("s", f"c{i}") for i in range(ncols)),
        a_keys=sql.SQL(", ").join(a_keys),
        src_cols=src_cols,
        table=_table_ident(tm.source_table),
        keys=plain_keys,
        staged=sql.Identifier(staged),
        on=sql.SQL(" AND ").join(
            sql.SQL("{} = {}").format(s, a) for s, a in zip(s_keys, a_keys, strict=True)),
        order=sql.SQL(", ").join(
            sql.SQL('coalesce({}, {}) COLLATE "C"').format(s, a)
            for s, a in zip(s_keys, a_keys, strict=True)),
    )
    with source.cursor(name=f"{staged}_diff", row_factory=tuple_row) as cur:
        cur.itersize = fetch_rows
        cur.execute(query)
        while rows := cur.fetchmany(fetch_rows):
            for row in rows:
                values: list[str | None] | None = list(row[1:1 + ncols]) if row[0] else None
                rec_text = row[-1]
                record = json.loads(rec_text) if rec_text is not None else None
                key = tm.key_from(values) if values is not None else tuple(
                    row[1 + ncols:1 + ncols + nkeys])
                passes = values is not None and tm.passes(values, frozenset())
                if not passes and record is None:
                    continue  # filtered out, and rightly not in the API
                result.compared_keys += 1
                result.source_rows += passes
                found = _judge(tm, key, values, record)
                if found is None:
                    continue
                if len(result.drift) < max_drift:
                    result.drift.append(found)
                else:
                    result.truncated = True


def _source_row(source: psycopg.Connection[Any], query: sql.Composed, tm: TableMapper,
                key: Key) -> list[str | None] | None:
    """The source row of ``key`` (text values), or ``None``; a key that is not even a valid
    value of the key column's type (an API id like ``abc`` for an integer key) has no row."""
    if any(v is None for v in key):
        return None
    try:
        with source.transaction(), source.cursor(row_factory=tuple_row) as cur:
            rows = cur.execute(query, key).fetchall()
    except psycopg.errors.DataError:
        return None
    for row in rows:
        values = list(row)
        if tm.key_from(values) == key:  # ``042`` finds the integer 42, whose key is ``42``
            return values
    return None


def _judge(tm: TableMapper, key: Key, values: list[str | None] | None,
           record: dict[str, Any] | None) -> KeyDrift | None:
    """The drift of one key, from its source row (``None``: none) and API record."""
    row = tm.row(values, frozenset()) if values is not None and tm.passes(
        values, frozenset()) else None
    if row is None:
        return None if record is None else KeyDrift(key, "extra")
    digest = fingerprint(row)
    if record is None:
        return KeyDrift(key, "missing", source_fingerprint=digest)
    sent = _as_sent(row)
    fields = tuple(name for name, value in sent.items()
                   if name in record and _canon(value) != _canon(record[name]))
    if fields:
        return KeyDrift(key, "different", fields, digest)
    return None


def _as_sent(row: dict[str, Any]) -> dict[str, Any]:
    """The row as the API received it: what :func:`encode_body` makes of it, decoded."""
    try:
        return dict(json.loads(encode_body(row)))
    except (TypeError, ValueError):  # delivery could not send it either: compare what we can
        return {k: v if v is None or isinstance(v, str) else str(v) for k, v in row.items()}


def _canon(value: Any) -> str | None:
    """A JSON value as a string for comparison: strings as they are, ``null`` as ``None``,
    anything else as compact JSON with sorted keys."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _sort(drift: list[KeyDrift], tm: TableMapper) -> None:
    """In the key columns' own order (integers numerically); values the type cannot read
    (an extra API id like ``abc`` for an integer key) after those that it can."""
    oids = [tm.relation.columns[i].type_oid for i in tm.key_idx]

    def typed(d: KeyDrift) -> tuple[tuple[int, Any], ...]:
        out: list[tuple[int, Any]] = []
        for oid, v in zip(oids, d.key, strict=True):
            if v is None:
                out.append((2, ""))
                continue
            try:
                out.append((0, pgtypes.to_python(oid, v)))
            except (ValueError, TypeError, ArithmeticError):
                out.append((1, v))
        return tuple(out)

    try:
        drift.sort(key=typed)
    except (TypeError, InvalidOperation, ArithmeticError):  # unorderable values (json, NaN)
        drift.sort(key=lambda d: tuple("" if v is None else v for v in d.key))
