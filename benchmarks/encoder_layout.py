"""The frozen encoder's throughput on preprocessed images: contiguous (NCHW) vs channels_last.

    python benchmarks/encoder_layout.py [--images 256] [--batch-size 32] [--rounds 3]

Why it exists: channels_last is the usual GPU advice, and the scaling-out issue asked for it to
be off on the CPU by default; on this project's CPU it measures faster, so the encoder uses it
on every device. Both sides run the same Lite0 weights on the same random pixels (decoding and
resizing JPEGs are left out: they cost the same either way), alternating round by round.
"""

from __future__ import annotations

import argparse

import torch
from common import Timer, machine

from captioner.encoders import build_encoder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    encoder = build_encoder("efficientnet_lite0").eval()
    S = encoder.spec.preprocess.crop
    pixels = torch.randn(a.batch_size, 3, S, S)
    layouts = {"contiguous (NCHW)": torch.contiguous_format, "channels_last": torch.channels_last}
    batches = max(1, a.images // a.batch_size)
    best: dict[str, float] = {}
    with torch.no_grad():
        for fmt in layouts.values():  # warm-up: first-call allocations and kernel selection
            encoder.to(memory_format=fmt)(pixels.contiguous(memory_format=fmt))
        for _ in range(a.rounds):
            for name, fmt in layouts.items():
                enc, x = encoder.to(memory_format=fmt), pixels.contiguous(memory_format=fmt)
                with Timer() as t:
                    for _ in range(batches):
                        enc(x)
                best[name] = min(best.get(name, float("inf")), t.s)
    n = batches * a.batch_size
    print(f"machine: {machine()}")
    print(f"\n| Lite0 encoder, {n} images, batch {a.batch_size} (best of {a.rounds}) | seconds | images/s |")
    print("|---|---|---|")
    for name, s in best.items():
        print(f"| {name} | {s:.2f} | {n / s:.1f} |")
    base, cl = best["contiguous (NCHW)"], best["channels_last"]
    print(f"| **channels_last speed-up** | **{base / cl:.2f}×** | |")


if __name__ == "__main__":
    main()
