"""Caption decoders behind one per-step interface (see base.py)."""
from __future__ import annotations

from .base import CaptionModel, DecoderState
from .show_tell import ShowTellDecoder

DECODERS = {"lstm": ShowTellDecoder}


def build_decoder(kind: str, vocab_size: int, feature_dim: int, **hparams) -> CaptionModel:
    if kind not in DECODERS:
        raise ValueError(f"unknown decoder {kind!r}; choose from {', '.join(DECODERS)}")
    return DECODERS[kind](vocab_size=vocab_size, feature_dim=feature_dim, **hparams)


__all__ = ["CaptionModel", "DecoderState", "ShowTellDecoder", "DECODERS", "build_decoder"]
