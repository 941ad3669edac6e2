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
from urllib.parse import quote

import httpx

from ..errors import SpecError, TerminalDeliveryError, TransientDeliveryError
from ..spec import DsnRef, HttpAuthSpec
from ..spec.links import LinkRole

Key = tuple[Any, ...]


class ApiReader:
    def __init__(self, role: LinkRole) -> None:
        api = role.api_connection
        assert api is not None
        self.what = f"link {role.name!r}, side {role.api_side!r}"
        auth = HttpAuthSpec.model_validate(api.auth or {})
        names = [v for v in (auth.bearer_token_env, auth.basic_user_env,
                             auth.basic_password_env) if v]
        self.credentials = f"${' and $'.join(names)}" if names else "the side's `auth:`"
        headers: dict[str, str] = {}
        basic = None
        if auth.bearer_token_env:
            token = DsnRef(dsn_env=auth.bearer_token_env).resolve(f"{self.what} bearer token")
            headers["Authorization"] = f"Bearer {token}"
        elif auth.basic_user_env and auth.basic_password_env:
            basic = (DsnRef(dsn_env=auth.basic_user_env).resolve(f"{self.what} user"),
                     DsnRef(dsn_env=auth.basic_password_env).resolve(f"{self.what} password"))
        base_url = DsnRef(dsn_env=api.base_url_env).resolve(f"{self.what} base URL")
        try:
            self.client = httpx.Client(base_url=base_url, headers=headers, auth=basic,
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
        template = get.split(None, 1)[1]

        def path(key: Key) -> str:
            fields = {f: quote(str(v), safe="") for f, v in zip(key_fields, key, strict=True)}
            try:
                return template.format(**fields)
            except (KeyError, IndexError, ValueError) as err:
                raise TerminalDeliveryError(f"{self.what}: get request {get!r} cannot be "
                                            f"filled from the key ({err})") from None

        def one(key: Key) -> tuple[Key, dict[str, Any] | None]:
            where = f"{self.what}: GET {path(key)}"
            try:
                answer = self.client.get(path(key))
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
