"""A small generated captioning dataset (coloured shapes) in the COCO caption layout.

Used by the quick start and the tests: it is made in a second, needs no download, and its
captions depend on what is in the picture (colour, shape, size), so a model must look to learn.

    python -m captioner.synthetic OUT_DIR [--per-combo 5] [--seed 0]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 210, 20)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.22, "big": 0.42}
TEMPLATES = (
    "a {size} {color} {shape}",
    "A {color} {shape} on a white background.",
    "there is a {size} {color} {shape} in the picture",
    "a picture of a {color} {shape} ",
    "  One {size} {color} {shape}, on white.",
)


def draw_shape(color: str, shape: str, size: str, rng: random.Random, px: int = 128) -> Image.Image:
    img = Image.new("RGB", (px, px), tuple(rng.randint(235, 255) for _ in range(3)))
    d = ImageDraw.Draw(img)
    r = SIZES[size] * px / 2 * rng.uniform(0.9, 1.1)
    cx, cy = px / 2 + rng.uniform(-0.12, 0.12) * px, px / 2 + rng.uniform(-0.12, 0.12) * px
    _draw(d, color, shape, cx, cy, r, rng)
    return img


def _draw(d: ImageDraw.ImageDraw, color: str, shape: str, cx: float, cy: float, r: float, rng: random.Random) -> None:
    """One shape of radius r at (cx, cy), its colour jittered a little."""
    fill = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLORS[color])
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r * 0.85), (cx + r, cy + r * 0.85)], fill=fill)


def make_split(out: Path, name: str, per_combo: int, rng: random.Random, start_id: int = 1) -> Path:
    """Write OUT/NAME/*.png and OUT/NAME.json (COCO captions); returns the JSON path."""
    (out / name).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    combos = list(itertools.product(COLORS, SHAPES, SIZES))
    image_id = start_id
    for color, shape, size in combos:
        for _ in range(per_combo):
            file_name = f"{color}_{shape}_{size}_{image_id:05d}.png"
            draw_shape(color, shape, size, rng).save(out / name / file_name)
            images.append({"id": image_id, "file_name": file_name, "width": 128, "height": 128})
            for t in TEMPLATES:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "caption": t.format(color=color, shape=shape, size=size),
                    }
                )
            image_id += 1
    rng.shuffle(annotations)  # like the real COCO files: annotations in no particular order
    path = out / f"{name}.json"
    path.write_text(
        json.dumps(
            {
                "info": {"description": "captioner synthetic shapes"},
                "licenses": [],
                "images": images,
                "annotations": annotations,
            }
        )
    )
    return path


RELATION_TEMPLATES = (  # x is named first by colour order, so only *where* it is decides the relation
    "a {x} to the {rel} of a {y}",
    "a {x} {rel} of a {y}",
    "a {x} is to the {rel} of a {y}",
    "a {x} on the {rel} of a {y}",
    "a {x} placed {rel} of a {y}",
)


def draw_pair(left: tuple[str, str], right: tuple[str, str], rng: random.Random, px: int = 160) -> Image.Image:
    """Two shapes side by side: `left` = (colour, shape) in the left half, `right` in the right half."""
    img = Image.new("RGB", (px, px), tuple(rng.randint(235, 255) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for (color, shape), cx in ((left, 0.3), (right, 0.7)):
        r = px * rng.uniform(0.1, 0.13)
        x, y = px * (cx + rng.uniform(-0.05, 0.05)), px * (0.5 + rng.uniform(-0.15, 0.15))
        _draw(d, color, shape, x, y, r, rng)
    return img


def make_relation_split(out: Path, name: str, n_images: int, rng: random.Random, start_id: int = 1) -> Path:
    """Pairs of shapes whose captions say which is left of which: OUT/NAME/*.png + OUT/NAME.json."""
    (out / name).mkdir(parents=True, exist_ok=True)
    colors = list(COLORS)
    images, annotations = [], []
    for image_id in range(start_id, start_id + n_images):
        c1, c2 = sorted(rng.sample(colors, 2), key=colors.index)  # x: the first colour in COLORS order
        x, y = (c1, rng.choice(SHAPES)), (c2, rng.choice(SHAPES))
        x_left = rng.random() < 0.5
        a, b = (x, y) if x_left else (y, x)  # a: the shape drawn on the left
        file_name = f"{'_'.join(a)}__left_of__{'_'.join(b)}_{image_id:05d}.png"
        draw_pair(a, b, rng).save(out / name / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": 160, "height": 160})
        for t in RELATION_TEMPLATES:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "caption": t.format(x=" ".join(x), y=" ".join(y), rel="left" if x_left else "right"),
                }
            )
    path = out / f"{name}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def relation_is_right(caption: str, left: str, right: str) -> bool:
    """Does the caption state the true left/right relation between the two named objects?"""
    import re

    m = re.search(r"a (\w+ \w+) (?:is |placed )?(?:to the |on the )?(left|right) of a (\w+ \w+)", caption)
    if not m:
        return False
    x, rel, y = m.groups()
    return (rel, x, y) in (("left", left, right), ("right", right, left))


MOTION_TEMPLATES = (
    "a {color} {shape} moves {dir}",
    "a {color} {shape} is moving {dir}",
    "the {color} {shape} goes {dir}",
    "a {color} {shape} sliding {dir}",
)
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}
OPPOSITE = {"right": "left", "left": "right", "down": "up", "up": "down"}


def make_motion_split(
    out: Path,
    name: str,
    n_tracks: int,
    rng: random.Random,
    frames: tuple[int, int] = (3, 6),
    start_id: int = 1,
    px: int = 128,
) -> Path:
    """One shape moving in a straight line across 3-6 frames, captioned with its direction.

    Each track is drawn once and used twice: in order (e.g. "moves right") and reversed ("moves
    left"), so the two sequences share every frame and only the order tells them apart. Writes
    OUT/NAME/*.png and OUT/NAME.json in the sequence format (images, sequences, annotations); a
    sequence's direction is its "direction" field.
    """
    (out / name).mkdir(parents=True, exist_ok=True)
    images, sequences, annotations = [], [], []
    image_id = start_id
    for track in range(n_tracks):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        forward = rng.choice(["right", "down"])
        dx, dy = DIRECTIONS[forward]
        n, r = rng.randint(*frames), px * rng.uniform(0.08, 0.11)
        across = px * rng.uniform(0.35, 0.65)  # the coordinate that stays put
        start, end = px * rng.uniform(0.22, 0.32), px * rng.uniform(0.68, 0.78)
        ids = []
        for i in range(n):
            along = start + (end - start) * i / (n - 1)
            cx, cy = (along, across) if dx else (across, along)
            img = Image.new("RGB", (px, px), tuple(rng.randint(235, 255) for _ in range(3)))
            _draw(ImageDraw.Draw(img), color, shape, cx, cy, r, rng)
            file_name = f"track{start_id + track:05d}_{i:02d}.png"
            img.save(out / name / file_name)
            images.append({"id": image_id, "file_name": file_name, "width": px, "height": px})
            ids.append(image_id)
            image_id += 1
        for direction, order in ((forward, ids), (OPPOSITE[forward], ids[::-1])):
            seq_id = len(sequences) + start_id
            sequences.append({"id": seq_id, "image_ids": order, "direction": direction})
            for t in MOTION_TEMPLATES:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "sequence_id": seq_id,
                        "caption": t.format(color=color, shape=shape, dir=direction),
                    }
                )
    path = out / f"{name}.json"
    path.write_text(json.dumps({"images": images, "sequences": sequences, "annotations": annotations}))
    return path


def motion_direction(caption: str) -> str | None:
    """The first direction word of a caption (left/right/up/down), or None."""
    return next((w for w in caption.split() if w in DIRECTIONS), None)


def make_dataset(out: str | Path, per_combo: int = 5, test_per_combo: int = 1, seed: int = 0) -> dict[str, Path]:
    """Train and held-back test splits of the shapes dataset under `out`."""
    out, rng = Path(out), random.Random(seed)
    train = make_split(out, "train", per_combo, rng, start_id=1)
    test = make_split(out, "test", test_per_combo, rng, start_id=100_000)
    return {"train_json": train, "train_images": out / "train", "test_json": test, "test_images": out / "test"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--per-combo", type=int, default=5, help="training images per colour x shape x size")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    paths = make_dataset(a.out, a.per_combo, seed=a.seed)
    print(json.dumps({k: str(v) for k, v in paths.items()}))


if __name__ == "__main__":
    main()
