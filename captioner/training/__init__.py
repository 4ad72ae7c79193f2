"""Training: teacher forcing + BPTT (or self-critical sequence training), per-epoch validation
with the COCO caption metrics, best.pt by a chosen metric, early stopping, exact resume.

options.py     TrainOptions: everything that defines a run, resolved and checked once (pure)
plan.py        RunPlan: what a run resumes or starts from and trains with, decided before any work
optim.py       optimizers, learning-rate schedules, mixed precision (Optimisation holds them)
batches.py     per-item features or pixels, each epoch's shard and random stream
objectives.py  the trainable step (what DDP wraps), cross-entropy and self-critical epochs
validation.py  val captions and their scores
run_folder.py  RUN/: last.pt, best.pt, interrupted.pt, metrics.jsonl
trainer.py     Trainer: records its inputs; prepare() plans, builds or restores and reads features;
               fit() runs the epochs, saves, and calibrates best.pt when there is val data

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
    "Optimisation": "optim",
    "RunPlan": "plan",
    "plan_run": "plan",
    "TrainStep": "objectives",
    "EpochContext": "objectives",
    "SelfCritical": "objectives",
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
