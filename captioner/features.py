"""Running the frozen encoder over a set of images, once, in batches.

With a frozen encoder the features of an image never change, so training computes them once per
run instead of once per caption per epoch.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .api import pool
from .data import DataError
from .encoders import Encoder
from .images import ImageError, Preprocess, load_image


class ImageFiles(Dataset):
    """Preprocessed pixels of image files; decoding runs in DataLoader workers."""

    def __init__(self, paths: Sequence[Path], preprocess: Preprocess) -> None:
        self.paths, self.preprocess = list(paths), preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:
        try:
            return self.preprocess(load_image(self.paths[i]))  # (3, S, S)
        except ImageError as e:
            raise DataError(str(e)) from None


@torch.no_grad()
def extract_features(encoder: Encoder, paths: Sequence[Path], kind: str = "pooled", batch_size: int = 32,
                     device: torch.device = torch.device("cpu"), num_workers: int = 1,
                     quiet: bool = False, desc: str = "features") -> Tensor:
    """Features of every image, in order: (N, D) pooled or (N, R, D) grid, fp32 for pooled, fp16 grid."""
    encoder = encoder.to(device, memory_format=torch.channels_last).eval()
    loader = DataLoader(ImageFiles(paths, encoder.spec.preprocess), batch_size=batch_size,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    out: list[Tensor] = []
    for pixels in tqdm(loader, desc=desc, unit="batch", disable=quiet, leave=False):
        x = pixels.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            grid = encoder(x)  # (B, R, D)
        f = pool(grid.float(), kind)
        out.append((f if kind == "pooled" else f.half()).cpu())
    return torch.cat(out)
