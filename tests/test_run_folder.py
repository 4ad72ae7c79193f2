"""The run folder (training/run_folder.py): a fresh run never starts over the files of another run
(they would mix: --resume would continue the other run), --overwrite deletes exactly those files and
only when training starts, and the epoch's log line and checkpoints are written as run_folder.py says."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from captioner.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from captioner.data import CaptionCorpus, load_coco
from captioner.errors import OutputError
from captioner.training import Trainer, TrainingInterrupted, TrainOptions
from captioner.training.run_folder import RunFolder, RunFolderError

from .test_checkpoint import gpu_saved

# Every kind of file a run writes into its folder. Not RunFolder.FILES: a name missing there must
# fail here. test_a_real_run_writes_exactly_these_files holds this list to what training writes.
WRITTEN = ("last.pt", "best.pt", "interrupted.pt", "metrics.jsonl")
OPTS = TrainOptions(decoder="lstm", epochs=1, batch_size=40, hidden_size=16, embed_size=8, min_word_count=1)


def _corpus(shapes: dict[str, Path]) -> CaptionCorpus:
    """8 shapes images (40 captions): an epoch is one batch, so a run costs a fraction of a second."""
    return load_coco(shapes["train_json"], shapes["train_images"]).subset(8)


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _epochs(folder: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def real_run(shapes: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder as training leaves it: epoch 1 done, then Ctrl-C during epoch 2 (interrupted.pt)."""
    out = tmp_path_factory.mktemp("real_run") / "run"
    Trainer(_corpus(shapes), None, out, OPTS, device="cpu").fit()
    trainer = Trainer(_corpus(shapes), None, out, replace(OPTS, epochs=2), device="cpu", resume=True)
    trainer.prepare()

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    trainer._run_epoch = ctrl_c  # Ctrl-C in the middle of epoch 2's training
    with pytest.raises(TrainingInterrupted, match="during epoch 2"):
        trainer.fit()
    return out


def test_a_real_run_writes_exactly_these_files(real_run: Path) -> None:
    """WRITTEN is what training writes (a file added to a run must be added there, and so to claim's
    checks below), and no temp or probe file is left behind."""
    assert sorted(os.listdir(real_run)) == sorted(WRITTEN)
    assert _epochs(real_run) == [1] and load_checkpoint(real_run / "interrupted.pt")["epoch"] == 1


@pytest.mark.parametrize("name", WRITTEN)
def test_a_fresh_run_refuses_a_folder_holding_any_file_of_a_run(
    shapes: dict[str, Path], real_run: Path, tmp_path: Path, name: str
) -> None:
    """One file of another run is enough to refuse (an interrupted first epoch leaves only
    interrupted.pt; a crash before the first checkpoint only metrics.jsonl). The message says which
    file and what to do; nothing in the folder is deleted or changed."""
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(real_run / name, folder / name)
    (folder / "notes.txt").write_text("the user's own file")
    before = _contents(folder)
    trainer = Trainer(_corpus(shapes), None, folder, OPTS, device="cpu")
    with pytest.raises(RunFolderError) as refused:
        trainer.prepare()
    message = str(refused.value)
    assert message == (
        f"{folder} holds a run ({name}): --resume continues it, --overwrite starts afresh in it "
        "(deleting those files), or choose another --out"
    )
    assert _contents(folder) == before
    with pytest.raises(RunFolderError, match=name):
        RunFolder(folder).claim(overwrite=False)
    assert _contents(folder) == before


@pytest.mark.parametrize("name", WRITTEN)
def test_claim_with_overwrite_names_the_file_and_deletes_nothing_yet(tmp_path: Path, name: str) -> None:
    """--overwrite: claim() returns the run's files (deleted only when training starts) and no other."""
    (tmp_path / name).write_text("x")
    (tmp_path / "notes.txt").write_text("mine")
    run = RunFolder(tmp_path)
    assert run.claim(overwrite=True) == [name]
    assert sorted(os.listdir(tmp_path)) == sorted([name, "notes.txt"])
    run.clear([name])
    assert os.listdir(tmp_path) == ["notes.txt"]
    run.clear([name])  # already gone: nothing to do, no error


def test_claim_lists_every_file_held_and_refuses_naming_them_all(tmp_path: Path) -> None:
    for name in WRITTEN:
        (tmp_path / name).write_text("x")
    run = RunFolder(tmp_path)
    assert sorted(run.claim(overwrite=True)) == sorted(WRITTEN)
    with pytest.raises(RunFolderError) as refused:
        run.claim(overwrite=False)
    listed = str(refused.value).split(f"{tmp_path} holds a run (", 1)[1].split("): ", 1)[0]
    assert sorted(listed.split(", ")) == sorted(WRITTEN)


def test_a_folder_without_a_run_is_claimed_as_it_is(tmp_path: Path) -> None:
    """No run files (other files, or no folder yet): nothing to refuse, nothing to delete."""
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "last.pt.bak").write_text("the user's copy")
    for overwrite in (False, True):
        assert RunFolder(tmp_path).claim(overwrite) == []
        assert RunFolder(tmp_path / "new").claim(overwrite) == []
    assert sorted(os.listdir(tmp_path)) == ["last.pt.bak", "notes.txt"]


def test_overwrite_deletes_exactly_the_run_files_when_training_starts(
    shapes: dict[str, Path], real_run: Path, tmp_path: Path
) -> None:
    """--overwrite over a whole run (interrupted.pt included): the folder keeps the user's files, and
    of the old run nothing: not its interrupted.pt, not its log lines, not its checkpoints."""
    folder = tmp_path / "run"
    shutil.copytree(real_run, folder)
    mine = {"notes.txt": b"mine", "last.pt.bak": b"a copy", "curves.png": b"a plot"}
    for name, data in mine.items():
        (folder / name).write_bytes(data)
    old = _contents(folder)
    trainer = Trainer(_corpus(shapes), None, folder, replace(OPTS, seed=7), device="cpu", overwrite=True)
    trainer.prepare()
    assert _contents(folder) == old  # not before training starts
    trainer.fit()
    now = _contents(folder)
    assert sorted(now) == sorted({"last.pt", "best.pt", "metrics.jsonl", *mine})  # interrupted.pt deleted
    assert all(now[name] == data for name, data in mine.items())
    assert _epochs(folder) == [1]  # the new run's line alone
    assert now["last.pt"] != old["last.pt"] and now["best.pt"] != old["best.pt"]
    assert load_checkpoint(folder / "last.pt")["config"]["train"]["seed"] == 7


def test_create_makes_the_folder_and_refuses_a_file(tmp_path: Path) -> None:
    RunFolder(tmp_path / "a" / "b").create()
    assert (tmp_path / "a" / "b").is_dir()
    RunFolder(tmp_path / "a" / "b").create()  # again: fine
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="is not a folder"):
        RunFolder(tmp_path / "f").create()


def _payload(epoch: int) -> dict:
    return {
        "config": {},
        "vocab": {"words": [], "min_count": 1},
        "decoder": {"w": torch.full((2,), float(epoch))},
        "epoch": epoch,
    }


def test_record_appends_the_line_and_writes_last_and_best_only_when_best(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    run.record({"epoch": 1, "train_loss": 2.5}, _payload(1), best=True)
    run.record({"epoch": 2, "train_loss": 2.0}, _payload(2), best=False)
    assert (tmp_path / "metrics.jsonl").read_text() == (
        '{"epoch": 1, "train_loss": 2.5}\n{"epoch": 2, "train_loss": 2.0}\n'
    )
    assert run.load_last()["epoch"] == 2 and load_checkpoint(run.best)["epoch"] == 1
    assert torch.equal(run.load_last()["decoder"]["w"], torch.full((2,), 2.0))
    run.save_interrupted(_payload(3))
    assert load_checkpoint(tmp_path / "interrupted.pt")["epoch"] == 3
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "interrupted.pt", "last.pt", "metrics.jsonl"]


def test_load_last_reads_onto_the_cpu_and_says_when_there_is_none(tmp_path: Path) -> None:
    """--resume on a CPU of a run trained on a GPU: last.pt's tensors come to the CPU."""
    run = RunFolder(tmp_path)
    with pytest.raises(CheckpointError, match="last.pt: no such checkpoint"):
        run.load_last()
    save_checkpoint(run.last, _payload(4))
    gpu_saved(run.last)
    w = run.load_last()["decoder"]["w"]
    assert w.device.type == "cpu" and torch.equal(w, torch.full((2,), 4.0))


def test_trim_drops_the_lines_past_the_checkpoint_and_keeps_the_rest(tmp_path: Path) -> None:
    """A crash after the log line, before last.pt: --resume drops those lines (blank lines too)."""
    run = RunFolder(tmp_path)
    lines = [json.dumps({"epoch": e, "lr": 0.1}) for e in (1, 2, 3, 4)]
    run.metrics.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")
    run.trim(2)
    assert run.metrics.read_text() == lines[0] + "\n" + lines[1] + "\n"
    run.trim(2)
    assert run.metrics.read_text() == lines[0] + "\n" + lines[1] + "\n"
    run.trim(0)
    assert run.metrics.read_text() == ""
    assert os.listdir(tmp_path) == ["metrics.jsonl"]
    RunFolder(tmp_path / "none").trim(1)  # no log yet: nothing to trim, nothing created
    assert not (tmp_path / "none").exists()
