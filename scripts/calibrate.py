"""Fit a model's guidance state (person classifier, typicality, confidence; captioner/guidance.py)
and write the model with it; print how well the confidence is calibrated.

    python scripts/calibrate.py --model RUN/best.pt --train-annotations T.json --val-annotations V.json \\
        --images DIR --out model.pt [--decoding decoding.json] [--measure-annotations C.json \\
        --measure-images CDIR] [--plot confidence.png]

The confidence is fitted on the validation captions (under --decoding, else the model's decoding
defaults); the report gives its 5-fold cross-validated reliability there, and, with --measure-*, on
another set it was not fitted on (coco_dev: measured only). --plot draws both.
"""

from __future__ import annotations

import argparse
import json

import torch

from captioner import Captioner
from captioner.calibration import calibrate, caption_quality, reliability
from captioner.data import load_coco
from captioner.guidance import ACCEPTABLE


def measure(model: Captioner, annotations: str, images: str, **decoding) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, per-caption CIDEr-D) of the model's best captions of another set."""
    corpus = load_coco(annotations, images)
    feats, kept, _ = model.corpus_inputs(corpus, model.feature_cache(), quiet=True)
    conf, texts = [], {}
    for s in range(0, len(kept), 250):
        for i, hyps in enumerate(model.decode(feats[s : s + 250], **decoding)):
            conf.append(hyps[0].confidence)
            texts[s + i] = hyps[0].text
    quality = caption_quality({i: corpus.captions[k] for i, k in enumerate(kept)}, texts)
    return torch.tensor(conf), torch.tensor([quality[i] for i in range(len(kept))])


def table(name: str, conf: torch.Tensor, quality: torch.Tensor) -> None:
    print(f"\n{name}: {len(conf)} captions, {(quality >= ACCEPTABLE).float().mean():.3f} acceptable "
          f"(CIDEr-D >= {ACCEPTABLE}), mean confidence {conf.mean():.3f}")  # fmt: skip
    print("| confidence (bin mean) | acceptable | mean CIDEr-D | captions |\n|---|---|---|---|")
    for b in reliability(conf, quality):
        print(f"| {b['confidence']:.3f} | {b['acceptable']:.3f} | {b['cider']:.3f} | {b['n']} |")


def plot(path: str, sets: list[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=110)
    ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--", label="perfect calibration")
    for (name, conf, quality), marker in zip(sets, "os^"):
        bins = reliability(conf, quality, bins=5 if len(conf) < 200 else 10)
        ax.plot([b["confidence"] for b in bins], [b["acceptable"] for b in bins], marker=marker, label=name)
    ax.set_xlabel("confidence (mean of an equal-count bin)")
    ax.set_ylabel(f"share of captions with CIDEr-D >= {ACCEPTABLE}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--train-annotations", required=True)
    p.add_argument("--val-annotations", required=True)
    p.add_argument("--images", required=True, help="folder of the training and validation photos")
    p.add_argument("--decoding", help="JSON of decoding settings (scripts/tune_decoding.py): recorded as defaults")
    p.add_argument("--measure-annotations", help="another set to measure the confidence on (not fitted on)")
    p.add_argument("--measure-images")
    p.add_argument("--plot", help="write the reliability plot here (PNG)")
    p.add_argument("--out", required=True, help="the model with its guidance state (fp16 weights)")
    a = p.parse_args()
    model = Captioner.load(a.model, device="cpu")
    if a.decoding:
        with open(a.decoding, encoding="utf-8") as f:
            model.config["decoding"] = json.load(f)
            model.decoding = model.decoding | model.config["decoding"]
    train = load_coco(a.train_annotations, a.images)
    val = load_coco(a.val_annotations, a.images)
    report = calibrate(model, train, val, model.feature_cache(), quiet=False)
    val_conf, val_q = torch.tensor(report["confidence"]), torch.tensor(report["quality"])
    table("validation (5-fold cross-validated)", val_conf, val_q)
    sets = [("Flickr8k val (cross-validated)", val_conf, val_q)]
    if a.measure_annotations:
        conf, quality = measure(model, a.measure_annotations, a.measure_images)
        table(f"{a.measure_annotations} (measured only)", conf, quality)
        sets.append((f"{a.measure_annotations.split('/')[-2]} (not fitted on)", conf, quality))
    if a.plot:
        plot(a.plot, sets)
    model.save(a.out, half=True)
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
