"""`captioner serve`: the web page and the HTTP API (captioner/serve/)."""

from __future__ import annotations

import argparse
import json
import logging
import os

from ..errors import UsageError
from ..settings import SERVE_ENV, ServeLimits
from .common import model_arg

log = logging.getLogger("captioner")  # the CLI shows its reports on stderr


def add(sub) -> None:
    s = sub.add_parser("serve", help="serve a web page and an HTTP API that caption uploaded photos")
    model_arg(s)
    s.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; 0.0.0.0 serves every network this machine is on (anyone who can "
        "reach it can upload photos and use the CPU; there is no authentication)",
    )
    s.add_argument("--port", type=int, default=8000, help="TCP port")
    s.add_argument("--workers", type=int, default=1, help="server processes, each with its own copy of the model")
    s.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="another site whose pages may call the API (scheme://host[:port], e.g. https://app.example); "
        "repeatable. Without it, uploads from other sites' pages are refused (403): any page the user visits "
        "could otherwise make their browser use this server",
    )
    for flag, name, kind, default, text in ServeLimits.flags():  # the limits: declared once, in settings.py
        s.add_argument(flag, dest=name, type=kind, default=default, help=text)
    s.add_argument("--device", default="auto", help="auto | cpu | cuda")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..serve.protocol import ReadTimeoutH11Protocol

    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be 0-65535, not {args.port}")
    limits = ServeLimits(**{name: getattr(args, name) for _, name, _, _, _ in ServeLimits.flags()})  # checked
    for origin in args.allow_origin:
        if not origin.startswith(("http://", "https://")) or origin.rstrip("/").count("/") != 2:
            raise UsageError(f"--allow-origin {origin}: give scheme://host[:port], e.g. https://app.example")
    settings = {
        "model": args.model,
        "device": args.device,
        "limits": limits.to_dict(),
        "allow_origins": args.allow_origin,
    }
    os.environ[SERVE_ENV] = json.dumps(settings)
    shown = "localhost" if args.host in ("127.0.0.1", "localhost") else args.host
    log.info(f"serving on http://{shown}:{args.port}/ (API docs: /docs); Ctrl-C stops")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(f"listening on {args.host}: anyone who can reach this machine can use it (no authentication)")
    uvicorn.run(
        "captioner.serve:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="warning",
        http=ReadTimeoutH11Protocol,  # stalled requests are closed (--request-timeout-s)
        limit_concurrency=limits.max_connections,
    )
    return 0
