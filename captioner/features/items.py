"""Per-item decoder inputs (an image, or an image sequence) gathered from per-image features."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..data import CaptionCorpus
from ..encoders import Encoder
from ..images import ImageError
from .cache import CachedFeatures, FeatureCache
from .encoding import extract_features


class ItemFeatures:
    """A corpus' decoder inputs, gathered a batch at a time from per-image features.

    An item is an image or an image sequence: its frames' rows in `store`. The decoder's
    `from_frames` turns the gathered frames into what it takes: a single-image decoder the mean
    frame (exactly the image when there is one frame), a sequence model a padded `Frames` batch.
    """

    def __init__(
        self,
        store: Tensor | CachedFeatures,
        frames: list[list[int]] | np.ndarray,  # each item's rows in store; (N, 1) array: one image per item
        from_frames: Callable[[list[Tensor]], object],
    ) -> None:
        self.store, self.frames, self.from_frames = store, frames, from_frames

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, idx: slice | Tensor | Sequence[int]) -> object:
        items = (
            range(len(self))[idx]
            if isinstance(idx, slice)
            else (idx.tolist() if isinstance(idx, Tensor) else list(idx))
        )
        if isinstance(self.frames, np.ndarray):  # (N, 1): one image per item
            flat = self.store[self.frames[np.asarray(items, dtype=np.int64), 0]]  # (b, ...)
            return self.from_frames(list(flat.float().split(1)))
        sizes = [len(self.frames[i]) for i in items]
        flat = self.store[[r for i in items for r in self.frames[i]]]  # (sum of frames, ...) one read
        return self.from_frames(list(flat.float().split(sizes)))


def corpus_features(
    encoder: Encoder,
    decoder,
    corpus: CaptionCorpus,
    cache: FeatureCache | None,
    batch_size: int = 32,
    device: torch.device = torch.device("cpu"),
    num_workers: int = 1,
    desc: str = "features",
    cut: int | None = None,
    mirror: bool = False,
) -> tuple[ItemFeatures, list[int], list[ImageError]]:
    """Features for every item of the corpus, from the cache (filled first) or computed in memory:
    what the decoder takes, or with `cut` the trunk's activations there (the cache's `cut` must match).

    Returns the inputs of the items whose images could all be read, those items' indices, and
    the images that failed. With mirror=True the inputs hold 2K items: the K kept items, then the
    same items seen in their mirror images (the flip augmentation's second view).
    """
    kind = "trunk" if cut is not None else decoder.feature_kind
    common = dict(batch_size=batch_size, num_workers=num_workers)
    if cache is not None:
        failed = cache.fill(corpus.paths, desc=desc, **common)
    else:
        store, failed = extract_features(encoder, corpus.paths, kind, desc=desc, device=device, cut=cut, **common)
    bad = {e.path for e in failed}
    ok = [i for i, p in enumerate(corpus.paths) if str(p) not in bad]
    ok_paths = [corpus.paths[i] for i in ok]
    if cache is not None:
        if mirror:  # both views cached before either is read (a read finds the rows indexed by then)
            cache.fill(ok_paths, desc=f"{desc} (mirrored)", mirror=True, **common)
        store = cache.load(ok_paths, kind, lazy=True)
        row = {i: r for r, i in enumerate(ok)}
    else:
        row = {i: i for i in ok}
    if corpus.frames is None:  # one image per item: rows in an array, not a list per item (COCO: 118k)
        kept = [k for k in range(len(corpus)) if k in row]
        item_rows = np.array([[row[k]] for k in kept], dtype=np.int64).reshape(-1, 1)  # (N, 1)
    else:
        kept = [k for k, fr in enumerate(corpus.frames) if all(f in row for f in fr)]
        item_rows = [[row[f] for f in corpus.frames[k]] for k in kept]
    if mirror:  # the mirrored view's rows follow the whole first store
        if cache is not None:
            mirrored = cache.load(ok_paths, kind, mirror=True, lazy=True)
        else:
            mirrored, _ = extract_features(
                encoder, ok_paths, kind, desc=f"{desc} (mirrored)", device=device, cut=cut, mirror=True, **common
            )
            row = {i: r for r, i in enumerate(ok)}  # the mirrored store holds the readable images only
        offset = len(store)
        store = store.join(mirrored) if isinstance(store, CachedFeatures) else torch.cat([store, mirrored])
        if isinstance(item_rows, np.ndarray):
            item_rows = np.concatenate([item_rows, offset + np.array([[row[k]] for k in kept], dtype=np.int64)])
        else:
            item_rows += [[offset + row[f] for f in corpus.frames[k]] for k in kept]
    return ItemFeatures(store, item_rows, decoder.from_frames), kept, failed
