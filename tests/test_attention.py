"""The soft-attention decoder: attention is a distribution, beams carry it, maps are drawn, and
it learns a spatial relation that a pooled decoder cannot see."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from captioner import Captioner
from captioner.cli import main
from captioner.data import load_coco
from captioner.decoding import beam_search
from captioner.models import AttentionDecoder
from captioner.synthetic import make_relation_split, relation_is_right
from captioner.training import Trainer, TrainOptions
from captioner.viz import attention_map_size


def _model(**kw):
    torch.manual_seed(0)
    return AttentionDecoder(vocab_size=30, feature_dim=16, embed_size=8, hidden_size=12, attention_size=10, **kw)


def test_attention_weights_are_a_distribution_at_every_step():
    m = _model().eval()
    feats = torch.randn(3, 49, 16)
    for hyps in beam_search(m, feats, beam_size=3, n_best=3, max_len=7):
        for h in hyps:
            assert h.attention.shape == (len(h.tokens), 49)
            assert (h.attention >= 0).all()
            assert np.allclose(h.attention.sum(1), np.ones(len(h.tokens)), atol=1e-5)


def test_beam_attention_follows_the_beam_it_belongs_to():
    """Each hypothesis' attention equals the attention of re-running its own words step by step."""
    m = _model().eval()
    feats = torch.randn(2, 49, 16)
    for b, hyps in enumerate(beam_search(m, feats, beam_size=4, n_best=4, max_len=6)):
        for h in hyps:
            state, tokens = m.init_state(feats[b : b + 1]), torch.tensor([1])
            for t, w in enumerate(h.tokens):
                _, state = m.step(tokens, state)
                assert np.allclose(state.alpha[0].detach().numpy(), h.attention[t], atol=1e-6)
                tokens = torch.tensor([w])


def test_teacher_forced_loss_matches_stepwise_and_includes_the_penalty():
    m = _model(alpha_c=0.0).eval()
    feats = torch.randn(3, 49, 16)
    captions = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 2, 0, 0], [1, 4, 9, 2, 0]])
    lengths = torch.tensor([5, 3, 4])
    loss = m(feats, captions, lengths).mean()
    state, nll, n = m.init_state(feats), 0.0, 0
    for t in range(4):
        logp, state = m.step(captions[:, t], state)
        for b in range(3):
            if t + 1 < lengths[b]:
                nll -= logp[b, captions[b, t + 1]].item()
                n += 1
    assert loss.item() == pytest.approx(nll / n, abs=1e-5)
    m.alpha_c = 1.0
    assert m(feats, captions, lengths).mean().item() > loss.item()  # the doubly stochastic penalty is added


def test_batched_beam_equals_alone_for_attention():
    m = _model().eval()
    feats = torch.randn(4, 49, 16) * 2
    batched = beam_search(m, feats, beam_size=3, n_best=2, max_len=6)
    for i in range(4):
        alone = beam_search(m, feats[i : i + 1], beam_size=3, n_best=2, max_len=6)[0]
        assert [h.tokens for h in batched[i]] == [h.tokens for h in alone]
        assert all(np.allclose(x.attention, y.attention, atol=1e-5) for x, y in zip(batched[i], alone))


@pytest.fixture(scope="module")
def relations(tmp_path_factory):
    out = tmp_path_factory.mktemp("relations")
    rng = random.Random(0)
    train = make_relation_split(out, "train", 200, rng, start_id=1)
    test = make_relation_split(out, "test", 40, rng, start_id=10_000)
    return load_coco(train, out / "train"), load_coco(test, out / "test"), out


def _relation_accuracy(model, corpus) -> float:
    captions = model.caption(corpus.paths, beam_size=3)
    right = 0
    for path, caption in zip(corpus.paths, captions):
        left, rest = path.name.split("__left_of__")
        right += relation_is_right(caption, left.replace("_", " "), rest.rsplit("_", 1)[0].replace("_", " "))
    return right / len(captions)


@pytest.fixture(scope="module")
def relation_models(relations):
    train, _, out = relations
    models = {}
    for decoder in ("lstm", "attention"):
        opts = TrainOptions(
            decoder=decoder,
            epochs=10,
            batch_size=32,
            hidden_size=128,
            embed_size=64,
            attention_size=128,
            min_word_count=1,
            lr=2e-3,
            dropout=0.2,
            lr_schedule="constant",
        )
        trainer = Trainer(train, None, out / decoder, opts, device="cpu")
        models[decoder] = Captioner.load(trainer.fit(), device="cpu")  # no val set: best.pt is the last epoch
    return models


def test_attention_gets_left_and_right_that_pooled_features_cannot(relations, relation_models):
    _, test, _ = relations
    pooled = _relation_accuracy(relation_models["lstm"], test)
    attended = _relation_accuracy(relation_models["attention"], test)
    assert attended >= 0.8 and attended - pooled >= 0.25, (attended, pooled)


def test_attention_map_file(relations, relation_models, tmp_path, capsys):
    _, test, out = relations
    model = relation_models["attention"]
    model.save(tmp_path / "att.pt")
    one = test.paths[0]
    rc = main(["caption", str(one), "--model", str(tmp_path / "att.pt"), "--attention-map", str(tmp_path / "maps")])
    caption = capsys.readouterr().out.strip().split("\t")[1]
    assert rc == 0
    with Image.open(tmp_path / "maps" / f"{one.stem}.png") as im:
        assert im.size == attention_map_size(len(caption.split()))  # the image + one panel per word
    text, weights = model.caption(one, return_attention=True)
    assert text == caption and weights.shape == (len(caption.split()), 7, 7)
    assert np.allclose(weights.sum((1, 2)), np.ones(len(caption.split())), atol=1e-5)


def test_attention_map_needs_an_attention_model(trained_run, shapes, tmp_path, capsys):
    one = sorted(shapes["test_images"].glob("*.png"))[0]
    rc = main(["caption", str(one), "--model", str(trained_run / "best.pt"), "--attention-map", str(tmp_path)])
    assert rc == 2 and "--decoder attention" in capsys.readouterr().err


def test_attention_map_size_is_as_documented():
    assert attention_map_size(4) == (5 * 228 + 4, 252 + 4)  # 5 panels in one row
    assert attention_map_size(7) == (5 * 228 + 4, 2 * 252 + 4)  # 8 panels: two rows of 5
