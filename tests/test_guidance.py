"""Tags, the tag-guided word prior and the confidence (guidance.py, calibration.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from captioner.calibration import (
    caption_quality,
    fit_centroids,
    fit_confidence,
    fit_person,
    person_labels,
    reliability,
)
from captioner.concepts import imagenet_classes
from captioner.guidance import ACCEPTABLE, Guidance, top_tags
from captioner.vocab import Vocabulary

WORDS = ["a", "an", "cat", "dog", "man", "woman", "car", "bus", "sits", "espresso", "coffee", "on", "grass"]
TABBY, ESPRESSO, SCHOOL_BUS, GOLDEN_RETRIEVER = 281, 967, 779, 207


def vocab() -> Vocabulary:
    return Vocabulary(WORDS)


RETRIEVER = next(i for i, c in enumerate(imagenet_classes()) if c["label"] == "golden retriever")


def one_hot(*classes: int, p: float = 1.0) -> torch.Tensor:
    probs = torch.zeros(len(classes), 1000)
    for i, c in enumerate(classes):
        probs[i, c] = p
    return probs


def fitted_state(dim: int = 8, n: int = 400) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """A guidance state over made-up pooled features: people have a positive first feature; the
    training photos cluster along the other features."""
    g = torch.Generator().manual_seed(0)
    pooled = torch.randn(n, dim, generator=g) + torch.tensor([0.0] + [3.0] * (dim - 1))
    labels = (pooled[:, 0] > 0).float()
    state = fit_person(pooled, labels) | {"centroids": fit_centroids(pooled, k=4)}
    g_ = Guidance(vocab(), state)
    state["val_typicality"] = torch.from_numpy(g_.typicality(pooled[:100])).sort().values
    return state, pooled, labels


def test_top_tags_are_labels_with_probabilities() -> None:
    probs = torch.full((2, 1000), 0.0)
    probs[0, TABBY], probs[0, ESPRESSO], probs[1, SCHOOL_BUS] = 0.7, 0.2, 0.9
    tags = top_tags(probs, k=2)
    assert [(t.label, t.p) for t in tags[0]] == [("tabby", 0.7), ("espresso", 0.2)]
    assert tags[1][0].label == imagenet_classes()[SCHOOL_BUS]["label"] == "school bus"
    assert tags[0][0].to_dict() == {"label": "tabby", "p": 0.7}


def test_classes_boost_their_caption_words() -> None:
    v = vocab()
    g = Guidance(v)
    probs = one_hot(TABBY, ESPRESSO, GOLDEN_RETRIEVER, p=0.8)
    bias = g.bias(torch.zeros(3, 8), probs, boost=2.0, suppress=0.0)  # (3, V)
    assert bias[0, v.stoi["cat"]] == torch.tensor(1.6)  # a tabby is a cat
    assert bias[1, v.stoi["espresso"]] == torch.tensor(1.6)  # its own name first, when the vocabulary has it
    assert bias[1, v.stoi["coffee"]] == 0.0
    assert bias[2, v.stoi["dog"]] == torch.tensor(1.6)  # a golden retriever is a dog
    assert bias[0, v.stoi["dog"]] == 0.0 and (bias[:, v.stoi["man"]] == 0).all()


def test_unseen_kinds_are_suppressed_on_unfamiliar_photos_only() -> None:
    v = vocab()
    state, pooled, _ = fitted_state()
    g = Guidance(v, state)
    familiar = pooled[:1]  # like the training photos
    odd = torch.zeros(1, 8)
    odd[0, 0] = -5.0  # no person, and nothing like the training photos
    probs = one_hot(ESPRESSO, ESPRESSO, p=0.97)
    probs[0, RETRIEVER] = 0.03  # a little evidence of a dog
    bias = g.bias(torch.cat([familiar, odd]), probs, boost=0.0, suppress=10.0)
    assert g.familiarity(familiar).item() > 0.5 and g.familiarity(odd).item() == 0.0
    # familiar photo: the decoder is trusted about animals, unless the classifier sees none at all
    assert bias[0, v.stoi["dog"]] == 0.0 and bias[0, v.stoi["bus"]] == -10.0
    assert bias[1, v.stoi["dog"]] == -10.0 and bias[1, v.stoi["bus"]] == -10.0
    assert bias[1, v.stoi["man"]] == -10.0 and bias[1, v.stoi["woman"]] == -10.0
    assert bias[1, v.stoi["coffee"]] == 0.0 and bias[1, v.stoi["on"]] == 0.0


def test_person_classifier_learns_from_labels() -> None:
    state, pooled, labels = fitted_state()
    g = Guidance(vocab(), state)
    p = torch.from_numpy(g.p_person(pooled))
    assert ((p > 0.5).float() == labels).float().mean() > 0.95


def test_person_labels_are_the_majority_of_references() -> None:
    refs = [["a man runs", "a person running", "a dog"], ["a dog", "a brown dog", "a woman and a dog"]]
    assert person_labels(refs).tolist() == [1.0, 0.0]


def test_subject_is_forced_only_on_unfamiliar_photos_with_a_sure_tag() -> None:
    v = vocab()
    state, pooled, _ = fitted_state()
    g = Guidance(v, state)
    odd = torch.zeros(2, 8)
    probs = torch.cat([one_hot(ESPRESSO, p=0.9), one_hot(ESPRESSO, p=0.2)])
    prefix = g.subject(odd, probs, threshold=0.5)
    assert prefix[0].tolist() == [v.stoi["an"], v.stoi["espresso"]]
    assert prefix[1].tolist() == [-1, -1]  # not sure enough
    assert g.subject(pooled[:2], one_hot(TABBY, TABBY), threshold=0.5) is None  # familiar photos
    assert Guidance(v).subject(odd, probs, threshold=0.5) is None  # no typicality fitted


def test_confidence_learns_what_predicts_quality() -> None:
    """A feature that predicts acceptable captions gets a confidence that tracks it: learning,
    tested by learning, then calibrated on held-out data."""
    g = torch.Generator().manual_seed(1)
    n = 2000
    signal = torch.randn(n, generator=g)
    quality = torch.where(torch.rand(n, generator=g) < torch.sigmoid(2 * signal), 0.9, 0.1)  # (N,)
    x = torch.stack([signal, torch.randn(n, generator=g)], 1)  # a signal and a distraction
    state = fit_confidence(x[:1000], quality[:1000])
    conf = torch.sigmoid(x[1000:] @ state["confidence_weight"] + state["confidence_bias"])
    bins = reliability(conf, quality[1000:], bins=5)
    assert bins[0]["acceptable"] < 0.25 and bins[-1]["acceptable"] > 0.75
    for b in bins:  # calibrated: each bin's mean confidence near its share of acceptable captions
        assert abs(b["confidence"] - b["acceptable"]) < 0.1
    assert abs(state["confidence_weight"][1]) < abs(state["confidence_weight"][0]) / 5


def test_caption_quality_is_per_caption_cider() -> None:
    refs = {1: ["a cat sits on a mat", "a cat on a mat"], 2: ["a dog runs in the grass", "a dog running"]}
    q = caption_quality(refs, {1: "a cat sits on a mat", 2: "a man in a blue shirt"})
    assert q[1] > ACCEPTABLE > q[2]


@pytest.mark.slow
def test_calibrated_model_saves_loads_and_prints_confidence(trained_run, shapes, tmp_path, capsys) -> None:
    from captioner import Captioner
    from captioner.calibration import calibrate
    from captioner.cli import main
    from captioner.data import load_coco

    model = Captioner.load(trained_run / "best.pt", device="cpu")  # its own copy: calibrating changes it
    train = load_coco(shapes["train_json"], shapes["train_images"])
    val = load_coco(shapes["test_json"], shapes["test_images"])
    report = calibrate(model, train, val, model.feature_cache(tmp_path / "cache"))
    assert len(report["confidence"]) == len(val) and all(0.0 <= c <= 1.0 for c in report["confidence"])
    # the confidence was fitted on the captions the calibrated model writes (typicality included)
    captions = dict(enumerate(model.caption([str(p) for p in val.paths])))
    quality = caption_quality(dict(enumerate(val.captions)), captions)
    assert [quality[i] for i in range(len(val))] == pytest.approx(report["quality"])
    assert {"val_typicality", "object_shares"} <= set(model.guidance.state)
    assert model.guidance.novel_kinds() >= {"zebra", "pizza"}  # the shapes captions name no COCO object
    path = tmp_path / "calibrated.pt"
    model.save(path)
    loaded = Captioner.load(path, device="cpu")
    assert loaded.guidance.calibrated and set(loaded.guidance.state) == set(model.guidance.state)
    for k, v in model.guidance.state.items():
        assert torch.equal(loaded.guidance.state[k], v), k
    image = str(val.paths[0])
    text, tags, conf = loaded.caption(image, return_tags=True, return_confidence=True)
    assert 0.0 <= conf <= 1.0 and len(tags) == 5 and tags[0].p >= tags[-1].p
    assert model.caption(image, return_confidence=True)[1] == pytest.approx(conf)
    assert Captioner.load(trained_run / "best.pt", device="cpu").caption(image, return_confidence=True)[1] is None

    # a model sure its captions are bad (the same state, its bias far down) gets them marked
    model.guidance.state["confidence_bias"] = model.guidance.state["confidence_bias"] - 50.0
    low = tmp_path / "low.pt"
    model.save(low)
    capsys.readouterr()
    args = ["caption", image, "--model", str(low), "--json", "--tags", "2"]
    assert main(args + ["--min-confidence", "0.5", "--omit-low-confidence"]) == 0
    entry = json.loads(capsys.readouterr().out)
    assert entry["caption"] is None and entry["low_confidence"] is True
    assert entry["confidence"] < 0.01 and entry["nbest"] == []  # an omitted caption is not in the n-best either
    assert [t["label"] for t in entry["tags"]] == [t.label for t in tags[:2]]
    assert main(["caption", image, "--model", str(low), "--min-confidence", "0.5"]) == 0
    line = capsys.readouterr().out.strip().split("\t")
    assert line[1] == text and line[2].startswith("(low confidence: 0.0")
    if conf >= 0.5:  # the calibrated model's own caption is not marked
        assert main(["caption", image, "--model", str(path), "--min-confidence", "0.5"]) == 0
        assert capsys.readouterr().out.strip().split("\t") == [image, text]


def test_the_command_lines_default_mark_is_the_librarys() -> None:
    from captioner.cli import build_parser
    from captioner.settings import LOW_CONFIDENCE

    assert build_parser().parse_args(["caption", "x.jpg"]).min_confidence == LOW_CONFIDENCE


# ---- exact figures of the word prior, the subject and the confidence, on a hand-made state ----------
# Pooled features are 2-d; the centroids and the val typicality are chosen so that the three photos
# are familiar (typicality 1.0: familiarity 1), half familiar (0.3: more typical than 1 of 40 val
# photos, a share of 0.025 = half of NOVELTY_ALPHA) and unfamiliar (0.0: familiarity 0).
FAMILIAR, HALF, STRANGE = [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]
P_PERSON = 0.4
WORDS2 = WORDS + ["animal", "tabby", "zebra", "umbrella"]


def hand_made(person: bool = True, typicality: bool = True, confidence: bool = False) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    if person:  # the same P(person) = 0.4 for every photo
        state |= {"person_weight": torch.zeros(2), "person_bias": torch.logit(torch.tensor(P_PERSON))}
    if typicality:
        state |= {"centroids": torch.tensor([[1.0, 0.0], [0.0, 0.3]])}
        state |= {"val_typicality": torch.tensor([0.2] + [0.5] * 39)}
    if confidence:  # confidence = sigmoid(score + 0.5) before the familiarity
        state |= {"confidence_weight": torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0])}
        state |= {"confidence_bias": torch.tensor(0.5)}
    return state


def test_familiarity_is_the_share_of_val_photos_beaten_over_the_novelty_share() -> None:
    g = Guidance(Vocabulary(WORDS2), hand_made())
    pooled = torch.tensor([FAMILIAR, HALF, STRANGE, [0.0, 0.0]])  # (the last: no direction at all)
    assert g.typicality(pooled).tolist() == pytest.approx([1.0, 0.3, 0.0, 0.0])  # the nearest centroid
    assert g.typical_share(pooled).tolist() == pytest.approx([1.0, 0.025, 0.0, 0.0])
    assert g.familiarity(pooled).tolist() == pytest.approx([1.0, 0.5, 0.0, 0.0])
    # a photo as typical as 39 of the val photos beats only the one below them (not 40 of 40)
    tie = Guidance(Vocabulary(WORDS2), hand_made() | {"centroids": torch.tensor([[0.5, 0.0]])})
    assert tie.typical_share(torch.tensor([FAMILIAR])).tolist() == pytest.approx([0.025])
    assert Guidance(Vocabulary(WORDS2), hand_made(typicality=False)).typical_share(pooled) is None


def test_the_word_prior_in_numbers() -> None:
    """boost x evidence, minus `suppress` x how far below SEEN an animal or vehicle kind is (on the
    unfamiliar share of a photo; below SEEN_FAMILIAR on the familiar share) and how far P(person)
    x familiarity is below SEEN_PERSON; generic words ("animal") and other words untouched."""
    v = Vocabulary(WORDS2)
    g = Guidance(v, hand_made())
    pooled = torch.tensor([FAMILIAR, HALF, STRANGE])
    probs = one_hot(TABBY, TABBY, TABBY, p=0.25)  # a little evidence of a cat on each
    bias = g.bias(pooled, probs, boost=2.0, suppress=10.0)
    col = {w: bias[:, v.stoi[w]].tolist() for w in ("cat", "dog", "bus", "man", "woman", "animal", "on", "tabby")}
    assert col["cat"] == pytest.approx(
        [0.5, 0.5 - 2.5, 0.5 - 5.0]
    )  # boost 2 x 0.25; 1 - 0.25/0.5 on the unfamiliar share
    assert col["tabby"] == pytest.approx([0.5, 0.5, 0.5])  # the class's own word: boosted, no kind of its own
    assert col["dog"] == col["bus"] == pytest.approx([-10.0, -10.0, -10.0])  # no evidence at all: unseen everywhere
    assert col["man"] == col["woman"] == pytest.approx([-5.0, -7.5, -10.0])  # 1 - 0.4 x familiarity / 0.8
    assert col["animal"] == col["on"] == [0.0, 0.0, 0.0]
    # a kind seen at SEEN or more, a person at SEEN_PERSON or more, no penalty
    sure = Guidance(v, hand_made() | {"person_bias": torch.tensor(10.0)})
    bias = sure.bias(torch.tensor([STRANGE, FAMILIAR]), one_hot(TABBY, TABBY, p=0.5), boost=0.0, suppress=10.0)
    assert bias[:, v.stoi["cat"]].tolist() == [0.0, 0.0] and bias[1, v.stoi["man"]] == 0.0
    assert bias[0, v.stoi["man"]] == pytest.approx(-10.0)  # ... trusted only as far as the photo is familiar
    # on a familiar photo, an animal under SEEN_FAMILIAR counts as unseen in part: 1 - 0.005 / 0.01
    bias = sure.bias(torch.tensor([FAMILIAR]), one_hot(TABBY, p=0.005), boost=0.0, suppress=10.0)
    assert bias[0, v.stoi["cat"]] == pytest.approx(-5.0)
    assert bias.dtype == np.float32 and bias.shape == (1, len(v))
    # no suppression: the boost alone; neither: nothing
    assert g.bias(pooled, probs, boost=2.0, suppress=0.0)[:, v.stoi["man"]].tolist() == [0.0, 0.0, 0.0]
    assert not g.bias(pooled, probs, boost=0.0, suppress=0.0).any()


def test_the_word_prior_without_typicality_or_person_classifier() -> None:
    """No typicality fitted: every photo counts as unfamiliar for animals, and P(person) is trusted
    as it is; no person classifier: people are left alone."""
    v = Vocabulary(WORDS2)
    probs = one_hot(TABBY, p=0.25)
    bias = Guidance(v, hand_made(typicality=False)).bias(torch.tensor([FAMILIAR]), probs, boost=0.0, suppress=10.0)
    assert bias[0, v.stoi["cat"]] == pytest.approx(-5.0) and bias[0, v.stoi["man"]] == pytest.approx(-5.0)
    bias = Guidance(v).bias(torch.tensor([FAMILIAR]), probs, boost=0.0, suppress=10.0)
    assert bias[0, v.stoi["man"]] == 0.0 and bias[0, v.stoi["dog"]] == -10.0


def test_evidence_is_capped_at_certainty() -> None:
    v = Vocabulary(WORDS2)
    probs = one_hot(TABBY, p=0.7)
    probs[0, 282] = 0.6  # tiger cat: another cat
    assert Guidance(v).evidence(probs)[0, v.stoi["cat"]] == 1.0


def test_the_forced_subject_in_detail() -> None:
    v = Vocabulary(WORDS2)
    g = Guidance(v, hand_made())
    pooled = torch.tensor([STRANGE, HALF, FAMILIAR])
    probs = one_hot(TABBY, ESPRESSO, TABBY, p=0.5)
    prefix = g.subject(pooled, probs, threshold=0.5)  # exactly as sure as asked: enough
    assert prefix.dtype == np.int64
    assert prefix.tolist() == [[v.stoi["a"], v.stoi["cat"]], [v.stoi["an"], v.stoi["espresso"]], [-1, -1]]
    assert g.subject(pooled, probs, threshold=0.0) is None  # 0: off
    assert g.subject(pooled, probs, threshold=0.6) is None  # no photo sure enough
    assert Guidance(Vocabulary(["cat", "dog"]), hand_made()).subject(pooled, probs, threshold=0.5) is None


def test_novel_kinds_come_from_the_recorded_shares() -> None:
    from captioner.objects import COCO_OBJECTS

    v = Vocabulary(WORDS2)
    assert Guidance(v).novel_kinds() is None and Guidance(v, hand_made()).novel_kinds() is None
    shares = torch.tensor([0.5 if k in ("dog", "person") else 0.0 for k in COCO_OBJECTS])
    novel = Guidance(v, {"object_shares": shares}).novel_kinds()
    assert "zebra" in novel and "dog" not in novel and "person" not in novel and len(novel) == len(COCO_OBJECTS) - 2
    assert Guidance(v, {"object_shares": shares[:-1]}).novel_kinds() is None  # recorded for other kinds


def test_confidence_features_and_confidence_in_numbers() -> None:
    v = Vocabulary(WORDS2)
    g = Guidance(v, hand_made(confidence=True))
    assert g.has_person and g.calibrated
    pooled = torch.tensor([FAMILIAR, HALF])
    probs = one_hot(TABBY, ESPRESSO, p=0.9)
    captions = [[("a man sits on grass", -2.0, 5), ("a cat sits", -1.0, 3)], [("an espresso", -0.5, 0)]]
    feats = g.confidence_features(pooled, probs, captions)
    # score, score per token (+1: the end token), top class p, P(person), names a person, agrees with P(person)
    close = np.testing.assert_allclose
    close(feats[0], [[-2.0, -2.0 / 6, 0.9, 0.4, 1.0, 0.4], [-1.0, -0.25, 0.9, 0.4, 0.0, 0.6]], rtol=1e-6)
    close(feats[1], [[-0.5, -0.5, 0.9, 0.4, 0.0, 0.6]], rtol=1e-6)
    conf = g.confidence(pooled, probs, captions)
    sig = torch.sigmoid(torch.tensor([-1.5, -0.5, 0.0])).tolist()
    assert conf[0] == pytest.approx(sig[:2]) and conf[1] == pytest.approx([sig[2] * 0.5])  # x familiarity
    # no person classifier: P(person) 0.5, so agreeing or not says nothing
    plain = Guidance(v).confidence_features(pooled[:1], probs[:1], [[("a man", -1.0, 2)], []][:1])
    close(plain[0], [[-1.0, -1.0 / 3, 0.9, 0.5, 1.0, 0.5]], rtol=1e-6)
    assert Guidance(v).confidence_features(pooled[:1], probs[:1], [[]])[0].shape == (0, 6)
    assert Guidance(v, hand_made()).confidence(pooled, probs, captions) is None  # not calibrated
    assert not Guidance(v).has_person and Guidance(v).p_person(pooled) is None


def test_probabilities_saturate_without_warnings() -> None:
    import warnings

    g = Guidance(Vocabulary(WORDS2), {"person_weight": torch.tensor([100.0, 0.0]), "person_bias": torch.tensor(0.0)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert g.p_person(torch.tensor([[-10.0, 0.0], [10.0, 0.0]])).tolist() == [0.0, 1.0]


def test_top_tags_round_to_four_places_and_keep_the_documented_number() -> None:
    from captioner.settings import TAGS_KEPT

    probs = torch.softmax(torch.randn(1, 1000, generator=torch.Generator().manual_seed(0)), -1)
    probs[0, TABBY] = 0.123456
    tags = top_tags(probs)[0]
    assert len(tags) == TAGS_KEPT and tags[0] == top_tags(probs, k=1)[0][0]
    assert tags[0].label == "tabby" and tags[0].p == 0.1235


def test_guidance_computes_in_float32_whatever_it_is_given() -> None:
    """The torch path hands it float32 tensors, the ONNX path numpy arrays: the same float32 results
    from both (README: the same best caption from either on 100 % of the val photos)."""
    v = Vocabulary(WORDS2)
    g = Guidance(v, hand_made(confidence=True))
    pooled, probs = torch.tensor([HALF, [0.3, 0.9]]), one_hot(TABBY, ESPRESSO, p=0.6)
    captions = [[("a man", -1.0, 2)], [("a cat", -2.0, 2)]]
    for p, q in ((pooled, probs), (pooled.double().numpy(), probs.double().numpy())):
        assert g.evidence(q).dtype == np.float32 and g.p_person(p).dtype == np.float32
        assert g.typical_share(p).dtype == np.float32 and g.familiarity(p).dtype == np.float32
        assert g.confidence_features(p, q, captions)[0].dtype == np.float32
    np.testing.assert_array_equal(g.bias(pooled, probs, 1.0, 10.0), g.bias(pooled.double().numpy(), probs, 1.0, 10.0))


def test_typicality_is_a_cosine_whatever_the_features_length() -> None:
    g = Guidance(Vocabulary(WORDS2), hand_made())
    pooled = torch.tensor([[2.0, 0.0], [0.5, 0.0], [0.0, 4.0], [0.0, 0.25]])
    assert g.typicality(pooled).tolist() == pytest.approx([1.0, 1.0, 0.3, 0.3])


def test_no_subject_is_forced_without_both_articles() -> None:
    """A vocabulary that lacks "a" or "an" cannot start a caption "a/an WORD" (not English)."""
    pooled, probs = torch.tensor([STRANGE]), one_hot(TABBY, p=0.9)
    for words in (["an", "cat", "espresso"], ["a", "cat", "espresso"]):
        assert Guidance(Vocabulary(words), hand_made()).subject(pooled, probs, threshold=0.5) is None, words
    assert Guidance(Vocabulary(["a", "an", "cat"]), hand_made()).subject(pooled, probs, threshold=0.5) is not None
