"""Checkpoints: tensors + JSON-able config + vocabulary; never pickled code.

Files are written atomically (temp file in the same folder, fsync, rename), so an interrupted
save leaves the previous file intact. Loading uses `weights_only=True`.
"""

from __future__ import annotations

import os
import re
import signal
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from pickle import UnpicklingError  # the error torch's safe loader raises; nothing is pickled here
from typing import Any

import torch

from .errors import CheckpointError, OutputError
from .paths import check_output_file

FORMAT = "captioner-checkpoint"
FORMAT_VERSION = 1
REQUIRED = ("format", "format_version", "config", "vocab", "decoder")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C (SIGINT) and SIGTERM wait until the block is done, then take effect as they would
    have: a write is never cut halfway (torch's zip writer, cut mid-file, raises its own error on
    top of the KeyboardInterrupt and leaves nothing usable). Nested blocks hold until the outermost
    one ends. Outside the main thread (where Python cannot set handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: h for s in held if (h := signal.getsignal(s)) not in (signal.SIG_IGN, None)}
    for s in previous:  # (None: a handler not set from Python; left alone)
        signal.signal(s, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(pending):  # delivered now, to whatever handled them before
            signal.raise_signal(s)


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(file_object) on a temp file next to `path`, then rename it over `path`; signals
    wait until it is done (see `signals_held`)."""
    path = Path(path)
    check_output_file(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with signals_held():
            _atomic_write(path, write)
    except OSError as e:  # e.g. the disk filled up: name the user's file, not the temp file
        raise OutputError(
            f"{path}: not written ({e.strerror or type(e).__name__}); any earlier version of it is untouched"
        ) from None


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
