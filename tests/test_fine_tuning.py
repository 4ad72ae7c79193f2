"""Fine-tuning the top of the encoder from a cached trunk, and the flip augmentation."""

import pytest
import torch
from PIL import Image

from captioner.api import Captioner
from captioner.checkpoint import load_checkpoint
from captioner.data import CaptionDataset, load_coco
from captioner.encoders import build_encoder
from captioner.errors import UsageError
from captioner.features import FeatureCache, LoadImage
from captioner.models import build_model
from captioner.training import Trainer, TrainOptions
from captioner.training.batches import Mirrored
from captioner.training.objectives import TrainStep
from captioner.vocab import Vocabulary

skdata = pytest.importorskip("skimage.data")


def _photos(encoder) -> torch.Tensor:
    pics = [skdata.chelsea(), skdata.astronaut(), skdata.coffee(), skdata.rocket()]
    return torch.stack([encoder.spec.preprocess(Image.fromarray(p)) for p in pics])  # (4, 3, S, S)


def _loss_and_grads(step: TrainStep, inputs, captions, lengths, params) -> tuple[float, list[torch.Tensor]]:
    for p in params:
        p.grad = None
    loss = step(inputs, captions, lengths).mean()
    loss.backward()
    return loss.item(), [p.grad.clone() for p in params]


def test_cached_trunk_gives_the_loss_and_gradients_of_the_full_encoder():
    torch.manual_seed(0)
    enc = build_encoder()
    config = {"decoder": "attention", "decoder_hparams": {"embed_size": 32, "hidden_size": 64, "attention_size": 32}}
    dec = build_model(config, 20, enc.feature_dim).eval()  # eval: no dropout, so both passes are the same function
    trained = enc.unfreeze_last(2) + list(dec.parameters())
    cut = enc.cut(2)
    pixels = _photos(enc)
    captions = torch.randint(4, 20, (4, 9))
    captions[:, 0] = Vocabulary.start_id
    lengths = torch.tensor([9, 9, 7, 5])
    full_loss, full = _loss_and_grads(TrainStep(enc, dec, 0), pixels, captions, lengths, trained)
    with torch.no_grad():
        trunk = enc.below(pixels, cut)  # (4, 192, 7, 7): what the cache holds
    assert trunk.shape == (4, 192, 7, 7)
    step = TrainStep(enc, dec, cut)
    loss32, g32 = _loss_and_grads(step, trunk, captions, lengths, trained)
    assert loss32 == pytest.approx(full_loss, rel=1e-6)
    for a, b in zip(g32, full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # the on-disk cache is fp16: the trunk rounded to 11 significant bits. Stated tolerance: the loss
    # within 1e-3 (relative), all gradients together within 1% of their norm, each trained tensor's
    # within 2% of its own (measured: 0.5% and 1.4%) -- or below 1e-8 where it is zero in exact
    # arithmetic (the attention score's bias: softmax ignores a shift, so only rounding noise is left)
    loss16, g16 = _loss_and_grads(step, trunk.half().float(), captions, lengths, trained)
    assert loss16 == pytest.approx(full_loss, rel=1e-3)
    for a, b in zip(g16, full):
        assert (a - b).norm() <= 0.02 * b.norm() + 1e-8
    flat16, flat = torch.cat([g.flatten() for g in g16]), torch.cat([g.flatten() for g in full])
    assert (flat16 - flat).norm() <= 0.01 * flat.norm()


def test_only_the_fine_tuned_blocks_are_saved_and_they_are_used_to_caption(shapes, tmp_path):
    train = load_coco(shapes["test_json"], shapes["test_images"])  # 24 images
    opts = TrainOptions(
        decoder="lstm",
        epochs=2,
        batch_size=24,
        hidden_size=32,
        embed_size=16,
        min_word_count=1,
        fine_tune_encoder=1,
        encoder_lr=1e-2,
        num_workers=0,
    )
    trainer = Trainer(train, None, tmp_path, opts, device="cpu")
    package = {k: v.clone() for k, v in trainer.model.encoder.state_dict().items()}
    trainer.fit()
    saved = load_checkpoint(tmp_path / "last.pt")["encoder"]
    # the head conv + bn (the last "block") alone: the frozen blocks come from the weight package
    assert {k.split(".")[1] for k in saved} == {"9", "10"} and all(k.startswith("trunk.") for k in saved)
    trained = [k for k in saved if "running" not in k and "num_batches" not in k]
    assert all(not torch.equal(saved[k], package[k]) for k in trained)
    assert all(torch.equal(saved[k], package[k]) for k in saved if "running" in k)  # BatchNorm statistics frozen
    loaded = Captioner.load(tmp_path / "last.pt", device="cpu")
    state = loaded.encoder.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert all(torch.equal(state[k], package[k]) for k in state if k not in saved)
    photo = shapes["test_images"] / sorted(p.name for p in shapes["test_images"].iterdir())[0]
    pixels = loaded.prepare(photo)[None]
    with torch.no_grad():  # the caption uses the fine-tuned blocks: features differ from the package's
        assert not torch.allclose(loaded.encoder(pixels), build_encoder()(pixels))
    assert loaded.caption(photo) == Captioner.from_checkpoint(load_checkpoint(tmp_path / "last.pt"), "cpu").caption(
        photo
    )


def test_a_run_cannot_drop_blocks_its_init_fine_tuned(shapes, tmp_path):
    train = load_coco(shapes["test_json"], shapes["test_images"])
    small = dict(decoder="lstm", epochs=1, batch_size=24, hidden_size=16, embed_size=8, min_word_count=1)
    Trainer(train, None, tmp_path / "a", TrainOptions(**small, fine_tune_encoder=2), "cpu").fit()
    init = str(tmp_path / "a" / "last.pt")
    with pytest.raises(UsageError, match="--fine-tune-encoder 2 or more"):
        Trainer(
            train, None, tmp_path / "b", TrainOptions(**small, fine_tune_encoder=1, init_from=init), "cpu"
        ).prepare()
    with pytest.raises(UsageError, match="has 8 blocks"):
        Trainer(train, None, tmp_path / "c", TrainOptions(**small, fine_tune_encoder=9), "cpu").prepare()


def test_the_trunk_cache_is_keyed_by_its_frozen_part_and_holds_a_mirrored_view(shapes, tmp_path):
    enc = build_encoder()
    enc.unfreeze_last(2)
    images = sorted(shapes["test_images"].iterdir())[:3]
    cache = FeatureCache(enc, tmp_path, cut=enc.cut(2))
    assert cache.fill(images, num_workers=0) == []
    assert cache.fill(images, num_workers=0, mirror=True) == []
    with torch.no_grad():
        enc.trunk[9].weight.mul_(2)  # training the blocks above the cut leaves the cache valid
    assert FeatureCache(enc, tmp_path, cut=enc.cut(2)).dir == cache.dir
    assert FeatureCache(enc, tmp_path, cut=enc.cut(3)).dir != cache.dir
    with pytest.raises(ValueError, match="cannot be cached"):
        FeatureCache(enc, tmp_path, cut=enc.cut(3) + 2)  # a trainable layer below the cut
    plain = cache.load(images, "trunk")[:]  # (3, 192, 7, 7)
    mirrored = cache.load(images, "trunk", mirror=True)[:]
    load = LoadImage(enc.spec.preprocess)
    pixels = torch.stack([load(p) for p in images])
    with torch.no_grad():
        want = enc.below(pixels, enc.cut(2))
        want_mirrored = enc.below(pixels.flip(-1), enc.cut(2))
    assert plain.shape == (3, 192, 7, 7) and plain.dtype == torch.float16
    torch.testing.assert_close(plain.float(), want, rtol=1e-2, atol=2e-3)
    torch.testing.assert_close(mirrored.float(), want_mirrored, rtol=1e-2, atol=2e-3)
    assert not torch.allclose(plain.float(), mirrored.float(), atol=1e-1)


def test_the_flip_augmentation_mirrors_half_the_captions_and_swaps_left_and_right(shapes):
    corpus = load_coco(shapes["test_json"], shapes["test_images"])
    corpus.captions[0] = ["a red circle on the left of a blue square right here"] * len(corpus.captions[0])
    vocab = Vocabulary.build([c for caps in corpus.captions for c in caps], 1)
    data = Mirrored(CaptionDataset(corpus, vocab), len(corpus), vocab, seed=0)
    first = data.flipped.clone()
    assert 0.35 < first.float().mean() < 0.65
    for i in range(len(data)):
        item, ids = data[i]
        plain_item, plain = data.dataset[i]
        if first[i]:
            assert item == plain_item + len(corpus)
            assert vocab.decode(ids) == vocab.decode(plain).replace("left", "@").replace("right", "left").replace(
                "@", "right"
            )
        else:
            assert (item, ids) == (plain_item, plain)
    data.set_epoch(1)
    assert not torch.equal(data.flipped, first)
    data.set_epoch(0)
    assert torch.equal(data.flipped, first)  # drawn from (seed, epoch): a resumed run sees the same


@pytest.mark.parametrize(("name", "size", "grid"), [("efficientnet_lite1", 240, 64), ("efficientnet_lite2", 260, 81)])
def test_larger_lite_encoders_are_real_imagenet_models_at_their_native_size(name, size, grid):
    enc = build_encoder(name)  # strict key mapping: load_state_dict(strict=True) inside
    x = enc.spec.preprocess(Image.fromarray(skdata.chelsea()))[None]
    assert x.shape == (1, 3, size, size)
    with torch.no_grad():
        feats = enc(x)
        top3 = enc.classify(x).topk(3).indices[0].tolist()
    assert feats.shape == (1, grid, 1280)
    assert {281, 282, 283, 284, 285} & set(top3), top3  # a cat
    with torch.no_grad():
        coffee = enc.classify(enc.spec.preprocess(Image.fromarray(skdata.coffee()))[None]).argmax().item()
    assert coffee in {504, 967, 968}  # coffee mug, espresso, cup


def test_flip_training_reads_both_cached_views(shapes, tmp_path):
    train = load_coco(shapes["test_json"], shapes["test_images"])  # 24 images
    opts = TrainOptions(
        decoder="lstm", epochs=2, batch_size=24, hidden_size=16, embed_size=8, min_word_count=1, flip=True
    )
    trainer = Trainer(train, None, tmp_path / "run", opts, device="cpu", cache_dir=tmp_path / "cache")
    dataset, feats = trainer.train_data
    assert isinstance(dataset, Mirrored) and len(feats) == 2 * len(train)
    (cache,) = (tmp_path / "cache" / "features").iterdir()
    assert len((cache / "index.jsonl").read_text().splitlines()) == 2 * len(train)  # each photo and its mirror
    trainer.fit()
    # the two views differ, and a mirrored item reads the mirrored row
    assert not torch.equal(feats[[0]], feats[[len(train)]])
    with pytest.raises(UsageError, match="drop --flip"):
        Trainer(train, None, tmp_path / "scst", TrainOptions(flip=True, self_critical=True), "cpu").prepare()
