"""What the training loop iterates over: per-item features (or pixels, when fine-tuning), the
epoch's shard of a shuffle that depends on (seed, epoch) only, and each epoch's random stream."""

from __future__ import annotations

import logging
import random

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

from ..bundle import ModelBundle
from ..data import Batch, CaptionCorpus, CaptionDataset, DataError, collate
from ..distributed import Dist
from ..features import FeatureCache, ItemFeatures, LoadImage, corpus_features
from ..models import Frames
from .options import TrainOptions

log = logging.getLogger("captioner")


def item_data(
    model: ModelBundle,
    corpus: CaptionCorpus,
    opts: TrainOptions,
    device: torch.device,
    cache: FeatureCache | None,
    skip_bad: bool,
    quiet: bool,
    desc: str,
) -> tuple[CaptionDataset, ItemFeatures | None]:
    """Frozen encoder: features computed once (cached on disk unless --no-cache), items are
    image or sequence indices. Fine-tuning: items carry pixels and the encoder runs every step."""
    if model.encoder.trainable:
        return CaptionDataset(corpus, model.vocab, opts.max_caption_len, LoadImage(model.preprocess)), None
    feats, kept, failed = corpus_features(
        model.encoder, model.decoder, corpus, cache, device=device, num_workers=opts.num_workers, quiet=quiet, desc=desc
    )
    if failed:
        shown = "; ".join(str(e) for e in failed[:3])
        if not skip_bad:
            raise DataError(
                f"{corpus.source}: {len(failed)} image(s) could not be read: {shown} (use --skip-bad to leave them out)"
            )
        if not quiet:
            log.warning(f"{corpus.source}: left out {len(corpus) - len(kept)} item(s) with unreadable images: {shown}")
        corpus = corpus.keep(kept)  # the features were gathered for these items, in this order
    return CaptionDataset(corpus, model.vocab, opts.max_caption_len), feats


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
    workers = opts.num_workers if dataset.load_pixels is not None else 0
    sampler = None
    if train:
        sampler = DistributedSampler(
            dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=opts.seed
        )
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
