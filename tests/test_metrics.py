"""Our metrics against coco-caption (pycocoevalcap) on a committed fixture, plus hand-worked cases."""

import builtins
import hashlib
import json
import math
from pathlib import Path

import pytest

from captioner import metrics
from captioner.metrics import bleu, diversity, evaluate, normalize, normalize_corpus, rouge_l
from tests.helpers.messy_captions import builtin_sets, shared_sets

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "coco_metrics_parity.json").read_text(encoding="utf-8"))
BUILTIN = FIXTURE["builtin"]
SETS = BUILTIN["sets"]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PARITY = 1e-6


def _corpus(sets):
    return {s["id"]: s["references"] for s in sets}, {s["id"]: s["candidate"] for s in sets}


def test_fixture_is_broad_and_messy():
    assert BUILTIN["captions"] >= 1000 and SETS == builtin_sets()  # the committed sets are the generator's
    text = [t for s in SETS for t in [s["candidate"], *s["references"]]]
    assert any(s["candidate"] == "" for s in SETS)
    assert {len(s["references"]) for s in SETS} >= {1, 2, 3, 4, 5}
    for kind, chars in {
        "a sentence inside": [". A", ". T"],
        "curly quotes": "“”‘’",
        "emoji": ["🐶", "😀"],
        "non-ASCII letters": "éüñçøł",
        "non-Latin": "мκ公",
        "brackets": "([{",
        "numbers with points/commas": ["3.5", "1,000"],
        "stray white space": ["\t", "  ", "\u00a0"],
        "abbreviations": ["Mr.", "U.S.", "etc."],
        "possessives": ["'s", "’s", "s' "],
        "hyphens and dashes": ["-year-", "—", "–"],
    }.items():
        assert any(c in t for t in text for c in chars), kind


def test_tokenisation_matches_coco_caption_ptb_tokenizer():
    r_tok, c_tok = normalize_corpus(*_corpus(SETS))
    for s, cand, refs in zip(SETS, BUILTIN["ptb_tokens"]["candidates"], BUILTIN["ptb_tokens"]["references"]):
        assert " ".join(c_tok[s["id"]]) == cand, s["candidate"]
        assert [" ".join(r) for r in r_tok[s["id"]]] == refs, s["references"]


def test_a_period_inside_a_caption_ends_the_word():
    # the case that was wrong: "square." stayed glued to its period; abbreviations keep theirs
    assert normalize("A dog sits below a square. A cat runs.") == "a dog sits below a square a cat runs".split()
    assert normalize("Mr. Smith in the U.S. on Jan. 5, etc.") == [
        "mr.",
        "smith",
        "in",
        "the",
        "u.s.",
        "on",
        "jan.",
        "5",
        "etc.",
    ]
    assert normalize("The dog’s “toy” isn't—here… (3½ ft)") == [
        "the",
        "dog",
        "'s",
        "toy",
        "is",
        "n't",
        "here",
        "-lrb-",
        "3",
        "1/2",
        "ft",
        "-rrb-",
    ]


def test_corpus_scores_equal_pycocoevalcap():
    ours = evaluate(*_corpus(SETS), use_meteor=False)
    for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D"):
        assert ours[k] == pytest.approx(BUILTIN["expected"][k], abs=PARITY), k
    assert ours["images"] == len(SETS) and ours["references"] == sum(len(s["references"]) for s in SETS)
    assert ours["METEOR"] is None and ours["METEOR_backend"] == "unavailable"


def test_per_image_rouge_and_cider_equal_pycocoevalcap():
    by_id = {s["id"]: s for s in SETS}
    ids = BUILTIN["per_image"]["ids"]
    r_tok, c_tok = normalize_corpus({i: by_id[i]["references"] for i in ids}, {i: by_id[i]["candidate"] for i in ids})
    cider = metrics.cider_d(
        {i: [metrics.split_words(r) for r in rs] for i, rs in r_tok.items()},
        {i: metrics.split_words(c) for i, c in c_tok.items()},
    )
    for i, want_r, want_c in zip(ids, BUILTIN["per_image"]["ROUGE-L"], BUILTIN["per_image"]["CIDEr-D"]):
        assert rouge_l(r_tok[i], c_tok[i]) == pytest.approx(want_r, abs=PARITY), i
        assert cider[i] == pytest.approx(want_c, abs=PARITY), i


def test_real_coco_and_flickr_captions_equal_pycocoevalcap():
    """The real captions stay in ../shared/data; the fixture holds their official scores and token hashes."""
    sets = shared_sets(SHARED_DATA)
    if sets is None:
        pytest.skip(f"{SHARED_DATA} (COCO and Flickr8k captions) is not here")
    part = FIXTURE["shared"]
    assert len(sets) == part["sets"] and sum(1 + len(s["references"]) for s in sets) == part["captions"] >= 1000
    refs, cands = _corpus(sets)
    r_tok, c_tok = normalize_corpus(refs, cands)

    def h(tokens):
        return hashlib.sha1(" ".join(tokens).encode()).hexdigest()[:16]

    got = {
        "candidates": [h(c_tok[s["id"]]) for s in sets],
        "references": [[h(r) for r in r_tok[s["id"]]] for s in sets],
    }
    bad = [s["candidate"] for s, a, b in zip(sets, got["candidates"], part["token_sha1"]["candidates"]) if a != b]
    bad += [
        r
        for s, a, b in zip(sets, got["references"], part["token_sha1"]["references"])
        for r, x, y in zip(s["references"], a, b)
        if x != y
    ]
    assert not bad, f"{len(bad)} captions tokenised unlike coco-caption, e.g. {bad[:3]}"
    ours = evaluate(refs, cands, use_meteor=False)
    for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D"):
        assert ours[k] == pytest.approx(part["expected"][k], abs=PARITY), k


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
    monkeypatch.delenv("CAPTIONER_METEOR", raising=False)  # whatever the caller's environment says
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
    assert metrics.meteor(*_corpus(SETS)) == pytest.approx(BUILTIN["expected"]["METEOR-1.5"], abs=PARITY)


def test_diversity_counts_distinct_captions_and_words():
    d = diversity({1: "a dog", 2: "A dog.", 3: "a cat runs", 4: "the cat"})
    assert d == {"distinct_captions": 3, "unique_fraction": 0.5, "words_used": 5}


def test_official_meteor_keeps_one_java_process(monkeypatch):
    """Starting METEOR's JVM costs seconds: one process serves every call, a failed call drops it,
    and a forked child starts its own without disturbing its parent's."""
    if metrics.meteor_backend() != "official-1.5":
        pytest.skip("official METEOR needs pycocoevalcap and Java")
    import os

    from pycocoevalcap.meteor import meteor as official

    started = []
    real = official.Meteor

    class Counted(real):
        def __init__(self):
            super().__init__()
            started.append(self)

    monkeypatch.setattr(official, "Meteor", Counted)
    monkeypatch.setattr(metrics, "_jvm", None)
    refs, cands = _corpus(SETS[:20])
    first = metrics.meteor(refs, cands, backend="official-1.5")
    again = metrics.meteor(refs, cands, backend="official-1.5")
    assert first == again and len(started) == 1
    # a call that fails part-way (here: the Java process gone) is not retried on a broken process
    started[0].meteor_p.kill()
    started[0].meteor_p.wait()
    with pytest.raises((OSError, ValueError)):
        metrics.meteor(refs, cands, backend="official-1.5")
    assert metrics.meteor(refs, cands, backend="official-1.5") == first and len(started) == 2
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its own process, the same score
        ok = False
        try:
            ok = metrics.meteor(refs, cands, backend="official-1.5") == first and len(started) == 3
        finally:
            os.write(write, b"1" if ok else b"0")
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
    assert metrics.meteor(refs, cands, backend="official-1.5") == first and len(started) == 2
    assert started[1].meteor_p.poll() is None  # the parent's Java process outlived the child
