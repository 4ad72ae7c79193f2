"""Ensembles at decode time: the CLI, the API and evaluation over several checkpoints."""

import json

import pytest

import captioner.ensemble as E
from captioner.api import Captioner
from captioner.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from captioner.cli import main
from captioner.data import load_coco
from captioner.ensemble import Ensemble
from captioner.errors import UsageError
from captioner.training import Trainer, TrainOptions

pytestmark = pytest.mark.slow  # trains two models first


@pytest.fixture(scope="module")
def two_models(shapes, tmp_path_factory):
    """Two small models of one vocabulary: Show-and-Tell on Lite0 (224 px, pooled) and attention
    on Lite1 (240 px, grid)."""
    train = load_coco(shapes["train_json"], shapes["train_images"])
    out = tmp_path_factory.mktemp("ensemble")
    common = dict(epochs=4, batch_size=32, hidden_size=64, embed_size=32, min_word_count=1, lr=3e-3, num_workers=0)
    runs = {
        "a": TrainOptions(decoder="lstm", **common),
        "b": TrainOptions(decoder="attention", encoder="efficientnet_lite1", attention_size=32, **common),
    }
    for name, opts in runs.items():
        Trainer(train, None, out / name, opts, device="cpu").fit()
    return out / "a" / "best.pt", out / "b" / "best.pt"


def _photos(shapes, n=4):
    return sorted(shapes["test_images"].iterdir())[:n]


def test_an_ensemble_of_a_model_with_itself_captions_as_the_model_in_one_encoder_pass(two_models, shapes, monkeypatch):
    a, _ = two_models
    alone = Captioner.load(a, device="cpu")
    calls = []
    real = E.encode_pixels
    monkeypatch.setattr(E, "encode_pixels", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    pair = Captioner.load([a, a], device="cpu")
    assert isinstance(pair.model, Ensemble) and pair.model.groups == [0, 0]
    photos = _photos(shapes)
    assert pair.caption(photos) == alone.caption(photos)
    assert len(calls) == 1  # one batch, one encoder pass for both members
    for ens, one in zip(pair.caption_nbest(photos, n=3), alone.caption_nbest(photos, n=3)):
        assert [c for c, _ in ens] == [c for c, _ in one]
        assert [s for _, s in ens] == pytest.approx([s for _, s in one], abs=1e-4)


def test_an_ensemble_of_different_encoders_and_decoders_captions_and_evaluates(two_models, shapes, tmp_path, capsys):
    a, b = two_models
    pair = Captioner.load([a, b], device="cpu")
    assert pair.model.groups == [0, 1] and [p.crop for p in pair.model.preprocesses] == [224, 240]
    assert pair.decoder.attends_over is None  # 7x7 and 8x8 grids: no one attention map
    text, weights = Captioner.load([b, b], device="cpu").caption(_photos(shapes, 1)[0], return_attention=True)
    assert weights.shape == (len(text.split()), 8, 8)  # the members' mean attention over Lite1's 8x8 grid
    photos = [*_photos(shapes, 3), tmp_path / "missing.jpg"]
    got = pair.caption(photos, errors="skip")
    assert got[-1] is None and all(isinstance(c, str) and c for c in got[:-1])
    # the CLI: caption and evaluate with --model twice
    args = ["--model", str(a), "--model", str(b), "--device", "cpu"]
    assert main(["caption", *map(str, photos[:2]), *args, "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["caption"] for r in lines] == got[:2]
    evaluate = ["evaluate", "--annotations", str(shapes["test_json"]), "--images", str(shapes["test_images"])]
    cache = ["--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main([*evaluate, *args, *cache]) == 0
    cached = json.loads(capsys.readouterr().out)
    assert main([*evaluate, *args, "--no-cache", "--quiet"]) == 0
    direct = json.loads(capsys.readouterr().out)
    assert cached["model"] == f"{a} + {b}"
    assert cached["CIDEr-D"] == pytest.approx(direct["CIDEr-D"], abs=0.05)  # fp16 cache vs fp32 features
    assert len(list((tmp_path / "cache" / "features").iterdir())) == 2  # one cache per encoder
    alone = []
    for m in (a, b):
        assert main([*evaluate, "--model", str(m), "--device", "cpu", *cache]) == 0
        alone.append(json.loads(capsys.readouterr().out)["CIDEr-D"])
    assert cached["CIDEr-D"] > 0.5 * max(alone)  # a sane ensemble, not noise


def test_an_ensemble_needs_one_vocabulary(two_models, tmp_path):
    a, b = two_models
    ck = load_checkpoint(b)
    ck["vocab"]["words"] = list(reversed(ck["vocab"]["words"]))
    for k in ("format", "format_version"):
        ck.pop(k, None)
    save_checkpoint(tmp_path / "other.pt", ck)
    with pytest.raises(CheckpointError, match=r"other\.pt: its vocabulary differs from that of .*one vocabulary"):
        Captioner.load([a, tmp_path / "other.pt"], device="cpu")
    rc = main(["caption", str(tmp_path / "x.jpg"), "--model", str(a), "--model", str(tmp_path / "other.pt")])
    assert rc != 0
    with pytest.raises(UsageError, match="not one checkpoint"):
        Captioner.load([a, b], device="cpu").save(tmp_path / "ens.pt")
