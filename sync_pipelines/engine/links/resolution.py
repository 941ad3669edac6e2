"""An operator's decision on a logged conflict: the version both sides get, written now.

Contract: :func:`resolve_conflict` takes a held conflict (or re-decides a decided one): the
version is one side's (``take``, that side's latest version in the conflict — a held key
absorbs each side's later changes into it) or that version with given field values, or a
delete. Under the link's lock and both directions' delivery locks it writes the version into
both sides in one transaction each (under the link's origins: the writes are not captured
back), then, in one state transaction, makes it the key's base — with both sides weighed up to
their WAL position of the write, so changes made while the key was held, still on their way,
do not undo it — releases the key and marks the conflict resolved. Later changes of the key
flow as usual, after it.

An HTTP API side gets the version by its ``upsert`` (or ``delete``) request, with an
idempotency key of the resolution (a retried resolution is recognised by the API); the write
goes into the echo ledger so its webhook or poll is not taken for an edit, and the API side is
weighed up to its latest version in the conflict.

A crash before the state transaction leaves the conflict held with one or both sides already
showing the version; resolving again writes the same and finishes. Values reach the sides as
text, cast by PostgreSQL to the columns' types (a wrong value fails the resolution with the
database's message and changes nothing on that side).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import psycopg
from psycopg import sql

from ..delivery.sinks.http_client import Endpoint, encode_body
from ..errors import SpecError, SyncError
from ..spec import HttpTargetSpec, PipelineSpec, SyncSpec
from ..spec.links import LinkRole
from ..staging.links import BaseRow, ConflictRecord, LinkStore
from ..staging.store import StateStore
from ..wire.pgtypes import TEXT_FORMAT_SETTINGS
from .canon import api_row, canonical_row, echo_hash


class ResolutionError(SyncError):
    """The resolution cannot be applied (the message says why); nothing was changed."""


def _side_table(role: LinkRole, first_table: str, side: str) -> tuple[str, dict[str, str]]:
    """The table's name on ``side`` and the column renames from first-side names."""
    t = role.tables[first_table]
    if side == role.first_side:
        return first_table, {}
    return t.other, dict(t.columns)


def _write_side(dsn: str, origin: str, table: str, key: dict[str, Any],
                row: dict[str, Any] | None) -> int:
    """Write one version into one side under the link's origin; its WAL position after."""
    ident = sql.Identifier(*table.split("."))
    with psycopg.connect(dsn, application_name="sync_pipelines:resolution") as conn:
        conn.execute(TEXT_FORMAT_SETTINGS)
        conn.execute("SELECT pg_replication_origin_session_setup(%s)", (origin,))
        match = sql.SQL(" AND ").join(sql.SQL("{}::text = %s").format(sql.Identifier(c))
                                      for c in key)
        if row is None:
            conn.execute(sql.SQL("DELETE FROM {} WHERE {}").format(ident, match),
                         list(key.values()))
        else:
            types = dict(conn.execute(
                "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
                "WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped",
                (ident.as_string(conn),)).fetchall())
            cols = list(row)
            unknown = [c for c in cols if c not in types]
            if unknown:
                raise ResolutionError(f"table {table} has no column(s) {', '.join(unknown)}")
            conn.execute(sql.SQL(
                "INSERT INTO {t} ({cols}) VALUES ({vals}) ON CONFLICT ({keys}) DO UPDATE SET "
                "{sets}").format(
                t=ident, cols=sql.SQL(", ").join(map(sql.Identifier, cols)),
                vals=sql.SQL(", ").join(sql.SQL("%s::" + types[c]) for c in cols),
                keys=sql.SQL(", ").join(map(sql.Identifier, key)),
                sets=sql.SQL(", ").join(sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c))
                                        for c in cols if c not in key) or sql.SQL(
                    "{k} = EXCLUDED.{k}").format(k=sql.Identifier(next(iter(key))))),
                [row[c] for c in cols])
        lsn = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
        conn.commit()
    assert lsn is not None
    return int(lsn[0])


def _write_api(p: PipelineSpec, first_table: str, key: dict[str, Any],
               row: dict[str, Any] | None, idempotency_key: str) -> None:
    """Send one version (first-side names) to a link's API side; raises ResolutionError."""
    assert p.link is not None
    role = p.link.tables[first_table]
    assert role.api is not None
    target = next(iter(p.targets))
    tspec = p.targets[target]
    assert isinstance(tspec, HttpTargetSpec)
    what = f"link {p.link.name!r}, side {p.link.target_side!r}"
    headers, auth = tspec.credentials(what)
    requests = tspec.tables[first_table]
    names = role.columns
    if row is None:
        if requests.delete is None:
            raise ResolutionError(f"{what}: {first_table} has no `delete:` request")
        endpoint, body = Endpoint.parse(requests.delete), None
        fields = {names.get(c, c): v for c, v in key.items()}
    else:
        endpoint = Endpoint.parse(requests.upsert)
        sent = {c: v for c, v in row.items() if c not in role.api.managed}  # the API's own
        body = {names.get(c, c): v for c, v in api_row(sent, role.api.types).items()}
        fields = {**{names.get(c, c): v for c, v in key.items()}, **body}
    path = endpoint.path(fields)
    try:
        with httpx.Client(base_url=tspec.base_url(f"{what} base URL"), headers=headers,
                          auth=auth, timeout=tspec.timeout_seconds) as client:
            answer = client.request(
                endpoint.method, path, headers={tspec.idempotency_header: idempotency_key,
                                                **({"Content-Type": "application/json"}
                                                   if body is not None else {})},
                content=encode_body(body) if body is not None else None)
    except httpx.HTTPError as err:
        raise ResolutionError(f"{what}: {endpoint.method} {path}: {type(err).__name__}"
                              ) from None
    if not (answer.is_success or (row is None and answer.status_code == 404)):
        raise ResolutionError(f"{what}: {endpoint.method} {path} answered "
                              f"{answer.status_code}: {answer.text[:200]}")


def resolve_conflict(spec: SyncSpec, state: StateStore, link: str, conflict_id: int, *,
                     take: str | None = None, values: dict[str, Any] | None = None,
                     delete: bool = False) -> ConflictRecord:
    """Resolve (or re-decide) one conflict of ``link``; returns it as now logged."""
    directions = [p for p in spec.pipelines.values()
                  if p.link is not None and p.link.name == link]
    if not directions:
        raise SpecError(f"no link {link!r} in the spec")
    role = directions[0].link
    assert role is not None
    store = LinkStore(state, link)
    c = store.conflict(conflict_id)
    if c is None:
        raise ResolutionError(f"link {link!r} has no conflict {conflict_id}")
    if c.status == "resolved":
        raise ResolutionError(f"conflict {conflict_id} was resolved already ({c.resolution})")
    sides = [role.first_side, *(s for s in c.versions if s != role.first_side)]
    if take is not None and take not in sides:
        raise ResolutionError(f"take: {take!r} is not a side of link {link!r} "
                              f"({', '.join(sides)})")
    if delete:
        row, how = None, "deleted"
    else:
        start = c.versions.get(take) if take else (
            c.versions.get(role.first_side) or next((v for v in c.versions.values() if v), None))
        if start is None and not values:
            raise ResolutionError(f"conflict {conflict_id}: {take or 'the'} version is a delete; "
                                  "give values, or delete: true")
        row = {**(start or {}), **{k: None if v is None else str(v)
                                   for k, v in (values or {}).items()}}
        how = (f"took {take}" if take else "given values") + (
            f" with {', '.join(sorted(values))}" if values and take else "")
    pk = _key_columns(role, directions, c.table, json.loads(c.key))
    if row is not None:
        row = {**row, **pk}  # the key is the conflict's, whatever the values say
    locks = [f"link:{link}", *(f"deliver:{p.name}:{next(iter(p.targets))}" for p in directions)]
    taken: list[str] = []
    try:
        for name in locks:
            if not state.try_lock(name):
                raise ResolutionError(f"{name} is held by a delivery run; try again shortly")
            taken.append(name)
        superseded: dict[str, Any] = {}
        echoes: list[tuple[str, str, str]] = []
        for p in directions:
            assert p.link is not None
            side = p.link.target_side
            api = role.tables[c.table].api
            if side == role.api_side and api is not None:
                _write_api(p, c.table, pk, row, f"{link}:resolution:{conflict_id}")
                echoes.append((c.table, c.key, echo_hash(canonical_row(row, api), api)))
                superseded[side] = [echo_hash(canonical_row(c.versions.get(side), api), api),
                                    echo_hash(canonical_row(row, api), api)]
                continue
            table, renames = _side_table(role, c.table, side)
            dsn = next(iter(p.targets.values())).resolve(f"link {link!r}: side {side!r}")
            key_vals = {renames.get(k, k): v for k, v in pk.items()}
            side_row = None if row is None else {renames.get(k, k): v for k, v in row.items()}
            try:
                superseded[side] = _write_side(dsn, p.link.origin, table, key_vals, side_row)
            except psycopg.Error as err:
                raise ResolutionError(f"link {link!r}, side {side!r}, table {table}: "
                                      f"{str(err).strip().splitlines()[0]}") from None
        with state.conn.transaction():
            base = row
            api = role.tables[c.table].api
            if api is not None:
                base = canonical_row(row, api)
            store.save([BaseRow(c.table, c.key, base, f"resolution:{conflict_id}", 0, 0,
                                superseded, None)], [])
            if echoes:
                store.save_echoes(echoes, [], role.echo_ttl_seconds)
            store.mark_resolved(conflict_id, row, how)
    finally:
        for name in reversed(taken):
            state.unlock(name)
    done = store.conflict(conflict_id)
    assert done is not None
    return done


def _key_columns(role: LinkRole, directions: list[PipelineSpec], table: str,
                 key: list[str | None]) -> dict[str, Any]:
    """The key's columns (first-side names, from the first side's catalog) and values."""
    first = next(p for p in directions if p.link is not None
                 and p.link.target_side == role.first_side)
    dsn = next(iter(first.targets.values())).resolve("link side")
    with psycopg.connect(dsn) as conn:
        cols = [r[0] for r in conn.execute(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
            "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = to_regclass(%s) AND i.indisprimary "
            "ORDER BY array_position(i.indkey, a.attnum)",
            (sql.Identifier(*table.split(".")).as_string(conn),)).fetchall()]
    if len(cols) != len(key):
        raise ResolutionError(f"table {table}: its primary key ({', '.join(cols) or 'none'}) "
                              "is not the key the conflict was logged with")
    return dict(zip(cols, key, strict=True))
