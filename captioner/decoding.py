"""Greedy and beam-search decoding, written once over the per-step interface (models/base.py).

Beam search is batched: all images x beams advance as one (B*K, ...) tensor program, so a batch
of 32 images costs about one model step per word, not 32. Finished beams stay in place with
their score frozen (their only continuation is <pad> at log-prob 0), so they keep competing
with the live ones; the search stops when every beam has ended or `max_len` words are out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .models.base import CaptionModel

PAD_ID, START_ID, END_ID = 0, 1, 2  # fixed by Vocabulary
DEAD_END_LOGP = -1e4  # log-prob charged for ending a caption that the constraints left no other way out of


@dataclass
class Hypothesis:
    tokens: list[int]  # word ids, without <start>/<end>
    logprob: float  # summed log-probability, <end> included when emitted
    score: float  # ranking score: logprob / GNMT length penalty (== logprob when alpha = 0)
    finished: bool  # emitted <end> (False: cut at max_len)


def length_penalty(length: Tensor, alpha: float) -> Tensor:
    """GNMT length penalty ((5 + |Y|) / 6) ** alpha; 1 when alpha == 0."""
    return ((5.0 + length.float()) / 6.0) ** alpha


def _constrain(logp: Tensor, history: Tensor, t: int, min_len: int, no_repeat_ngram: int) -> Tensor:
    """Mask what may not come next. logp (N, V); history (N, t) word ids generated so far."""
    logp = logp.clone()
    logp[:, PAD_ID] = float("-inf")
    logp[:, START_ID] = float("-inf")
    if t < min_len:
        logp[:, END_ID] = float("-inf")
    n = no_repeat_ngram
    if n > 0 and t >= n:
        windows = history.unfold(1, n, 1)  # (N, W, n): every n-gram so far
        prefix = history[:, t - n + 1:]  # (N, n-1): what the next n-gram would start with
        match = (windows[:, :, :-1] == prefix[:, None, :]).all(-1)  # (N, W)
        banned = torch.zeros_like(logp).scatter_add_(1, windows[:, :, -1], match.to(logp.dtype)) > 0  # (N, V)
        logp = logp.masked_fill(banned, float("-inf"))
    dead = torch.isinf(logp).all(dim=-1)  # (N,) nothing allowed: end the caption here, at a heavy cost
    logp[dead, END_ID] = DEAD_END_LOGP
    return logp


@torch.no_grad()
def greedy(model: CaptionModel, features: Tensor, max_len: int = 20, min_len: int = 1,
           no_repeat_ngram: int = 0) -> list[Hypothesis]:
    """Most likely next word at each step; one hypothesis per image. features (B, ...)."""
    B = features.size(0)
    state = model.init_state(features)
    tokens = torch.full((B,), START_ID, dtype=torch.long, device=features.device)
    history = torch.empty((B, 0), dtype=torch.long, device=features.device)
    logprob = torch.zeros(B, device=features.device)
    finished = torch.zeros(B, dtype=torch.bool, device=features.device)
    for t in range(max_len):
        logp, state = model.step(tokens, state)  # (B, V)
        logp = _constrain(logp, history, t, min_len, no_repeat_ngram)
        best, tokens = logp.max(dim=-1)  # (B,), (B,)
        logprob += torch.where(finished, torch.zeros_like(best), best)
        tokens = torch.where(finished, torch.full_like(tokens, PAD_ID), tokens)
        history = torch.cat([history, tokens[:, None]], dim=1)  # (B, t+1)
        finished |= tokens == END_ID
        if finished.all():
            break
    return [_hypothesis(history[b], logprob[b], finished[b], 0.0) for b in range(B)]


def _hypothesis(seq: Tensor, logprob: Tensor, finished: Tensor, alpha: float) -> Hypothesis:
    words = [int(w) for w in seq.tolist() if w not in (PAD_ID, END_ID)]
    n_scored = len(words) + int(bool(finished))
    lp = float(length_penalty(torch.tensor(n_scored), alpha))
    return Hypothesis(words, float(logprob), float(logprob) / lp, bool(finished))


@torch.no_grad()
def beam_search(model: CaptionModel, features: Tensor, beam_size: int = 5, max_len: int = 20, min_len: int = 1,
                length_alpha: float = 0.0, no_repeat_ngram: int = 0, n_best: int = 1) -> list[list[Hypothesis]]:
    """Batched beam search; for each image the `n_best` hypotheses, best first. features (B, ...)."""
    if beam_size < 1 or not 1 <= n_best <= beam_size:
        raise ValueError(f"need beam_size >= 1 and 1 <= n_best <= beam_size (got {beam_size}, {n_best})")
    B, K, dev = features.size(0), beam_size, features.device
    state = model.init_state(features).repeat_interleave(K)  # (B*K, ...)
    tokens = torch.full((B * K,), START_ID, dtype=torch.long, device=dev)
    history = torch.empty((B * K, 0), dtype=torch.long, device=dev)
    beam_logp = torch.full((B, K), float("-inf"), device=dev)
    beam_logp[:, 0] = 0.0  # all beams start identical: expand only the first at step 0
    finished = torch.zeros(B * K, dtype=torch.bool, device=dev)
    offsets = (torch.arange(B, device=dev) * K)[:, None]  # (B, 1)
    for t in range(max_len):
        logp, state = model.step(tokens, state)  # (B*K, V)
        V = logp.size(-1)
        logp = _constrain(logp.float(), history, t, min_len, no_repeat_ngram)
        frozen = torch.full_like(logp, float("-inf"))
        frozen[:, PAD_ID] = 0.0
        logp = torch.where(finished[:, None], frozen, logp)  # finished beams: only <pad>, at no cost
        cand = (beam_logp.view(B * K, 1) + logp).view(B, K * V)  # (B, K*V)
        beam_logp, idx = cand.topk(K, dim=1)  # (B, K)
        src = (offsets + idx // V).view(-1)  # (B*K,) beam each survivor came from
        tokens = (idx % V).view(-1)  # (B*K,)
        state = state.index(src)
        history = torch.cat([history[src], tokens[:, None]], dim=1)  # (B*K, t+1)
        finished = finished[src] | (tokens == END_ID) | torch.isinf(beam_logp.view(-1))
        if finished.all():
            break
    ended = (history == END_ID).any(dim=1)  # (B*K,)
    results = []
    for b in range(B):
        hyps = [_hypothesis(history[b * K + k], beam_logp[b, k], ended[b * K + k], length_alpha)
                for k in range(K) if torch.isfinite(beam_logp[b, k])]
        hyps.sort(key=lambda h: h.score, reverse=True)
        results.append(hyps[:n_best])
    return results
