"""`captioner serve`: a web page and an HTTP API over one model, with requests batched together
(app.py: routes and limits; batcher.py: the cross-request batching; static/: the page)."""

from __future__ import annotations

import json
import os

from .app import Limits, create_app


def app_from_env():
    """The app for a uvicorn worker process, from the settings `captioner serve` put in the
    environment (uvicorn's workers import the app afresh)."""
    from ..api import Captioner
    from ..cli.serve import ENV

    s = json.loads(os.environ[ENV])
    model = Captioner.load(s["model"], device=s["device"])
    limits = Limits(max_upload_mb=s["max_upload_mb"], max_files=s["max_files"], max_pixels=s["max_pixels"])
    return create_app(model, limits, max_batch=s["batch_size"], max_wait_ms=s["batch_wait_ms"])


__all__ = ["Limits", "app_from_env", "create_app"]
