"""Images to pixels, in worker processes: one bad file never stops a batch."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..images import ImageError, Preprocess, load_image


class LoadImage:
    """Path -> preprocessed pixels (3, S, S), or their mirror image with mirror=True (the flip
    augmentation's second view); a picklable callable for DataLoader workers."""

    def __init__(self, preprocess: Preprocess, max_pixels: int | None = None, mirror: bool = False) -> None:
        self.preprocess, self.max_pixels, self.mirror = preprocess, max_pixels, mirror

    def __call__(self, path: str | os.PathLike) -> Tensor:
        pixels = self.preprocess(load_image(path, self.max_pixels))  # (3, S, S)
        return pixels.flip(-1) if self.mirror else pixels


class _Prepared(Dataset):
    """Each item prepared, or the ImageError it raised, so one bad file never stops a batch."""

    def __init__(self, items: Sequence, prepare: Callable[[object], Tensor]) -> None:
        self.items, self.prepare = items, prepare

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Tensor | ImageError:
        try:
            return self.prepare(self.items[i])
        except ImageError as e:
            return e


def _as_list(batch: list) -> list:
    return batch


def default_workers(n_items: int, batch_size: int) -> int:
    """Decode in a worker process only when there is a next batch to overlap with the CNN."""
    return 0 if n_items <= batch_size else max(1, min(4, (os.cpu_count() or 2) // 2))


def prepared_batches(
    items: Sequence, prepare: Callable[[object], Tensor], batch_size: int = 32, num_workers: int = 0
) -> Iterator[list[Tensor | ImageError]]:
    """Items prepared in batches, in order; with workers, decoding overlaps the caller's compute."""
    if num_workers == 0:
        data = _Prepared(items, prepare)
        for start in range(0, len(items), batch_size):
            yield [data[i] for i in range(start, min(start + batch_size, len(items)))]
        return
    yield from DataLoader(
        _Prepared(items, prepare), batch_size=batch_size, num_workers=num_workers, collate_fn=_as_list
    )


def split_batch(batch: list[Tensor | ImageError]) -> tuple[list[int], Tensor | None, list[ImageError]]:
    """(positions of the good items, their pixels stacked (b, 3, S, S), the errors)."""
    idx = [i for i, x in enumerate(batch) if isinstance(x, Tensor)]
    pixels = torch.stack([batch[i] for i in idx]) if idx else None
    return idx, pixels, [x for x in batch if isinstance(x, ImageError)]
