"""Training that is killed, interrupted or blows up loses nothing: checkpoints stay loadable,
--resume finishes the run with every epoch accounted for."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from captioner import Captioner
from captioner.checkpoint import load_checkpoint
from captioner.data import load_coco
from captioner.training import Trainer, TrainingInterrupted, TrainOptions

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


class _FileOps:
    """Python's audit events for file operations (open, rename/replace, remove, mkdir, chmod) under
    one folder, counted; SIGINT is sent to this process just before the `ctrl_c_at`-th one, as a
    terminal would send it at that moment. One hook for the session (audit hooks cannot be removed);
    it does nothing while no folder is watched."""

    EVENTS = frozenset({"open", "os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.chmod", "os.truncate"})
    installed = False

    def __init__(self) -> None:
        self.root: str | None = None
        self.ctrl_c_at = 0
        self.seen: list[str] = []

    def __call__(self, event: str, args: tuple) -> None:
        if self.root is None or event not in self.EVENTS or not isinstance(args[0], (str, os.PathLike)):
            return
        path = os.fspath(args[0])
        if path != self.root and os.path.dirname(path) != self.root:
            return
        to = f" -> {os.path.basename(args[1])}" if event == "os.rename" else ""  # (os.replace raises os.rename)
        self.seen.append(f"{event} {os.path.basename(path)}{to}")
        if len(self.seen) == self.ctrl_c_at:
            signal.raise_signal(signal.SIGINT)

    def watch(self, root: Path, ctrl_c_at: int = 0) -> None:
        if not _FileOps.installed:
            sys.addaudithook(self)
            _FileOps.installed = True
        self.root, self.ctrl_c_at, self.seen = str(root), ctrl_c_at, []

    def stop(self) -> list[str]:
        self.root = None
        return self.seen


_OPS = _FileOps()


def test_ctrl_c_at_every_file_operation_of_the_epochs_writes_leaves_a_consistent_run(shapes, tmp_path):
    """The end of an epoch writes a group: the log line in metrics.jsonl, last.pt, best.pt (each
    through a probe and a temp file, renamed). Ctrl-C just before any one of those operations must
    leave a folder that agrees with itself: metrics.jsonl ends at last.pt's epoch, best.pt (no val
    set: every epoch's) is last.pt's, interrupted.pt holds that epoch and the message says so, no
    temp or probe file is left; and --resume finishes the run with every epoch logged once.
    One trainer takes an epoch per interruption (fit() again goes on from where it stands)."""
    train = load_coco(shapes["train_json"], shapes["train_images"]).subset(8)  # an epoch is one batch
    opts = TrainOptions(decoder="lstm", epochs=1, batch_size=40, hidden_size=16, embed_size=8, min_word_count=1)
    out = tmp_path / "run"
    trainer = Trainer(train, None, out, opts, device="cpu")
    trainer.prepare()
    _OPS.watch(out)
    trainer.fit()
    group = _OPS.stop()  # epoch 1's operations, uninterrupted
    assert "open metrics.jsonl" in group, group  # the group as this test knows it
    assert [op.split(" -> ")[1] for op in group if op.startswith("os.rename")] == ["last.pt", "best.pt"], group
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        for n in range(1, len(group) + 1):
            trainer.opts = dataclasses.replace(trainer.opts, epochs=trainer.standing.epoch + 1)
            where = f"Ctrl-C before {group[n - 1]!r}, operation {n} of {group}"
            _OPS.watch(out, ctrl_c_at=n)
            try:
                with pytest.raises(TrainingInterrupted) as stopped:
                    trainer.fit()
            except KeyboardInterrupt:  # never into pytest, which would stop the session
                pytest.fail(f"{where}: escaped fit()")
            finally:
                seen = _OPS.stop()
            assert [_unnamed(op) for op in seen[:n]] == [_unnamed(op) for op in group[:n]], where
            last = load_checkpoint(out / "last.pt")
            done = last["epoch"]
            assert _epochs_logged(out) == list(range(1, done + 1)), where
            assert load_checkpoint(out / "best.pt")["epoch"] == done, where
            interrupted = load_checkpoint(out / "interrupted.pt")
            assert interrupted["epoch"] == done and f"(end of epoch {done})" in str(stopped.value), where
            if done == trainer.opts.epochs:  # the epoch's writes were finished: the weights of the moment are last.pt's
                assert all(torch.equal(interrupted["decoder"][k], v) for k, v in last["decoder"].items()), where
            assert sorted(os.listdir(out)) == ["best.pt", "interrupted.pt", "last.pt", "metrics.jsonl"], where
    finally:
        signal.signal(signal.SIGINT, previous)
    done = load_checkpoint(out / "last.pt")["epoch"]
    Trainer(train, None, out, dataclasses.replace(opts, epochs=done + 1), device="cpu", resume=True).fit()
    assert _epochs_logged(out) == list(range(1, done + 2)) and load_checkpoint(out / "last.pt")["epoch"] == done + 1


def _unnamed(op: str) -> str:
    """A file operation without the random part of temp and probe file names (mkstemp's 8 characters)."""
    return re.sub(r"\.[a-z0-9_]{8}(\.tmp)?\b", r".*\1", op)
