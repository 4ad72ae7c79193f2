"""`captioner caption` cold start on one image, warm per-image latency at batch 32, peak memory.

    python benchmarks/caption_latency.py [--model CKPT] [--runs 3] [--json OUT]

Cold start: wall time of `captioner caption IMG` from process start to its output, and the peak
RSS of that process. Warm: in one process with the model loaded, seconds per image when 32
images go through as one batch vs one at a time. Without --model a checkpoint with random decoder
weights is used: its captions always run to max_len, the slowest case.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import Timer, machine, random_decoder

from captioner import Captioner
from captioner.synthetic import draw_shape


def _random_checkpoint(path: Path) -> None:
    from captioner.encoders import build_encoder

    decoder, vocab = random_decoder()
    enc = build_encoder()
    config = {
        "encoder": "efficientnet_lite0",
        "decoder": "lstm",
        "decoder_hparams": {"embed_size": 256, "hidden_size": 512, "num_layers": 1, "dropout": 0.5},
        "preprocess": enc.spec.preprocess.to_dict(),
        "fine_tune_encoder": 0,
    }
    Captioner(enc, decoder, vocab, config, device="cpu").save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint (default: random decoder weights)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--images", type=int, default=32, help="images per warm measurement (one batch)")
    ap.add_argument("--cold-runs", type=int, help="cold starts to time (default: --runs; 0: skip them)")
    ap.add_argument("--json", type=Path, metavar="OUT", help="write the numbers here too")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="captioner-bench-"))
    try:
        model_path = Path(a.model) if a.model else tmp / "random.pt"
        if not a.model:
            _random_checkpoint(model_path)
        import random

        rng = random.Random(0)
        imgs = []
        for i in range(a.images):
            p = tmp / f"img{i}.jpg"
            draw_shape(rng.choice(["red", "blue"]), "circle", "big", rng, px=640).save(p, quality=90)
            imgs.append(p)

        beside = Path(sys.executable).with_name("captioner")  # this environment's, not another one's on PATH
        exe = str(beside) if beside.is_file() else shutil.which("captioner")
        exe = exe or sys.exit("`captioner` is not installed (pip install -e .)")
        cold = []
        for _ in range(a.runs if a.cold_runs is None else a.cold_runs):
            with Timer() as t:
                subprocess.run(
                    [exe, "caption", str(imgs[0]), "--model", str(model_path), "--device", "cpu"],
                    check=True,
                    capture_output=True,
                )
            cold.append(t.s)
        peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

        model = Captioner.load(model_path, device="cpu")
        model.caption(imgs[:2])  # warm-up
        batch, single = [], []
        for _ in range(a.runs):
            with Timer() as t:
                model.caption(imgs, batch_size=len(imgs), num_workers=0)
            batch.append(t.s / len(imgs))
            with Timer() as t:
                for p in imgs:
                    model.caption(p)
            single.append(t.s / len(imgs))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"machine: {machine()}")
    print(
        f"model: {a.model or 'random decoder weights (captions run to max_len 20)'}; "
        f"{model.config['decoder']} decoder{' on frames' if model.is_sequence_model else ''}; "
        f"beam {model.decoding['beam_size']}; 640x640 JPEG inputs; median of {a.runs}"
    )
    print("| captioner caption | value |")
    print("|---|---|")
    if cold:
        print(f"| cold start, 1 image (process start to output) | {statistics.median(cold):.1f} s |")
        print(f"| peak RSS of that process | {peak_rss_mb:.0f} MB |")
    print(f"| warm, batch of {a.images} | {1000 * statistics.median(batch):.0f} ms/image |")
    print(f"| warm, one image at a time | {1000 * statistics.median(single):.0f} ms/image |")
    print(f"| batching speed-up | {statistics.median(single) / statistics.median(batch):.1f}x |")
    if a.json:
        out = {
            "machine": machine(),
            "model": a.model or "random decoder weights",
            "images": a.images,
            "runs": a.runs,
            "cold_start_s": cold,
            "peak_rss_mb": peak_rss_mb if cold else None,
            "s_per_image": {"batch": batch, "single": single},
            "median_ms_per_image": {
                "batch": 1000 * statistics.median(batch),
                "single": 1000 * statistics.median(single),
            },
            "batching_speed_up": statistics.median(single) / statistics.median(batch),
        }
        a.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
