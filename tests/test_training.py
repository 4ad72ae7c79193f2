from __future__ import annotations

import json
import math

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence

from captioner.checkpoint import load_checkpoint
from captioner.cli import main
from captioner.data import load_coco
from captioner.training import Trainer, TrainOptions, build_optimizer

from .conftest import FLICKR8K, train_flags

QUICK = (
    "--decoder lstm --batch-size 32 --hidden-size 64 --embed-size 32 --min-word-count 1 --device cpu --quiet".split()
)


def _train(shapes, out, *extra):
    return main(
        [
            "train",
            *train_flags(shapes),
            "--out",
            str(out),
            *QUICK,
            *extra,
        ]
    )


def test_resume_continues_exactly(shapes, tmp_path):
    assert _train(shapes, tmp_path / "straight", "--epochs", "2") == 0
    assert _train(shapes, tmp_path / "split", "--epochs", "1") == 0
    assert _train(shapes, tmp_path / "split", "--epochs", "2", "--resume") == 0
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "split" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    for k, v in a["decoder"].items():
        assert torch.equal(v, b["decoder"][k]), k
    log = [json.loads(l) for l in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]


def test_same_seed_same_weights_other_seed_differs(shapes, tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert _train(shapes, tmp_path / name, "--epochs", "1", "--seed", str(seed)) == 0
    w = {n: load_checkpoint(tmp_path / n / "last.pt")["decoder"]["out.weight"] for n in "abc"}
    assert torch.equal(w["a"], w["b"]) and not torch.equal(w["a"], w["c"])


def test_checkpoint_holds_everything_to_resume(shapes, tmp_path):
    assert (
        _train(
            shapes,
            tmp_path / "r",
            "--epochs",
            "1",
            "--optimizer",
            "momentum",
            "--lr-schedule",
            "step",
            "--lr-step-epochs",
            "1",
            "--lr-gamma",
            "0.5",
            "--lr",
            "0.1",
        )
        == 0
    )
    ck = load_checkpoint(tmp_path / "r" / "last.pt")
    assert {"optimizer", "scheduler", "scaler", "epoch", "config", "vocab", "decoder"} <= set(ck)
    assert ck["config"]["train"]["optimizer"] == "momentum"
    assert ck["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.05)  # stepped once
    json.dumps(ck["config"]), json.dumps(ck["vocab"])  # JSON-able
    assert (tmp_path / "r" / "best.pt").is_file()  # no val set: best follows the latest epoch


def test_optimizers():
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(build_optimizer(TrainOptions(optimizer="adam"), [{"params": p}]), torch.optim.Adam)
    sgd = build_optimizer(TrainOptions(optimizer="sgd"), [{"params": p}])
    mom = build_optimizer(TrainOptions(optimizer="momentum", momentum=0.9), [{"params": p}])
    assert sgd.param_groups[0]["momentum"] == 0 and mom.param_groups[0]["momentum"] == 0.9


def test_cli_data_errors_are_one_line(shapes, tmp_path, capsys):
    rc = main(
        [
            "train",
            "--train-annotations",
            str(tmp_path / "none.json"),
            "--train-images",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "none.json: no such file" in err[0]


@pytest.mark.skipif(not (FLICKR8K / "captions_train.json").is_file(), reason="Flickr8k not present at ../shared/data")
@pytest.mark.slow  # reads real photos
def test_real_photos_loss_falls(tmp_path):
    """200 real Flickr8k photos, ~300 steps: the training loss falls clearly."""
    corpus = load_coco(FLICKR8K / "captions_train.json", FLICKR8K / "images").subset(200)
    opts = TrainOptions(
        decoder="lstm", epochs=5, batch_size=16, hidden_size=256, embed_size=128, min_word_count=2, lr=1e-3, dropout=0.2
    )
    trainer = Trainer(corpus, None, tmp_path, opts, device="cpu")
    trainer.fit()
    log = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = log[0]["train_loss"], log[-1]["train_loss"]
    assert last < first - 1.0, (first, last)


class _StepDtypes:
    """The dtypes the decoder's matmul-bearing layers (LSTM, Linear) return inside training steps
    (grad enabled: not feature extraction), seen by a forward hook on every module."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, torch.dtype]] = set()

    def __call__(self, module: torch.nn.Module, args: tuple, output) -> None:
        if torch.is_grad_enabled() and isinstance(module, (torch.nn.LSTM, torch.nn.LSTMCell, torch.nn.Linear)):
            out = output[0] if type(output) is tuple else output  # LSTM: (output, (h, c))
            self.seen.add((type(module).__name__, (out.data if isinstance(out, PackedSequence) else out).dtype))

    def __enter__(self) -> _StepDtypes:
        self.handle = torch.nn.modules.module.register_module_forward_hook(self)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def test_bf16_autocast_trains_like_fp32(shapes, tmp_path):
    """--amp bf16 (opt-in on CPU) really runs the training step's LSTM and linear layers in bf16
    (--amp off: fp32), and learns as well as fp32 on the same data."""
    losses = {}
    for amp, dtype in (("off", torch.float32), ("bf16", torch.bfloat16)):
        with _StepDtypes() as step:
            assert _train(shapes, tmp_path / amp, "--epochs", "3", "--amp", amp, "--lr", "2e-3") == 0
        assert step.seen == {("LSTM", dtype), ("Linear", dtype)}, (amp, step.seen)
        log = [json.loads(l) for l in (tmp_path / amp / "metrics.jsonl").read_text().splitlines()]
        losses[amp] = log[-1]["train_loss"]
    assert losses["bf16"] == pytest.approx(losses["off"], rel=0.05)
    assert load_checkpoint(tmp_path / "bf16" / "last.pt")["config"]["train"]["amp"] == "bf16"


def test_bf16_autocast_covers_self_critical_steps(shapes, tmp_path):
    """Self-critical sampling under --amp bf16 runs the decoder in bf16 too (its own autocast block)."""
    train = load_coco(shapes["train_json"], shapes["train_images"]).subset(8)
    opts = TrainOptions(
        decoder="lstm",
        epochs=1,
        batch_size=8,
        hidden_size=16,
        embed_size=8,
        min_word_count=1,
        amp="bf16",
        self_critical=True,
        scst_samples=2,
        scst_max_len=4,
    )
    with _StepDtypes() as step:
        Trainer(train, None, tmp_path, opts, device="cpu").fit()
    assert step.seen == {("LSTM", torch.bfloat16), ("Linear", torch.bfloat16)}, step.seen


@pytest.mark.slow  # trains two models
def test_self_critical_training_raises_cider_of_a_weak_model(shapes, tmp_path, capsys):
    """Self-critical fine-tuning from --init-from: the reward it optimises (CIDEr-D) goes up on
    held-back images, and the architecture and vocabulary come from the starting checkpoint."""
    from captioner import Captioner
    from captioner.evaluation import caption_corpus, references, score

    assert (
        _train(
            shapes,
            tmp_path / "xe",
            "--epochs",
            "1",
            "--hidden-size",
            "128",
            "--embed-size",
            "64",
            "--lr",
            "2e-3",
            "--dropout",
            "0.2",
        )
        == 0
    )
    # no architecture flags: they come from the starting checkpoint (contradicting ones are refused)
    assert (
        main(
            [
                "train",
                *train_flags(shapes),
                "--out",
                str(tmp_path / "sc"),
                "--init-from",
                str(tmp_path / "xe" / "best.pt"),
                "--self-critical",
                "--epochs",
                "4",
                "--batch-size",
                "16",
                "--lr",
                "5e-4",
                "--lr-schedule",
                "constant",
                "--device",
                "cpu",
                "--quiet",
            ]
        )
        == 0
    )
    test = load_coco(shapes["test_json"], shapes["test_images"])
    cider = {}
    for run in ("xe", "sc"):
        model = Captioner.load(tmp_path / run / "best.pt", device="cpu")
        assert model.config["decoder_hparams"]["hidden_size"] == 128  # taken from the start
        results, _ = caption_corpus(model, test, beam_size=1)
        cider[run] = score(references(test), results, use_meteor=False)["CIDEr-D"]
    log = [json.loads(l) for l in (tmp_path / "sc" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["train_CIDEr-D"] > log[0]["train_CIDEr-D"]
    assert cider["sc"] >= cider["xe"] + 0.2, cider
    xe_vocab = load_checkpoint(tmp_path / "xe" / "best.pt")["vocab"]
    assert load_checkpoint(tmp_path / "sc" / "best.pt")["vocab"] == xe_vocab


def test_self_critical_rewards_only_finished_captions_and_never_samples_unk():
    from captioner.decoding import sample
    from captioner.metrics import CiderD
    from captioner.models import ShowTellDecoder
    from captioner.training import TrainStep, scst_rewards
    from captioner.vocab import Vocabulary

    vocab = Vocabulary(["a", "dog", "runs"])
    cider = CiderD({0: [["a", "dog", "runs"]], 1: [["runs"]]})
    s, e = Vocabulary.start_id, Vocabulary.end_id
    a, dog, runs = (vocab.stoi[w] for w in ("a", "dog", "runs"))
    tokens = torch.tensor([[a, dog, runs, e], [a, dog, runs, runs]])  # the same words; the second was cut
    reward = scst_rewards(cider, [0, 0], tokens, vocab)
    assert reward[0] > 1.0 and reward[1] == 0.0
    # <unk> is never drawn, even by a decoder that prefers it to everything else
    torch.manual_seed(0)
    decoder = ShowTellDecoder(vocab_size=len(vocab), feature_dim=8, embed_size=8, hidden_size=8).eval()
    with torch.no_grad():
        decoder.out.bias.fill_(-5.0)
        decoder.out.bias[vocab.unk_id] = 10.0
    free, _, _ = sample(decoder, torch.randn(4, 8), n=50, max_len=6)
    assert (free == vocab.unk_id).float().mean() > 0.9  # the model's own choice
    tokens, logp, mask = TrainStep(None, decoder)(torch.randn(4, 8), samples=50, max_len=6)
    assert not (tokens == vocab.unk_id).any() and torch.isfinite(logp[mask]).all()
    assert s not in tokens.tolist()


def test_cosine_resume_with_more_epochs_follows_the_longer_schedule(shapes, tmp_path):
    base = ["--lr-schedule", "cosine", "--lr", "1e-3"]
    assert _train(shapes, tmp_path / "short", "--epochs", "2", *base) == 0
    assert _train(shapes, tmp_path / "short", "--epochs", "5", "--resume", *base) == 0
    assert _train(shapes, tmp_path / "long", "--epochs", "5", *base) == 0
    lrs = {
        run: [json.loads(l)["lr"] for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("short", "long")
    }
    want = [1e-3 * 0.5 * (1 + math.cos(math.pi * e / 5)) for e in range(5)]
    assert lrs["long"] == pytest.approx(want)
    assert lrs["short"][2:] == pytest.approx(want[2:])  # after the resume: the 5-epoch curve, falling to the end
    assert all(a >= b for a, b in zip(lrs["short"][2:], lrs["short"][3:]))


def test_a_folder_holding_a_run_is_not_reused_without_resume_or_overwrite(shapes, tmp_path, capsys):
    assert _train(shapes, tmp_path / "run", "--epochs", "1") == 0
    before = (tmp_path / "run" / "last.pt").read_bytes()
    capsys.readouterr()
    assert _train(shapes, tmp_path / "run", "--epochs", "1", "--seed", "3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a run" in err[0] and "--resume" in err[0] and "--overwrite" in err[0]
    assert (tmp_path / "run" / "last.pt").read_bytes() == before  # untouched
    # --overwrite with an option that fails: the old run is still there (files go only when training starts)
    assert (
        _train(shapes, tmp_path / "run", "--epochs", "1", "--overwrite", "--self-critical", "--scst-samples", "1") == 2
    )
    assert (tmp_path / "run" / "last.pt").read_bytes() == before
    assert _train(shapes, tmp_path / "run", "--epochs", "1", "--seed", "3", "--overwrite") == 0
    assert (tmp_path / "run" / "last.pt").read_bytes() != before
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def test_ctrl_c_during_a_checkpoint_save_waits_for_it_then_stops_cleanly(shapes, tmp_path, capsys, monkeypatch):
    import os
    import signal
    import time

    import captioner.checkpoint as ckpt_module

    real_save, calls = torch.save, []

    def save_interrupted_midway(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # epoch 1 writes last.pt, then best.pt: Ctrl-C while best.pt is being written
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # (a handler that raises would cut the write here)
        return real_save(obj, f, *args, **kwargs)

    # Ctrl-C as a terminal delivers it (a shell starts background jobs with SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    monkeypatch.setattr(ckpt_module.torch, "save", save_interrupted_midway)
    try:
        rc = _train(shapes, tmp_path, "--epochs", "3")
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert len(calls) >= 2 and rc == 130, err
    assert err.count("\n") == 1 and "Traceback" not in err and "interrupted after epoch 1" in err
    log = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1] and log[0]["best"]
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    assert load_checkpoint(tmp_path / "interrupted.pt")["epoch"] == 1
    monkeypatch.setattr(ckpt_module.torch, "save", real_save)
    assert _train(shapes, tmp_path, "--epochs", "2", "--resume") == 0  # and the run goes on
    assert [json.loads(l)["epoch"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
