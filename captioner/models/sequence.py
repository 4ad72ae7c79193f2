"""Image sequences (albums, bursts, video frames) -> one caption, as S2VT does for video.

Per-frame CNN features go through an order-aware temporal RNN (GRU or LSTM); its output at each
sequence's last frame initialises the caption decoder, and with the attention decoder its
per-frame outputs are what the decoder attends over (frames, with their time as position).
Order matters: "a man sits down" and "a man stands up" can share every frame.

What a frame contributes: its pooled vector (what is there) and K soft keypoints (where it is).
Pooled CNN features are nearly blind to position (convolution is translation-equivariant and
the mean throws the layout away), so from pooled frames alone no model can tell "moves left"
from "moves right". Each keypoint is a spatial soft-argmax (Levine et al. 2016): a learned
score per grid region, softmaxed over the regions, gives the expected (x, y) of a learned
feature; K of them cost 2K numbers per frame and do not depend on the grid size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UsageError
from .attention import Memory, _grid_coords
from .base import CaptionModel, DecoderState, LossTerms


@dataclass
class Frames:
    """A batch of frame sequences, padded: feats (B, F, ...) zero past each end, lengths (B,)."""

    feats: Tensor
    lengths: Tensor

    @classmethod
    def pad(cls, seqs: list[Tensor]) -> Frames:
        """[(F_i, ...) per sequence] -> padded to the longest."""
        if not seqs or any(len(s) == 0 for s in seqs):
            raise ValueError("every sequence needs at least one frame")
        lengths = torch.tensor([len(s) for s in seqs])
        feats = seqs[0].new_zeros((len(seqs), int(lengths.max()), *seqs[0].shape[1:]))  # (B, F, ...)
        for i, s in enumerate(seqs):
            feats[i, : len(s)] = s
        return cls(feats, lengths)

    def __len__(self) -> int:
        return self.feats.size(0)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Frames:
        return Frames(self.feats.to(device, non_blocking=non_blocking), self.lengths.to(device))

    def float(self) -> Frames:
        return Frames(self.feats.float(), self.lengths)

    def pin_memory(self) -> Frames:
        return Frames(self.feats.pin_memory(), self.lengths)


TEMPORAL = {"gru": nn.GRU, "lstm": nn.LSTM}


class SequenceModel(CaptionModel):
    """Frame features -> temporal RNN -> a caption decoder (Show-and-Tell or attention).

    Training back-propagates through the words and all frames (full BPTT), or, with `tbptt=K`,
    through at most K frames of the temporal recurrence: the RNN runs in chunks of K frames and
    its state is detached between chunks, which bounds memory and gradient paths on very long
    sequences. Inference always runs the whole sequence at once; the outputs are the same.
    """

    feature_kind = "grid"  # keypoints need each frame's grid

    def __init__(
        self,
        decoder: CaptionModel,
        feature_dim: int,
        kind: str = "gru",
        hidden_size: int = 512,
        keypoints: int = 16,
        dropout: float = 0.5,
        tbptt: int = 0,
    ) -> None:
        super().__init__()
        if kind not in TEMPORAL:
            raise UsageError(f"unknown temporal model {kind!r}: {', '.join(TEMPORAL)}")
        self.decoder, self.kind, self.tbptt = decoder, kind, tbptt
        self.attends_over = "frames" if decoder.attends_over else None
        self.keypoint_score = nn.Linear(feature_dim, keypoints)
        self.rnn = TEMPORAL[kind](feature_dim + 4 * keypoints, hidden_size, batch_first=True)
        self.dropout = nn.Dropout(dropout)

    def from_frames(self, frames: list[Tensor]) -> Frames:
        return Frames.pad([f.float() for f in frames])

    def _frame_vectors(self, grid: Tensor) -> Tensor:
        """grid (B, F, R, D) -> per-frame input (B, F, D + 4K): pooled features (dropout), keypoints
        and their motion since the previous frame (zero at the first)."""
        where = torch.softmax(self.keypoint_score(grid), dim=2)  # (B, F, R, K) over regions
        xy = torch.einsum("bfrk,rc->bfkc", where, _grid_coords(grid.size(2), grid.device)).flatten(2)  # (B, F, 2K)
        motion = torch.cat([torch.zeros_like(xy[:, :1]), xy[:, 1:] - xy[:, :-1]], dim=1)  # (B, F, 2K)
        return torch.cat([self.dropout(grid.mean(dim=2)), xy, motion], dim=2)  # (B, F, D + 4K)

    def encode(self, frames: Frames) -> tuple[Tensor, Tensor]:
        """-> temporal outputs (B, F, H) (past each end: don't care) and each sequence's last one (B, H)."""
        x = self._frame_vectors(frames.feats.float())  # (B, F, I)
        F_ = x.size(1)
        chunk = self.tbptt if self.training and self.tbptt > 0 else F_
        outs, hidden = [], None
        for s in range(0, F_, chunk):
            if hidden is not None:  # truncated BPTT: no gradient flows back past this chunk
                hidden = tuple(h.detach() for h in hidden) if isinstance(hidden, tuple) else hidden.detach()
            y, hidden = self.rnn(x[:, s : s + chunk], hidden)  # (B, chunk, H)
            outs.append(y)
        out = torch.cat(outs, dim=1)  # (B, F, H); unidirectional, so padding never reaches a real frame
        last = out[torch.arange(out.size(0), device=out.device), frames.lengths.to(out.device) - 1]  # (B, H)
        return out, last

    def _decoder_input(self, frames: Frames) -> Any:
        out, last = self.encode(frames)
        if self.decoder.feature_kind == "pooled":
            return last
        F_ = out.size(1)
        lengths = frames.lengths.to(out.device)
        mask = torch.arange(F_, device=out.device)[None, :] < lengths[:, None]  # (B, F)
        t = torch.arange(F_, device=out.device, dtype=torch.float32)[None, :]  # (1, F)
        time = 2 * t / (lengths[:, None] - 1).clamp(min=1) - 1  # (B, F): first frame -1, last +1
        return Memory(out, torch.stack([time, torch.zeros_like(time)], dim=2), mask)

    def init_state(self, features: Frames) -> DecoderState:
        return self.decoder.init_state(self._decoder_input(features))

    def step(self, tokens: Tensor, state: DecoderState) -> tuple[Tensor, DecoderState]:
        return self.decoder.step(tokens, state)

    def compile_step(self, **kwargs) -> bool:
        return self.decoder.compile_step(**kwargs)

    def forward(self, features: Frames, captions: Tensor, lengths: Tensor) -> LossTerms:
        return self.decoder(self._decoder_input(features), captions, lengths)
