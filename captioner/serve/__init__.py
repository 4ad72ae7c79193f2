"""`captioner serve`: a web page and an HTTP API over one model, with requests batched together
(app.py: routes and limits; batcher.py: the cross-request batching; static/: the page)."""

from __future__ import annotations

import json
import os

from ..settings import SERVE_ENV, ServeLimits
from .app import create_app


def app_from_env():
    """The app for a uvicorn worker process, from the settings `captioner serve` put in the
    environment (uvicorn's workers import the app afresh)."""
    from ..api import Captioner

    s = json.loads(os.environ[SERVE_ENV])
    model = Captioner.load(s["model"], device=s["device"])
    return create_app(model, ServeLimits(**s["limits"]), allow_origins=s.get("allow_origins", ()))


__all__ = ["ServeLimits", "app_from_env", "create_app"]
