"""Checkpoints: tensors + JSON-able config + vocabulary; never pickled code.

Files are written atomically (temp file in the same folder, fsync, rename), so an interrupted
save leaves the previous file intact. Loading uses `weights_only=True`.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from pickle import UnpicklingError  # the error torch's safe loader raises; nothing is pickled here
from typing import Any

import torch

from .errors import CheckpointError
from .paths import atomic_write, check_output_file, signals_held  # noqa: F401  (their home is paths.py)

FORMAT = "captioner-checkpoint"
FORMAT_VERSION = 1
REQUIRED = ("format", "format_version", "config", "vocab", "decoder")


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint; CheckpointError (never arbitrary code) on anything wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing them
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except UnpicklingError as e:
        m = re.search(r"WeightsUnpickler error:\s*(.+?)\n", str(e))
        detail = m.group(1).strip() if m else type(e).__name__
        raise CheckpointError(
            f"{path}: refused: not a plain tensors-and-JSON checkpoint; it may hold pickled "
            f"code, which is never run ({detail})"
        ) from None
    except Exception as e:  # truncated or not a torch file at all
        raise CheckpointError(
            f"{path}: not a readable checkpoint: truncated or corrupt ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a captioner checkpoint")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {ckpt.get('format_version')} "
            f"is not supported by this captioner (expects {FORMAT_VERSION})"
        )
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return ckpt
