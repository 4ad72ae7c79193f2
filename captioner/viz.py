"""Pictures people would rather look at than read: training curves."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .checkpoint import atomic_write
from .data import DataError


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{run_dir}: no metrics.jsonl (is this a `captioner train --out` folder?)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise DataError(f"{path}: empty: no epoch has finished yet")
    return rows


def plot_training(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """PNG of loss (train/val), val BLEU-4/METEOR/ROUGE-L and val CIDEr-D per epoch; best epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out = Path(out) if out else Path(run_dir) / "curves.png"
    epochs = [r["epoch"] for r in rows]
    best = [r["epoch"] for r in rows if r.get("best")]
    panels = [("loss (cross-entropy per word)", ["train_loss", "val_loss"]),
              ("val caption metrics", ["BLEU-4", "METEOR", "ROUGE-L"]),
              ("val CIDEr-D", ["CIDEr-D"])]
    panels = [(t, [k for k in keys if any(r.get(k) is not None for r in rows)]) for t, keys in panels]
    panels = [(t, keys) for t, keys in panels if keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for k in keys:
            pts = [(r["epoch"], r[k]) for r in rows if r.get(k) is not None]
            ax.plot([e for e, _ in pts], [v for _, v in pts], marker="o", label=k)
        if best:
            ax.axvline(best[-1], color="grey", linestyle="--", linewidth=1, label=f"best (epoch {best[-1]})")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_xticks(epochs if len(epochs) <= 20 else epochs[:: max(1, len(epochs) // 10)])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{Path(run_dir).resolve().name}: {len(rows)} epochs")
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return out
