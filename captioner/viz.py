"""Pictures people would rather look at than read: training curves."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import DataError
from .paths import atomic_write, check_output_file


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{run_dir}: no metrics.jsonl (is this a `captioner train --out` folder?)")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: line {n} is not JSON ({e.msg}): the log is damaged; delete that line "
                "(a resume rewrites the log from its checkpoint)"
            ) from None
        if row is not None and not (isinstance(row, dict) and isinstance(row.get("epoch"), int)):
            raise DataError(f'{path}: line {n} is not an epoch record (no "epoch"): the log is damaged')
        if row is not None:
            rows.append(row)
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
    check_output_file(out)  # before drawing
    epochs = [r["epoch"] for r in rows]
    best = [r["epoch"] for r in rows if r.get("best")]
    panels = [
        ("loss (cross-entropy per word)", ["train_loss", "val_loss"]),
        ("val caption metrics", ["BLEU-4", "METEOR", "ROUGE-L"]),
        ("val CIDEr-D", ["CIDEr-D"]),
    ]
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


PANEL, TEXT_H, PAD, COLUMNS = 224, 24, 4, 5  # attention-map layout, in pixels


def attention_map_size(n_words: int) -> tuple[int, int]:
    """(width, height) of an attention map: the image + one panel per word, COLUMNS panels a row."""
    panels = n_words + 1
    cols = min(COLUMNS, panels)
    rows = -(-panels // cols)
    return cols * (PANEL + PAD) + PAD, rows * (PANEL + TEXT_H + PAD) + PAD


def attention_map(image, words: list[str], weights, preprocess, out: str | os.PathLike) -> Path:
    """Write a PNG: the image as the model saw it (resized, centre-cropped), then for each word the
    image with that word's attention (upsampled from the h x w grid, smoothed) blended over it as
    a heat map, the word written under each panel. weights: (len(words), h, w)."""
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image, ImageDraw, ImageFilter

    w, h = image.size
    scale = preprocess.resize / min(w, h)
    img = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    left, top = (img.width - preprocess.crop) // 2, (img.height - preprocess.crop) // 2
    img = img.crop((left, top, left + preprocess.crop, top + preprocess.crop)).resize((PANEL, PANEL))
    base = np.asarray(img, dtype=np.float32) / 255.0  # (P, P, 3)
    jet = colormaps["jet"]
    panels = [(img, "(image)")]
    for word, a in zip(words, weights):
        a = np.asarray(a, dtype=np.float32)
        a8 = Image.fromarray(np.uint8(np.round(255 * a / max(float(a.max()), 1e-8))))  # (h, w), 0-255
        heat = a8.resize((PANEL, PANEL), Image.BICUBIC).filter(ImageFilter.GaussianBlur(PANEL / 28))
        heat = np.asarray(heat, dtype=np.float32) / 255.0  # (P, P) in [0, 1]
        blended = 0.45 * base + 0.55 * jet(heat)[..., :3]
        panels.append((Image.fromarray((blended * 255).astype(np.uint8)), word))
    width, height = attention_map_size(len(words))
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    cols = min(COLUMNS, len(panels))
    for i, (panel, label) in enumerate(panels):
        x = PAD + (i % cols) * (PANEL + PAD)
        y = PAD + (i // cols) * (PANEL + TEXT_H + PAD)
        sheet.paste(panel, (x, y))
        tw = draw.textlength(label)
        draw.text((x + (PANEL - tw) / 2, y + PANEL + 6), label, fill="black")
    out = Path(out)
    atomic_write(out, lambda f: sheet.save(f, format="PNG"))
    return out
