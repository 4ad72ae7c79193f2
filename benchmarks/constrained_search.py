"""Constrained beam search's cost per image against plain beam search, side by side in one run.

    python benchmarks/constrained_search.py [--annotations A --images DIR] [--model CKPT] [--repeats 3]

Decodes the same encoder features (from the feature cache; default: ../shared/data/coco_256, else
the example photos) three ways with the model's decoding settings: plain beam search (constraints
off), the shipped decoding (constraints on the photos unlike the training photos whose free caption
misses a sure concept), and constrained search on every photo with a sure concept (the worst case).
Prints seconds per image and the ratios to plain search.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from captioner import Captioner, pipeline
from captioner.data import load_coco
from captioner.guidance import CONSTRAIN_SHARE
from captioner.images import list_images

ROOT = Path(__file__).resolve().parents[1]
COCO = ROOT.parent / "shared" / "data" / "coco_256"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint (default: the bundled model)")
    ap.add_argument("--annotations", default=str(COCO / "captions.json") if COCO.is_dir() else None)
    ap.add_argument("--images", default=str(COCO / "images") if COCO.is_dir() else None)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    model = Captioner.load(a.model, device="cpu")
    if a.annotations:
        corpus = load_coco(a.annotations, a.images)
        feats, kept, _ = model.corpus_inputs(corpus, model.feature_cache())
        name = Path(a.annotations).parent.name
    else:
        paths = list_images(ROOT / "assets" / "examples")
        feats = model.encode(torch.stack([model.prepare(p) for p in paths]))
        name = "assets/examples"
    n = len(feats)
    c = model.decoding["constrain"] or 0.2
    ways = {
        "plain beam search": dict(constrain=0.0),
        f"shipped (constrain {c:g}, photos less typical than 30 % of val)": dict(constrain=c),
        "constrained on every sure photo": dict(constrain=c, _everywhere=True),
    }
    times = dict.fromkeys(ways, float("inf"))
    model.decode(feats[:32])  # warm-up: first calls build the concept tables
    order = list(ways)
    for r in range(a.repeats):  # interleaved, in turn first, best of N: the machine's noise hits all alike
        for way in order[r % len(order) :] + order[: r % len(order)]:
            opts = dict(ways[way])
            if opts.pop("_everywhere", False):  # constraints on every photo, however typical
                pipeline.CONSTRAIN_SHARE = float("inf")
            t = time.perf_counter()
            for s in range(0, n, 32):
                model.decode(feats[s : s + 32], **opts)
            times[way] = min(times[way], time.perf_counter() - t)
            pipeline.CONSTRAIN_SHARE = CONSTRAIN_SHARE
    print(f"{n} photos of {name}, batches of 32, beam {model.decoding['beam_size']}, best of {a.repeats}")
    print("| decoding | ms per image | x plain |\n|---|---|---|")
    base = times["plain beam search"]
    for way, t in times.items():
        print(f"| {way} | {1000 * t / n:.1f} | {t / base:.2f}x |")


if __name__ == "__main__":
    main()
