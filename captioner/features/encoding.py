"""Pixels to features: the frozen encoder run once per image, in memory (no cache)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..encoders import Encoder
from ..errors import DataError
from ..images import ImageError
from ..progress import progress
from .loading import LoadImage, prepared_batches, split_batch


def compute_dtype(device: torch.device) -> torch.dtype:
    """What the encoder computes in on this device: bf16 autocast on CUDA, fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@torch.no_grad()
def encode_pixels(encoder: Encoder, pixels: Tensor, device: torch.device, cut: int | None = None) -> Tensor:
    """(B, 3, S, S) -> grid (B, R, D) fp32, or with `cut` the trunk's activations there (B, C, h, w);
    channels_last, computed in `compute_dtype(device)`."""
    if device.type == "cuda":
        pixels = pixels.pin_memory()  # so the copy to the GPU is asynchronous
    x = pixels.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    dtype = compute_dtype(device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        return (encoder(x) if cut is None else encoder.below(x, cut)).float()


def pool(grid: Tensor, kind: str) -> Tensor:
    """What a decoder consumes from the encoder grid (B, R, D): pooled (B, D) or the grid itself
    (kind "trunk", the cached trunk's activations, passes through as well)."""
    return grid.mean(dim=1) if kind == "pooled" else grid


@torch.no_grad()
def extract_features(
    encoder: Encoder,
    paths: Sequence[Path],
    kind: str = "pooled",
    batch_size: int = 32,
    device: torch.device = torch.device("cpu"),
    num_workers: int = 1,
    desc: str = "features",
    cut: int | None = None,
    mirror: bool = False,
) -> tuple[Tensor, list[ImageError]]:
    """In-memory features of every image (or of its mirror image), in order (no cache): (N, D)
    pooled fp32, (N, R, D) grid fp16, or with `cut` the trunk's activations there (N, C, h, w) fp16.

    Rows of images that failed are zero; the errors come back alongside.
    """
    encoder = encoder.to(device, memory_format=torch.channels_last).eval()
    out: Tensor | None = None
    failed: list[ImageError] = []
    start = 0
    with progress(total=len(paths), desc=desc, unit="img") as bar:
        for batch in prepared_batches(
            paths, LoadImage(encoder.spec.preprocess, mirror=mirror), batch_size, num_workers
        ):
            idx, pixels, errors = split_batch(batch)
            failed += errors
            if pixels is not None:
                f = pool(encode_pixels(encoder, pixels, device, cut), kind)
                f = (f if kind == "pooled" else f.half()).cpu()
                if out is None:
                    out = torch.zeros((len(paths), *f.shape[1:]), dtype=f.dtype)
                out[[start + i for i in idx]] = f
            start += len(batch)
            bar.update(len(batch))
    if out is None:
        raise DataError("no image could be read")
    return out, failed
