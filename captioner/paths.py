"""Where captioner keeps things on disk outside a run folder."""
from __future__ import annotations

import os
from pathlib import Path

BUNDLED_NAME = "captioner-flickr8k.pt"
# an installed wheel carries it inside the package (pyproject maps assets/model to captioner/bundled);
# a checkout, or an editable install, has it in the repository's assets/model
_INSTALLED = Path(__file__).resolve().parent / "bundled" / BUNDLED_NAME
_CHECKOUT = Path(__file__).resolve().parent.parent / "assets" / "model" / BUNDLED_NAME
BUNDLED_MODEL = _INSTALLED if _INSTALLED.is_file() else _CHECKOUT


def cache_dir() -> Path:
    """Shared cache (features, WordNet copy): $CAPTIONER_CACHE_DIR, else $XDG_CACHE_HOME/captioner,
    else ~/.cache/captioner."""
    if os.environ.get("CAPTIONER_CACHE_DIR"):
        return Path(os.environ["CAPTIONER_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "captioner"


def bundled_model_path() -> Path:
    """Where `Captioner.load()` looks when no path is given: $CAPTIONER_MODEL, else the bundled file."""
    return Path(os.environ.get("CAPTIONER_MODEL", BUNDLED_MODEL))
