"""Optimizers, learning-rate schedules and mixed precision, from the run's options."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from .objectives import Update
from .options import TrainOptions


def build_optimizer(opts: TrainOptions, groups: list[dict]) -> torch.optim.Optimizer:
    if opts.optimizer == "adam":
        return torch.optim.Adam(groups, lr=opts.lr, weight_decay=opts.weight_decay)
    if opts.optimizer in ("sgd", "momentum"):
        momentum = opts.momentum if opts.optimizer == "momentum" else 0.0
        return torch.optim.SGD(groups, lr=opts.lr, momentum=momentum, weight_decay=opts.weight_decay)
    raise UsageError(f"unknown optimizer {opts.optimizer!r}: adam, sgd or momentum")


class CosineFactor:
    """The cosine schedule's LR factor at an epoch, 1 -> 0 over `epochs` (then 0, never rising again).
    A callable object rather than a function so that LambdaLR keeps it in its state_dict; a
    resume with more epochs sets `epochs`, and the rest of the run follows the longer curve."""

    def __init__(self, epochs: int) -> None:
        self.epochs = max(1, epochs)

    def __call__(self, epoch: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(epoch, self.epochs) / self.epochs))


def build_scheduler(opts: TrainOptions, optim: torch.optim.Optimizer, mode: str):
    if opts.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optim, mode=mode, factor=opts.lr_gamma, patience=opts.lr_patience, eps=0.0
        )
    if opts.lr_schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optim, lambda epoch: 1.0)
    if opts.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optim, step_size=opts.lr_step_epochs, gamma=opts.lr_gamma)
    if opts.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optim, CosineFactor(opts.epochs))
    raise UsageError(f"unknown lr schedule {opts.lr_schedule!r}: plateau, constant, step or cosine")


def stretch_cosine(sched, optim: torch.optim.Optimizer, epochs: int, epoch: int) -> None:
    """On a resume with another --epochs, the cosine schedule runs over the new horizon: the
    coming epochs get the LR the longer (or shorter) schedule gives them."""
    if not isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
        return
    for group, base, factor in zip(optim.param_groups, sched.base_lrs, sched.lr_lambdas):
        if isinstance(factor, CosineFactor) and factor.epochs != max(1, epochs):
            factor.epochs = max(1, epochs)
            group["lr"] = base * factor(epoch)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for --amp on this device, or None for full fp32."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if amp in ("off", "none"):
        return None
    if amp in ("bf16", "fp16"):
        return torch.bfloat16 if amp == "bf16" else torch.float16
    raise UsageError(f"unknown --amp {amp!r}: auto, off, bf16 or fp16")


@dataclass
class Optimisation:
    """A run's optimizer, LR schedule, fp16 gradient scaler and mixed-precision dtype, and the
    update step built from them; saved into and restored from every checkpoint together."""

    optim: torch.optim.Optimizer
    sched: Any  # a torch LR scheduler (ReduceLROnPlateau is not an LRScheduler)
    scaler: torch.amp.GradScaler
    amp: torch.dtype | None  # autocast dtype, None: full fp32
    update: Update

    @classmethod
    def build(
        cls, opts: TrainOptions, groups: list[dict], device: torch.device, mode: str, last_good: Path
    ) -> Optimisation:
        """mode: "max" when a higher selection score is better, else "min" (for plateau decay)."""
        optim = build_optimizer(opts, groups)
        amp = amp_dtype(opts.amp, device)
        scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        sched = build_scheduler(opts, optim, mode)
        return cls(optim, sched, scaler, amp, Update(optim, scaler, opts.grad_clip, last_good))

    def autocast(self, device: torch.device) -> torch.autocast:
        return torch.autocast(device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)

    def step_schedule(self, score: float) -> None:
        """After an epoch: plateau decay follows the selection score, the other schedules the epoch."""
        if isinstance(self.sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.sched.step(score)
        else:
            self.sched.step()

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps to continue exactly."""
        return {
            "optimizer": self.optim.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, ckpt: dict[str, Any], epochs: int) -> None:
        """From a checkpoint written after epoch ckpt["epoch"]; the cosine schedule stretched to
        `epochs` (a resume may train longer)."""
        self.optim.load_state_dict(ckpt["optimizer"])
        if isinstance(self.sched, torch.optim.lr_scheduler.LambdaLR) and "lr_lambdas" not in ckpt["scheduler"]:
            self.sched.last_epoch = ckpt["scheduler"]["last_epoch"]  # a cosine run saved by an older version
        else:
            self.sched.load_state_dict(ckpt["scheduler"])
        stretch_cosine(self.sched, self.optim, epochs, ckpt["epoch"])
        self.scaler.load_state_dict(ckpt.get("scaler") or {})
