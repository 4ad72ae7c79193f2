"""Our metrics against coco-caption (pycocoevalcap) on a committed fixture, plus hand-worked cases."""
import builtins
import json
import math
from pathlib import Path

import pytest

from captioner import metrics
from captioner.metrics import bleu, diversity, evaluate, normalize, rouge_l

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "coco_metrics_parity.json").read_text())
SETS = FIXTURE["sets"]


def test_fixture_is_broad_enough():
    assert len(SETS) >= 50
    assert any(s["candidate"] == "" for s in SETS)
    assert {len(s["references"]) for s in SETS} >= {1, 2, 3, 4, 5}
    assert any(any(ch in s["candidate"] for ch in ",.!?()") for s in SETS)


def test_tokenisation_matches_coco_caption_ptb_tokenizer():
    for s, cand, refs in zip(SETS, FIXTURE["ptb_tokens"]["candidates"], FIXTURE["ptb_tokens"]["references"]):
        assert " ".join(normalize(s["candidate"])) == cand, s["candidate"]
        assert [" ".join(normalize(r)) for r in s["references"]] == refs


def test_corpus_scores_equal_pycocoevalcap():
    refs = {s["id"]: s["references"] for s in SETS}
    cands = {s["id"]: s["candidate"] for s in SETS}
    ours = evaluate(refs, cands, use_meteor=False)
    for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D"):
        assert ours[k] == pytest.approx(FIXTURE["expected"][k], abs=1e-4), k
    assert ours["images"] == len(SETS) and ours["references"] == sum(len(s["references"]) for s in SETS)
    assert ours["METEOR"] is None and ours["METEOR_backend"] == "unavailable"


def test_per_image_rouge_and_cider_equal_pycocoevalcap():
    by_id = {s["id"]: s for s in SETS}
    ids = FIXTURE["per_image"]["ids"]
    r_tok = {i: [normalize(r) for r in by_id[i]["references"]] for i in ids}
    c_tok = {i: normalize(by_id[i]["candidate"]) for i in ids}
    cider = metrics.cider_d(r_tok, c_tok)
    for i, want_r, want_c in zip(ids, FIXTURE["per_image"]["ROUGE-L"], FIXTURE["per_image"]["CIDEr-D"]):
        assert rouge_l(r_tok[i], c_tok[i]) == pytest.approx(want_r, abs=1e-4), i
        assert cider[i] == pytest.approx(want_c, abs=1e-4), i


def test_bleu_brevity_penalty_and_closest_reference_by_hand():
    # "a dog" against "a dog runs fast": all unigrams match, BP = exp(1 - 4/2)
    [b1] = bleu({0: [["a", "dog", "runs", "fast"]]}, {0: ["a", "dog"]}, n=1)
    assert b1 == pytest.approx(math.exp(-1), abs=1e-6)
    # 3 words, references of 2 and 4 words: equally close, the shorter counts -> no penalty
    [b1] = bleu({0: [["a", "b"], ["a", "b", "c", "d"]]}, {0: ["a", "b", "c"]}, n=1)
    assert b1 == pytest.approx(1.0, abs=1e-6)
    # clipped counts: "the the the" against "the cat": 1 of 3 unigrams count
    [b1] = bleu({0: [["the", "cat", "sat"]]}, {0: ["the", "the", "the"]}, n=1)
    assert b1 == pytest.approx(1 / 3, abs=1e-6)


def test_rouge_l_by_hand():
    # LCS("a b c d", "a c d e f") = 3: P = 3/4, R = 3/5, beta = 1.2
    p, r, b2 = 0.75, 0.6, 1.44
    assert rouge_l([["a", "c", "d", "e", "f"]], ["a", "b", "c", "d"]) == pytest.approx((1 + b2) * p * r / (r + b2 * p))
    assert rouge_l([["x"]], []) == 0.0


def test_meteor_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("CAPTIONER_METEOR", "off")
    assert metrics.meteor_backend() == "unavailable"
    out = evaluate({1: ["a dog runs"]}, {1: "a dog runs"})
    assert out["METEOR"] is None and out["METEOR_backend"] == "unavailable"


def test_meteor_falls_back_to_nltk_without_java_or_pycocoevalcap(monkeypatch):
    real_import = builtins.__import__

    def no_pycocoevalcap(name, *a, **kw):
        if name.startswith("pycocoevalcap"):
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_pycocoevalcap)
    expected = "nltk" if metrics._nltk_wordnet() is not None else "unavailable"
    assert metrics.meteor_backend() == expected
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    assert metrics.meteor_backend() == expected


def test_nltk_meteor_scores_make_sense():
    if metrics._nltk_wordnet() is None:
        pytest.skip("no WordNet data (Debian: apt-get install wordnet-base wordnet-sense-index)")
    refs = {1: ["a dog runs on the grass"], 2: ["a dog runs on the grass"]}
    same = metrics.meteor(refs, {1: "a dog runs on the grass", 2: "a dog runs on the grass"}, backend="nltk")
    other = metrics.meteor(refs, {1: "two men play chess", 2: "a red car"}, backend="nltk")
    synonym = metrics.meteor({1: ["a dog runs on the grass"]}, {1: "a dog run on the lawn"}, backend="nltk")
    assert same > 0.95 and other < 0.2 and 0.5 < synonym < same


def test_official_meteor_matches_pycocoevalcap_fixture():
    if metrics.meteor_backend() != "official-1.5":
        pytest.skip("official METEOR needs pycocoevalcap and Java")
    refs = {s["id"]: s["references"] for s in SETS}
    cands = {s["id"]: s["candidate"] for s in SETS}
    assert metrics.meteor(refs, cands) == pytest.approx(FIXTURE["expected"]["METEOR-1.5"], abs=1e-4)


def test_diversity_counts_distinct_captions_and_words():
    d = diversity({1: "a dog", 2: "A dog.", 3: "a cat runs", 4: "the cat"})
    assert d == {"distinct_captions": 3, "unique_fraction": 0.5, "words_used": 5}
