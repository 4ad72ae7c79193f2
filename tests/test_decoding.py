"""Decoding against a fake model whose next-token distributions are set by hand (im2txt style)."""

import math
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from captioner.decoding import DEAD_END_LOGP, EnsembleDecoder, beam_search, sample
from captioner.models import ShowTellDecoder
from captioner.models.base import CaptionModel, DecoderState

PAD, START, END, A, B, C = range(6)
V = 6


def table(rows: dict[int, dict[int, float]]) -> Tensor:
    """(V, V) next-token probabilities: row = previous token. Unlisted rows: always <end>."""
    t = torch.zeros(V, V)
    t[:, END] = 1.0
    for prev, dist in rows.items():
        t[prev] = 0.0
        for tok, p in dist.items():
            t[prev, tok] = p
    return t


# Image 0: beams are easy to work out by hand (see test_exact_beams).
IMAGE0 = table({START: {A: 0.5, B: 0.3, C: 0.2}, A: {END: 0.62, B: 0.38}, B: {END: 0.1, C: 0.9}, C: {END: 1.0}})
# Image 1: greedy takes "a" (0.6) and ends at 0.36; beam 2 finds "b" at 0.38.
IMAGE1 = table({START: {A: 0.6, B: 0.4}, A: {END: 0.4, C: 0.6}, B: {END: 0.95, C: 0.05}, C: {END: 1.0}})
# Image 2: never emits <end>.
IMAGE2 = table({START: {A: 1.0}, A: {A: 0.6, B: 0.4}, B: {A: 0.3, B: 0.7}})
# Image 3: loves "a b a b ...".
IMAGE3 = table({START: {A: 0.9, B: 0.1}, A: {B: 0.8, END: 0.2}, B: {A: 0.7, END: 0.3}, C: {END: 1.0}})
TABLES = torch.stack([IMAGE0, IMAGE1, IMAGE2, IMAGE3]).log()  # (4, V, V); impossible tokens: -inf


@dataclass
class FakeState(DecoderState):
    image: Tensor  # (N,) which table


class FakeModel(CaptionModel):
    """features (B,) = image numbers; the next token depends on the image and the last token only."""

    def init_state(self, features):
        return FakeState(image=features.long())

    def step(self, tokens, state):
        return TABLES[state.image, tokens], state  # (N, V)


def images(*ids):
    return torch.tensor(ids)


def test_exact_beams_and_scores():
    # step 0: a .5, b .3 | step 1: a-end .31, b-c .27 (a-b .19, b-end .03 drop) | step 2: b-c-end .27
    [hyps] = beam_search(FakeModel(), images(0), beam_size=2, n_best=2)
    assert [h.tokens for h in hyps] == [[A], [B, C]]
    assert [h.logprob for h in hyps] == pytest.approx([math.log(0.31), math.log(0.27)], abs=1e-6)
    assert all(h.finished for h in hyps)


def test_exact_beams_size_three():
    # step 1 keeps a-end .31, b-c .27, c-end .20 (a-b .19 drops out)
    [hyps] = beam_search(FakeModel(), images(0), beam_size=3, n_best=3)
    assert [h.tokens for h in hyps] == [[A], [B, C], [C]]
    assert [h.score for h in hyps] == pytest.approx([math.log(x) for x in (0.31, 0.27, 0.2)], abs=1e-6)


def test_beam_beats_greedy_where_greedy_is_short_sighted():
    [[g]] = beam_search(FakeModel(), images(1), beam_size=1)
    assert g.tokens == [A, C] and g.logprob == pytest.approx(math.log(0.36), abs=1e-6)
    [[best]] = beam_search(FakeModel(), images(1), beam_size=2)
    assert best.tokens == [B] and best.logprob == pytest.approx(math.log(0.38), abs=1e-6)


def greedy_reference(model, features, max_len):
    """The most likely next word at each step, one image at a time: what beam 1 must give."""
    out = []
    for i in range(len(features)):
        state = model.init_state(features[i : i + 1])
        token, words, logprob = torch.tensor([START]), [], 0.0
        for _ in range(max_len):
            logp, state = model.step(token, state)  # (1, V)
            logp[0, [PAD, START]] = float("-inf")
            best, token = logp[0].max(dim=-1, keepdim=True)
            logprob += best.item()
            if token.item() == END:
                break
            words.append(token.item())
        out.append((words, logprob))
    return out


def test_beam_size_one_equals_greedy():
    feats = images(0, 1, 2, 3)
    gs = greedy_reference(FakeModel(), feats, max_len=6)
    bs = beam_search(FakeModel(), feats, beam_size=1, max_len=6)
    assert [g[0] for g in gs] == [b[0].tokens for b in bs]
    assert [g[1] for g in gs] == pytest.approx([b[0].logprob for b in bs])


def test_batched_equals_one_image_at_a_time():
    feats = images(0, 1, 2, 3, 1, 0)
    batched = beam_search(FakeModel(), feats, beam_size=3, n_best=3, max_len=7, no_repeat_ngram=2)
    alone = [
        beam_search(FakeModel(), feats[i : i + 1], beam_size=3, n_best=3, max_len=7, no_repeat_ngram=2)[0]
        for i in range(len(feats))
    ]
    assert [[h.tokens for h in hs] for hs in batched] == [[h.tokens for h in hs] for hs in alone]
    assert [h.score for hs in batched for h in hs] == pytest.approx([h.score for hs in alone for h in hs])


def test_batched_equals_alone_with_a_real_decoder():
    torch.manual_seed(0)
    model = ShowTellDecoder(vocab_size=30, feature_dim=16, embed_size=8, hidden_size=12, num_layers=2).eval()
    feats = torch.randn(5, 16) * 3
    batched = beam_search(model, feats, beam_size=4, n_best=4, max_len=8)
    for i in range(5):
        alone = beam_search(model, feats[i : i + 1], beam_size=4, n_best=4, max_len=8)[0]
        assert [h.tokens for h in batched[i]] == [h.tokens for h in alone]
        assert [h.score for h in batched[i]] == pytest.approx([h.score for h in alone], abs=1e-4)


def test_never_ending_beam_still_returns_its_best_hypothesis():
    [hyps] = beam_search(FakeModel(), images(2), beam_size=2, n_best=2, max_len=4)
    assert len(hyps) == 2 and all(len(h.tokens) == 4 and not h.finished for h in hyps)
    assert hyps[0].tokens == [A, A, A, A] and hyps[0].logprob == pytest.approx(3 * math.log(0.6), abs=1e-6)
    assert hyps[1].tokens == [A, B, B, B] and hyps[1].logprob == pytest.approx(math.log(0.4 * 0.7 * 0.7), abs=1e-6)
    [[g]] = beam_search(FakeModel(), images(2), beam_size=1, max_len=4)
    assert g.tokens == [A, A, A, A] and not g.finished


def test_dead_end_from_constraints_ends_instead_of_crashing():
    # image 2 can only say a/b; with unigram blocking, after "a b" nothing is allowed
    [hyps] = beam_search(FakeModel(), images(2), beam_size=2, n_best=1, max_len=6, no_repeat_ngram=1)
    assert hyps[0].tokens == [A, B] and hyps[0].finished
    assert hyps[0].logprob == pytest.approx(math.log(0.4) + DEAD_END_LOGP, abs=1e-3)
    [[g]] = beam_search(FakeModel(), images(2), beam_size=1, max_len=6, no_repeat_ngram=1)
    assert g.tokens == [A, B] and g.finished


def test_no_repeat_ngram_blocks_repeated_bigrams():
    [[free]] = beam_search(FakeModel(), images(3), beam_size=1, max_len=8)
    assert free.tokens[:4] == [A, B, A, B]
    [[blocked]] = beam_search(FakeModel(), images(3), beam_size=1, max_len=8, no_repeat_ngram=2)
    seq = blocked.tokens
    bigrams = list(zip(seq, seq[1:]))
    assert len(bigrams) == len(set(bigrams))
    assert seq == [A, B, A]  # "a b" cannot come again, so after "a" the caption ends


def test_min_len_forbids_early_end():
    [[h]] = beam_search(FakeModel(), images(0), beam_size=2, min_len=2)
    assert len(h.tokens) >= 2 and h.tokens == [B, C]
    [[g]] = beam_search(FakeModel(), images(0), beam_size=1, min_len=3)
    assert len(g.tokens) >= 3


def test_max_len_caps_words():
    for h in beam_search(FakeModel(), images(2, 3), beam_size=3, max_len=3):
        assert len(h[0].tokens) <= 3


def test_length_penalty_reranks_towards_longer_captions():
    # GNMT lp(|Y|) = ((5+|Y|)/6)^alpha over words + <end>; alpha=1:
    # "a" -1.171/(7/6) = -1.004, "b c" -1.309/(8/6) = -0.982, "a b c" -1.766/(9/6) = -1.177,
    # "c" -1.609/(7/6) = -1.380. "a b c" is found because "a"'s ending does not take a beam's place:
    # step 1 goes on with 3 live beams (b c, a b, c ...), not 2 (the old search kept "a" in a slot).
    [hyps] = beam_search(FakeModel(), images(0), beam_size=3, n_best=3, length_alpha=1.0)
    assert [h.tokens for h in hyps] == [[B, C], [A], [A, B, C]]
    assert [h.score for h in hyps] == pytest.approx(
        [math.log(x) / lp for x, lp in ((0.27, 8 / 6), (0.31, 7 / 6), (0.171, 9 / 6))], abs=1e-6
    )
    assert hyps[0].logprob == pytest.approx(math.log(0.27), abs=1e-6)


def test_bad_beam_arguments():
    with pytest.raises(ValueError):
        beam_search(FakeModel(), images(0), beam_size=2, n_best=3)


def test_sampling_draws_from_the_model_and_keeps_each_tokens_logprob():
    torch.manual_seed(0)
    tokens, logp, mask = sample(FakeModel(), images(1, 0), n=3000, max_len=4)  # rows 0..2999: image 1
    first = tokens[:3000, 0]
    assert (first == A).float().mean().item() == pytest.approx(0.6, abs=0.03)  # image 1: a .6, b .4
    after_a = tokens[:3000][first == A, 1]
    assert (after_a == C).float().mean().item() == pytest.approx(0.6, abs=0.04)  # a -> c .6, <end> .4
    table = TABLES[torch.tensor([1, 0]).repeat_interleave(3000)]  # (N, V, V)
    prev = torch.cat([torch.full((6000, 1), START), tokens[:, :-1]], dim=1)  # (N, T)
    want = table.gather(1, prev[:, :, None].expand(-1, -1, V)).gather(2, tokens[:, :, None]).squeeze(2)  # (N, T)
    assert torch.allclose(logp[mask], want[mask])  # each real step's log-prob is the model's
    ended = (tokens == END).cumsum(1) - (tokens == END).long()  # > 0 strictly after <end>
    assert torch.equal(mask, ended == 0) and (tokens[~mask] == PAD).all() and (logp[~mask] == 0).all()


def test_suppressed_tokens_are_never_emitted():
    [[g]] = beam_search(FakeModel(), images(0), beam_size=1, suppress=[A])
    assert g.tokens == [B, C]  # a (.5) is gone: b (.3), then c (.9)
    for hyps in beam_search(FakeModel(), images(0, 3), beam_size=3, n_best=3, suppress=[A]):
        assert all(A not in h.tokens for h in hyps)


# ---- against an exhaustive search -------------------------------------------------------------
W = 4  # real words in the random models below: ids 3..6 after <pad>, <start>, <end>


def random_tables(seed: int, n: int) -> Tensor:
    """n random next-token tables (V = 3 + W): row = previous token; <pad>/<start> never come next."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 3 + W, 3 + W, generator=g) * 1.5
    logits[:, :, [PAD, START]] = float("-inf")
    return logits.log_softmax(-1)


class TableModel(CaptionModel):
    """Like FakeModel, over given tables; counts the rows it is asked to step."""

    def __init__(self, tables):
        super().__init__()
        self.tables, self.rows = tables, []

    def init_state(self, features):
        return FakeState(image=features.long())

    def step(self, tokens, state):
        self.rows.append(len(tokens))
        return self.tables[state.image, tokens], state


def exhaustive(tables: Tensor, image: int, max_len: int, alpha: float, n_best: int) -> list[tuple[list[int], float]]:
    """Every caption of at most max_len words (ended, or cut at max_len), scored as beam search
    scores them; the n_best best."""
    out = []

    def walk(prefix, logp):
        prev = prefix[-1] if prefix else START
        for tok in range(2, 3 + W):
            lp = logp + float(tables[image, prev, tok])
            if tok == END:
                if prefix:  # min_len 1
                    out.append((prefix, lp / ((5 + len(prefix) + 1) / 6) ** alpha))
            elif len(prefix) + 1 == max_len:
                out.append((prefix + [tok], lp / ((5 + max_len) / 6) ** alpha))
            else:
                walk(prefix + [tok], lp)

    walk([], 0.0)
    return sorted(out, key=lambda x: -x[1])[:n_best]


@pytest.mark.parametrize("alpha", [0.0, 0.7, 2.0])
def test_a_beam_wide_enough_finds_the_exhaustive_best(alpha):
    tables = random_tables(0, 6)
    hyps = beam_search(TableModel(tables), images(*range(6)), beam_size=W**4, n_best=5, max_len=4, length_alpha=alpha)
    for image, hs in enumerate(hyps):
        want = exhaustive(tables, image, 4, alpha, 5)
        assert [h.tokens for h in hs] == [w for w, _ in want]
        assert [h.score for h in hs] == pytest.approx([s for _, s in want], abs=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_early_stop_changes_nothing_but_the_work(alpha):
    tables = random_tables(1, 16)
    kw = dict(beam_size=3, n_best=2, max_len=9, length_alpha=alpha)
    fast, full = TableModel(tables), TableModel(tables)
    a = beam_search(fast, images(*range(16)), **kw)
    b = beam_search(full, images(*range(16)), early_stop=False, **kw)
    assert [[h.tokens for h in hs] for hs in a] == [[h.tokens for h in hs] for hs in b]
    assert [h.score for hs in a for h in hs] == pytest.approx([h.score for hs in b for h in hs])
    assert sum(fast.rows) < sum(full.rows) == 16 * 3 * 9 - 16 * 2  # all rows live to max_len without it


def test_k_beams_stay_live_after_captions_end():
    # image 0, beam 2: at step 1 "a <end>" finishes; the search still steps 2 live beams (b c, a b)
    model = TableModel(TABLES)
    beam_search(model, images(0), beam_size=2, n_best=1, max_len=5, length_alpha=1.0, early_stop=False)
    assert model.rows[:3] == [1, 2, 2]


def test_negative_length_penalty_is_refused():
    with pytest.raises(ValueError, match="length penalty"):
        beam_search(FakeModel(), images(0), length_alpha=-0.5)


# Two models that disagree: X prefers "a", Y prefers "b"; both rate "c" second at 0.4.
X_TABLE = table({START: {A: 0.5, B: 0.1, C: 0.4}, A: {END: 1.0}, B: {END: 1.0}, C: {END: 1.0}}).log()
Y_TABLE = table({START: {A: 0.1, B: 0.5, C: 0.4}, A: {END: 1.0}, B: {END: 1.0}, C: {END: 1.0}}).log()


class OneTableModel(CaptionModel):
    def __init__(self, t: Tensor) -> None:
        super().__init__()
        self.t = t

    def init_state(self, features):
        return FakeState(image=features.long())

    def step(self, tokens, state):
        return self.t[tokens], state  # (N, V)


def test_an_ensemble_decodes_the_mean_of_its_members_log_probabilities():
    x, y = OneTableModel(X_TABLE), OneTableModel(Y_TABLE)
    alone_x = beam_search(x, images(0), beam_size=3, n_best=3)[0]
    assert alone_x[0].tokens == [A]
    both = beam_search(EnsembleDecoder([x, y]), (images(0), images(0)), beam_size=3, n_best=3)[0]
    # geometric means a: sqrt(.05), b: sqrt(.05), c: .4, renormalised: "c" wins, though neither chose it
    norm = 2 * math.sqrt(0.05) + 0.4
    assert [h.tokens for h in both] == [[C], [A], [B]] or [h.tokens for h in both] == [[C], [B], [A]]
    assert both[0].score == pytest.approx(math.log(0.4 / norm), abs=1e-5)
    assert both[1].score == pytest.approx(math.log(math.sqrt(0.05) / norm), abs=1e-5)
    # an ensemble of one model with itself is that model: same beams, same scores
    same = beam_search(EnsembleDecoder([x, x]), (images(0), images(0)), beam_size=3, n_best=3)[0]
    assert [(h.tokens, round(h.score, 5)) for h in same] == [(h.tokens, round(h.score, 5)) for h in alone_x]


def test_an_ensemble_of_real_decoders_beam_searches_in_batches():
    torch.manual_seed(0)
    make = dict(vocab_size=12, feature_dim=8, embed_size=8, hidden_size=16)
    a, b = ShowTellDecoder(**make).eval(), ShowTellDecoder(**make).eval()
    feats = torch.randn(3, 8)
    ens = EnsembleDecoder([a, b])
    batched = beam_search(ens, (feats, feats), beam_size=4, max_len=6)
    alone = [beam_search(ens, (feats[i : i + 1], feats[i : i + 1]), beam_size=4, max_len=6)[0] for i in range(3)]
    assert [h[0].tokens for h in batched] == [h[0].tokens for h in alone]


# ---- a per-image word prior (bias) and a forced start (prefix): what tag guidance uses -------------
def test_bias_is_a_renormalised_product_of_experts():
    # image 0 greedy: "a" (0.5) then <end> (0.62). A prior of log 4 on "c" makes the first step
    # 0.5 : 0.3 : 0.8 for a : b : c, renormalised -> c 0.5; c then ends with probability 1.
    bias = torch.zeros(1, V)
    bias[0, C] = math.log(4.0)
    [[h]] = beam_search(FakeModel(), images(0), beam_size=1, bias=bias)
    assert h.tokens == [C]
    assert h.logprob == pytest.approx(math.log(0.8 / 1.6))
    [[plain]] = beam_search(FakeModel(), images(0), beam_size=1)
    assert plain.tokens == [A]


def test_bias_is_per_image_and_keeps_the_early_stop_exact():
    tables = random_tables(2, 8)
    bias = torch.randn(8, tables.size(-1), generator=torch.Generator().manual_seed(0)) * 2.0
    kw = dict(beam_size=3, n_best=2, max_len=7, length_alpha=1.0, bias=bias)
    a = beam_search(TableModel(tables), images(*range(8)), **kw)
    b = beam_search(TableModel(tables), images(*range(8)), early_stop=False, **kw)
    assert [[h.tokens for h in hs] for hs in a] == [[h.tokens for h in hs] for hs in b]
    # each image's captions are those it gets when decoded alone with its own prior
    for i in (0, 5):
        [alone] = beam_search(TableModel(tables), images(i), **(kw | {"bias": bias[i : i + 1]}))
        assert [h.tokens for h in alone] == [h.tokens for h in a[i]]
        assert all(h.logprob <= 0 for h in alone)


def test_prefix_forces_the_start_and_leaves_free_rows_alone():
    prefix = torch.tensor([[B, -1], [-1, -1]])  # image 0 must start with "b"; image 1 is free
    hyps = beam_search(FakeModel(), images(0, 1), beam_size=2, n_best=1, prefix=prefix)
    assert hyps[0][0].tokens[0] == B
    # "b" has probability 0.3 at step 0 and keeps the model's log-prob: b c <end> = 0.3 * 0.9 * 1
    assert hyps[0][0].tokens == [B, C] and hyps[0][0].logprob == pytest.approx(math.log(0.27))
    [free] = beam_search(FakeModel(), images(1), beam_size=2, n_best=1)
    assert [h.tokens for h in hyps[1]] == [h.tokens for h in free]


# ---- constrained beam search (Anderson et al. 2017) ---------------------------------------------
def exhaustive_constrained(tables, image, max_len, alpha, n_best, sets, need):
    """The exhaustive ranking constrained search promises: captions meeting `need` sets first, then
    by how many they meet, then by score."""
    every = exhaustive(tables, image, max_len, alpha, 10**6)
    met = lambda words: sum(bool(set(words) & s) for s in sets)  # noqa: E731
    need = len(sets) if need is None else min(need, len(sets))
    return sorted(every, key=lambda x: (-min(met(x[0]), need), -x[1]))[:n_best]


@pytest.mark.parametrize("alpha", [0.0, 1.0])
@pytest.mark.parametrize("need", [None, 1, 2])
def test_constrained_search_wide_enough_finds_the_exhaustive_best(alpha, need):
    tables = random_tables(2, 6)
    sets = [[{3}, {5, 6}], [{4}], [], [{6}, {3}, {4}], [{5}, {6}], [{3, 4}, {5}]]
    hyps = beam_search(
        TableModel(tables), images(*range(6)), beam_size=W**4, n_best=4, max_len=4, length_alpha=alpha,
        constraints=sets, need=need,
    )  # fmt: skip
    for image, hs in enumerate(hyps):
        want = exhaustive_constrained(tables, image, 4, alpha, 4, sets[image], need)
        every = dict((tuple(w), s) for w, s in exhaustive_constrained(tables, image, 4, alpha, 10**6, [], 0))
        assert [h.score for h in hs] == pytest.approx([s for _, s in want], abs=1e-5)
        # the same captions, up to the order of exact ties (these tables make some)
        assert all(every[tuple(h.tokens)] == pytest.approx(h.score, abs=1e-5) for h in hs)
        assert [h.met for h in hs] == [sum(bool(set(w) & s) for s in sets[image]) for w, _ in want]
        k = len(sets[image]) if need is None else min(need, len(sets[image]))
        assert hs[0].met >= k  # a caption meeting them exists within 4 words for every image here


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_constrained_early_stop_changes_nothing_but_the_work(alpha):
    tables = random_tables(3, 12)
    sets = [[{3 + i % W}, {3 + (i + 1) % W}] if i % 3 else [] for i in range(12)]
    kw = dict(beam_size=3, n_best=2, max_len=8, length_alpha=alpha, constraints=sets, need=1)
    fast, full = TableModel(tables), TableModel(tables)
    a = beam_search(fast, images(*range(12)), **kw)
    b = beam_search(full, images(*range(12)), early_stop=False, **kw)
    assert [[h.tokens for h in hs] for hs in a] == [[h.tokens for h in hs] for hs in b]
    assert [h.score for hs in a for h in hs] == pytest.approx([h.score for hs in b for h in hs])
    assert sum(fast.rows) < sum(full.rows)


def test_images_without_constraints_decode_as_plain_beam_search():
    tables = random_tables(4, 5)
    kw = dict(beam_size=3, n_best=2, max_len=6, length_alpha=0.5)
    plain = beam_search(TableModel(tables), images(*range(5)), **kw)
    mixed = beam_search(TableModel(tables), images(*range(5)), constraints=[[], [{4}], [], [{5}, {6}], []], **kw)
    for i in (0, 2, 4):
        assert [h.tokens for h in mixed[i]] == [h.tokens for h in plain[i]]
        assert [h.score for h in mixed[i]] == pytest.approx([h.score for h in plain[i]])
    assert 4 in mixed[1][0].tokens and {5, 6} <= set(mixed[3][0].tokens)


def test_a_constraint_brings_in_a_word_the_decoder_would_not_choose():
    # image 0 prefers "a <end>" (.31); constrained to hold "c": "b c <end>" (.27), then "c <end>" (.2)
    [hyps] = beam_search(FakeModel(), images(0), beam_size=2, n_best=2, constraints=[[{C}]])
    assert [h.tokens for h in hyps] == [[B, C], [C]]
    assert [h.logprob for h in hyps] == pytest.approx([math.log(0.27), math.log(0.2)], abs=1e-6)
    assert all(h.met == 1 for h in hyps)


def test_an_unreachable_constraint_falls_back_to_the_unconstrained_best():
    # "c" is suppressed, so no caption can meet the constraint: the best caption, meeting none
    [hyps] = beam_search(FakeModel(), images(1), beam_size=2, constraints=[[{C}]], suppress=[C])
    assert hyps[0].tokens == [B] and hyps[0].met == 0


def test_too_many_constraints_are_refused():
    with pytest.raises(ValueError, match="at most"):
        beam_search(FakeModel(), images(0), constraints=[[{A}, {B}, {C}, {A}, {B}]])


def test_topk_is_exact_with_ties_in_position_order() -> None:
    """beam.topk (chunked selection) against a full stable sort, on rows long enough to be chunked,
    with many equal values and -inf (dead beams)."""
    import numpy as np

    from captioner.beam import topk

    rng = np.random.default_rng(0)
    for _ in range(300):
        shape = (int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(rng.integers(1, 3000)))
        x = rng.integers(-5, 5, size=shape).astype(np.float32)
        x[rng.random(shape) < rng.random()] = -np.inf
        k = int(rng.integers(1, min(12, shape[-1]) + 1))
        values, idx = topk(x, k)
        expected = np.argsort(-x, axis=-1, kind="stable")[..., :k]
        assert np.array_equal(idx, expected) and np.array_equal(values, np.take_along_axis(x, expected, -1))
