"""Image sequences -> one caption: the sequence format, the temporal model (order matters, variable
lengths, truncated BPTT), and sequences through the API and the CLI."""

import json
import random
import shutil

import pytest
import torch

from captioner import Captioner
from captioner.cli import main
from captioner.data import DataError, load_sequences
from captioner.decoding import beam_search
from captioner.features import FeatureCache, corpus_features
from captioner.images import list_images
from captioner.models import Frames, build_model
from captioner.synthetic import OPPOSITE, make_motion_split, motion_direction
from captioner.training import Trainer, TrainOptions


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


# ---- the file format ------------------------------------------------------------------------------
def _frames_on_disk(tmp_path, n):
    from PIL import Image

    for i in range(n):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(tmp_path / f"f{i}.png")


def test_load_sequences_keeps_order_shares_frames_and_drops_uncaptioned(tmp_path):
    _frames_on_disk(tmp_path, 4)
    images = [{"id": 10 + i, "file_name": f"f{i}.png"} for i in range(4)]
    seqs = [{"id": 1, "image_ids": [13, 11, 12]}, {"id": 2, "image_ids": [12]}, {"id": 3, "image_ids": [10]}]
    anns = [
        {"id": 1, "sequence_id": 2, "caption": "b"},
        {"id": 2, "sequence_id": 1, "caption": " a  one "},
        {"id": 3, "sequence_id": 1, "caption": "a two"},
    ]
    c = load_sequences(
        _write(tmp_path / "s.json", {"images": images, "sequences": seqs, "annotations": anns}), tmp_path
    )
    assert c.image_ids == [1, 2] and c.captions == [["a one", "a two"], ["b"]]  # sequence 3 has no caption
    assert [[c.paths[f].name for f in fr] for fr in c.frames] == [["f3.png", "f1.png", "f2.png"], ["f2.png"]]
    assert len(c.paths) == 3  # f2 once, though two sequences use it; f0 is not needed


def test_load_sequences_refuses_broken_files_and_skips_missing_frames(tmp_path):
    _frames_on_disk(tmp_path, 2)
    images = [{"id": 1, "file_name": "f0.png"}, {"id": 2, "file_name": "f1.png"}, {"id": 3, "file_name": "gone.png"}]
    base = {
        "images": images,
        "annotations": [{"id": 1, "sequence_id": 7, "caption": "x"}, {"id": 2, "sequence_id": 8, "caption": "y"}],
    }
    bad = [
        (
            {"sequences": [{"id": 7, "image_ids": [1, 99]}, {"id": 8, "image_ids": [2]}]},
            "1 sequences naming image ids not in 'images': 7 -> 99",
        ),
        ({"sequences": [{"id": 7, "image_ids": []}, {"id": 8, "image_ids": [2]}]}, "1 sequences without frames: 7"),
        (
            {"sequences": [{"id": 8, "image_ids": [2]}]},
            r"1 annotations naming an unknown sequence_id: annotations\[0\] \(7\)",
        ),
        ({"sequences": [{"id": 7, "image_ids": [1, 3]}, {"id": 8, "image_ids": [2]}]}, "gone.png"),
    ]
    for extra, message in bad:
        with pytest.raises(DataError, match=message):
            load_sequences(_write(tmp_path / "s.json", base | extra), tmp_path)
    c = load_sequences(tmp_path / "s.json", tmp_path, skip_missing=True)  # the last one: 7 has a missing frame
    assert c.image_ids == [8] and c.skipped_missing == 1 and [p.name for p in c.paths] == ["f1.png"]
    with pytest.raises(DataError, match="not a sequence caption file"):
        load_sequences(_write(tmp_path / "c.json", {"images": [], "annotations": []}), tmp_path)


def test_sequence_folders_are_read_in_natural_order(tmp_path):
    for name in ("frame10.png", "frame2.png", "frame1.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["frame1.png", "frame2.png", "frame10.png"]


# ---- the temporal model ---------------------------------------------------------------------------
def _seq_model(decoder="lstm", tbptt=0, kind="gru"):
    torch.manual_seed(0)
    config = {
        "decoder": decoder,
        "decoder_hparams": {"embed_size": 8, "hidden_size": 12, "dropout": 0.0},
        "temporal": {"kind": kind, "hidden_size": 10, "keypoints": 3, "dropout": 0.0, "tbptt": tbptt},
    }
    return build_model(config, vocab_size=25, feature_dim=6)


@pytest.mark.parametrize("decoder", ["lstm", "attention"])
def test_variable_length_batch_decodes_like_one_by_one(decoder):
    m = _seq_model(decoder).eval()
    torch.manual_seed(1)
    seqs = [torch.randn(n, 4, 6) * 2 for n in (5, 1, 3, 9, 2)]  # (F_i, R, D), R = 2x2 grid
    batched = beam_search(m, m.from_frames(seqs), beam_size=3, n_best=2, max_len=6)
    for seq, hyps in zip(seqs, batched):
        alone = beam_search(m, m.from_frames([seq]), beam_size=3, n_best=2, max_len=6)[0]
        assert [h.tokens for h in hyps] == [h.tokens for h in alone]
        assert [h.score for h in hyps] == pytest.approx([h.score for h in alone], abs=1e-5)
        if decoder == "attention":  # attention over the real frames only, never the padding
            assert all(h.attention.shape[1] == 9 and abs(h.attention[:, len(seq) :]).sum() == 0 for h in hyps)


def test_padding_and_frame_order_matter_exactly_as_they_should():
    m = _seq_model("attention").eval()
    torch.manual_seed(2)
    seq = torch.randn(4, 4, 6)
    padded = m.from_frames([seq, torch.randn(7, 4, 6)])
    one = m.from_frames([seq])
    logp_padded, _ = m.step(torch.tensor([1, 1]), m.init_state(padded))
    logp_one, _ = m.step(torch.tensor([1]), m.init_state(one))
    assert torch.allclose(logp_padded[0], logp_one[0], atol=1e-5)  # padding changes nothing
    logp_rev, _ = m.step(torch.tensor([1]), m.init_state(m.from_frames([seq.flip(0)])))
    assert not torch.allclose(logp_rev, logp_one, atol=1e-3)  # order does


def _frame_grads(model, frames: Frames, captions, lengths):
    frames.feats.requires_grad_(True)
    loss = model(frames, captions, lengths).mean()
    loss.backward()
    return loss.item(), frames.feats.grad.abs().sum(dim=(2, 3))  # (B, F) gradient reaching each frame


def test_full_bptt_reaches_every_frame_and_tbptt_only_the_last_k():
    torch.manual_seed(3)
    seqs = [torch.randn(64, 4, 6), torch.randn(23, 4, 6)]  # long sequences, different lengths
    captions, lengths = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]]), torch.tensor([4, 3])
    full = _seq_model("lstm").train()
    loss_full, g_full = _frame_grads(full, Frames.pad(seqs), captions, lengths)
    assert (g_full[0] > 0).all() and (g_full[1, :23] > 0).all() and (g_full[1, 23:] == 0).all()
    truncated = _seq_model("lstm", tbptt=8).train()
    loss_tb, g_tb = _frame_grads(truncated, Frames.pad(seqs), captions, lengths)
    assert loss_tb == pytest.approx(loss_full, abs=1e-6)  # same forward pass, shorter gradient paths
    # only the chunk holding the last frame (and the frame before it, whose keypoints the chunk's
    # first motion input is measured from) gets gradient: 64 frames -> 56-63; 23 frames -> 16-22
    assert (g_tb[0, 55:] > 0).all() and (g_tb[0, :55] == 0).all()
    assert (g_tb[1, 15:23] > 0).all() and (g_tb[1, :15] == 0).all()
    truncated.eval()  # inference runs the whole sequence: tbptt changes nothing there
    full.eval()
    assert torch.allclose(truncated.init_state(Frames.pad(seqs)).h, full.init_state(Frames.pad(seqs)).h)


# ---- learning the direction of motion -------------------------------------------------------------
@pytest.fixture(scope="module")
def motion(tmp_path_factory):
    out = tmp_path_factory.mktemp("motion")
    rng = random.Random(0)
    train_json = make_motion_split(out, "train", 48, rng, start_id=1)
    test_json = make_motion_split(out, "test", 20, rng, start_id=100_000)
    truth = {s["id"]: s["direction"] for s in json.loads(test_json.read_text())["sequences"]}
    return {
        "dir": out,
        "train_json": train_json,
        "test_json": test_json,
        "truth": truth,
        "train": load_sequences(train_json, out / "train"),
        "test": load_sequences(test_json, out / "test"),
    }


@pytest.fixture(scope="module")
def motion_models(motion, tmp_path_factory):
    """The same attention decoder, over a GRU on the frames or over their mean (the order-blind baseline)."""
    models = {}
    for temporal in ("gru", "none"):
        opts = TrainOptions(
            decoder="attention",
            temporal=temporal,
            epochs=15,
            batch_size=32,
            hidden_size=128,
            embed_size=64,
            attention_size=64,
            temporal_size=128,
            min_word_count=1,
            lr=2e-3,
            dropout=0.2,
            lr_schedule="constant",
        )
        trainer = Trainer(motion["train"], None, tmp_path_factory.mktemp(temporal), opts, device="cpu")
        models[temporal] = Captioner.load(trainer.fit(), device="cpu")  # no val set: best.pt is the last epoch
    return models


def _directions(model, motion, reverse=False):
    test = motion["test"]
    seqs = [[test.paths[f] for f in (fr[::-1] if reverse else fr)] for fr in test.frames]
    captions = [r[0].text for r in model.generate_sequences(seqs, beam_size=3)]
    return captions, [motion_direction(c) for c in captions]


def test_direction_is_learned_and_flips_with_the_order_unlike_a_mean_pooled_baseline(motion, motion_models):
    truth = [motion["truth"][i] for i in motion["test"].image_ids]
    scores = {}
    for name, model in motion_models.items():
        captions, forward = _directions(model, motion)
        reversed_captions, backward = _directions(model, motion, reverse=True)
        scores[name] = (
            sum(d == t for d, t in zip(forward, truth)) / len(truth),
            sum(d == OPPOSITE[t] for d, t in zip(backward, truth)) / len(truth),
        )
        if name == "none":
            assert reversed_captions == captions  # the mean frame cannot see order at all
    assert scores["gru"][0] >= 0.9 and scores["gru"][1] >= 0.9, scores
    assert scores["none"][0] <= 0.6 and scores["gru"][0] - scores["none"][0] >= 0.3, scores


def test_cached_sequence_batches_decode_like_one_by_one(motion, motion_models):
    model, test = motion_models["gru"], motion["test"]
    feats, kept, failed = corpus_features(model.encoder, model.decoder, test, FeatureCache(model.encoder))
    assert not failed and kept == list(range(len(test)))
    assert len({len(f) for f in test.frames}) > 1  # the batch really mixes lengths
    batched = model.decode(feats[0 : len(test)], beam_size=3)
    for i in range(len(test)):
        assert model.decode(feats[i : i + 1], beam_size=3)[0][0].text == batched[i][0].text


def test_images_and_one_frame_sequences_are_the_same_thing(motion, motion_models, captioner_model, shapes):
    frame = motion["test"].paths[0]
    for model in (motion_models["gru"], motion_models["none"]):
        assert model.caption(frame, beam_size=3) == model.caption_sequence([frame], beam_size=3)
    image = sorted(shapes["test_images"].glob("*.png"))[0]  # a model trained on single images
    assert captioner_model.caption_sequence([image]) == captioner_model.caption(image)
    text, weights = motion_models["gru"].caption_sequence([frame, frame], return_attention=True)
    assert weights.shape == (len(text.split()), 2)  # attention over the two frames, per word
    with pytest.raises(ValueError, match="attention over image regions"):
        motion_models["gru"].caption(frame, return_attention=True)


# ---- the command line -----------------------------------------------------------------------------
def test_sequences_through_the_cli(motion, motion_models, tmp_path, capsys):
    d, test = motion["dir"], motion["test"]
    run = tmp_path / "run"
    rc = main(
        [
            "train",
            "--train-sequences",
            str(motion["train_json"]),
            "--train-images",
            str(d / "train"),
            "--val-sequences",
            str(motion["test_json"]),
            "--val-images",
            str(d / "test"),
            "--out",
            str(run),
            "--epochs",
            "1",
            "--hidden-size",
            "32",
            "--embed-size",
            "16",
            "--temporal-size",
            "16",
            "--tbptt",
            "2",
            "--min-word-count",
            "1",
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    assert rc == 0
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["CIDEr-D"] is not None  # validated on the sequences
    ckpt = torch.load(run / "best.pt", weights_only=True)
    assert ckpt["config"]["temporal"]["kind"] == "gru" and ckpt["config"]["temporal"]["tbptt"] == 2
    capsys.readouterr()

    model = tmp_path / "seq.pt"
    motion_models["gru"].save(model)
    results = tmp_path / "results.json"
    rc = main(
        [
            "evaluate",
            "--model",
            str(model),
            "--sequences",
            str(motion["test_json"]),
            "--images",
            str(d / "test"),
            "--beam-size",
            "3",
            "--results",
            str(results),
            "--quiet",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["CIDEr-D"] > 1.0 and len(json.loads(results.read_text())) == len(test)
    assert main(["score", "--results", str(results), "--annotations", str(motion["test_json"])]) == 0
    assert json.loads(capsys.readouterr().out)["CIDEr-D"] == pytest.approx(report["CIDEr-D"])

    frames = [str(test.paths[f]) for f in test.frames[0]]
    want = motion_models["gru"].caption_sequence(frames, beam_size=3)
    assert main(["caption", "--model", str(model), "--beam-size", "3", "--sequence", *frames]) == 0
    assert capsys.readouterr().out.strip().split("\t")[1] == want

    clip = tmp_path / "clip"  # frames named so that only natural order is the right order
    clip.mkdir()
    for i, f in enumerate(frames):
        shutil.copy(f, clip / f"frame{i * 5}.png")
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(frames[0], broken / "a1.png")
    (broken / "a2.png").write_bytes(b"not a png")
    rc = main(
        [
            "caption",
            "--model",
            str(model),
            "--beam-size",
            "3",
            "--json",
            "--sequence-dir",
            str(broken),
            "--sequence-dir",
            str(clip),
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 1 and "a2.png" in err and len(err.strip().splitlines()) == 1  # one line for the bad sequence
    line = json.loads(out)
    assert line["caption"] == want and [p.rsplit("/", 1)[1] for p in line["sequence"]] == [
        f"frame{i * 5}.png" for i in range(len(frames))
    ]

    assert main(["caption", "--model", str(model), "--sequence", frames[0], "--", frames[1]]) == 2
    assert "one of them" in capsys.readouterr().err


def test_fine_tuning_the_encoder_on_sequences_is_refused_clearly(motion, tmp_path):
    opts = TrainOptions(fine_tune_encoder=1, epochs=1)
    with pytest.raises(ValueError, match="single images only"):
        Trainer(motion["train"], None, tmp_path, opts, device="cpu").prepare()


@pytest.mark.slow
def test_the_default_decoder_learns_the_direction_of_motion(motion, tmp_path):
    """No --decoder, no --temporal: the defaults must be the setting that works (attention over a
    GRU on the frames). Only the step size suits this tiny set: lr 2e-3, batch 32 (Flickr8k's
    defaults take 2 steps an epoch here)."""
    d = motion["dir"]
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--train-sequences",
                str(motion["train_json"]),
                "--train-images",
                str(d / "train"),
                "--out",
                str(run),
                "--epochs",
                "10",
                "--lr",
                "2e-3",
                "--batch-size",
                "32",
                "--min-word-count",
                "1",
                "--device",
                "cpu",
                "--quiet",
            ]
        )
        == 0
    )
    model = Captioner.load(run / "best.pt", device="cpu")
    assert model.config["decoder"] == "attention" and model.config["temporal"]["kind"] == "gru"
    truth = [motion["truth"][i] for i in motion["test"].image_ids]
    _, forward = _directions(model, motion)
    _, backward = _directions(model, motion, reverse=True)
    assert sum(d == t for d, t in zip(forward, truth)) / len(truth) >= 0.9
    assert sum(d == OPPOSITE[t] for d, t in zip(backward, truth)) / len(truth) >= 0.9
