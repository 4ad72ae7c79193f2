"""What the training loop iterates over: per-item features (the cached trunk when fine-tuning,
pixels for encoders that cannot be cut), mirrored views for the flip augmentation, the epoch's
shard of a shuffle that depends on (seed, epoch) only, and each epoch's random stream."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..api import Captioner
from ..data import Batch, CaptionCorpus, CaptionDataset, DataError, collate
from ..distributed import Dist
from ..errors import UsageError
from ..features import FeatureCache, ItemFeatures, LoadImage, corpus_features
from ..models import Frames
from ..vocab import Vocabulary
from .options import TrainOptions

log = logging.getLogger("captioner")


#: words that change places in the caption of a mirrored photo
MIRROR_WORDS = {"left": "right", "right": "left"}


class Mirrored(Dataset):
    """The flip augmentation: each epoch, each caption is seen with its photo or, half of the time
    (drawn from (seed, epoch) alone, so a resume or another number of processes sees the same),
    with the photo's mirror image (item k + n_items of the features) and "left"/"right" swapped.

    Swapping rather than leaving those captions out keeps every caption: in a mirror image the
    swapped caption is the true one. (A word the vocabulary lacks becomes <unk>, as in the photo.)
    """

    def __init__(self, dataset: CaptionDataset, n_items: int, vocab: Vocabulary, seed: int) -> None:
        self.dataset, self.n_items, self.seed = dataset, n_items, seed
        self.corpus = dataset.corpus
        self.swap = {vocab.stoi[a]: vocab.stoi.get(b, vocab.unk_id) for a, b in MIRROR_WORDS.items() if a in vocab.stoi}
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch, 7]).generate_state(1)[0]))
        self.flipped = torch.rand(len(self.dataset), generator=g) < 0.5  # (N,) which captions see the mirror

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[int, list[int]]:
        item, ids = self.dataset[i]
        if not self.flipped[i]:
            return item, ids
        return item + self.n_items, [self.swap.get(t, t) for t in ids]


class ShardSampler(DistributedSampler):
    """DistributedSampler's shuffled shard, index for index, held as a tensor: its list of Python
    ints costs ~36 bytes a caption for the whole epoch (21 MB at COCO's 592k captions), this 8."""

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=g)  # (N,)
        pad = self.total_size - len(order)  # the first indices again, so every rank gets as many
        if pad > 0:
            order = torch.cat([order, order.repeat(math.ceil(pad / len(order)))[:pad]])
        return (int(i) for i in order[self.rank : self.total_size : self.num_replicas].numpy())


def item_data(
    model: Captioner,
    corpus: CaptionCorpus,
    opts: TrainOptions,
    device: torch.device,
    cache: FeatureCache | None,
    skip_bad: bool,
    desc: str,
    cut: int | None = None,
    mirror: bool = False,
) -> tuple[CaptionDataset | Mirrored, ItemFeatures | None]:
    """Features computed once (cached on disk unless --no-cache): the frozen encoder's, or when
    fine-tuning the frozen trunk's activations at `cut`; items are image or sequence indices.
    Fine-tuning an encoder that cannot be cut (cut None): items carry pixels and the whole
    encoder runs every step. mirror=True: the flip augmentation (see `Mirrored`)."""
    if model.encoder.trainable and cut is None:
        if mirror:
            raise UsageError("--flip needs cached features: this encoder cannot be cut for --fine-tune-encoder")
        return CaptionDataset(corpus, model.vocab, opts.max_caption_len, LoadImage(model.preprocess)), None
    feats, kept, failed = corpus_features(
        model.encoder,
        model.decoder,
        corpus,
        cache,
        device=device,
        num_workers=opts.num_workers,
        desc=desc,
        cut=cut,
        mirror=mirror,
    )
    if failed:
        shown = "; ".join(str(e) for e in failed[:3])
        if not skip_bad:
            raise DataError(
                f"{corpus.source}: {len(failed)} image(s) could not be read: {shown} (use --skip-bad to leave them out)"
            )
        log.warning(f"{corpus.source}: left out {len(corpus) - len(kept)} item(s) with unreadable images: {shown}")
        corpus = corpus.keep(kept)  # the features were gathered for these items, in this order
    dataset = CaptionDataset(corpus, model.vocab, opts.max_caption_len)
    if mirror:
        return Mirrored(dataset, len(kept), model.vocab, opts.seed), feats
    return dataset, feats


def to_inputs(batch: Batch, feats: ItemFeatures | None, device: torch.device) -> Tensor | Frames:
    """What TrainStep takes: cached features, or (fine-tuning) the pixels, on the device."""
    if feats is not None:
        f = feats[batch.images]  # (B, ...)
        if device.type == "cuda":
            f = f.pin_memory()  # so the copy below overlaps with compute
        return f.to(device, non_blocking=True).float()
    return batch.images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


def loader(
    dataset: CaptionDataset, opts: TrainOptions, dist: Dist, device: torch.device, train: bool, epoch: int = 0
) -> DataLoader:
    """Training: this rank's shard of the epoch's shuffle, which depends on (seed, epoch) only,
    so N ranks with batch B see, step by step, exactly the batches of one rank with batch N*B."""
    workers = opts.num_workers if getattr(dataset, "load_pixels", None) is not None else 0
    if train and isinstance(dataset, Mirrored):
        dataset.set_epoch(epoch)
    sampler = None
    if train:
        sampler = ShardSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=opts.seed)
        sampler.set_epoch(epoch)
    return DataLoader(
        dataset,
        batch_size=opts.batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Each epoch's random stream (dropout, sampling) comes from (seed, epoch, rank), so a resume
    on any number of processes continues without saved RNG state and ranks draw different masks."""
    torch_seed, py_seed = np.random.SeedSequence([seed, epoch, rank]).generate_state(2)
    torch.manual_seed(int(torch_seed))
    random.seed(int(py_seed))
