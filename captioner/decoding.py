"""Beam search (beam 1 is greedy) and sampling, written once over the per-step interface (models/base.py).

Beam search is batched: all images x beams advance as one (B*K, ...) tensor program, so a batch
of 32 images costs about one model step per word, not 32. Captions that end are set aside with
their length-penalised score and K live beams go on, as in GNMT and fairseq; an image stops as
soon as no live beam can beat its n-best finished captions (exact), and only the live rows of
unfinished images are run through the model.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import UsageError
from .models.base import CaptionModel, DecoderState
from .settings import MAX_CONSTRAINTS
from .vocab import Vocabulary

PAD_ID, START_ID, END_ID = Vocabulary.pad_id, Vocabulary.start_id, Vocabulary.end_id
DEAD_END_LOGP = -1e4  # log-prob charged for ending a caption that the constraints left no other way out of


@dataclass
class Hypothesis:
    tokens: list[int]  # word ids, without <start>/<end>
    logprob: float  # summed log-probability, <end> included when emitted
    score: float  # ranking score: logprob / GNMT length penalty (== logprob when alpha = 0)
    finished: bool  # emitted <end> (False: cut at max_len)
    attention: Tensor | None = None  # (len(tokens), R) attention weights per word, for attention decoders
    met: int = 0  # how many of its image's constraints it meets (constrained beam search)


def _constrain(
    logp: Tensor,
    history: Tensor,
    t: int,
    min_len: int,
    no_repeat_ngram: int,
    suppress: Sequence[int] = (),
    banned_bigrams: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Mask what may not come next. logp (N, V); history (N, t) word ids generated so far;
    `suppress`: ids never to emit (e.g. <unk>); banned_bigrams: see beam_search."""
    logp = logp.clone()
    logp[:, PAD_ID] = float("-inf")
    logp[:, START_ID] = float("-inf")
    if suppress:
        logp[:, list(suppress)] = float("-inf")
    if t < min_len:
        logp[:, END_ID] = float("-inf")
    n = no_repeat_ngram
    if n > 0 and t >= n:
        windows = history.unfold(1, n, 1)  # (N, W, n): every n-gram so far
        prefix = history[:, t - n + 1 :]  # (N, n-1): what the next n-gram would start with
        match = (windows[:, :, :-1] == prefix[:, None, :]).all(-1)  # (N, W)
        banned = torch.zeros_like(logp).scatter_add_(1, windows[:, :, -1], match.to(logp.dtype)) > 0  # (N, V)
        logp = logp.masked_fill(banned, float("-inf"))
    if banned_bigrams is not None and t > 0:
        firsts, seconds = (x.to(logp.device) for x in banned_bigrams)  # (F,) ids, (N, V) mask
        after = torch.isin(history[:, -1], firsts)  # (N,)
        logp[after[:, None] & seconds] = -math.inf
    dead = torch.isinf(logp).all(dim=-1)  # (N,) nothing allowed: end the caption here, at a heavy cost
    logp[dead, END_ID] = DEAD_END_LOGP
    return logp


def _force(logp: Tensor, forced: Tensor) -> Tensor:
    """logp (N, V) with only the word `forced` (N,) allowed in the rows where it is >= 0; it keeps
    the model's log-probability, so the score says how surprised the decoder is."""
    rows = forced >= 0  # (N,)
    if not bool(rows.any()):
        return logp
    allowed = torch.zeros_like(logp, dtype=torch.bool)  # (N, V)
    allowed[rows, forced[rows]] = True
    return torch.where(allowed | ~rows[:, None], logp, float("-inf"))


def _step_live(model: CaptionModel, tokens: Tensor, state: DecoderState, live: Tensor) -> tuple[Tensor, DecoderState]:
    """model.step on the live rows only; finished rows get -inf log-probs and keep their state."""
    if bool(live.all()):
        return model.step(tokens, state)
    idx = live.nonzero().squeeze(1)  # (n_live,)
    logp_live, state_live = model.step(tokens[idx], state.index(idx))  # (n_live, V)
    logp = logp_live.new_full((tokens.size(0), logp_live.size(1)), float("-inf"))
    logp[idx] = logp_live
    return logp, state.put(idx, state_live)


def _hypothesis(
    seq: list[int], logprob: float, finished: bool, alpha: float, attention: Tensor | None = None
) -> Hypothesis:
    words = [w for w in seq if w not in (PAD_ID, END_ID)]
    lp = _length_penalty(len(words) + int(finished), alpha)
    attn = attention[: len(words)].cpu() if attention is not None else None  # words are a prefix of seq
    return Hypothesis(words, logprob, logprob / lp, finished, attn)


def _length_penalty(words_and_end: int, alpha: float) -> float:
    """GNMT's lp(|Y|) = ((5 + |Y|) / 6) ** alpha; |Y| counts the words and the <end> token."""
    return ((5.0 + words_and_end) / 6.0) ** alpha


def constraints_met(sets: Sequence[Collection[int]], tokens: Sequence[int]) -> int:
    """How many of the word-id sets a caption's tokens meet (a set is met by any one of its words)."""
    present = set(tokens)
    return sum(bool(present.intersection(ws)) for ws in sets)


class _Constraints:
    """Constrained beam search's finite-state machine (Anderson et al. 2017) as tensors. A state is
    the set of constraints met so far, as a bit mask; every state keeps its own beams. States
    that meet `need` or more are one accepting state (all bits set): past `need` a caption is
    not ranked higher for meeting more, so those beams need not be kept apart."""

    def __init__(
        self, sets: Sequence[Sequence[Collection[int]]], need: int | Sequence[int] | None, dev: torch.device
    ) -> None:
        B = len(sets)
        self.m = max((len(s) for s in sets), default=0)
        if self.m > MAX_CONSTRAINTS:
            raise UsageError(f"at most {MAX_CONSTRAINTS} constraints per image (got {self.m})")
        self.S = 1 << self.m
        self.sets = [[set(ws) for ws in image] for image in sets]
        needs, per_image = [], []
        for image in self.sets:
            bits: dict[int, int] = {}  # word -> the constraints it meets, as a bit mask
            for i, ws in enumerate(image):
                for w in ws:
                    bits[w] = bits.get(w, 0) | 1 << i
            per_image.append(sorted(bits.items()))
            k = len(image) if need is None else need if isinstance(need, int) else need[len(needs)]
            needs.append(min(k, len(image)))
        self.need = needs
        popcount = torch.tensor([bin(x).count("1") for x in range(self.S)])  # (S,)
        full = torch.tensor(needs)[:, None] <= popcount[None, :]  # (B, S)
        self.canon = torch.where(full, self.S - 1, torch.arange(self.S)[None, :]).to(dev)  # (B, S) canonical state
        C = max((len(w) for w in per_image), default=0) or 1
        self.words = torch.full((B, C), PAD_ID, dtype=torch.long)  # (B, C) each image's constraint words
        self.word_masks = torch.zeros((B, C), dtype=torch.long)  # (B, C) the constraints each one meets
        for b, pairs in enumerate(per_image):
            for j, (w, bits_) in enumerate(pairs):
                self.words[b, j], self.word_masks[b, j] = w, bits_
        self.words, self.word_masks = self.words.to(dev), self.word_masks.to(dev)

    def met(self, b: int, tokens: Sequence[int]) -> int:
        """How many of image b's constraints the tokens meet."""
        return constraints_met(self.sets[b], tokens)

    def candidates(self, cand: Tensor, B: int, K: int) -> tuple[Tensor, Tensor, Tensor]:
        """Every beam's continuations cand (B*S*K, V) (beam log-prob + word log-prob) -> for each
        (image, state) group its best 2K continuations into that state: log-probs, source rows and
        words, each (B*S, 2K). Exact: a group's best continuations are either words that leave a
        beam in its state (among that beam's best 2K such words) or constraint words that move a
        beam into it (all of them are looked at)."""
        S, N, V = self.S, cand.size(0), cand.size(1)
        dev = cand.device
        row_img = torch.arange(B, device=dev).repeat_interleave(S * K)  # (N,)
        row_state = torch.arange(S, device=dev).repeat_interleave(K).repeat(B)  # (N,)
        words = self.words[row_img]  # (N, C)
        move_dest = self.canon[row_img[:, None], row_state[:, None] | self.word_masks[row_img]]  # (N, C)
        moving = move_dest != row_state[:, None]  # (N, C)
        word_logp = cand.gather(1, words)  # (N, C)
        stay = cand.scatter(1, words, word_logp.masked_fill(moving, float("-inf")))  # (N, V)
        k2 = min(2 * K, V)
        stay_logp, stay_tok = stay.topk(k2, dim=1)  # (N, 2K)
        logp = torch.cat([stay_logp, word_logp.masked_fill(~moving, float("-inf"))], 1)  # (N, 2K+C)
        tok = torch.cat([stay_tok, words], 1)
        dest = torch.cat([row_state[:, None].expand(-1, k2), move_dest], 1)
        src = torch.arange(N, device=dev)[:, None].expand_as(logp)
        P = S * K * logp.size(1)
        into = dest.reshape(B, 1, P) == torch.arange(S, device=dev)[None, :, None]  # (B, S, P)
        scores = logp.reshape(B, 1, P).masked_fill(~into, float("-inf"))  # (B, S, P)
        top_logp, pos = scores.topk(min(2 * K, P), dim=2)  # (B, S, 2K)
        pick = lambda x: x.reshape(B, 1, P).expand(B, S, P).gather(2, pos).view(B * S, -1)  # noqa: E731
        return top_logp.view(B * S, -1), pick(src), pick(tok)


@torch.no_grad()
def beam_search(
    model: CaptionModel,
    features: Any,
    beam_size: int = 5,
    max_len: int = 20,
    min_len: int = 1,
    length_alpha: float = 0.0,
    no_repeat_ngram: int = 0,
    n_best: int = 1,
    suppress: Sequence[int] = (),
    early_stop: bool = True,
    bias: Tensor | None = None,
    prefix: Tensor | None = None,
    constraints: Sequence[Sequence[Collection[int]]] | None = None,
    need: int | Sequence[int] | None = None,
    banned_bigrams: tuple[Tensor, Tensor] | None = None,
) -> list[list[Hypothesis]]:
    """Batched beam search; for each image (or sequence) the `n_best` hypotheses, best first, ranked
    by log-probability / GNMT length penalty (`length_alpha`; 0 = raw log-probability).
    `suppress`: token ids never to emit (the Captioner passes <unk>).
    `bias` (B, V): added to each image's log-probabilities at every step, then renormalised (a
    product of the decoder and a per-image word prior: tag guidance, see guidance.py);
    hypotheses' log-probabilities and scores are those of the product.
    `prefix` (B, P): word ids each image's captions must start with (-1: free from there on).
    `constraints`: per image, up to MAX_CONSTRAINTS sets of word ids; a caption meets a set by
    holding any of its words (constrained beam search, Anderson et al. 2017). Captions meeting
    `need` of an image's sets (default all; per image or one for all, capped at its count) rank
    above all others; among them, and among the others by how many they meet, the score decides.
    Each state of met constraints keeps `beam_size` beams, so the search is exact in the same
    sense as without constraints; images without constraints cost what they cost without.
    `banned_bigrams` (firsts (F,), seconds (B, V) bool): in image b no word of seconds[b] may
    follow any of the word ids `firsts` (no "a coffee": naming.py).

    As in the standard implementations (GNMT, fairseq), a caption that ends is set aside with its
    penalised score and the search goes on with `beam_size` live beams: of each step's best
    2 x beam_size continuations, those ending at a rank below beam_size are kept as finished
    and the first beam_size that do not end stay live. An image stops when no live beam can
    still beat its n_best-th finished caption (that meets `need` constraints): a live beam's
    log-probability only falls, so its best possible score is its log-probability over the
    largest penalty (that of max_len), which makes the stop exact (`early_stop=False` runs every
    beam to max_len, for checking). Beams cut at max_len count as unfinished hypotheses.

    features: what `model.init_state` takes, e.g. (B, ...) image features or a `Frames` batch.
    """
    if beam_size < 1 or not 1 <= n_best <= beam_size:
        raise UsageError(f"need beam_size >= 1 and 1 <= n_best <= beam_size (got {beam_size}, {n_best})")
    if length_alpha < 0:
        raise UsageError(f"the length penalty must be >= 0 (got {length_alpha})")
    state = model.init_state(features)
    B, K, dev = state.batch_size, beam_size, state.device
    fsm = None
    if constraints is not None:
        if len(constraints) != B:
            raise UsageError(f"constraints are given for {len(constraints)} inputs, not {B}")
        fsm = _Constraints(constraints, need, dev)
        if fsm.m == 0:
            fsm = None
    S = fsm.S if fsm is not None else 1  # beams groups per image: one per state of met constraints
    G, N = B * S, B * S * K
    state = state.repeat_interleave(S * K)  # (N, ...)
    tokens = torch.full((N,), START_ID, dtype=torch.long, device=dev)
    history = torch.empty((N, 0), dtype=torch.long, device=dev)
    beam_logp = torch.full((B, S, K), float("-inf"), device=dev)
    start = fsm.canon[:, 0] if fsm is not None else torch.zeros(B, dtype=torch.long, device=dev)  # (B,)
    beam_logp[torch.arange(B, device=dev), start, 0] = 0.0  # all beams start identical: expand only one
    beam_logp = beam_logp.view(G, K)
    offsets = (torch.arange(G, device=dev) * K)[:, None]  # (G, 1)
    need_b = fsm.need if fsm is not None else [0] * B
    attention = None  # (N, t, R) when the model exposes per-step attention (state.alpha)
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    best_bound = _length_penalty(max_len, length_alpha)  # the largest penalty any caption can get
    if bias is not None:
        bias = bias.to(dev, torch.float32).repeat_interleave(S * K, dim=0)  # (N, V)
    if prefix is not None:
        prefix = prefix.to(dev).repeat_interleave(S * K, dim=0)  # (N, P)
    if banned_bigrams is not None:  # per image (B, V) -> per row (N, V)
        banned_bigrams = (banned_bigrams[0], banned_bigrams[1].to(dev).repeat_interleave(S * K, dim=0))

    def done(b: int, seq: list[int], logprob: float, ended: bool, attn: Tensor | None) -> Hypothesis:
        h = _hypothesis(seq, logprob, ended, length_alpha, attn)
        h.met = fsm.met(b, h.tokens) if fsm is not None else 0
        return h

    for t in range(max_len):
        live = torch.isfinite(beam_logp.view(-1))  # (N,)
        logp, state = _step_live(model, tokens, state, live)  # (N, V)
        V = logp.size(-1)
        logp = logp.float()
        if bias is not None:  # renormalised, so still <= 0; finished rows (all -inf) stay as they are
            logp = torch.where(live[:, None], (logp + bias).log_softmax(-1), logp)
        logp = _constrain(logp, history, t, min_len, no_repeat_ngram, suppress, banned_bigrams)
        if prefix is not None and t < prefix.size(1):
            logp = _force(logp, prefix[:, t])
        cand = beam_logp.view(N, 1) + logp  # (N, V); dead beams stay -inf
        if fsm is None:
            top_logp, top_idx = cand.view(G, K * V).topk(min(2 * K, K * V), dim=1)  # (G, 2K) best continuations
            top_src, top_tok = offsets + top_idx // V, top_idx % V  # (G, 2K) source row, word
        else:
            top_logp, top_src, top_tok = fsm.candidates(cand, B, K)  # (G, 2K) each
        ends = (top_tok == END_ID) & torch.isfinite(top_logp)  # (G, 2K)
        step_attn = state.alpha if getattr(state, "alpha", None) is not None else None  # (N, R)
        # captions that end among the K best continuations of their group are set aside, scored with the penalty
        eg, ej = ends[:, :K].nonzero(as_tuple=True)  # (E,), (E,)
        if len(eg):
            rows = top_src[eg, ej]  # (E,) the beam each ended caption came from
            ended_attn = None
            if step_attn is not None:
                step = step_attn[rows][:, None, :]  # (E, 1, R)
                ended_attn = step if attention is None else torch.cat([attention[rows], step], dim=1)  # (E, t+1, R)
            for k, (g, seq, lp) in enumerate(zip(eg.tolist(), history[rows].tolist(), top_logp[eg, ej].tolist())):
                b = g // S
                finished[b].append(done(b, seq + [END_ID], lp, True, None if ended_attn is None else ended_attn[k]))
        # the first K continuations of each group that do not end stay live
        keep_logp, keep = torch.where(ends, float("-inf"), top_logp).topk(K, dim=1)  # (G, K)
        src = top_src.gather(1, keep).view(-1)  # (N,) beam each survivor came from
        tokens = top_tok.gather(1, keep).view(-1)  # (N,)
        beam_logp = keep_logp
        state = state.index(src)
        history = torch.cat([history[src], tokens[:, None]], dim=1)  # (N, t+1)
        if step_attn is not None:
            step = step_attn[:, None, :]  # (N, 1, R): what produced this step's word
            attention = step[src] if attention is None else torch.cat([attention[src], step[src]], dim=1)
        if early_stop:
            best_live = beam_logp.view(B, S * K).max(1).values.tolist()  # (B,)
            for b in range(B):
                done_ = [h.score for h in finished[b] if h.met >= need_b[b]]
                if len(done_) >= n_best and math.isfinite(best_live[b]):
                    nth = sorted(done_, reverse=True)[n_best - 1]
                    if best_live[b] / best_bound <= nth:  # no live beam can get in any more
                        beam_logp.view(B, S * K)[b] = float("-inf")
        if not torch.isfinite(beam_logp).any():
            break
    seqs, scores = history.tolist(), beam_logp.view(-1).tolist()
    results = []
    for b in range(B):
        hyps = finished[b] + [
            done(b, seqs[i], scores[i], False, None if attention is None else attention[i])
            for i in range(b * S * K, (b + 1) * S * K)
            if math.isfinite(scores[i])
        ]
        hyps.sort(key=lambda h: (min(h.met, need_b[b]), h.score), reverse=True)
        results.append(hyps[:n_best])
    return results


def sample(
    model: CaptionModel,
    features: Any,
    n: int = 1,
    max_len: int = 16,
    temperature: float = 1.0,
    suppress: Sequence[int] = (),
) -> tuple[Tensor, Tensor, Tensor]:
    """n captions per input drawn from the model, keeping the graph (for self-critical training).
    `suppress`: token ids never to draw (<unk>, as at inference: a sample should be a caption the
    model could print).

    Returns tokens (B*n, T) (the n samples of input b are rows b*n .. b*n+n-1; <pad> after <end>),
    the log-probability of each chosen token (B*n, T) and the mask of real steps, <end> included
    (B*n, T). A sample that holds no <end> was cut at max_len.
    """
    state = model.init_state(features).repeat_interleave(n)
    N, dev = state.batch_size, state.device
    tokens = torch.full((N,), START_ID, dtype=torch.long, device=dev)
    finished = torch.zeros(N, dtype=torch.bool, device=dev)
    banned = [PAD_ID, START_ID, *suppress]
    out_tokens, out_logp, out_mask = [], [], []
    for _ in range(max_len):
        logp, state = model.step(tokens, state)  # (N, V)
        logp = logp.float().clone()
        logp[:, banned] = float("-inf")
        with torch.no_grad():
            probs = (logp / temperature).softmax(dim=-1)  # (N, V): renormalised without the banned ids
            tokens = torch.multinomial(probs, 1).squeeze(1)  # (N,)
        chosen = logp.log_softmax(dim=-1).gather(1, tokens[:, None]).squeeze(1)  # (N,)
        out_mask.append(~finished)
        out_tokens.append(tokens.masked_fill(finished, PAD_ID))
        out_logp.append(chosen.masked_fill(finished, 0.0))
        finished = finished | (tokens == END_ID)
        tokens = tokens.masked_fill(finished, PAD_ID)
        if bool(finished.all()):
            break
    return torch.stack(out_tokens, 1), torch.stack(out_logp, 1), torch.stack(out_mask, 1)


@dataclass
class EnsembleState(DecoderState):
    """The members' states side by side; reordering beams reorders every member's rows alike."""

    states: tuple[DecoderState, ...] = ()

    @property
    def batch_size(self) -> int:
        return self.states[0].batch_size

    @property
    def device(self):
        return self.states[0].device

    @property
    def alpha(self) -> Tensor | None:
        """The members' mean attention (N, R) when all attend over the same regions, else None."""
        alphas = [getattr(s, "alpha", None) for s in self.states]
        if any(a is None for a in alphas) or len({a.shape for a in alphas}) != 1:
            return None
        return torch.stack(alphas).mean(0)

    def index(self, idx: Tensor) -> EnsembleState:
        return EnsembleState(tuple(s.index(idx) for s in self.states))

    def put(self, idx: Tensor, rows: EnsembleState) -> EnsembleState:
        return EnsembleState(tuple(s.put(idx, r) for s, r in zip(self.states, rows.states)))

    def repeat_interleave(self, k: int) -> EnsembleState:
        return EnsembleState(tuple(s.repeat_interleave(k) for s in self.states))


class EnsembleDecoder(CaptionModel):
    """Several decoders over one vocabulary as one model of the step interface, so beam search,
    sampling and everything above them work unchanged: its input is the tuple of the members'
    inputs, and each step's log-probabilities are the mean of the members' log-probabilities,
    renormalised (log_softmax), i.e. their normalised geometric mean."""

    def __init__(self, members: Sequence[CaptionModel]) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        kinds = {m.attends_over for m in members}
        self.attends_over = kinds.pop() if len(kinds) == 1 else None

    def init_state(self, features: Sequence[Any]) -> EnsembleState:
        return EnsembleState(tuple(m.init_state(f) for m, f in zip(self.members, features)))

    def step(self, tokens: Tensor, state: EnsembleState) -> tuple[Tensor, EnsembleState]:
        outs = [m.step(tokens, s) for m, s in zip(self.members, state.states)]
        logp = torch.stack([o[0].float() for o in outs]).mean(0)  # (N, V)
        return logp.log_softmax(dim=-1), EnsembleState(tuple(o[1] for o in outs))
