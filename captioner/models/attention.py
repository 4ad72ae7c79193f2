"""Show, Attend and Tell (Xu et al. 2015): soft additive attention over the CNN's feature grid."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UsageError
from .base import CaptionModel, DecoderState, LossTerms, shared


def _grid_coords(regions: int, device: torch.device) -> Tensor:
    """(R, 2) (x, y) centres of a square grid's regions in row-major order, in [-1, 1]."""
    regions = int(regions)  # (a constant when traced for ONNX export: the grid's size is the encoder's)
    side = round(regions**0.5)
    if side * side != regions:
        raise ValueError(f"the attention decoder needs a square feature grid, got {regions} regions")
    axis = torch.linspace(-1.0, 1.0, side, device=device)
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)


@dataclass
class Memory:
    """What the attention decoder attends over: R items per row (image regions, or frames)."""

    feats: Tensor  # (B, R, D)
    coords: Tensor  # (B, R, 2) where each item is: (x, y) of a region, (time, 0) of a frame, in [-1, 1]
    mask: Tensor | None = None  # (B, R) True for real items, False for padding (None: all real)

    @classmethod
    def of_grid(cls, grid: Tensor) -> Memory:
        """An image's square feature grid (B, R, D): regions at their (x, y) centres."""
        coords = _grid_coords(grid.size(1), grid.device).expand(grid.size(0), -1, -1)  # (B, R, 2)
        return cls(grid, coords)


@dataclass
class AttentionState(DecoderState):
    h: Tensor  # (N, H)
    c: Tensor  # (N, H)
    image: Tensor  # (N,) row of the shared fields this beam describes
    alpha: Tensor  # (N, R) attention of the latest step (uniform before the first)
    feats: Tensor = shared()  # (B, R, D) the batch's grids, shared by all beams of an image
    keys: Tensor = shared()  # (B, R, A) their projections for the attention scores
    coords: Tensor = shared()  # (B, R, 2) positions of the items
    mask: Tensor | None = shared()  # (B, R) real items (None: all)


class AttentionDecoder(CaptionModel):
    """Embedding + attended context -> LSTM cell -> vocabulary logits, one word at a time.

    At every step, additive (Bahdanau) attention scores each of the R grid regions against the
    previous hidden state; their softmax weights (alpha) average the regions into a context
    vector, scaled by a learned gate sigmoid(W h) as in the paper. The state starts from the
    mean region. Training adds the doubly stochastic penalty alpha_c * (1 - sum_t alpha_t)^2,
    which asks every region to be looked at about once over a caption.

    One addition to the paper: CNN region features barely encode *where* a region is (convolution
    is translation-equivariant), so the context alone cannot tell "left of" from "right of". The
    LSTM also gets where it looked: the attention-weighted mean of the regions' (x, y) positions.

    Input: an image grid (B, R, D), or a `Memory` (a sequence model passes its frames this way,
    with a padding mask and each frame's time as its position).
    """

    feature_kind = "grid"
    attends_over = "regions"

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        embed_size: int = 256,
        hidden_size: int = 512,
        num_layers: int = 1,
        dropout: float = 0.5,
        attention_size: int = 512,
        alpha_c: float = 1.0,
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        if num_layers != 1:
            raise UsageError("the attention decoder has one LSTM layer (--num-layers 1)")
        self.pad_id, self.alpha_c = pad_id, alpha_c
        self.embed = nn.Embedding(vocab_size, embed_size, padding_idx=pad_id)
        self.att_feat = nn.Linear(feature_dim, attention_size)
        self.att_hidden = nn.Linear(hidden_size, attention_size)
        self.att_score = nn.Linear(attention_size, 1)
        self.gate = nn.Linear(hidden_size, feature_dim)
        self.init_h = nn.Linear(feature_dim, hidden_size)
        self.init_c = nn.Linear(feature_dim, hidden_size)
        self.where = nn.Linear(2, embed_size)  # attended (x, y) -> LSTM input
        self.cell = nn.LSTMCell(2 * embed_size + feature_dim, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, vocab_size)

    def _attend(
        self, feats: Tensor, keys: Tensor, coords: Tensor, mask: Tensor | None, h: Tensor
    ) -> tuple[Tensor, Tensor]:
        """feats (N, R, D), keys (N, R, A), coords (N, R, 2), mask (N, R), h (N, H)
        -> LSTM input from the image (N, D + E), alpha (N, R)."""
        scores = self.att_score(torch.tanh(keys + self.att_hidden(h)[:, None, :])).squeeze(2)  # (N, R)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        alpha = scores.softmax(dim=1)  # (N, R)
        context = torch.bmm(alpha[:, None, :], feats).squeeze(1)  # (N, D)
        where = torch.bmm(alpha[:, None, :], coords).squeeze(1)  # (N, 2) attended position in [-1, 1]^2
        return torch.cat([torch.sigmoid(self.gate(h)) * context, self.where(where)], dim=1), alpha

    @staticmethod
    def _memory(features: Tensor | Memory) -> Memory:
        m = features if isinstance(features, Memory) else Memory.of_grid(features)
        return Memory(m.feats.float(), m.coords.to(m.feats.device, torch.float32), m.mask)

    def _start(self, m: Memory) -> tuple[Tensor, Tensor, Tensor]:
        if m.mask is None:
            mean = m.feats.mean(dim=1)  # (B, D)
        else:
            w = m.mask.to(m.feats.dtype)[:, :, None]  # (B, R, 1)
            mean = (m.feats * w).sum(1) / w.sum(1).clamp(min=1)  # (B, D) mean of the real items
        return (
            torch.tanh(self.init_h(mean)),
            torch.tanh(self.init_c(mean)),
            self.att_feat(m.feats),
        )  # (B,H) (B,H) (B,R,A)

    def init_state(self, features: Tensor | Memory) -> AttentionState:
        m = self._memory(features)
        h, c, keys = self._start(m)
        B, R = m.feats.shape[:2]
        alpha = (
            m.feats.new_full((B, R), 1.0 / R)
            if m.mask is None
            else m.mask.float() / m.mask.float().sum(1, keepdim=True)
        )  # (B, R)
        return AttentionState(
            h=h,
            c=c,
            image=torch.arange(B, device=m.feats.device),
            alpha=alpha,
            feats=m.feats,
            keys=keys,
            coords=m.coords,
            mask=m.mask,
        )

    def step(self, tokens: Tensor, state: AttentionState) -> tuple[Tensor, AttentionState]:
        i = state.image
        mask = None if state.mask is None else state.mask[i]
        h, c, alpha, logits = self._advance(
            self.embed(tokens), state.feats[i], state.keys[i], state.coords[i], mask, state.h, state.c
        )
        return F.log_softmax(logits, dim=-1), replace(state, h=h, c=c, alpha=alpha)  # (N, V)

    def _advance(
        self, emb: Tensor, feats: Tensor, keys: Tensor, coords: Tensor, mask: Tensor | None, h: Tensor, c: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One word: emb (N, E), the memory rows (N, R, .), h, c (N, H) -> h, c (N, H), alpha (N, R),
        logits (N, V). Training and decoding both step through here, so `compile_step()` speeds up both."""
        context, alpha = self._attend(feats, keys, coords, mask, h)  # (N, D + E), (N, R)
        h, c = self.cell(torch.cat([emb, context], dim=1), (h, c))  # (N, H)
        return h, c, alpha, self.out(self.dropout(h))

    def compile_step(self, **kwargs) -> bool:
        """torch.compile the per-word step (attention + LSTM cell + output layer), one graph with a
        dynamic batch size: compiling the whole caption loop would recompile for every length."""
        self._advance = torch.compile(self._advance, dynamic=True, **kwargs)
        return True

    def forward(self, features: Tensor | Memory, captions: Tensor, lengths: Tensor) -> LossTerms:
        """features (B, R, D) or a Memory; captions (B, T) <start> .. <end> <pad>..; lengths (B,) incl. specials.

        Teacher forcing with full BPTT; rows are processed longest first and drop out of the
        batch as their captions end, so padding costs nothing.
        """
        order = lengths.argsort(descending=True)
        m = self._memory(features)
        feats, coords = m.feats[order], m.coords[order]
        mask = None if m.mask is None else m.mask[order]
        captions, steps = captions[order], (lengths[order] - 1).tolist()
        h, c, keys = self._start(Memory(feats, coords, mask))
        emb = self.dropout(self.embed(captions[:, :-1]))  # (B, T-1, E)
        logits, targets, alpha_sum = [], [], feats.new_zeros(feats.shape[:2])  # alpha_sum (B, R)
        for t in range(steps[0]):
            n = sum(1 for s in steps if s > t)  # rows still inside their caption
            h_n, c_n, alpha, logit = self._advance(
                emb[:n, t], feats[:n], keys[:n], coords[:n], None if mask is None else mask[:n], h[:n], c[:n]
            )  # (n, H) ..
            h, c = torch.cat([h_n, h[n:]]), torch.cat([c_n, c[n:]])
            alpha_sum = torch.cat([alpha_sum[:n] + alpha, alpha_sum[n:]])
            logits.append(logit)  # (n, V)
            targets.append(captions[:n, t + 1])
        targets = torch.cat(targets)
        nll = F.cross_entropy(torch.cat(logits).float(), targets, ignore_index=self.pad_id, reduction="sum")
        penalty = (1.0 - alpha_sum) ** 2  # (B, R)
        penalty = penalty.mean() if mask is None else (penalty * mask).sum() / mask.sum()  # padding not counted
        return LossTerms(nll, targets.numel(), self.alpha_c * penalty)
