"""captioner: image captioning with a pretrained CNN encoder and an LSTM decoder."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Captioner", "__version__"]


def __getattr__(name: str):
    """`Captioner` is imported on first use, so `captioner --help` and the torch-free modules
    (settings, errors, paths, cli) start without loading torch."""
    if name == "Captioner":
        from .api import Captioner

        return Captioner
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")
