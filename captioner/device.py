"""Device selection: --device auto|cpu|cuda[:N]."""

from __future__ import annotations

import torch

from .errors import UsageError


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; asking for cuda without one is an error."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but no CUDA device is available (use --device cpu)")
    return dev
