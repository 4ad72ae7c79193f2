"""A training epoch three ways, side by side: frozen encoder, fine-tuning from the cached trunk,
and fine-tuning with the whole encoder run at every step (what --fine-tune-encoder did before).

    python benchmarks/fine_tune_epoch.py [--images 300] [--blocks 2] [--amp off] [--decoder attention]

All three train the same decoder (default: attention; batch 64) on the same Flickr8k captions; the two
fine-tuning runs train the last --blocks blocks of Lite0 with BatchNorm frozen. Each run trains
two epochs and the second is timed (the first pays one-off warm-up); feature and trunk
extraction are one-time costs, reported apart. The cached trunk's size per image is read from
the cache and scaled to Flickr8k's 7000 photos.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from common import FLICKR8K, Timer, machine

from captioner.data import load_coco
from captioner.training import Trainer, TrainOptions


def _run(corpus, opts: TrainOptions, cache_dir: str, cached_trunk: bool = True) -> tuple[float, float]:
    """(one-time set-up incl. extraction, the second epoch's seconds)."""
    out = tempfile.mkdtemp(prefix="captioner-bench-run-")
    try:
        with Timer() as setup:
            trainer = Trainer(corpus, None, out, opts, device="cpu", cache_dir=cache_dir, cached_trunk=cached_trunk)
            trainer.prepare()  # builds the model and extracts the features: the one-time cost
        trainer.fit()
        times = [json.loads(line)["time_s"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        return setup.s, times[-1]
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _size(cache_dir: str, trunk: bool) -> tuple[str, int]:
    """(shape, bytes per image) of the feature-grid cache, or of the cached trunk."""
    for d in (Path(cache_dir) / "features").iterdir():
        if ("-cut" in d.name) == trunk:
            shape = json.loads((d / "meta.json").read_text())["shape"]
            n = 1
            for s in shape:
                n *= s
            return "x".join(map(str, shape)), 2 * n  # fp16
    raise RuntimeError("no such cache")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--blocks", type=int, default=2, help="--fine-tune-encoder N of the fine-tuning runs")
    ap.add_argument("--amp", default="off", choices=("off", "bf16"))
    ap.add_argument("--decoder", default="attention", choices=("attention", "lstm"))
    a = ap.parse_args()
    if not (FLICKR8K / "captions_train.json").is_file():
        sys.exit(f"needs Flickr8k at {FLICKR8K}")
    corpus = load_coco(FLICKR8K / "captions_train.json", FLICKR8K / "images").subset(a.images)
    base = dict(epochs=2, batch_size=64, lr_schedule="constant", num_workers=1, amp=a.amp, decoder=a.decoder)
    cache_dir = tempfile.mkdtemp(prefix="captioner-bench-cache-")
    try:
        frozen_setup, frozen = _run(corpus, TrainOptions(**base), cache_dir)
        tuned = TrainOptions(**base, fine_tune_encoder=a.blocks)
        trunk_setup, trunk = _run(corpus, tuned, cache_dir)
        full_setup, full = _run(corpus, tuned, cache_dir, cached_trunk=False)
        grid_shape, grid_bytes = _size(cache_dir, trunk=False)
        trunk_shape, trunk_bytes = _size(cache_dir, trunk=True)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    captions = sum(len(c) for c in corpus.captions)
    print(f"machine: {machine()}")
    print(f"{len(corpus)} Flickr8k images, {captions} captions, {a.decoder} decoder, batch 64, --amp {a.amp}")
    print("| one epoch (the 2nd) | seconds | captions/s | vs frozen |")
    print("|---|---|---|---|")
    rows = [
        ("frozen encoder, cached features", frozen),
        (f"--fine-tune-encoder {a.blocks} from the cached trunk (captioner)", trunk),
        (f"--fine-tune-encoder {a.blocks}, whole encoder every step (before)", full),
    ]
    for name, s in rows:
        print(f"| {name} | {s:.1f} | {captions / s:.0f} | {s / frozen:.2f}x |")
    print(f"| **cached trunk vs whole encoder** | **{full / trunk:.1f}x faster** | | |")
    print(
        f"one-time set-up (model + extraction of {len(corpus)} images): frozen features {frozen_setup:.1f} s, "
        f"trunk {trunk_setup:.1f} s, whole-encoder run {full_setup:.1f} s (no extraction)"
    )
    mb = 7000 / 2**20
    print(
        f"cache per image (fp16): feature grid {grid_shape} = {grid_bytes / 1024:.0f} KiB; trunk at the cut "
        f"{trunk_shape} = {trunk_bytes / 1024:.0f} KiB -> for 7000 photos {trunk_bytes * mb:.0f} MiB on disk "
        f"({2 * trunk_bytes * mb:.0f} MiB with --flip), memory-mapped: read a batch at a time, never loaded whole"
    )


if __name__ == "__main__":
    main()
