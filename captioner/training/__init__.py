"""Training: teacher forcing + BPTT (or self-critical sequence training), per-epoch validation
with the COCO caption metrics, best.pt by a chosen metric, early stopping, exact resume.

options.py     TrainOptions: everything that defines a run, resolved and checked once (pure)
optim.py       optimizers, learning-rate schedules, mixed precision
batches.py     per-item features or pixels, each epoch's shard and random stream
objectives.py  the trainable step (what DDP wraps), cross-entropy and self-critical epochs
validation.py  val captions and their scores
run_folder.py  RUN/: last.pt, best.pt, interrupted.pt, metrics.jsonl
trainer.py     Trainer: builds or restores the model, runs the epochs, saves

Names are imported on first use, so `from captioner.training import TrainOptions` (as the CLI
does to build its flags) does not load the training machinery.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_HOMES = {
    "TrainOptions": "options",
    "CLI_UNSET": "options",
    "ARCHITECTURE": "options",
    "RESUMABLE": "options",
    "canonical_metric": "options",
    "flag": "options",
    "build_optimizer": "optim",
    "build_scheduler": "optim",
    "CosineFactor": "optim",
    "amp_dtype": "optim",
    "TrainStep": "objectives",
    "scst_rewards": "objectives",
    "RunFolder": "run_folder",
    "RunFolderError": "run_folder",
    "Trainer": "trainer",
    "TrainingInterrupted": "trainer",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'captioner.training' has no attribute {name!r}")
    return getattr(import_module(f".{_HOMES[name]}", __name__), name)
