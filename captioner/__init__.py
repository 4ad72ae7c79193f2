"""captioner: image captioning with a pretrained CNN encoder and an LSTM decoder."""

from __future__ import annotations

__version__ = "0.1.0"

from .api import Captioner  # noqa: E402

__all__ = ["Captioner", "__version__"]
