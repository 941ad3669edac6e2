"""A link's reads of an HTTP API side: the current record of each key, by the table's ``get``.

Contract: :meth:`ApiReader.current` GETs the record of every key (concurrently, up to the
side's ``concurrency``) and returns, per key, the record's top-level JSON values by field name,
or ``None`` for a 404. The link reads before it writes into the API (to tell a conflict from an
update) and reads again for every change the API reports (a webhook or a poll is a notice that
the key changed; what the API holds *now* is the version the link weighs — so a notice that
arrives late, after the link already wrote over the version it describes, cannot bring that
old version back). Any other answer (5xx, timeout, not a JSON object) raises
:class:`~...errors.TransientDeliveryError`, a 401 :class:`~...errors.TerminalDeliveryError`
naming the credentials' variables; either way nothing of the window is written, and it is
delivered again later. Credentials come from the environment; they never appear in a message.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from ..delivery.sinks.http_client import ReadEndpoint
from ..errors import SpecError, TerminalDeliveryError, TransientDeliveryError
from ..http_reads import read_client
from ..spec import DsnRef, HttpAuthSpec
from ..spec.links import LinkRole

Key = tuple[Any, ...]


class ApiReader:
    def __init__(self, role: LinkRole) -> None:
        api = role.api_connection
        assert api is not None
        self.what = f"link {role.name!r}, side {role.api_side!r}"
        auth = HttpAuthSpec.model_validate(api.auth or {})
        names = auth.variables
        self.credentials = f"${' and $'.join(names)}" if names else "the side's `auth:`"
        headers, basic = auth.credentials(self.what)
        base_url = DsnRef(dsn_env=api.base_url_env).resolve(f"{self.what} base URL")
        try:
            self.client = read_client(base_url=base_url, headers=headers, auth=basic,
                                      timeout=api.timeout_seconds,
                                      limits=httpx.Limits(max_connections=api.concurrency))
        except (ValueError, httpx.InvalidURL):
            raise SpecError(f"{self.what}: the base URL in ${api.base_url_env} is not a "
                            "usable http(s) URL") from None
        self.concurrency = api.concurrency

    def close(self) -> None:
        self.client.close()

    def current(self, get: str, key_fields: Sequence[str], keys: Sequence[Key]
                ) -> dict[Key, dict[str, Any] | None]:
        """The API's record of each key now (``get``: ``GET /contacts/{id}``; ``key_fields``:
        the record's key fields, in the order of each key's values)."""
        try:
            endpoint = ReadEndpoint.parse(get)
        except ValueError as err:
            raise TerminalDeliveryError(f"{self.what}: get request: {err}") from None

        def one(key: Key) -> tuple[Key, dict[str, Any] | None]:
            try:
                path = endpoint.path(dict(zip(key_fields, key, strict=True)))
            except ValueError as err:
                raise TerminalDeliveryError(f"{self.what}: get request: {err}") from None
            where = f"{self.what}: GET {path}"
            try:
                answer = self.client.get(path)
            except httpx.HTTPError as err:
                raise TransientDeliveryError(f"{where}: {type(err).__name__}") from None
            if answer.status_code == 404:
                return key, None
            if answer.status_code == 401:
                raise TerminalDeliveryError(f"{where}: the API refused the credentials; "
                                            f"check {self.credentials}")
            if not answer.is_success:
                raise TransientDeliveryError(f"{where} answered {answer.status_code}")
            try:
                record = answer.json()
            except ValueError:
                record = None
            if not isinstance(record, dict):
                raise TransientDeliveryError(f"{where}: the answer is not a JSON object")
            return key, record

        if not keys:
            return {}
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(keys))) as pool:
            return dict(pool.map(one, keys))
