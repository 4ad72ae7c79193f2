"""`captioner serve`: the web page and the HTTP API (captioner/serve/)."""

from __future__ import annotations

import argparse
import os

from ..errors import UsageError
from .common import err, max_pixels_arg, model_arg


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
    s.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body accepted")
    s.add_argument("--max-files", type=int, default=32, help="most images in one request")
    max_pixels_arg(s)
    s.add_argument("--batch-size", type=int, default=32, help="most images captioned together across requests")
    s.add_argument(
        "--batch-wait-ms", type=float, default=5.0, help="how long the first image waits for others to join its batch"
    )
    s.add_argument("--device", default="auto", help="auto | cpu | cuda")
    s.set_defaults(func=run)


ENV = "CAPTIONER_SERVE_CONFIG"  # how the settings reach worker processes (uvicorn starts them afresh)


def run(args: argparse.Namespace) -> int:
    import json

    import uvicorn

    for name, low in (("workers", 1), ("max_files", 1), ("batch_size", 1), ("max_pixels", 1)):
        if getattr(args, name) < low:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {low}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be 0-65535, not {args.port}")
    if args.max_upload_mb <= 0 or args.batch_wait_ms < 0:
        raise UsageError("--max-upload-mb must be > 0 and --batch-wait-ms >= 0")
    settings = {
        "model": args.model,
        "device": args.device,
        "max_upload_mb": args.max_upload_mb,
        "max_files": args.max_files,
        "max_pixels": args.max_pixels,
        "batch_size": args.batch_size,
        "batch_wait_ms": args.batch_wait_ms,
    }
    os.environ[ENV] = json.dumps(settings)
    shown = "localhost" if args.host in ("127.0.0.1", "localhost") else args.host
    err(f"serving on http://{shown}:{args.port}/ (API docs: /docs); Ctrl-C stops")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        err(f"listening on {args.host}: anyone who can reach this machine can use it (no authentication)")
    uvicorn.run(
        "captioner.serve:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="warning",
    )
    return 0
