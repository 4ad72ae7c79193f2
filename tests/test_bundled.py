"""The bundled Flickr8k model: small, loads with no network, describes the example photos."""

import socket

import pytest
import torch

from captioner import Captioner
from captioner.cli import main
from captioner.encoders import build_encoder
from captioner.images import list_images
from captioner.paths import BUNDLED_MODEL

from .conftest import REPO

EXAMPLES = list_images(REPO / "assets" / "examples")


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to reach the network fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.delenv("CAPTIONER_MODEL", raising=False)


def test_bundled_file_is_small_fp16_and_holds_no_copy_of_the_packaged_encoder():
    assert BUNDLED_MODEL.is_file() and BUNDLED_MODEL.stat().st_size <= 40 * 2**20
    ckpt = torch.load(BUNDLED_MODEL, map_location="cpu", weights_only=True)
    assert "optimizer" not in ckpt
    assert all(t.dtype == torch.float16 for t in ckpt["decoder"].values() if t.is_floating_point())
    assert {"beam_size", "length_alpha", "no_repeat_ngram"} <= set(ckpt["config"]["decoding"])
    # of the encoder, only the fine-tuned top blocks: the rest comes from the installed weight package
    n = ckpt["config"]["fine_tune_encoder"]
    package = build_encoder(ckpt["config"]["encoder"])
    top = package.top_state_dict(n)
    assert n > 0 and set(ckpt["encoder"]) == set(top) and len(top) < len(package.state_dict()) / 4
    assert all(t.dtype == torch.float16 for t in ckpt["encoder"].values() if t.is_floating_point())
    assert any(not torch.equal(v.float(), top[k].float()) for k, v in ckpt["encoder"].items())  # really trained


def test_bundled_model_loads_offline_and_describes_every_example(offline):
    model = Captioner.load(device="cpu")
    assert len(EXAMPLES) >= 5
    captions = dict(zip((p.name for p in EXAMPLES), model.caption(EXAMPLES)))
    for name, caption in captions.items():
        words = caption.split()
        known = model.naming.vocab.stoi  # the decoder's words and those it may borrow
        assert len(words) >= 3 and all(w.isalpha() and w in known for w in words), (name, caption)
    assert "dog" in captions["dog.png"].split(), captions


def test_bundled_model_names_the_unfamiliar_examples_or_says_it_cannot(offline):
    """The cat, the coffee and the rocket are outside Flickr8k's world: the caption names them
    or, at the least, the tags do and the confidence is low; the dog is named with no help."""
    model = Captioner.load(device="cpu")
    assert model.guidance.calibrated and model.decoding["suppress_unseen"] > 0
    names = {"cat.jpg": "cat", "coffee.jpg": "coffee", "rocket.jpg": "rocket", "dog.png": "dog"}
    paths = [p for p in EXAMPLES if p.name in names]
    for path, (caption, tags, confidence) in zip(paths, model.caption(paths, return_tags=True, return_confidence=True)):
        word = names[path.name]
        named = word in caption.split()
        tagged = any(word in t.label.lower() or word in _class_words(t.label) for t in tags[:3])
        if path.name == "dog.png":
            assert named and confidence > 0.05, (caption, confidence)
        else:
            assert named or (tagged and confidence < 0.2), (path.name, caption, tags[:3], confidence)
            assert not any(w in caption.split() for w in ("man", "woman", "boy", "girl", "people")), caption


def _class_words(label: str) -> list[str]:
    from captioner.concepts import imagenet_classes

    return [w for c in imagenet_classes() if c["label"] == label for w in c["words"]]


def test_caption_command_uses_the_bundled_model_by_default(offline, capsys):
    dog = REPO / "assets" / "examples" / "dog.png"
    assert main(["caption", str(dog)]) == 0
    assert "dog" in capsys.readouterr().out.split("\t")[1].split()


def test_an_ensemble_keeps_the_first_models_tags_and_guidance_but_claims_no_confidence(offline):
    single = Captioner.load(device="cpu")
    both = Captioner.load([None, None], device="cpu")  # the bundled model twice: the same captions
    cat = REPO / "assets" / "examples" / "cat.jpg"
    text, tags, conf = both.caption(cat, return_tags=True, return_confidence=True)
    assert (text, tags) == single.caption(cat, return_tags=True) and conf is None
    # the coffee needs the constrained second pass, which an ensemble runs over its members too
    coffee = REPO / "assets" / "examples" / "coffee.jpg"
    assert both.caption(coffee) == single.caption(coffee) and "coffee" in single.caption(coffee).split()
    assert both.guidance.has_person and not both.guidance.calibrated


def test_tags_come_from_the_encoders_classifier_alone_and_match_the_captions_tags():
    from captioner.errors import UsageError

    model = Captioner.load(device="cpu")
    cat = REPO / "assets" / "examples" / "cat.jpg"
    one = model.tags(cat, k=3)
    assert len(one) == 3 and one[0].label == "Egyptian cat" and one[0].p >= one[1].p >= one[2].p
    both = model.tags([cat, EXAMPLES[0]], k=2)
    assert len(both) == 2 and both[0] == one[:2]
    _, tags = model.caption(cat, return_tags=True)
    assert [t.label for t in tags[:3]] == [t.label for t in one]
    with pytest.raises(UsageError, match="k must be a whole number"):
        model.tags(cat, k=0)
