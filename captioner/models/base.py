"""The per-step decoder interface that every decoding strategy is written against.

A caption model turns image features into an initial `DecoderState` (`init_state`) and then,
one token at a time, turns the previous tokens and the state into next-token log-probabilities
(`step`). Greedy, beam search and sampling need nothing else, so each is written once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor, nn


def shared(default=None):
    """A DecoderState field that is the same for every row (e.g. the batch's feature grid):
    beam reordering leaves it alone instead of copying it per beam."""
    return field(default=default, metadata={"shared": True})


@dataclass
class DecoderState:
    """Tensors whose first dim is the batch N (images, or images x beams).

    Keeping N first for every per-row field lets decoding reorder or expand beams without
    knowing what the fields are; subclasses add fields. Fields declared with `shared()` are
    whole-batch tensors that rows point into (through an index field), never copied per beam.
    """

    @property
    def batch_size(self) -> int:
        """N, the number of rows."""
        return getattr(self, self._rows()[0]).size(0)

    @property
    def device(self):
        return getattr(self, self._rows()[0]).device

    def _rows(self) -> list[str]:
        return [f.name for f in fields(self) if not f.metadata.get("shared") and getattr(self, f.name) is not None]

    def index(self, idx: Tensor) -> DecoderState:
        """Rows `idx` of every per-row field: (N, ...) -> (len(idx), ...)."""
        return replace(self, **{n: getattr(self, n)[idx] for n in self._rows()})

    def put(self, idx: Tensor, rows: DecoderState) -> DecoderState:
        """A copy with rows `idx` replaced by `rows` (len(idx), ...); the other rows kept."""
        return replace(self, **{n: getattr(self, n).index_copy(0, idx, getattr(rows, n)) for n in self._rows()})

    def repeat_interleave(self, k: int) -> DecoderState:
        """Each row repeated k times in place: (N, ...) -> (N*k, ...), for beams of one image."""
        return replace(self, **{n: getattr(self, n).repeat_interleave(k, dim=0) for n in self._rows()})


@dataclass
class LossTerms:
    """A batch's teacher-forcing loss in parts. Data-parallel training divides the summed
    negative log-likelihood by the token count of the *global* batch, so N processes with batch B
    take exactly the step one process takes with batch N*B, however the caption lengths fall."""

    nll_sum: Tensor  # () summed over the real target tokens
    tokens: int  # real target tokens in the batch
    reg: Tensor  # () regulariser, a mean over the batch's items (0 for decoders without one)

    def mean(self) -> Tensor:
        """The per-token loss of this batch alone (what single-process training minimises)."""
        return self.nll_sum / max(self.tokens, 1) + self.reg


class CaptionModel(nn.Module):
    """Base of all decoders: features -> state; (tokens, state) -> (log-probs, state)."""

    #: which encoder output the decoder consumes per image (or frame): "pooled" (B, D) or "grid" (B, R, D)
    feature_kind: str = "pooled"
    #: what the per-step attention weights (state.alpha) range over: "regions" of the image grid,
    #: "frames" of a sequence, or None for decoders without attention
    attends_over: str | None = None

    def from_frames(self, frames: list[Tensor]) -> Any:
        """The input for a batch of image sequences [(F_i, ...) per-frame features] -> init_state's input.

        A single-image decoder sees a sequence as its mean frame (B, ...): order-blind, and a
        one-frame sequence is exactly the image. Sequence models (models/sequence.py) override this.
        """
        if all(len(f) == 1 for f in frames):  # plain images (the training hot path): one copy, no per-item math
            return torch.cat(frames).float()
        return torch.stack([f.float().mean(dim=0) for f in frames])

    def compile_step(self, **kwargs) -> bool:
        """torch.compile the per-word computation where that pays; False when there is nothing worth
        compiling (Show-and-Tell: the LSTM is already one fused kernel)."""
        return False

    def init_state(self, features: Any) -> DecoderState:  # pragma: no cover - interface
        """Encoder features (B, ...) -- or whatever `from_frames` made -- -> the state of B rows."""
        raise NotImplementedError

    def step(self, tokens: Tensor, state: DecoderState) -> tuple[Tensor, DecoderState]:  # pragma: no cover
        """tokens (N,) -> log-probs (N, V) over the next token, and the next state."""
        raise NotImplementedError

    def forward(self, features: Tensor, captions: Tensor, lengths: Tensor) -> Tensor:  # pragma: no cover
        """Teacher-forced training pass; returns the mean cross-entropy per real token."""
        raise NotImplementedError
