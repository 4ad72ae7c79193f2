"""Caption decoders behind one per-step interface (see base.py)."""
from __future__ import annotations

from .attention import AttentionDecoder
from .base import CaptionModel, DecoderState
from .show_tell import ShowTellDecoder

DECODERS = {"lstm": ShowTellDecoder, "attention": AttentionDecoder}


def build_decoder(kind: str, vocab_size: int, feature_dim: int, **hparams) -> CaptionModel:
    if kind not in DECODERS:
        raise ValueError(f"unknown decoder {kind!r}; choose from {', '.join(DECODERS)}")
    return DECODERS[kind](vocab_size=vocab_size, feature_dim=feature_dim, **hparams)


__all__ = ["AttentionDecoder", "CaptionModel", "DecoderState", "ShowTellDecoder", "DECODERS", "build_decoder"]
