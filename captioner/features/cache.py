"""The on-disk feature cache.

Encoder features, computed once: in memory for one run, or in a shared on-disk cache.

With a frozen encoder the features of an image never change, so running the CNN on every image
at every epoch (as the classic tutorials do) wastes almost all of the training time. The cache
keeps, per encoder (name + weights hash + preprocessing), an append-only pair of fp16 arrays —
the grid (M, R, D) and the pooled vector (M, D) — and an index from image identity (absolute
path, size, mtime) to row. Any change to the encoder, its weights, its preprocessing or an image
file therefore misses the cache and is extracted afresh. Extraction appends batch by batch, so an
interrupted run keeps what it finished and the next one resumes; a file lock keeps concurrent runs
from writing at once. Rows are read a batch at a time (positioned reads), so a grid for COCO's
118k photos (15 GB) never has to fit in RAM, nor counts in the process' resident memory.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
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


def image_identities(paths: Sequence[str | os.PathLike]) -> list[str | OSError]:
    """`image_identity` of each path (or the error that stat gave), with one system call per file:
    a folder is resolved once for all its files (resolving each path walks every folder above it,
    seconds for COCO's 118k photos); a file that is itself a link is resolved whole."""
    real: dict[str, str] = {}
    out: list[str | OSError] = []
    for path in paths:
        path = os.fspath(path)
        try:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out.append(image_identity(path))
                continue
            folder, name = os.path.split(path)
            if folder not in real:
                real[folder] = str(Path(folder or ".").resolve())
            out.append(f"{os.path.join(real[folder], name)}\t{st.st_size}\t{st.st_mtime_ns}")
        except OSError as e:
            out.append(e)
    return out


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


def _key(identity: str | OSError) -> str:
    if isinstance(identity, OSError):
        raise identity
    return identity


MIRRORED = "\tmirrored"  # appended to an image's identity: the cached view of its mirror image


class CachedFeatures:
    """Rows of one cache array file (grid (R, D), pooled (D,) or trunk (C, h, w) per image) for a
    dataset's images, read a batch at a time.

    Rows are read with positioned reads rather than through a memory map: a map's pages count in
    the process' resident memory, so a long run over a large cache would look as if it held the
    whole store; read rows live only in the batch (the OS page cache still keeps them warm)."""

    def __init__(self, path: Path, row_shape: tuple[int, ...], rows: np.ndarray) -> None:
        self.path, self.row_shape, self.rows = Path(path), tuple(row_shape), rows  # rows: (N,) store row per image
        self.row_bytes = int(np.prod(self.row_shape)) * 2  # fp16

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.row_shape)

    def __getitem__(self, idx) -> Tensor:
        rows = self.rows[idx] if isinstance(idx, slice) else self.rows[np.asarray(idx, dtype=np.int64)]
        rows = np.atleast_1d(rows)
        out = np.empty((len(rows), *self.row_shape), dtype=np.float16)  # (b, ...) fp16
        flat = out.reshape(len(rows), self.row_bytes // 2).view(np.uint8)  # (b, row_bytes); not -1: b may be 0
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for k in np.argsort(rows, kind="stable"):  # in file order: the disk reads forward
                if os.preadv(fd, [flat[k]], int(rows[k]) * self.row_bytes) != self.row_bytes:
                    raise OSError(f"{self.path}: row {int(rows[k])} is cut short (the cache was damaged)")
        finally:
            os.close(fd)
        return torch.from_numpy(out)

    def join(self, other: CachedFeatures) -> CachedFeatures:
        """This store's rows, then `other`'s (rows of the same cache file)."""
        if other.path != self.path or other.row_shape != self.row_shape:
            raise ValueError("only rows of the same cache file can be joined")
        return CachedFeatures(self.path, self.row_shape, np.concatenate([self.rows, other.rows]))


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
        self._read_to: tuple[tuple[int, int] | None, int] = (None, 0)  # (index file, bytes of it read)
        self.shape: tuple[int, ...] | None = None  # (R, D), or (C, h, w) for a cached trunk

    # files: meta.json {"encoder", "shape", "dtype", "computed_in"}, index.jsonl ({"k": identity, "r": row}
    # per line), grid.f16, pooled.f16 (left empty for a cached trunk), lock
    def _read(self) -> None:
        """Read the meta and the index lines added since the last read (the index only grows:
        reading it whole each time costs seconds at COCO's size)."""
        meta = self.dir / "meta.json"
        self.shape = tuple(json.loads(meta.read_text())["shape"]) if meta.is_file() else None
        index = self.dir / "index.jsonl"
        try:
            st = index.stat()
        except FileNotFoundError:
            self.index, self._read_to = {}, (None, 0)
            return
        file, done = self._read_to
        if file != (st.st_dev, st.st_ino) or st.st_size < done:  # another file (or cut below what was read)
            self.index, done = {}, 0
        with open(index, "rb") as f:
            f.seek(done)
            data = f.read()
        whole = data.rfind(b"\n") + 1  # whole lines only: a last line without its newline was cut
        for line in data[:whole].decode("utf-8", errors="replace").split("\n")[:-1]:
            try:
                rec = json.loads(line)
                self.index[rec["k"]] = rec["r"]
            except (ValueError, KeyError, TypeError):  # damaged by an older version: that row is re-extracted
                continue
        self._read_to = ((st.st_dev, st.st_ino), done + whole)

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
            for p, key in zip(paths, image_identities(paths)):
                if isinstance(key, OSError):
                    reason = "no such file" if isinstance(key, FileNotFoundError) else f"unreadable ({key.strerror})"
                    todo.append((p, None, ImageError(p, reason)))
                    continue
                key += MIRRORED if mirror else ""
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
        with self._appending() as append, progress(total=len(todo), desc=desc, unit="img") as bar:
            paths, start = [p for p, _ in todo], 0
            load = LoadImage(encoder.spec.preprocess, mirror=mirror)
            for batch in prepared_batches(paths, load, batch_size, num_workers):
                idx, pixels, errors = split_batch(batch)
                keys = [todo[start + i][1] for i in idx]
                start += len(batch)
                failed += errors
                if pixels is not None:
                    append(keys, encode_pixels(encoder, pixels, device, self.cut))  # (b, R, D) or (b, C, h, w)
                bar.update(len(batch))
        return failed

    def put(self, paths: Sequence[Path], batches: Iterable[Tensor], mirror: bool = False) -> None:
        """Store features computed elsewhere for `paths` (a batch (b, R, D) — or (b, C, h, w) for a
        cached trunk — at a time, in order), written exactly as an extraction here writes them:
        e.g. features extracted on another machine with the same encoder, or a benchmark's
        synthetic ones (benchmarks/scale.py). A path cached already gets the new row."""
        keys = [_key(k) + (MIRRORED if mirror else "") for k in image_identities(paths)]
        with open(self.dir / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._read()
            start = 0
            with self._appending() as append:
                for grid in batches:
                    if start + len(grid) > len(keys):
                        raise ValueError(f"more feature rows than the {len(keys)} paths given")
                    append(keys[start : start + len(grid)], grid)
                    start += len(grid)
            if start != len(keys):
                raise ValueError(f"features for {start} of the {len(keys)} paths given")

    @contextmanager
    def _appending(self) -> Iterator[Callable[[list[str], Tensor], None]]:
        """Open the arrays and the index for appending (the caller holds the lock and has read the
        index) and yield `append(keys, grid)`: rows first, then their index lines, so a crash at
        any point leaves whole rows that the index accounts for, or rows the next run cuts off."""
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
        ):

            def append(keys: list[str], grid: Tensor) -> None:
                nonlocal n
                if len(keys) != len(grid):
                    raise ValueError(f"{len(keys)} keys for {len(grid)} feature rows")
                if self.shape is None:
                    self.shape = tuple(grid.shape[1:])
                    meta = {
                        "encoder": self.encoder.spec.name,
                        "shape": list(self.shape),
                        "dtype": "float16",
                        "computed_in": str(compute_dtype(self.device)),
                    }
                    atomic_write(self.dir / "meta.json", lambda f, meta=meta: f.write(json.dumps(meta).encode()))
                elif tuple(grid.shape[1:]) != self.shape:
                    raise ValueError(f"feature rows of shape {tuple(grid.shape[1:])}, the cache holds {self.shape}")
                grid = torch.as_tensor(grid)
                fg.write(grid.half().cpu().numpy().tobytes())
                if self.cut is None:
                    fp.write(grid.float().mean(dim=1).half().cpu().numpy().tobytes())
                fg.flush()
                fp.flush()
                fi.write("".join(json.dumps({"k": k, "r": n + i}) + "\n" for i, k in enumerate(keys)))
                fi.flush()  # index lines only after their rows are written
                self.index.update((k, n + i) for i, k in enumerate(keys))
                n += len(keys)

            yield append

    def load(
        self, paths: Sequence[Path], kind: str = "pooled", mirror: bool = False, lazy: bool = False
    ) -> Tensor | CachedFeatures:
        """Cached features of `paths` (or of their mirror images; all must be cached): the grid (or
        cached trunk) as `CachedFeatures`, read a batch at a time; pooled (N, D) fp16 in RAM, or
        with lazy=True also as `CachedFeatures` (a large training set's pooled vectors need not
        all sit in memory)."""
        self._read()
        view = MIRRORED if mirror else ""
        rows = np.array([self.index[_key(k) + view] for k in image_identities(paths)], dtype=np.int64)
        if kind == "pooled" and self.cut is None:
            pooled = CachedFeatures(self.dir / "pooled.f16", (self.shape[-1],), rows)
            return pooled if lazy else pooled[:]  # (N, D) fp16
        return CachedFeatures(self.dir / "grid.f16", self.shape, rows)
