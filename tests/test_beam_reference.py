"""captioner.beam against an independent reference: a plain per-image beam search written here in
Python lists, with every option beam.py has (n-best, length penalty, min/max length, n-gram
blocking, suppressed words, a per-image word prior, a forced start, banned bigrams, constraints,
attention), on many small random trigram models. The reference has no early stop, so the same
runs also check that beam.py's early stop changes nothing but the work. Small vocabularies and
short captions keep each run to milliseconds."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pytest

from captioner.beam import (
    DEAD_END_LOGP,
    END_ID,
    PAD_ID,
    START_ID,
    ExtendedSteps,
    beam_search,
    constraints_met,
    log_softmax,
    topk,
)
from captioner.errors import UsageError
from captioner.settings import MAX_CONSTRAINTS

W = 4  # real words: ids 3 .. 3 + W - 1 after <pad>, <start>, <end>
V = 3 + W
R = 3  # attention regions
NEG = -np.inf


@dataclass
class Rows:
    """A step state: each row's image and the token before its last one (the model is a trigram
    model, so reordering beams must reorder the state), and the latest step's attention."""

    image: np.ndarray
    prev: np.ndarray
    alpha: np.ndarray | None = None

    @property
    def batch_size(self) -> int:
        return len(self.image)

    def index(self, idx):
        return Rows(self.image[idx], self.prev[idx], None if self.alpha is None else self.alpha[idx])

    def put(self, idx, rows):
        image, prev = self.image.copy(), self.prev.copy()
        image[idx], prev[idx] = rows.image, rows.prev
        alpha = None
        if rows.alpha is not None:
            alpha = np.zeros((len(image), R), np.float32) if self.alpha is None else self.alpha.copy()
            alpha[idx] = rows.alpha
        return Rows(image, prev, alpha)

    def repeat_interleave(self, k):
        return Rows(np.repeat(self.image, k), np.repeat(self.prev, k), None)


class Trigram:
    """features (B,) image numbers; next-token log-probs tables[image, token before last, last];
    attention att[image, token before last, last] when att is given. Counts the rows it steps."""

    def __init__(self, tables, att=None):
        self.tables, self.att, self.rows = tables, att, 0

    def init_state(self, features):
        image = np.asarray(features, dtype=np.int64)
        return Rows(image, np.full(len(image), START_ID, np.int64))

    def step(self, tokens, state):
        assert tokens.dtype == np.int64 and len(tokens) == state.batch_size
        self.rows += len(tokens)
        logp = self.tables[state.image, state.prev, tokens]
        alpha = None if self.att is None else self.att[state.image, state.prev, tokens]
        return logp, Rows(state.image, tokens.copy(), alpha)


def make_tables(rng, n, p_no_end=0.2, p_impossible=0.1):
    """n random trigram tables (n, V, V, V), rows normalised over their possible words (float32)."""
    logits = rng.normal(size=(n, V, V, V)) * 1.5
    logits[rng.random((n, V, V, V)) < p_impossible] = NEG  # some words impossible after some contexts
    logits[rng.random(n) < p_no_end, :, :, END_ID] = NEG  # some images never end
    logits[..., W + 2] = np.where(np.isneginf(logits).all(-1), 0.0, logits[..., W + 2])  # no all -inf row
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    return logp.astype(np.float32)


def lp(n, alpha):
    return ((5.0 + n) / 6.0) ** alpha


def reference(tables, image, *, beam_size, max_len, min_len=1, length_alpha=0.0, no_repeat_ngram=0, n_best=1,
              suppress=(), bias=None, prefix=None, banned=None, sets=None, need=None, att=None):  # fmt: skip
    """Plain beam search for one image, no early stop: a list of (tokens, logprob, score, finished,
    met, attention) best first. Each state of met constraints (a bit mask; `need` or more met:
    one accepting state) keeps beam_size beams; a state's best 2 x beam_size continuations give
    its finished captions (those ending in the first beam_size) and its next beams (the first
    beam_size that do not end)."""
    K, sets = beam_size, sets or []
    k_need = len(sets) if need is None else min(need, len(sets))
    full = (1 << len(sets)) - 1

    def state_of(words):
        met = [i for i, s in enumerate(sets) if set(words) & s]
        return full if len(met) >= k_need else sum(1 << i for i in met)

    def next_logp(hist, t):
        prev2 = hist[-2] if len(hist) >= 2 else START_ID
        prev1 = hist[-1] if hist else START_ID
        x = tables[image, prev2, prev1].astype(np.float64)
        if bias is not None:
            y = x + bias
            y = y - y.max() - np.log(np.exp(y - y.max()).sum())
            x = y
        x = x.astype(np.float32)
        x[[PAD_ID, START_ID, *suppress]] = NEG
        if t < min_len:
            x[END_ID] = NEG
        n = no_repeat_ngram
        if n > 0:
            for i in range(len(hist) - n + 1):
                if list(hist[i : i + n - 1]) == list(hist[len(hist) - n + 1 :]):
                    x[hist[i + n - 1]] = NEG
        if banned is not None and hist and hist[-1] in banned[0]:
            x[banned[1]] = NEG
        if np.isneginf(x).all():
            x[END_ID] = DEAD_END_LOGP
        if prefix is not None and t < len(prefix) and prefix[t] >= 0:
            keep = x[prefix[t]]
            x[:] = NEG
            x[prefix[t]] = keep
        a = None if att is None else att[image, prev2, prev1]
        return x, a

    groups = {state_of([]): [((), np.float32(0.0), [])]}
    finished = []
    for t in range(max_len):
        cands = {}
        for s in sorted(groups):
            for hist, logprob, attn in groups[s]:
                x, a = next_logp(hist, t)
                for w in range(V):
                    if np.isfinite(x[w]):
                        dest = s if w == END_ID else state_of(hist + (w,))
                        cands.setdefault(dest, []).append((np.float32(logprob + x[w]), hist, w, attn + [a]))
        groups = {}
        for s in sorted(cands):
            top = sorted(cands[s], key=lambda c: -c[0])[: 2 * K]
            for logprob, hist, w, attn in top[:K]:
                if w == END_ID:
                    finished.append((list(hist), float(logprob), True, attn[:-1]))
            live = [(hist + (w,), logprob, attn) for logprob, hist, w, attn in top if w != END_ID][:K]
            if live:
                groups[s] = live
        if not groups:
            break
    hyps = finished + [(list(h), float(logprob), False, attn) for s in sorted(groups) for h, logprob, attn in groups[s]]
    out = []
    for words, logprob, ended, attn in hyps:
        met = sum(bool(set(words) & s) for s in sets)
        out.append((words, logprob, logprob / lp(len(words) + int(ended), length_alpha), ended, met, attn))
    out.sort(key=lambda h: (min(h[4], k_need), h[2]), reverse=True)
    return out[:n_best]


def random_config(rng, n_images, *, options=True):
    """One random set of beam_search settings for n_images images (and the reference's per-image ones)."""
    K = int(rng.integers(1, 5))
    kw = dict(
        beam_size=K,
        n_best=int(rng.integers(1, K + 1)),
        max_len=int(rng.integers(1, 8)),
        min_len=int(rng.integers(0, 4)),
        length_alpha=float(rng.choice([0.0, 0.7, 1.0, 2.0])),
        no_repeat_ngram=int(rng.choice([0, 0, 1, 2, 3])),
    )
    per_image = [{} for _ in range(n_images)]
    if not options:
        return kw, per_image
    if rng.random() < 0.3:
        kw["suppress"] = [int(rng.integers(3, V))]
    if rng.random() < 0.3:
        bias = (rng.normal(size=(n_images, V)) * 2).astype(np.float32)
        kw["bias"] = bias
        for b in range(n_images):
            per_image[b]["bias"] = bias[b].astype(np.float64)
    if rng.random() < 0.3:
        prefix = rng.integers(-1, V, size=(n_images, int(rng.integers(1, 4))))
        prefix[prefix < 3] = -1
        kw["prefix"] = prefix
        for b in range(n_images):
            per_image[b]["prefix"] = prefix[b].tolist()
    if rng.random() < 0.3:
        firsts = np.array(sorted(set(rng.integers(3, V, size=2).tolist())))
        seconds = rng.random((n_images, V)) < 0.4
        kw["banned_bigrams"] = (firsts, seconds)
        for b in range(n_images):
            per_image[b]["banned"] = (set(firsts.tolist()), seconds[b])
    if rng.random() < 0.4:
        sets = []
        for b in range(n_images):
            m = int(rng.integers(0, 3))
            sets.append([set(rng.choice(np.arange(3, V), size=int(rng.integers(1, 3)), replace=False).tolist())
                         for _ in range(m)])  # fmt: skip
            per_image[b]["sets"] = sets[b]
        kw["constraints"] = sets
        if rng.random() < 0.5:
            kw["need"] = int(rng.integers(0, 3))
        elif rng.random() < 0.5:
            kw["need"] = rng.integers(0, 3, size=n_images).tolist()
        for b in range(n_images):
            need = kw.get("need")
            per_image[b]["need"] = need[b] if isinstance(need, list) else need
    return kw, per_image


def reference_kw(kw, per_image):
    common = {k: kw[k] for k in ("beam_size", "n_best", "max_len", "min_len", "length_alpha", "no_repeat_ngram")}
    return common | {"suppress": kw.get("suppress", ())} | per_image


def assert_same(got, want, ctx):
    """beam.py's hypotheses for one image equal the reference's, captions exact (none of these random
    models makes two captions score exactly alike), numbers to float32 rounding."""
    assert [h.tokens for h in got] == [w[0] for w in want], ctx
    assert [h.finished for h in got] == [w[3] for w in want], ctx
    assert [h.met for h in got] == [w[4] for w in want], ctx
    assert [h.logprob for h in got] == pytest.approx([w[1] for w in want], rel=1e-6, abs=1e-5), ctx
    assert [h.score for h in got] == pytest.approx([w[2] for w in want], rel=1e-6, abs=1e-5), ctx
    for h, w in zip(got, want):
        if w[5] and w[5][0] is None:
            assert h.attention is None, ctx
        elif w[5]:
            assert h.attention is not None and h.attention.shape == (len(h.tokens), R), ctx
            assert np.array_equal(h.attention, np.array(w[5], np.float32).reshape(len(h.tokens), R)), ctx


@pytest.mark.parametrize("alpha", [0.0, 0.7, 1.0, 2.0])
def test_early_stop_changes_nothing_over_many_seeds(alpha):
    """The early stop drops an image's live beams once none can beat its n-th finished caption: exact
    only with the bound of the longest caption (max_len), since the penalty grows with length."""
    fast_rows = full_rows = 0
    for seed in range(48):
        rng = np.random.default_rng([seed, int(alpha * 10)])
        n = 12
        tables = make_tables(rng, n, p_no_end=0.1, p_impossible=0.0)
        K = int(rng.integers(2, 5))
        kw = dict(beam_size=K, n_best=int(rng.integers(1, K + 1)), max_len=int(rng.integers(3, 10)),
                  min_len=int(rng.integers(0, 3)), length_alpha=alpha)  # fmt: skip
        fast, full = Trigram(tables), Trigram(tables)
        a = beam_search(fast, np.arange(n), **kw)
        b = beam_search(full, np.arange(n), early_stop=False, **kw)
        ctx = (seed, kw)
        assert [[h.tokens for h in hs] for hs in a] == [[h.tokens for h in hs] for hs in b], ctx
        assert [h.score for hs in a for h in hs] == [h.score for hs in b for h in hs], ctx
        fast_rows, full_rows = fast_rows + fast.rows, full_rows + full.rows
    assert fast_rows < full_rows  # it does stop early


def test_beam_search_equals_the_reference():
    """Every option at once on random settings: hypotheses, scores, finished, constraints met and
    attention as the reference gives them; batched, several images per call."""
    for seed in range(150):
        rng = np.random.default_rng(seed)
        n = 3
        tables = make_tables(rng, n)
        att = rng.random((n, V, V, R)).astype(np.float32) if seed % 2 else None
        kw, per_image = random_config(rng, n)
        got = beam_search(Trigram(tables, att), np.arange(n), **kw)
        for b in range(n):
            want = reference(tables, b, att=att, **reference_kw(kw, per_image[b]))
            assert_same(got[b], want, (seed, b, kw))


def test_plain_settings_equal_the_reference_with_long_captions():
    """Without the options, longer captions (up to 12 words) and wider beams than above."""
    for seed in range(40):
        rng = np.random.default_rng([seed, 1])
        n = 4
        tables = make_tables(rng, n)
        kw, per_image = random_config(rng, n, options=False)
        kw["max_len"], kw["beam_size"] = int(rng.integers(6, 13)), int(rng.integers(1, 7))
        kw["n_best"] = int(rng.integers(1, kw["beam_size"] + 1))
        got = beam_search(Trigram(tables), np.arange(n), **kw)
        for b in range(n):
            assert_same(got[b], reference(tables, b, **reference_kw(kw, per_image[b])), (seed, b, kw))


def test_all_finite_and_only_allowed_words_when_the_model_offers_pad_and_start():
    """<pad> and <start> get the most probability of all here, yet never come out."""
    rng = np.random.default_rng(7)
    tables = make_tables(rng, 2, p_no_end=0.0, p_impossible=0.0)
    tables[..., [PAD_ID, START_ID]] = -0.01
    for hs in beam_search(Trigram(tables), np.arange(2), beam_size=3, n_best=3, max_len=5):
        assert len(hs) == 3
        for h in hs:
            assert all(3 <= w < V for w in h.tokens) and math.isfinite(h.score)


def test_the_bound_uses_the_longest_caption():
    """A hand-made case: "a <end>" (p .5) finishes at step 1; the live "b b" (p .3 x .999) looks
    beaten at its own length with alpha 2 but, grown to 6 words of which 5 are p .999, beats it."""
    tables = np.full((1, V, V, V), NEG, np.float32)
    a, b = 3, 4
    tables[0, START_ID, START_ID, [a, b]] = np.log([0.5, 0.3])
    tables[0, :, a, END_ID] = 0.0
    tables[0, :, b, b] = np.log(0.999)
    tables[0, :, b, END_ID] = np.log(0.001)
    for early in (True, False):
        [[h]] = beam_search(Trigram(tables), np.arange(1), beam_size=2, max_len=6, length_alpha=2.0,
                            early_stop=early)  # fmt: skip
        assert h.tokens == [b] * 6 and not h.finished
        assert h.score == pytest.approx((math.log(0.3) + 5 * math.log(0.999)) / lp(6, 2.0), rel=1e-5)


# ---- the helpers ---------------------------------------------------------------------------------
def test_log_softmax_matches_float64_and_survives_large_and_infinite_inputs():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(5, 9)) * 30 + rng.normal(size=(5, 1)) * 500).astype(np.float32)  # exp(500) overflows
    x[1, [2, 5]] = NEG
    x[2] = NEG  # a finished row: stays all -inf
    x[3, 0] = np.float32(3e38)
    want = x.astype(np.float64)
    m = want.max(-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        want = want - m - np.log(np.exp(want - m).sum(-1, keepdims=True))
    want[2] = NEG
    got = log_softmax(x)
    assert got.dtype == np.float32 and got.shape == x.shape
    assert np.array_equal(np.isneginf(got), np.isneginf(want)) and np.isfinite(got[~np.isneginf(want)]).all()
    assert np.allclose(got[np.isfinite(want)], want[np.isfinite(want)], atol=1e-4)
    assert np.allclose(np.exp(got.astype(np.float64)).sum(-1), [1, 1, 0, 1, 1], atol=1e-4)
    assert np.allclose(log_softmax(x[None]), got[None], atol=0)  # last axis only


def test_topk_is_exact_on_every_path():
    """topk against a stable sort: rows of 1 to 3 axes, short (one selection) and long (chunked, with
    and without a partial last chunk, with k = 1 among many chunks), ties, -inf, -0.0 == 0.0 and
    values closer than float32 resolution at 1; values keep their dtype."""
    x = np.array([-0.0, 0.0, 1.0, -np.inf, 1.0, -2.0], np.float32)
    values, idx = topk(x, 4)
    assert idx.tolist() == [2, 4, 0, 1] and values.tolist() == [1.0, 1.0, 0.0, 0.0]
    values, idx = topk(x[None], 6)
    assert idx.tolist() == [[2, 4, 0, 1, 5, 3]] and values[0, -1] == NEG
    tiny = np.array([-3e-9, -1e-9, -2e-9, 5e-10, -4e-9], np.float32)
    assert topk(tiny, 5)[1].tolist() == [3, 1, 2, 0, 4]
    rng = np.random.default_rng(1)
    for n in (1, 2, 63, 64, 65, 129, 257, 300, 1000, 20000):
        for lead in ((), (2,), (2, 3)):
            y = rng.normal(size=(*lead, n)).astype(np.float32)
            y[..., ::7] = np.float32(0.5)  # ties
            y[..., 3::11] = NEG
            for k in sorted({1, 2, 3, 7, 9} & set(range(1, n + 1))):
                want = np.argsort(-y, axis=-1, kind="stable")[..., :k]
                values, idx = topk(y, k)
                assert values.dtype == np.float32 and idx.shape == (*lead, k), (n, lead, k)
                assert np.array_equal(idx, want) and np.array_equal(values, np.take_along_axis(y, want, -1)), (n, k)


def test_the_early_stop_stops_as_soon_as_nothing_can_beat_the_best():
    """The captions "a <end>" and "b c" are both p .5 after step 1: the live beam can only tie, not
    beat, so the search stops there (3 rows stepped); without the early stop it steps "b c" once more."""
    a, b, c = 3, 4, 5
    tables = np.full((1, V, V, V), NEG, np.float32)
    tables[0, START_ID, START_ID, [a, b]] = np.log(0.5)
    tables[0, :, a, END_ID] = tables[0, :, b, c] = tables[0, :, c, END_ID] = 0.0
    for n_best, early, rows in ((1, True, 3), (1, False, 4), (2, True, 4)):
        model = Trigram(tables)
        hyps = beam_search(model, np.arange(1), beam_size=2, n_best=n_best, early_stop=early)[0]
        assert [h.tokens for h in hyps] == [[a], [b, c]][:n_best] and model.rows == rows, (n_best, early)
        assert [h.logprob for h in hyps] == [np.float32(np.log(0.5))] * n_best


def test_extended_steps_borrow_their_source_words():
    rng = np.random.default_rng(3)
    tables = make_tables(rng, 2)
    sources = np.array([4, 6, 3])  # three borrowed words: ids V, V+1, V+2
    ext = ExtendedSteps(Trigram(tables), sources, V)
    images = [0, 1, 1, 0, 1]
    state = ext.init_state(np.array(images))
    assert state.batch_size == 5
    tokens = np.array([START_ID, 5, V, V + 1, V + 2], np.int64)
    logp, state = ext.step(tokens, state)
    seen = [START_ID, 5, 4, 6, 3]  # a borrowed word goes in as its source word
    assert state.prev.tolist() == seen
    base = tables[images, START_ID, seen].astype(np.float64)
    both = np.concatenate([base, base[:, sources]], 1)  # and comes out with its source's log-prob
    want = both - np.log(np.exp(both).sum(-1, keepdims=True))
    assert logp.shape == (5, V + 3) and logp.dtype == np.float32
    finite = np.isfinite(want)
    assert np.array_equal(np.isfinite(logp), finite) and np.allclose(logp[finite], want[finite], atol=1e-5)
    hyps = beam_search(ext, np.arange(2), beam_size=3, n_best=3, max_len=4)
    assert all(0 <= w < V + 3 for hs in hyps for h in hs for w in h.tokens)


def test_constraints_met_counts_sets_met_by_any_word():
    assert constraints_met([{3}, {4, 5}, {6}], [5, 3, 3]) == 2
    assert constraints_met([], [3]) == 0 and constraints_met([{3}], []) == 0
    assert constraints_met([{3, 4}, {4}], [4]) == 2


def test_bad_arguments_are_refused_with_the_reason():
    m, one = Trigram(make_tables(np.random.default_rng(0), 1)), np.arange(1)
    for kw, reason in (
        (dict(beam_size=0), r"need beam_size >= 1 and 1 <= n_best <= beam_size \(got 0, 1\)"),
        (dict(beam_size=2, n_best=3), r"\(got 2, 3\)"),
        (dict(beam_size=2, n_best=0), r"\(got 2, 0\)"),
        (dict(length_alpha=-0.1), "length penalty must be >= 0"),
        (dict(constraints=[[{3}], [{4}]]), "constraints are given for 2 inputs, not 1"),
        (dict(constraints=[[{3}] * (MAX_CONSTRAINTS + 1)]), f"at most {MAX_CONSTRAINTS} constraints per image"),
    ):
        with pytest.raises(UsageError, match=reason):
            beam_search(m, one, **kw)
    [[h]] = beam_search(m, one, beam_size=1, constraints=[[{3}] * MAX_CONSTRAINTS])  # the most allowed
    assert 3 in h.tokens or not h.met


def test_defaults_are_a_beam_of_5_and_20_words():
    tables = make_tables(np.random.default_rng(5), 1, p_no_end=1.0)  # never ends: cut at max_len
    hyps = beam_search(Trigram(tables), np.arange(1), n_best=5)[0]
    assert len(hyps) == 5 and all(len(h.tokens) == 20 and not h.finished for h in hyps)
    with pytest.raises(UsageError):
        beam_search(Trigram(tables), np.arange(1), n_best=6)


class Wide:
    """A vocabulary of 1000 (topk's chunked path), the same log-probs after every word."""

    def __init__(self):
        self.logp, self.rows = np.log(np.random.default_rng(4).dirichlet(np.ones(1000))).astype(np.float32), 0

    def init_state(self, features):
        return Rows(np.asarray(features, np.int64), np.asarray(features, np.int64))

    def step(self, tokens, state):
        self.rows += len(tokens)
        return np.tile(self.logp, (len(tokens), 1)), state


def test_no_images_and_no_constraints():
    for m in (Trigram(make_tables(np.random.default_rng(0), 1)), Wide()):
        for beam_size in (1, 2):
            assert beam_search(m, np.arange(0), beam_size=beam_size) == []
            assert beam_search(m, np.arange(0), beam_size=beam_size, constraints=[]) == []
        assert m.rows == 0
        [hyps] = beam_search(m, np.arange(1), beam_size=2, max_len=3, constraints=[[{3}]])
        assert len(hyps) == 1
    assert topk(np.zeros((0, 1000), np.float32), 3)[1].shape == (0, 3)
    tables = make_tables(np.random.default_rng(1), 3)
    kw = dict(beam_size=3, n_best=3, max_len=6, length_alpha=0.7)
    plain = beam_search(Trigram(tables), np.arange(3), **kw)
    for need in (None, 1, [0, 2, 1]):
        same = beam_search(Trigram(tables), np.arange(3), constraints=[[], [], []], need=need, **kw)
        assert [[(h.tokens, h.score, h.met) for h in hs] for hs in same] == [
            [(h.tokens, h.score, h.met) for h in hs] for hs in plain
        ]


def test_nothing_warns():
    """Finished rows (all -inf) go through log_softmax when a prior is given: silently."""
    tables = make_tables(np.random.default_rng(2), 4)
    bias = np.random.default_rng(3).normal(size=(4, V)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isneginf(log_softmax(np.full((2, V), NEG, np.float32))).all()
        beam_search(Trigram(tables), np.arange(4), beam_size=3, n_best=2, max_len=6, bias=bias)
