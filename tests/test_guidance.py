"""Tags, the tag-guided word prior and the confidence (guidance.py, calibration.py)."""

from __future__ import annotations

import json

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
