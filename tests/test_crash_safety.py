"""Training that is killed, interrupted or blows up loses nothing: checkpoints stay loadable,
--resume finishes the run with every epoch accounted for."""

import dataclasses
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from captioner import Captioner
from captioner.checkpoint import load_checkpoint
from captioner.data import load_coco
from captioner.training import Trainer, TrainOptions

from .conftest import train_flags

pytestmark = pytest.mark.slow  # launches training processes

ARGS = (
    "--decoder lstm --batch-size 2 --hidden-size 64 --embed-size 32 --min-word-count 1 --device cpu "
    "--quiet --lr-schedule constant"
).split()


def _train_cmd(shapes, out, *extra):
    return [
        sys.executable,
        "-m",
        "captioner",
        "train",
        *train_flags(shapes),
        "--out",
        str(out),
        *ARGS,
        *extra,
    ]


def _epochs_logged(out):
    path = out / "metrics.jsonl"
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines()] if path.is_file() else []


def _start_and_wait_for_first_epoch(shapes, out, epochs):
    # SIGINT as a terminal delivers it: a shell runs background jobs with SIGINT ignored, and a child
    # that starts with it ignored never installs Python's KeyboardInterrupt handler
    proc = subprocess.Popen(
        _train_cmd(shapes, out, "--epochs", str(epochs)),
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 240
    while not _epochs_logged(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()
    time.sleep(0.3)  # into the next epoch
    return proc


def test_sigkill_mid_run_then_resume_accounts_for_every_epoch(shapes, tmp_path):
    proc = _start_and_wait_for_first_epoch(shapes, tmp_path, epochs=4)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait(timeout=60)
    done = load_checkpoint(tmp_path / "last.pt")["epoch"]  # loadable, whatever the moment was
    assert 1 <= done < 4
    rc = subprocess.run(_train_cmd(shapes, tmp_path, "--epochs", "4", "--resume"), timeout=300).returncode
    assert rc == 0
    assert _epochs_logged(tmp_path) == [1, 2, 3, 4]  # continuous: no gap, no epoch twice
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 4


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_save_the_weights_and_exit_cleanly(shapes, tmp_path, sig):
    proc = _start_and_wait_for_first_epoch(shapes, tmp_path, epochs=50)
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()  # never left running, whatever happened
    assert proc.returncode == 130 and "Traceback" not in err
    assert "interrupted" in err and "interrupted.pt" in err and len(err.strip().splitlines()) == 1
    Captioner.load(tmp_path / "interrupted.pt", device="cpu")  # the weights of the moment, usable
    done = load_checkpoint(tmp_path / "last.pt")["epoch"]
    assert _epochs_logged(tmp_path) == list(range(1, done + 1))
    rc = subprocess.run(_train_cmd(shapes, tmp_path, "--epochs", str(done + 1), "--resume"), timeout=300).returncode
    assert rc == 0 and _epochs_logged(tmp_path) == list(range(1, done + 2))


def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(shapes, tmp_path):
    train = load_coco(shapes["train_json"], shapes["train_images"])
    opts = TrainOptions(decoder="lstm", epochs=1, batch_size=32, hidden_size=32, embed_size=16, min_word_count=1)
    trainer = Trainer(train, None, tmp_path, opts, device="cpu")
    trainer.fit()
    good = load_checkpoint(tmp_path / "last.pt")["decoder"]
    trainer.opts.epochs = 2
    real_forward = trainer.model.decoder.forward

    def blown_up(*a):
        terms = real_forward(*a)
        return dataclasses.replace(terms, nll_sum=terms.nll_sum * float("nan"))  # the loss blows up

    trainer.model.decoder.forward = blown_up
    with pytest.raises(FloatingPointError, match="non-finite training loss.*last.pt"):
        trainer.fit()
    kept = load_checkpoint(tmp_path / "last.pt")
    assert kept["epoch"] == 1 and all(torch.equal(good[k], kept["decoder"][k]) for k in good)
