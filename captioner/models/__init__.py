"""Caption decoders behind one per-step interface (see base.py), and the sequence model around them."""

from __future__ import annotations

from typing import Any

from ..errors import UsageError
from .attention import AttentionDecoder
from .base import CaptionModel, DecoderState, LossTerms
from .sequence import TEMPORAL, Frames, SequenceModel
from .show_tell import ShowTellDecoder

DECODERS = {"lstm": ShowTellDecoder, "attention": AttentionDecoder}


def build_decoder(kind: str, vocab_size: int, feature_dim: int, **hparams) -> CaptionModel:
    if kind not in DECODERS:
        raise UsageError(f"unknown decoder {kind!r}; choose from {', '.join(DECODERS)}")
    return DECODERS[kind](vocab_size=vocab_size, feature_dim=feature_dim, **hparams)


def build_model(config: dict[str, Any], vocab_size: int, feature_dim: int) -> CaptionModel:
    """The model a checkpoint config describes: a decoder, inside a SequenceModel when it has a
    temporal part (config["temporal"]: kind, hidden_size, keypoints, dropout, tbptt)."""
    temporal = config.get("temporal")
    if not temporal:
        return build_decoder(config["decoder"], vocab_size, feature_dim, **config["decoder_hparams"])
    decoder = build_decoder(config["decoder"], vocab_size, temporal["hidden_size"], **config["decoder_hparams"])
    return SequenceModel(decoder, feature_dim, **temporal)


__all__ = [
    "AttentionDecoder",
    "CaptionModel",
    "DecoderState",
    "Frames",
    "LossTerms",
    "SequenceModel",
    "ShowTellDecoder",
    "DECODERS",
    "TEMPORAL",
    "build_decoder",
    "build_model",
]
