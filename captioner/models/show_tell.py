"""Show and Tell (Vinyals et al. 2015): pooled CNN features -> LSTM -> words."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from .base import CaptionModel, DecoderState, LossTerms


@dataclass
class LSTMState(DecoderState):
    h: Tensor  # (N, L, H)
    c: Tensor  # (N, L, H)


class ShowTellDecoder(CaptionModel):
    """Embedding -> multi-layer LSTM -> vocabulary logits.

    The image initialises the LSTM state (h0, c0 = tanh(W f)) instead of entering as the first
    input word (the paper's choice). Both work about equally well; initialising the state keeps
    every step's input a word, so `init_state` / `step` look the same for this decoder and the
    attention decoder, which also initialises its state from the image.
    """

    feature_kind = "pooled"

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        embed_size: int = 256,
        hidden_size: int = 512,
        num_layers: int = 1,
        dropout: float = 0.5,
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        self.num_layers, self.hidden_size, self.pad_id = num_layers, hidden_size, pad_id
        self.embed = nn.Embedding(vocab_size, embed_size, padding_idx=pad_id)
        self.init_h = nn.Linear(feature_dim, num_layers * hidden_size)
        self.init_c = nn.Linear(feature_dim, num_layers * hidden_size)
        self.lstm = nn.LSTM(
            embed_size, hidden_size, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0
        )
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, vocab_size)

    def _h0c0(self, features: Tensor) -> tuple[Tensor, Tensor]:
        B = features.size(0)
        f = self.dropout(features)  # (B, D)
        h = torch.tanh(self.init_h(f)).view(B, self.num_layers, self.hidden_size)  # (B, L, H)
        c = torch.tanh(self.init_c(f)).view(B, self.num_layers, self.hidden_size)  # (B, L, H)
        return h, c

    def init_state(self, features: Tensor) -> LSTMState:
        h, c = self._h0c0(features.float())
        return LSTMState(h=h, c=c)

    def step(self, tokens: Tensor, state: LSTMState) -> tuple[Tensor, LSTMState]:
        x = self.embed(tokens).unsqueeze(1)  # (N, 1, E)
        hc = (state.h.transpose(0, 1).contiguous(), state.c.transpose(0, 1).contiguous())  # (L, N, H) each
        y, (h, c) = self.lstm(x, hc)  # y (N, 1, H)
        logits = self.out(self.dropout(y.squeeze(1)))  # (N, V)
        return F.log_softmax(logits, dim=-1), LSTMState(h=h.transpose(0, 1), c=c.transpose(0, 1))

    def forward(self, features: Tensor, captions: Tensor, lengths: Tensor) -> LossTerms:
        """features (B, D); captions (B, T) = <start> w1 .. wn <end> <pad>..; lengths (B,) incl. specials.

        Teacher forcing over the whole caption with full BPTT; packing means padded positions
        cost neither compute nor loss.
        """
        h0, c0 = self._h0c0(features.float())  # (B, L, H) each
        inputs = self.dropout(self.embed(captions[:, :-1]))  # (B, T-1, E)
        steps = (lengths - 1).cpu()
        packed = pack_padded_sequence(inputs, steps, batch_first=True, enforce_sorted=False)
        y, _ = self.lstm(packed, (h0.transpose(0, 1).contiguous(), c0.transpose(0, 1).contiguous()))
        logits = self.out(self.dropout(y.data))  # (sum(steps), V)
        targets = pack_padded_sequence(captions[:, 1:], steps, batch_first=True, enforce_sorted=False).data
        nll = F.cross_entropy(logits.float(), targets, ignore_index=self.pad_id, reduction="sum")
        return LossTerms(nll, targets.numel(), nll.new_zeros(()))
