import pytest
import torch
from PIL import Image

from captioner.encoders import EncoderWeightsError, build_encoder

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def lite0():
    return build_encoder("efficientnet_lite0")


def test_default_weights_are_real_imagenet_weights(lite0):
    skdata = pytest.importorskip("skimage.data")
    x = lite0.spec.preprocess(Image.fromarray(skdata.chelsea()))[None]  # (1, 3, 224, 224)
    with torch.no_grad():
        top3 = lite0.classify(x).topk(3).indices[0].tolist()
    assert CAT_CLASSES & set(top3), top3


def test_feature_shapes_and_preprocessing(lite0):
    assert lite0.spec.preprocess.to_dict() == {"resize": 256, "crop": 224, "mean": [0.5] * 3, "std": [0.5] * 3}
    x = lite0.spec.preprocess(Image.new("RGB", (300, 200), (10, 200, 30)))
    assert x.shape == (3, 224, 224)
    with torch.no_grad():
        grid = lite0(torch.stack([x, x]))
    assert grid.shape == (2, 49, 1280) and lite0.feature_dim == 1280


def test_frozen_encoder_stays_in_eval_mode_and_batchnorm_does_not_drift(lite0):
    assert not any(p.requires_grad for p in lite0.parameters())
    before = {k: v.clone() for k, v in lite0.state_dict().items() if "running" in k}
    lite0.train()
    assert not lite0.training
    with torch.no_grad():
        lite0(torch.randn(4, 3, 224, 224) * 3 + 1)
    after = lite0.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_fine_tune_unfreezes_only_the_last_blocks():
    enc = build_encoder("efficientnet_lite0")
    params = enc.unfreeze_last(2)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert len(params) == len(trainable) > 0
    # trunk: 0 stem, 1 bn, 2..8 the seven block stages, 9 head conv, 10 head bn
    assert {n.split(".")[1] for n in trainable} == {"8", "9", "10"}, sorted(trainable)[:5]
    assert "trunk.0.weight" not in trainable  # the stem stays frozen


def test_missing_torchvision_weights_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(EncoderWeightsError, match=r"resnet50.*not found at .*checkpoints.*TORCH_HOME"):
        build_encoder("resnet50")


def test_torchvision_resnet_from_local_cache(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ref = torchvision.models.resnet50(weights=None)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(ref.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth")
    enc = build_encoder("resnet50")
    assert enc.feature_dim == 2048 and enc.spec.preprocess.mean == (0.485, 0.456, 0.406)
    assert torch.equal(enc.trunk[0].weight, ref.conv1.weight)
    with torch.no_grad():
        assert enc(torch.randn(1, 3, 224, 224)).shape == (1, 49, 2048)


def test_timm_backbone_from_local_cache_and_clear_error_without(tmp_path, monkeypatch):
    import timm

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(EncoderWeightsError, match="timm/mobilenetv3_small_050.*not in the local cache"):
        build_encoder("timm/mobilenetv3_small_050")
    ref = timm.create_model("mobilenetv3_small_050")
    url_name = timm.models.get_pretrained_cfg("mobilenetv3_small_050").url.rsplit("/", 1)[-1]
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(ref.state_dict(), tmp_path / "hub" / "checkpoints" / url_name)
    enc = build_encoder("timm/mobilenetv3_small_050")
    assert torch.equal(enc.trunk.net.conv_stem.weight, ref.conv_stem.weight)
    with torch.no_grad():
        assert enc(torch.randn(1, 3, 224, 224)).shape == (1, 49, enc.feature_dim)


def test_unknown_encoder_name():
    with pytest.raises(ValueError, match="unknown encoder"):
        build_encoder("vgg99")
