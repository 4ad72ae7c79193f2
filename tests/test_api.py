import numpy as np
import pytest
import torch
from PIL import Image

from captioner import Captioner
from captioner.checkpoint import CheckpointError
from captioner.images import ImageError


def _test_images(shapes):
    return sorted(shapes["test_images"].glob("*.png"))


def test_caption_accepts_paths_pil_images_and_tensors(captioner_model, shapes):
    path = _test_images(shapes)[0]
    by_path = captioner_model.caption(path)
    assert isinstance(by_path, str) and by_path
    assert captioner_model.caption(str(path)) == by_path
    pil = Image.open(path).convert("RGB")
    assert captioner_model.caption(pil) == by_path
    uint8 = torch.from_numpy(np.array(pil)).permute(2, 0, 1)  # (3, H, W)
    assert captioner_model.caption(uint8) == by_path
    assert captioner_model.caption(uint8.float() / 255) == by_path


def test_caption_list_matches_single_calls_and_names_the_shape(captioner_model, shapes):
    paths = _test_images(shapes)[:6]
    batch = captioner_model.caption(paths, batch_size=4)
    assert batch == [captioner_model.caption(p) for p in paths]
    for p, c in zip(paths, batch):
        color, shape = p.name.split("_")[:2]
        assert color in c and shape in c, (p.name, c)


def test_caption_nbest_is_sorted_and_distinct(captioner_model, shapes):
    nbest = captioner_model.caption_nbest(_test_images(shapes)[0], n=3)
    assert len(nbest) == 3
    scores = [s for _, s in nbest]
    assert scores == sorted(scores, reverse=True) and all(s < 0 for s in scores)
    assert len({c for c, _ in nbest}) == 3
    assert nbest[0][0] == captioner_model.caption(_test_images(shapes)[0], beam_size=3)


def test_bad_inputs_raise_or_are_skipped(captioner_model, shapes, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    good = _test_images(shapes)[0]
    with pytest.raises(ImageError, match="broken.jpg: not an image"):
        captioner_model.caption(bad)
    with pytest.raises(ImageError):
        captioner_model.caption([good, bad])
    out = captioner_model.caption([good, bad, tmp_path / "missing.png"], errors="skip")
    assert out[0] == captioner_model.caption(good) and out[1:] == [None, None]


def test_save_and_load_round_trip(captioner_model, shapes, tmp_path):
    captioner_model.save(tmp_path / "model.pt")
    again = Captioner.load(tmp_path / "model.pt", device="cpu")
    paths = _test_images(shapes)[:4]
    assert again.caption(paths) == captioner_model.caption(paths)
    assert again.vocab == captioner_model.vocab
    ck = torch.load(tmp_path / "model.pt", weights_only=True)
    assert ck["encoder"] is None  # frozen packaged encoder: its weights are not duplicated


def test_load_without_a_bundled_model_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("CAPTIONER_MODEL", str(tmp_path / "none.pt"))
    with pytest.raises(CheckpointError, match="no bundled model"):
        Captioner.load()


def test_mismatched_checkpoint_is_refused(captioner_model, tmp_path):
    captioner_model.save(tmp_path / "m.pt")
    ck = torch.load(tmp_path / "m.pt", weights_only=True)
    ck["vocab"]["words"] = ck["vocab"]["words"][:-3]  # vocabulary no longer matches the weights
    torch.save(ck, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"bad.pt: the vocabulary has \d+ tokens but the decoder weights"):
        Captioner.load(tmp_path / "bad.pt", device="cpu")
    ck = torch.load(tmp_path / "m.pt", weights_only=True)
    ck["config"]["decoder_hparams"]["hidden_size"] *= 2  # architecture no longer matches the weights
    torch.save(ck, tmp_path / "arch.pt")
    with pytest.raises(CheckpointError, match="arch.pt: decoder weights do not match.*size mismatch"):
        Captioner.load(tmp_path / "arch.pt", device="cpu")
    ck["config"]["decoder"] = "transformer"  # a decoder this version does not have
    torch.save(ck, tmp_path / "kind.pt")
    with pytest.raises(CheckpointError, match="kind.pt: its model config cannot be built.*transformer"):
        Captioner.load(tmp_path / "kind.pt", device="cpu")
    ck = torch.load(tmp_path / "m.pt", weights_only=True)
    ck["format_version"] = 99  # written by a newer captioner
    torch.save(ck, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="new.pt: checkpoint format version 99 is not supported"):
        Captioner.load(tmp_path / "new.pt", device="cpu")


def test_decoding_defaults_come_from_the_checkpoint_and_calls_override_them(captioner_model, shapes, tmp_path):
    from captioner.cli import main

    path = _test_images(shapes)[0]
    model = Captioner(
        captioner_model.encoder,
        captioner_model.decoder,
        captioner_model.vocab,
        captioner_model.config | {"decoding": {"beam_size": 1, "max_len": 2}},
        device="cpu",
    )
    assert model.caption(path) == captioner_model.caption(path, beam_size=1, max_len=2)  # the model's settings
    assert len(model.caption(path).split()) <= 2
    assert model.caption(path, beam_size=5, max_len=20) == captioner_model.caption(path)  # a call's win
    model.save(tmp_path / "m.pt")
    assert Captioner.load(tmp_path / "m.pt", device="cpu").decoding["max_len"] == 2
    assert main(["caption", str(path), "--model", str(tmp_path / "m.pt"), "--max-len", "20", "--beam-size", "5"]) == 0


def test_half_precision_save_is_smaller_and_captions_alike(captioner_model, shapes, tmp_path):
    captioner_model.save(tmp_path / "full.pt")
    captioner_model.save(tmp_path / "half.pt", half=True)
    assert (tmp_path / "half.pt").stat().st_size < 0.6 * (tmp_path / "full.pt").stat().st_size
    half = Captioner.load(tmp_path / "half.pt", device="cpu")
    assert next(half.decoder.parameters()).dtype == torch.float32  # fp16 on disk, fp32 to compute
    paths = _test_images(shapes)
    same = sum(a == b for a, b in zip(half.caption(paths), captioner_model.caption(paths)))
    assert same >= 0.9 * len(paths)
