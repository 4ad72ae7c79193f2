"""One training epoch on a 1000-image Flickr8k subset: from the feature cache vs re-encoding every step.

    python benchmarks/train_epoch.py [--images 1000] [--baseline-batches 0]

Both sides train the same Show-and-Tell decoder (default size, batch 64, fp32) on the same
captions; one more row shows our cached epoch with `--amp bf16`, which pays on CPUs with
AVX512-BF16 or AMX.
The baseline is the classic tutorials' loop: a DataLoader decodes and preprocesses the images
of every batch (1 worker) and the frozen CNN encodes them at every step (channels_last, so the
baseline is already the fast encoder). Ours reads cached fp16 features. The one-time cost of
filling the cache is reported separately. --baseline-batches N times only the first N baseline
batches and scales to the epoch (the per-batch cost is flat), for a quicker run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time

import torch
from common import FLICKR8K, Timer, machine
from torch.utils.data import DataLoader

from captioner.data import CaptionDataset, collate, load_coco
from captioner.features import LoadImage, encode_pixels, pool
from captioner.training import Trainer, TrainOptions


def _warm_epoch_seconds(trainer: Trainer) -> float:
    """Train two epochs; the second one's wall time (the first also pays one-off warm-up)."""
    trainer.fit()
    return [json.loads(line)["time_s"] for line in (trainer.out / "metrics.jsonl").read_text().splitlines()][-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--baseline-batches", type=int, default=0, help="0: the whole epoch")
    a = ap.parse_args()
    if not (FLICKR8K / "captions_train.json").is_file():
        sys.exit(f"needs Flickr8k at {FLICKR8K}")
    corpus = load_coco(FLICKR8K / "captions_train.json", FLICKR8K / "images").subset(a.images)
    opts = TrainOptions(epochs=2, batch_size=64, lr_schedule="constant", num_workers=1)
    cache_dir = tempfile.mkdtemp(prefix="captioner-bench-cache-")
    try:
        with Timer() as fill:  # builds the model and fills a fresh cache: the one-time cost
            trainer = Trainer(corpus, None, tempfile.mkdtemp(), opts, device="cpu", cache_dir=cache_dir)
            trainer.prepare()
        cached = _warm_epoch_seconds(trainer)
        bf16_opts = TrainOptions(**{**opts.__dict__, "amp": "bf16"})
        cached_bf16 = _warm_epoch_seconds(
            Trainer(corpus, None, tempfile.mkdtemp(), bf16_opts, device="cpu", cache_dir=cache_dir)
        )  # warm cache: no extraction

        # baseline: same decoder recipe, images decoded and encoded at every step
        dataset = CaptionDataset(corpus, trainer.model.vocab, opts.max_caption_len, LoadImage(trainer.model.preprocess))
        loader = DataLoader(dataset, batch_size=opts.batch_size, shuffle=True, collate_fn=collate, num_workers=1)
        decoder, encoder = trainer.model.decoder.train(), trainer.model.encoder
        optim = torch.optim.Adam(decoder.parameters(), lr=opts.lr)
        n_batches = len(loader) if a.baseline_batches <= 0 else min(a.baseline_batches, len(loader))
        t0 = time.perf_counter()
        for i, batch in enumerate(loader):
            if i == n_batches:
                break
            feats = pool(encode_pixels(encoder, batch.images, torch.device("cpu")), "pooled")  # every step
            loss = decoder(feats, batch.captions, batch.lengths).mean()
            optim.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(decoder.parameters(), opts.grad_clip)
            optim.step()
        baseline = (time.perf_counter() - t0) * len(loader) / n_batches
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    print(f"machine: {machine()}")
    print(
        f"{len(corpus)} images, {len(dataset)} captions, batch 64, {len(loader)} steps per epoch"
        + ("" if n_batches == len(loader) else f"; baseline timed on {n_batches} steps and scaled")
    )
    print("| one epoch | seconds | captions/s |")
    print("|---|---|---|")
    print(f"| re-encoding images every step (classic tutorials) | {baseline:.1f} | {len(dataset) / baseline:.0f} |")
    print(f"| from the feature cache (captioner; 2nd epoch) | {cached:.1f} | {len(dataset) / cached:.0f} |")
    print(f"| **speed-up** | **{baseline / cached:.1f}x** | |")
    print(f"| from the cache with --amp bf16 (opt-in on CPU) | {cached_bf16:.1f} | {len(dataset) / cached_bf16:.0f} |")
    print(f"| **speed-up with --amp bf16** | **{baseline / cached_bf16:.1f}x** | |")
    print(f"one-time cache fill ({len(corpus)} images, incl. model set-up): {fill.s:.1f} s")


if __name__ == "__main__":
    main()
