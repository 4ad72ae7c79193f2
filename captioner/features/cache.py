"""The on-disk feature cache.

Encoder features, computed once: in memory for one run, or in a shared on-disk cache.

With a frozen encoder the features of an image never change, so running the CNN on every image
at every epoch (as the classic tutorials do) wastes almost all of the training time. The cache
keeps, per encoder (name + weights hash + preprocessing), an append-only pair of fp16 arrays —
the grid (M, R, D) and the pooled vector (M, D) — and an index from image identity (absolute
path, size, mtime) to row. Any change to the encoder, its weights, its preprocessing or an image
file therefore misses the cache and is extracted afresh. Extraction appends batch by batch, so an
interrupted run keeps what it finished and the next one resumes; a file lock keeps concurrent runs
from writing at once. Memory-mapped reads mean a grid for 100k images never has to fit in RAM.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..checkpoint import atomic_write
from ..encoders import Encoder
from ..errors import OutputError
from ..images import ImageError
from ..paths import cache_dir, check_output_dir
from ..progress import progress
from .encoding import compute_dtype, encode_pixels
from .loading import LoadImage, prepared_batches, split_batch


def image_identity(path: str | os.PathLike) -> str:
    """What makes cached features valid for a file: absolute path, size and modification time."""
    p = Path(path).resolve()
    st = p.stat()
    return f"{p}\t{st.st_size}\t{st.st_mtime_ns}"


def encoder_key(encoder: Encoder, dtype: torch.dtype = torch.float32, cut: int | None = None) -> str:
    """Name + hash of the weights + preprocessing + compute dtype (+ the cut, for a cached trunk):
    features made by anything else never match (bf16 features from a GPU differ from fp32 ones
    from a CPU). A cached trunk hashes only the layers below its cut, which never train: the
    blocks being fine-tuned above it may change without invalidating it."""
    h = hashlib.sha256()
    part = encoder.trunk if cut is None else encoder.trunk[:cut]
    for name, t in sorted(part.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps(encoder.spec.preprocess.to_dict(), sort_keys=True).encode())
    h.update(str(dtype).encode())
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in encoder.spec.name)
    return f"{safe}-{h.hexdigest()[:16]}" if cut is None else f"{safe}-cut{cut}-{h.hexdigest()[:16]}"


MIRRORED = "\tmirrored"  # appended to an image's identity: the cached view of its mirror image


@dataclass
class GridFeatures:
    """Grid features (N, R, D) (or trunk activations (N, C, h, w)) of a dataset, read from the
    memory-mapped cache a batch at a time."""

    array: np.ndarray  # (M, R, D) or (M, C, h, w) fp16 memmap of the whole store
    rows: np.ndarray  # (N,) store row of each dataset image

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.array.shape[1:])

    def __getitem__(self, idx) -> Tensor:
        rows = self.rows[idx] if isinstance(idx, slice) else self.rows[np.asarray(idx)]
        return torch.from_numpy(np.ascontiguousarray(self.array[rows]))  # (b, R, D) fp16

    def join(self, other: GridFeatures) -> GridFeatures:
        """This store's rows, then `other`'s (read from the same cache, `other` no earlier)."""
        return GridFeatures(other.array, np.concatenate([self.rows, other.rows]))


class FeatureCache:
    """One encoder's cached features under CACHE/features/<encoder key>/, computed on `device`
    (whose compute dtype is part of the key).

    With `cut` (fine-tuning the blocks above it) the cache holds the frozen trunk's activations at
    the cut, (C, h, w) per image, instead of the feature grid: a "cached trunk"."""

    def __init__(
        self,
        encoder: Encoder,
        root: str | os.PathLike | None = None,
        device: torch.device = torch.device("cpu"),
        cut: int | None = None,
    ) -> None:
        below = encoder.trunk if cut is None else encoder.trunk[:cut]
        if any(p.requires_grad for p in below.parameters()):
            raise ValueError("a fine-tuned encoder's features change while training: they cannot be cached")
        self.encoder, self.device, self.cut = encoder, device, cut
        self.dir = Path(root or cache_dir()) / "features" / encoder_key(encoder, compute_dtype(device), cut)
        try:
            check_output_dir(self.dir)
        except OutputError as e:
            raise OutputError(f"feature cache: {e} (choose another --cache-dir, or --no-cache)") from None
        self.dir.mkdir(parents=True, exist_ok=True)
        self.index: dict[str, int] = {}
        self.shape: tuple[int, ...] | None = None  # (R, D), or (C, h, w) for a cached trunk

    # files: meta.json {"encoder", "shape", "dtype", "computed_in"}, index.jsonl ({"k": identity, "r": row}
    # per line), grid.f16, pooled.f16 (left empty for a cached trunk), lock
    def _read(self) -> None:
        meta = self.dir / "meta.json"
        self.shape = tuple(json.loads(meta.read_text())["shape"]) if meta.is_file() else None
        self.index = {}
        index = self.dir / "index.jsonl"
        if index.is_file():
            text = index.read_text(encoding="utf-8")
            for line in text.split("\n")[:-1]:  # whole lines only: a last line without its newline was cut
                try:
                    rec = json.loads(line)
                    self.index[rec["k"]] = rec["r"]
                except (ValueError, KeyError, TypeError):  # damaged by an older version: that row is re-extracted
                    continue

    def _repair_index(self) -> None:
        """Cut index.jsonl back to its last whole line, so the next append starts on a fresh line
        (a crash mid-line would otherwise glue the next record onto the cut one)."""
        index = self.dir / "index.jsonl"
        if not index.is_file():
            return
        data = index.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep != len(data):
            os.truncate(index, keep)

    def _rows(self) -> int:
        """Rows the index accounts for (rows past them were written by a run that crashed)."""
        return 1 + max(self.index.values(), default=-1)

    def _row_sizes(self) -> dict[str, int]:
        """Elements per image row of each array file."""
        sizes = {"grid.f16": int(np.prod(self.shape))}
        if self.cut is None:
            sizes["pooled.f16"] = self.shape[-1]
        return sizes

    def _arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        n = self._rows()
        grid = np.memmap(self.dir / "grid.f16", dtype=np.float16, mode="r", shape=(n, *self.shape))
        if self.cut is not None:
            return grid, None
        pooled = np.memmap(self.dir / "pooled.f16", dtype=np.float16, mode="r", shape=(n, self.shape[-1]))
        return grid, pooled

    def fill(
        self,
        paths: Sequence[Path],
        batch_size: int = 32,
        num_workers: int = 1,
        desc: str = "features",
        mirror: bool = False,
    ) -> list[ImageError]:
        """Extract and append whatever of `paths` (or, with mirror=True, of their mirror images)
        is not cached yet; returns the images that failed."""
        with open(self.dir / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one writer at a time; others wait, then find their rows
            self._read()
            todo, seen = [], set()
            for p in paths:
                try:
                    key = image_identity(p) + (MIRRORED if mirror else "")
                except OSError as e:
                    todo.append(
                        (
                            p,
                            None,
                            ImageError(
                                p, "no such file" if isinstance(e, FileNotFoundError) else f"unreadable ({e.strerror})"
                            ),
                        )
                    )
                    continue
                if key not in self.index and key not in seen:
                    seen.add(key)
                    todo.append((p, key, None))
            failed = [err for _, _, err in todo if err is not None]
            todo = [(p, k) for p, k, err in todo if err is None]
            if todo:
                failed += self._extract(todo, batch_size, num_workers, desc, mirror)
        return failed

    def _extract(
        self, todo: list[tuple[Path, str]], batch_size: int, num_workers: int, desc: str, mirror: bool
    ) -> list[ImageError]:
        device = self.device
        encoder = self.encoder.to(device, memory_format=torch.channels_last).eval()
        failed: list[ImageError] = []
        self._repair_index()
        n = self._rows()
        if self.shape is not None:  # drop rows a crash left without an index line
            for name, row in self._row_sizes().items():
                if (self.dir / name).exists():
                    os.truncate(self.dir / name, n * row * 2)
        with (
            open(self.dir / "grid.f16", "ab") as fg,
            open(self.dir / "pooled.f16", "ab") as fp,
            open(self.dir / "index.jsonl", "a", encoding="utf-8") as fi,
            progress(total=len(todo), desc=desc, unit="img") as bar,
        ):
            paths, start = [p for p, _ in todo], 0
            load = LoadImage(encoder.spec.preprocess, mirror=mirror)
            for batch in prepared_batches(paths, load, batch_size, num_workers):
                idx, pixels, errors = split_batch(batch)
                idx = [start + i for i in idx]
                start += len(batch)
                failed += errors
                if pixels is not None:
                    grid = encode_pixels(encoder, pixels, device, self.cut)  # (b, R, D) or (b, C, h, w) fp32
                    if self.shape is None:
                        self.shape = tuple(grid.shape[1:])
                        meta = {
                            "encoder": encoder.spec.name,
                            "shape": list(self.shape),
                            "dtype": "float16",
                            "computed_in": str(compute_dtype(device)),
                        }
                        atomic_write(self.dir / "meta.json", lambda f, meta=meta: f.write(json.dumps(meta).encode()))
                    fg.write(grid.half().cpu().numpy().tobytes())
                    if self.cut is None:
                        fp.write(grid.mean(dim=1).half().cpu().numpy().tobytes())
                    fg.flush()
                    fp.flush()
                    for i in idx:  # index lines only after their rows are written
                        fi.write(json.dumps({"k": todo[i][1], "r": n}) + "\n")
                        self.index[todo[i][1]] = n
                        n += 1
                    fi.flush()
                bar.update(len(batch))
        return failed

    def load(self, paths: Sequence[Path], kind: str = "pooled", mirror: bool = False) -> Tensor | GridFeatures:
        """Cached features of `paths` (or of their mirror images; all must be cached): pooled
        (N, D) fp16 in RAM, or the grid (or cached trunk) via memmap."""
        self._read()
        view = MIRRORED if mirror else ""
        rows = np.array([self.index[image_identity(p) + view] for p in paths], dtype=np.int64)
        grid, pooled = self._arrays()
        if kind == "pooled" and pooled is not None:
            return torch.from_numpy(np.ascontiguousarray(pooled[rows]))  # (N, D) fp16
        return GridFeatures(grid, rows)
