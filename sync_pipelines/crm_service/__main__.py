"""Run the reference CRM service in the foreground: ``python -m sync_pipelines.crm_service``.

``--host`` (default 127.0.0.1) and ``--port`` (default 8765) choose where it listens. A bearer
token is read from the environment variable named by ``--bearer-token-env`` (likewise basic
credentials from ``--basic-user-env`` / ``--basic-password-env``), never from the command line,
so it does not show up in process listings. State is in memory: stopping the process
(Ctrl-C) loses everything, as for :func:`sync_pipelines.crm_service.app.create_app`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import uvicorn

from .app import DEFAULT_IDEMPOTENCY_HEADER, create_app


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sync_pipelines.crm_service",
        description="Reference CRM-style HTTP service (contacts, companies, deals).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    parser.add_argument(
        "--bearer-token-env",
        metavar="NAME",
        help="require 'Authorization: Bearer <token>', the token read from env var NAME",
    )
    parser.add_argument("--basic-user-env", metavar="NAME", help="basic auth user from env var")
    parser.add_argument(
        "--basic-password-env", metavar="NAME", help="basic auth password from env var"
    )
    parser.add_argument("--max-body-bytes", type=int, default=1_000_000)
    parser.add_argument("--idempotency-header", default=DEFAULT_IDEMPOTENCY_HEADER)
    parser.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    return parser


def _env(parser: argparse.ArgumentParser, name: str) -> str:
    value = os.environ.get(name)
    if not value:
        parser.error(f"environment variable {name} is not set or empty")
    return value


def main(argv: Sequence[str] | None = None) -> None:
    """Parse ``argv``, build the app and serve it until interrupted."""
    parser = _parser()
    args = parser.parse_args(argv)
    token = _env(parser, args.bearer_token_env) if args.bearer_token_env else None
    basic = None
    if args.basic_user_env or args.basic_password_env:
        if not (args.basic_user_env and args.basic_password_env):
            parser.error("--basic-user-env and --basic-password-env go together")
        basic = (_env(parser, args.basic_user_env), _env(parser, args.basic_password_env))
    app = create_app(
        max_body_bytes=args.max_body_bytes,
        idempotency_header=args.idempotency_header,
        bearer_token=token,
        basic=basic,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
