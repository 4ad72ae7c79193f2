"""Where captioner keeps things on disk outside a run folder."""
from __future__ import annotations

import os
from pathlib import Path

BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "assets" / "model" / "captioner-flickr8k.pt"


def cache_dir() -> Path:
    """Shared cache (features, WordNet copy): $CAPTIONER_CACHE_DIR, else $XDG_CACHE_HOME/captioner,
    else ~/.cache/captioner."""
    if os.environ.get("CAPTIONER_CACHE_DIR"):
        return Path(os.environ["CAPTIONER_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "captioner"


def bundled_model_path() -> Path:
    """Where `Captioner.load()` looks when no path is given: $CAPTIONER_MODEL, else the bundled file."""
    return Path(os.environ.get("CAPTIONER_MODEL", BUNDLED_MODEL))
