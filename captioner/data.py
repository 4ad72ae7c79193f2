"""Caption datasets: COCO caption JSON, Karpathy split JSON and COCO-style sequence JSON ->
(item, caption) pairs, where an item is an image or an ordered sequence of images.

A `CaptionCorpus` is the items and their reference captions; training flattens it into one
pair per caption, so an epoch visits every caption once.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .vocab import Vocabulary


class DataError(Exception):
    """A dataset that cannot be used as given; the message says which file and why."""


@dataclass
class CaptionCorpus:
    """Captioned items aligned by index: images, or (with `frames`) image sequences.

    paths: the image files, each once (for sequences: every distinct frame)
    image_ids: the items' ids (image ids, or sequence ids)
    captions: each item's reference captions
    frames: for sequences, each item's frames in temporal order, as indices into `paths`
    """

    paths: list[Path]
    image_ids: list[Any]
    captions: list[list[str]]
    skipped_missing: int = 0
    source: str = ""
    frames: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.image_ids)

    def items(self) -> list[tuple[int, str]]:
        """One (item index, caption) pair per caption."""
        return [(i, c) for i, caps in enumerate(self.captions) for c in caps]

    def item_frames(self) -> list[list[int]]:
        """Each item's images as indices into `paths`: its frames, or the image alone."""
        return self.frames if self.frames is not None else [[i] for i in range(len(self.paths))]

    def keep(self, items: list[int], skipped: int = 0) -> "CaptionCorpus":
        """Only these items (and only the images they use)."""
        if self.frames is None:
            return CaptionCorpus([self.paths[i] for i in items], [self.image_ids[i] for i in items],
                                 [self.captions[i] for i in items], self.skipped_missing + skipped, self.source)
        used = sorted({f for i in items for f in self.frames[i]})
        new = {old: n for n, old in enumerate(used)}
        return CaptionCorpus([self.paths[i] for i in used], [self.image_ids[i] for i in items],
                             [self.captions[i] for i in items], self.skipped_missing + skipped, self.source,
                             [[new[f] for f in self.frames[i]] for i in items])

    def subset(self, n: int) -> "CaptionCorpus":
        return self.keep(list(range(min(n, len(self)))))


def read_json(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def _check_missing(corpus: CaptionCorpus, skip_missing: bool) -> CaptionCorpus:
    missing = {i for i, p in enumerate(corpus.paths) if not p.is_file()}
    if not missing:
        return corpus
    if not skip_missing:
        shown = ", ".join(str(corpus.paths[i]) for i in sorted(missing)[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DataError(f"{corpus.source}: {len(missing)} image file(s) missing: {shown}{more} "
                        "(use --skip-missing to leave them out)")
    keep = [k for k, fr in enumerate(corpus.item_frames()) if not missing.intersection(fr)]
    return corpus.keep(keep, skipped=len(corpus) - len(keep))


def _coco(annotations: str | os.PathLike, data: Any = None) -> tuple[list[dict], dict[Any, list[str]]]:
    data = read_json(annotations) if data is None else data
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise DataError(f"{annotations}: not a COCO caption file (needs 'images' and 'annotations')")
    by_image: dict[Any, list[str]] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(" ".join(str(a["caption"]).split()))
    return data["images"], by_image


def load_coco_references(annotations: str | os.PathLike) -> dict[Any, list[str]]:
    """{image_id: [reference captions]} of a COCO caption file, or {sequence_id: [...]} of a sequence
    file (no image files needed)."""
    data = read_json(annotations)
    if isinstance(data, dict) and "sequences" in data:
        by_seq: dict[Any, list[str]] = {}
        for a in data.get("annotations", []):
            by_seq.setdefault(a["sequence_id"], []).append(" ".join(str(a["caption"]).split()))
        return by_seq
    return _coco(annotations, data)[1]


def load_coco(annotations: str | os.PathLike, images_dir: str | os.PathLike,
              skip_missing: bool = False) -> CaptionCorpus:
    """COCO caption JSON (`images[{id, file_name}]`, `annotations[{image_id, caption}]`, any order).

    Images without a caption are left out (nothing to learn or score against).
    """
    images, by_image = _coco(annotations)
    root = Path(images_dir)
    paths, ids, caps = [], [], []
    for img in images:
        if img["id"] in by_image:
            paths.append(root / img["file_name"])
            ids.append(img["id"])
            caps.append(by_image[img["id"]])
    corpus = CaptionCorpus(paths, ids, caps, source=str(annotations))
    return _check_missing(corpus, skip_missing)


def load_karpathy(path: str | os.PathLike, images_root: str | os.PathLike, split: str,
                  skip_missing: bool = False) -> CaptionCorpus:
    """Karpathy split JSON (`images[{filename, filepath?, split, sentences[{raw, tokens}]}]`).

    `split` may list several, comma-separated (e.g. "train,restval" as usual for COCO).
    """
    data = read_json(path)
    if not isinstance(data, dict) or "images" not in data:
        raise DataError(f"{path}: not a Karpathy split file (needs 'images')")
    wanted = {s.strip() for s in split.split(",")}
    root = Path(images_root)
    paths, ids, caps = [], [], []
    for i, img in enumerate(data["images"]):
        if img.get("split") not in wanted:
            continue
        paths.append(root / img.get("filepath", "") / img["filename"])
        ids.append(img.get("cocoid", img.get("imgid", i)))
        caps.append([s.get("raw") or " ".join(s["tokens"]) for s in img["sentences"]])
    if not paths:
        raise DataError(f"{path}: no images in split {split!r}")
    return _check_missing(CaptionCorpus(paths, ids, caps, source=str(path)), skip_missing)


def load_sequences(path: str | os.PathLike, images_dir: str | os.PathLike,
                   skip_missing: bool = False) -> CaptionCorpus:
    """COCO-style sequence JSON: `images[{id, file_name}]`, `sequences[{id, image_ids}]` (frames in
    temporal order, any length >= 1, images may be shared) and `annotations[{sequence_id, caption}]`.

    Sequences without a caption are left out; with skip_missing, so are those with a missing frame.
    """
    data = read_json(path)
    if not isinstance(data, dict) or not all(k in data for k in ("images", "sequences", "annotations")):
        raise DataError(f"{path}: not a sequence caption file (needs 'images', 'sequences' and 'annotations')")
    files = {img["id"]: img["file_name"] for img in data["images"]}
    by_seq: dict[Any, list[str]] = {}
    for a in data["annotations"]:
        by_seq.setdefault(a["sequence_id"], []).append(" ".join(str(a["caption"]).split()))
    known = {seq["id"] for seq in data["sequences"]}
    unknown = [sid for sid in by_seq if sid not in known]
    if unknown:
        raise DataError(f"{path}: {len(unknown)} annotation sequence_id(s) name no sequence, e.g. {unknown[0]!r}")
    root = Path(images_dir)
    paths, row, ids, caps, frames = [], {}, [], [], []
    for seq in data["sequences"]:
        if seq["id"] not in by_seq:
            continue
        if not seq["image_ids"]:
            raise DataError(f"{path}: sequence {seq['id']!r} has no frames")
        for iid in seq["image_ids"]:
            if iid not in files:
                raise DataError(f"{path}: sequence {seq['id']!r} names image id {iid!r}, which is not in 'images'")
            if iid not in row:
                row[iid] = len(paths)
                paths.append(root / files[iid])
        ids.append(seq["id"])
        caps.append(by_seq[seq["id"]])
        frames.append([row[iid] for iid in seq["image_ids"]])
    return _check_missing(CaptionCorpus(paths, ids, caps, source=str(path), frames=frames), skip_missing)


@dataclass
class Batch:
    images: Tensor  # (B,) image indices, or (B, 3, H, W) pixels when images are loaded per step
    captions: Tensor  # (B, T) <start> ... <end> <pad>..., longest first
    lengths: Tensor  # (B,) including <start> and <end>


def _clip(ids: list[int], max_len: int, end_id: int) -> list[int]:
    """At most `max_len` words between <start> and <end>."""
    return ids if len(ids) <= max_len + 2 else ids[: max_len + 1] + [end_id]


class CaptionDataset(Dataset):
    """One item per caption: (image index or pixels, token ids)."""

    def __init__(self, corpus: CaptionCorpus, vocab: Vocabulary, max_len: int = 50,
                 load_pixels: Callable[[Path], Tensor] | None = None) -> None:
        self.corpus = corpus
        self.items = corpus.items()
        self.encoded = [_clip(vocab.encode(c), max_len, vocab.end_id) for _, c in self.items]
        self.load_pixels = load_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor | int, list[int]]:
        img = self.items[i][0]
        if self.load_pixels is not None:
            return self.load_pixels(self.corpus.paths[img]), self.encoded[i]
        return img, self.encoded[i]


def collate(batch: Sequence[tuple[Tensor | int, list[int]]], pad_id: int = 0) -> Batch:
    """Pad captions and sort the batch longest first (what packing wants)."""
    order = sorted(range(len(batch)), key=lambda i: -len(batch[i][1]))
    lengths = torch.tensor([len(batch[i][1]) for i in order])
    captions = torch.full((len(batch), int(lengths.max())), pad_id, dtype=torch.long)
    for row, i in enumerate(order):
        captions[row, : lengths[row]] = torch.tensor(batch[i][1])
    first = batch[0][0]
    if isinstance(first, Tensor):
        images = torch.stack([batch[i][0] for i in order])  # (B, 3, H, W)
    else:
        images = torch.tensor([batch[i][0] for i in order])  # (B,)
    return Batch(images, captions, lengths)
