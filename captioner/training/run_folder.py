"""The run folder: RUN/last.pt after every epoch, RUN/best.pt when the selection metric improves,
RUN/interrupted.pt after Ctrl-C/SIGTERM, RUN/metrics.jsonl one line per epoch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..checkpoint import CheckpointError, atomic_write, load_checkpoint, save_checkpoint, signals_held
from ..paths import check_output_dir


class RunFolderError(CheckpointError):
    """--out names a folder that already holds a run, and neither --resume nor --overwrite was given."""


class RunFolder:
    FILES = ("last.pt", "best.pt", "interrupted.pt", "metrics.jsonl")

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.last, self.best = self.path / "last.pt", self.path / "best.pt"
        self.interrupted, self.metrics = self.path / "interrupted.pt", self.path / "metrics.jsonl"

    def create(self) -> None:
        check_output_dir(self.path)  # before any work: a run that cannot save is not started
        self.path.mkdir(parents=True, exist_ok=True)

    def claim(self, overwrite: bool) -> list[str]:
        """A fresh run does not start in a folder that holds another run's checkpoints: they would
        mix (a first epoch interrupted here, then --resume, would continue the other run).
        Returns the files --overwrite will delete (when training starts, not before every option
        and file has been checked)."""
        held = [name for name in self.FILES if (self.path / name).exists()]
        if held and not overwrite:
            raise RunFolderError(
                f"{self.path} holds a run ({', '.join(held)}): --resume continues it, "
                "--overwrite starts afresh in it (deleting those files), or choose another --out"
            )
        return held

    def clear(self, names: list[str]) -> None:
        for name in names:
            (self.path / name).unlink(missing_ok=True)

    def load_last(self) -> dict[str, Any]:
        return load_checkpoint(self.last, map_location="cpu")

    def record(self, record: dict[str, Any], payload: dict[str, Any], best: bool) -> None:
        """The epoch's log line, last.pt and (if best) best.pt, written together: Ctrl-C waits."""
        with signals_held():
            with open(self.metrics, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            save_checkpoint(self.last, payload)  # after the log line: a resume trims lines past the checkpoint
            if best:
                save_checkpoint(self.best, payload)

    def save_interrupted(self, payload: dict[str, Any]) -> None:
        save_checkpoint(self.interrupted, payload)

    def trim(self, epoch: int) -> None:
        """Drop metric lines from epochs after the checkpoint (written just before a crash)."""
        if self.metrics.is_file():
            lines = [line for line in self.metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
            kept = [line for line in lines if json.loads(line)["epoch"] <= epoch]
            atomic_write(self.metrics, lambda f: f.write("".join(line + "\n" for line in kept).encode()))
