"""Beam search (beam 1 is greedy), written once in numpy over a small per-step interface, so the
torch models (decoding.TorchSteps) and the exported ONNX models (runtime.py) decode with the same
code. Nothing here imports torch.

The step interface (`StepModel`): `init_state(features)` gives a state of B rows; `step(tokens
(N,) int64, state)` gives next-token log-probabilities (N, V) float32 and the next state. A state
has `batch_size`, `index(idx)` (rows idx), `put(idx, rows)` (a copy with rows idx replaced),
`repeat_interleave(k)` (each row k times) and `alpha` (N, R) float32 attention of the latest step,
or None. Index arrays are numpy int64; what a state holds (torch tensors, numpy arrays) is its own.

Beam search is batched: all images x beams advance as one (B*K, ...) program, so a batch of 32
images costs about one model step per word, not 32. Captions that end are set aside with their
length-penalised score and K live beams go on, as in GNMT and fairseq; an image stops as soon as
no live beam can beat its n-best finished captions (exact), and only the live rows of unfinished
images are run through the model.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .errors import UsageError
from .settings import MAX_CONSTRAINTS
from .vocab import Vocabulary

PAD_ID, START_ID, END_ID = Vocabulary.pad_id, Vocabulary.start_id, Vocabulary.end_id
DEAD_END_LOGP = -1e4  # log-prob charged for ending a caption that the constraints left no other way out of
NEG_INF = np.float32(-np.inf)


class StepState(Protocol):
    @property
    def batch_size(self) -> int: ...

    @property
    def alpha(self) -> np.ndarray | None: ...

    def index(self, idx: np.ndarray) -> StepState: ...

    def put(self, idx: np.ndarray, rows: StepState) -> StepState: ...

    def repeat_interleave(self, k: int) -> StepState: ...


class StepModel(Protocol):
    def init_state(self, features: Any) -> StepState: ...

    def step(self, tokens: np.ndarray, state: StepState) -> tuple[np.ndarray, StepState]: ...


@dataclass
class Hypothesis:
    tokens: list[int]  # word ids, without <start>/<end>
    logprob: float  # summed log-probability, <end> included when emitted
    score: float  # ranking score: logprob / GNMT length penalty (== logprob when alpha = 0)
    finished: bool  # emitted <end> (False: cut at max_len)
    attention: np.ndarray | None = None  # (len(tokens), R) attention weights per word, for attention decoders
    met: int = 0  # how many of its image's constraints it meets (constrained beam search)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log_softmax over the last axis (rows that are all -inf stay all -inf)."""
    m = x.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = m + np.log(np.exp(x - m).sum(-1, keepdims=True))  # (..., 1)
        return np.where(np.isfinite(lse), x - lse, x).astype(np.float32)


#: beam search's top-k looks at the best TOPK_CHUNK-wide chunks first (see `topk`)
TOPK_CHUNK = 64


def _first(x: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest values of each row of x (..., n), largest first, equal values
    in position order: an exact selection on one integer key (the float's order, then the position).
    (NaN, which log-probabilities never are, would rank by its sign bit.)"""
    bits = (x.astype(np.float32) + np.float32(0.0)).view(np.int32).astype(np.int64)  # (+ 0: -0.0 is 0.0)
    bits = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # float32 order as integer order
    key = (bits << 32) - np.arange(x.shape[-1])  # a larger value first, then a lower position
    sel = np.argpartition(-key, k - 1, axis=-1)[..., :k] if k < x.shape[-1] else np.argsort(-key, axis=-1)
    return np.take_along_axis(sel, np.argsort(-np.take_along_axis(key, sel, -1), axis=-1), -1)


def topk(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest values of each row of x (..., n), largest first, and their positions; equal
    values in the order of their positions (so the search is deterministic).

    Long rows are cut into TOPK_CHUNK-wide chunks and only the k chunks with the largest maxima
    (equal maxima: the earlier chunk) are searched: the k largest values lie in them, ties
    included, since any value outside them has k chunks' maxima, at earlier positions when
    equal, before it. numpy's argpartition over a whole (images, beams x V) row is 3x slower."""
    n = x.shape[-1]
    c = TOPK_CHUNK
    if n <= 2 * k * c:
        idx = _first(x, k)
        return np.take_along_axis(x, idx, -1), idx
    lead = x.shape[:-1]
    if n % c:
        x = np.concatenate([x, np.full((*lead, -n % c), -np.inf, x.dtype)], -1)  # never chosen: n >= k
    chunks = x.reshape(*lead, x.shape[-1] // c, c)  # (..., n/c, c); not -1: lead may hold a 0 (no images)
    first = np.sort(_first(chunks.max(-1), k), axis=-1)  # (..., k) the chunks to search, in order
    cand = np.take_along_axis(chunks, first[..., None], -2).reshape(*lead, k * c)  # (..., k*c)
    pos = (first[..., None] * c + np.arange(c)).reshape(*lead, k * c)  # their positions, increasing
    sel = _first(cand, k)
    return np.take_along_axis(cand, sel, -1), np.take_along_axis(pos, sel, -1)


def _constrain(
    logp: np.ndarray,
    history: np.ndarray,
    t: int,
    min_len: int,
    no_repeat_ngram: int,
    suppress: Sequence[int] = (),
    banned_bigrams: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Mask what may not come next. logp (N, V); history (N, t) word ids generated so far;
    `suppress`: ids never to emit (e.g. <unk>); banned_bigrams: see beam_search."""
    logp = logp.copy()
    logp[:, PAD_ID] = NEG_INF
    logp[:, START_ID] = NEG_INF
    if len(suppress):
        logp[:, list(suppress)] = NEG_INF
    if t < min_len:
        logp[:, END_ID] = NEG_INF
    n = no_repeat_ngram
    if n > 0 and t >= n:
        windows = np.lib.stride_tricks.sliding_window_view(history, n, axis=1)  # (N, W, n): every n-gram so far
        prefix = history[:, t - n + 1 :]  # (N, n-1): what the next n-gram would start with
        match = (windows[:, :, :-1] == prefix[:, None, :]).all(-1)  # (N, W)
        rows, ws = np.nonzero(match)
        logp[rows, windows[rows, ws, -1]] = NEG_INF
    if banned_bigrams is not None and t > 0:
        firsts, seconds = banned_bigrams  # (F,) ids, (N, V) mask
        after = np.isin(history[:, -1], firsts)  # (N,)
        logp[after[:, None] & seconds] = NEG_INF
    dead = np.isneginf(logp).all(-1)  # (N,) nothing allowed: end the caption here, at a heavy cost
    logp[dead, END_ID] = DEAD_END_LOGP
    return logp


def _force(logp: np.ndarray, forced: np.ndarray) -> np.ndarray:
    """logp (N, V) with only the word `forced` (N,) allowed in the rows where it is >= 0; it keeps
    the model's log-probability, so the score says how surprised the decoder is."""
    rows = np.flatnonzero(forced >= 0)  # (n,)
    if not len(rows):
        return logp
    out = logp.copy()
    keep = logp[rows, forced[rows]]
    out[rows] = NEG_INF
    out[rows, forced[rows]] = keep
    return out


def _step_live(model: StepModel, tokens: np.ndarray, state: Any, live: np.ndarray) -> tuple[np.ndarray, Any]:
    """model.step on the live rows only; finished rows get -inf log-probs and keep their state."""
    if live.all():
        return model.step(tokens, state)
    idx = np.flatnonzero(live)  # (n_live,)
    logp_live, state_live = model.step(tokens[idx], state.index(idx))  # (n_live, V)
    logp = np.full((len(tokens), logp_live.shape[1]), NEG_INF, dtype=np.float32)
    logp[idx] = logp_live
    return logp, state.put(idx, state_live)


def _length_penalty(words_and_end: int, alpha: float) -> float:
    """GNMT's lp(|Y|) = ((5 + |Y|) / 6) ** alpha; |Y| counts the words and the <end> token."""
    return ((5.0 + words_and_end) / 6.0) ** alpha


def _hypothesis(
    seq: list[int], logprob: float, finished: bool, alpha: float, attention: np.ndarray | None = None
) -> Hypothesis:
    words = [w for w in seq if w not in (PAD_ID, END_ID)]
    lp = _length_penalty(len(words) + int(finished), alpha)
    attn = attention[: len(words)] if attention is not None else None  # words are a prefix of seq
    return Hypothesis(words, logprob, logprob / lp, finished, attn)


def constraints_met(sets: Sequence[Collection[int]], tokens: Sequence[int]) -> int:
    """How many of the word-id sets a caption's tokens meet (a set is met by any one of its words)."""
    present = set(tokens)
    return sum(bool(present.intersection(ws)) for ws in sets)


class _Constraints:
    """Constrained beam search's finite-state machine (Anderson et al. 2017) as arrays. A state is
    the set of constraints met so far, as a bit mask; every state keeps its own beams. States
    that meet `need` or more are one accepting state (all bits set): past `need` a caption is
    not ranked higher for meeting more, so those beams need not be kept apart."""

    def __init__(self, sets: Sequence[Sequence[Collection[int]]], need: int | Sequence[int] | None) -> None:
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
        popcount = np.array([bin(x).count("1") for x in range(self.S)])  # (S,)
        full = np.array(needs)[:, None] <= popcount[None, :]  # (B, S)
        self.canon = np.where(full, self.S - 1, np.arange(self.S)[None, :])  # (B, S) canonical state
        C = max((len(w) for w in per_image), default=0) or 1
        self.words = np.full((B, C), PAD_ID, dtype=np.int64)  # (B, C) each image's constraint words
        self.word_masks = np.zeros((B, C), dtype=np.int64)  # (B, C) the constraints each one meets
        for b, pairs in enumerate(per_image):
            for j, (w, bits_) in enumerate(pairs):
                self.words[b, j], self.word_masks[b, j] = w, bits_

    def met(self, b: int, tokens: Sequence[int]) -> int:
        """How many of image b's constraints the tokens meet."""
        return constraints_met(self.sets[b], tokens)

    def candidates(self, cand: np.ndarray, B: int, K: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every beam's continuations cand (B*S*K, V) (beam log-prob + word log-prob) -> for each
        (image, state) group its best 2K continuations into that state: log-probs, source rows and
        words, each (B*S, 2K). Exact: a group's best continuations are either words that leave a
        beam in its state (among that beam's best 2K such words) or constraint words that move a
        beam into it (all of them are looked at)."""
        S, N, V = self.S, cand.shape[0], cand.shape[1]
        row_img = np.repeat(np.arange(B), S * K)  # (N,)
        row_state = np.tile(np.repeat(np.arange(S), K), B)  # (N,)
        words = self.words[row_img]  # (N, C)
        move_dest = self.canon[row_img[:, None], row_state[:, None] | self.word_masks[row_img]]  # (N, C)
        moving = move_dest != row_state[:, None]  # (N, C)
        word_logp = np.take_along_axis(cand, words, 1)  # (N, C)
        stay = cand.copy()
        np.put_along_axis(stay, words, np.where(moving, NEG_INF, word_logp), 1)  # (N, V)
        k2 = min(2 * K, V)
        stay_logp, stay_tok = topk(stay, k2)  # (N, 2K)
        logp = np.concatenate([stay_logp, np.where(moving, word_logp, NEG_INF)], 1)  # (N, 2K+C)
        tok = np.concatenate([stay_tok, words], 1)
        dest = np.concatenate([np.broadcast_to(row_state[:, None], (N, k2)), move_dest], 1)
        src = np.broadcast_to(np.arange(N)[:, None], logp.shape)
        P = S * K * logp.shape[1]
        into = dest.reshape(B, 1, P) == np.arange(S)[None, :, None]  # (B, S, P)
        scores = np.where(into, logp.reshape(B, 1, P), NEG_INF)  # (B, S, P)
        top_logp, pos = topk(scores, min(2 * K, P))  # (B, S, 2K)

        def pick(x: np.ndarray) -> np.ndarray:
            return np.take_along_axis(np.broadcast_to(x.reshape(B, 1, P), (B, S, P)), pos, 2).reshape(B * S, -1)

        return top_logp.reshape(B * S, -1), pick(src), pick(tok)


def beam_search(
    model: StepModel,
    features: Any,
    beam_size: int = 5,
    max_len: int = 20,
    min_len: int = 1,
    length_alpha: float = 0.0,
    no_repeat_ngram: int = 0,
    n_best: int = 1,
    suppress: Sequence[int] = (),
    early_stop: bool = True,
    bias: np.ndarray | None = None,
    prefix: np.ndarray | None = None,
    constraints: Sequence[Sequence[Collection[int]]] | None = None,
    need: int | Sequence[int] | None = None,
    banned_bigrams: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[list[Hypothesis]]:
    """Batched beam search; for each image (or sequence) the `n_best` hypotheses, best first, ranked
    by log-probability / GNMT length penalty (`length_alpha`; 0 = raw log-probability).
    `suppress`: token ids never to emit (the pipeline passes <unk>).
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

    features: what `model.init_state` takes, e.g. (B, ...) image features.
    """
    if beam_size < 1 or not 1 <= n_best <= beam_size:
        raise UsageError(f"need beam_size >= 1 and 1 <= n_best <= beam_size (got {beam_size}, {n_best})")
    if length_alpha < 0:
        raise UsageError(f"the length penalty must be >= 0 (got {length_alpha})")
    state = model.init_state(features)
    B, K = state.batch_size, beam_size
    fsm = None
    if constraints is not None:
        if len(constraints) != B:
            raise UsageError(f"constraints are given for {len(constraints)} inputs, not {B}")
        fsm = _Constraints(constraints, need)
        if fsm.m == 0:
            fsm = None
    S = fsm.S if fsm is not None else 1  # beams groups per image: one per state of met constraints
    G, N = B * S, B * S * K
    state = state.repeat_interleave(S * K)  # (N, ...)
    tokens = np.full(N, START_ID, dtype=np.int64)
    history = np.empty((N, 0), dtype=np.int64)
    beam_logp = np.full((B, S, K), NEG_INF, dtype=np.float32)
    start = fsm.canon[:, 0] if fsm is not None else np.zeros(B, dtype=np.int64)  # (B,)
    beam_logp[np.arange(B), start, 0] = 0.0  # all beams start identical: expand only one
    beam_logp = beam_logp.reshape(G, K)
    offsets = (np.arange(G) * K)[:, None]  # (G, 1)
    need_b = fsm.need if fsm is not None else [0] * B
    attention = None  # (N, t, R) when the model exposes per-step attention (state.alpha)
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    best_bound = _length_penalty(max_len, length_alpha)  # the largest penalty any caption can get
    if bias is not None:
        bias = np.repeat(np.asarray(bias, dtype=np.float32), S * K, axis=0)  # (N, V)
    if prefix is not None:
        prefix = np.repeat(np.asarray(prefix, dtype=np.int64), S * K, axis=0)  # (N, P)
    if banned_bigrams is not None:  # per image (B, V) -> per row (N, V)
        banned_bigrams = (np.asarray(banned_bigrams[0]), np.repeat(np.asarray(banned_bigrams[1]), S * K, axis=0))

    def done(b: int, seq: list[int], logprob: float, ended: bool, attn: np.ndarray | None) -> Hypothesis:
        h = _hypothesis(seq, logprob, ended, length_alpha, attn)
        h.met = fsm.met(b, h.tokens) if fsm is not None else 0
        return h

    for t in range(max_len):
        live = np.isfinite(beam_logp.reshape(-1))  # (N,)
        logp, state = _step_live(model, tokens, state, live)  # (N, V)
        V = logp.shape[-1]
        logp = np.asarray(logp, dtype=np.float32)
        if bias is not None:  # renormalised, so still <= 0; finished rows (all -inf) stay as they are
            logp = np.where(live[:, None], log_softmax(logp + bias), logp)
        logp = _constrain(logp, history, t, min_len, no_repeat_ngram, suppress, banned_bigrams)
        if prefix is not None and t < prefix.shape[1]:
            logp = _force(logp, prefix[:, t])
        cand = beam_logp.reshape(N, 1) + logp  # (N, V); dead beams stay -inf
        if fsm is None:
            top_logp, top_idx = topk(cand.reshape(G, K * V), min(2 * K, K * V))  # (G, 2K) best continuations
            top_src, top_tok = offsets + top_idx // V, top_idx % V  # (G, 2K) source row, word
        else:
            top_logp, top_src, top_tok = fsm.candidates(cand, B, K)  # (G, 2K) each
        ends = (top_tok == END_ID) & np.isfinite(top_logp)  # (G, 2K)
        step_attn = state.alpha  # (N, R) or None
        # captions that end among the K best continuations of their group are set aside, scored with the penalty
        eg, ej = np.nonzero(ends[:, :K])  # (E,), (E,)
        if len(eg):
            rows = top_src[eg, ej]  # (E,) the beam each ended caption came from
            ended_attn = None
            if step_attn is not None:
                step = step_attn[rows][:, None, :]  # (E, 1, R)
                ended_attn = step if attention is None else np.concatenate([attention[rows], step], 1)  # (E, t+1, R)
            for k, (g, seq, lp) in enumerate(zip(eg.tolist(), history[rows].tolist(), top_logp[eg, ej].tolist())):
                b = g // S
                finished[b].append(done(b, seq + [END_ID], lp, True, None if ended_attn is None else ended_attn[k]))
        # the first K continuations of each group that do not end stay live
        keep_logp, keep = topk(np.where(ends, NEG_INF, top_logp), K)  # (G, K)
        src = np.take_along_axis(top_src, keep, 1).reshape(-1)  # (N,) beam each survivor came from
        tokens = np.take_along_axis(top_tok, keep, 1).reshape(-1).astype(np.int64)  # (N,)
        beam_logp = keep_logp
        state = state.index(src)
        history = np.concatenate([history[src], tokens[:, None]], 1)  # (N, t+1)
        if step_attn is not None:
            step = step_attn[src][:, None, :]  # (N, 1, R): what produced this step's word
            attention = step if attention is None else np.concatenate([attention[src], step], 1)
        if early_stop:
            per_image = beam_logp.reshape(B, S * K)
            best_live = per_image.max(1).tolist()  # (B,)
            for b in range(B):
                done_ = [h.score for h in finished[b] if h.met >= need_b[b]]
                if len(done_) >= n_best and math.isfinite(best_live[b]):
                    nth = sorted(done_, reverse=True)[n_best - 1]
                    if best_live[b] / best_bound <= nth:  # no live beam can get in any more
                        per_image[b] = NEG_INF
        if not np.isfinite(beam_logp).any():
            break
    seqs, scores = history.tolist(), beam_logp.reshape(-1).tolist()
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


class ExtendedSteps:
    """A step model with borrowed words appended to its vocabulary (naming.py): a borrowed word goes
    in as its source word and comes out with its source word's log-probability (then all renormalised)."""

    def __init__(self, base: StepModel, sources: np.ndarray, base_size: int) -> None:
        self.base, self.sources, self.V0 = base, np.asarray(sources, dtype=np.int64), base_size

    def init_state(self, features: Any) -> StepState:
        return self.base.init_state(features)

    def step(self, tokens: np.ndarray, state: StepState) -> tuple[np.ndarray, StepState]:
        borrowed = tokens >= self.V0
        src = self.sources[np.clip(tokens - self.V0, 0, len(self.sources) - 1)]
        logp, state = self.base.step(np.where(borrowed, src, tokens), state)  # (N, V0)
        logp = np.asarray(logp, dtype=np.float32)
        return log_softmax(np.concatenate([logp, logp[:, self.sources]], 1)), state  # (N, V0 + E)
