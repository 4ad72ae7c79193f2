"""Caption datasets: COCO caption JSON, Karpathy split JSON and COCO-style sequence JSON ->
(item, caption) pairs, where an item is an image or an ordered sequence of images.

A `CaptionCorpus` is the items and their reference captions; training flattens it into one
pair per caption, so an epoch visits every caption once.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .errors import DataError
from .vocab import Vocabulary, tokenize


@dataclass
class TokenizedCaptions:
    """Every caption of a corpus tokenised once and packed into flat arrays: the vocabulary is
    counted and the training set encoded from the same tokens, and 600k captions (COCO) take a
    few tens of MB rather than a Python list per caption."""

    words: list[str]  # each distinct word once
    ids: np.ndarray  # (total tokens,) uint16 (int32 past 65536 words): index into `words` of each token
    offsets: np.ndarray  # (C + 1,) int64: caption c is ids[offsets[c]:offsets[c + 1]]
    item_of: np.ndarray  # (C,) int32: the item each caption describes

    @classmethod
    def of(cls, captions: Sequence[Sequence[str]]) -> TokenizedCaptions:
        index: dict[str, int] = {}
        words: list[str] = []
        ids, offsets, item_of = array("i"), array("q", [0]), array("i")
        for item, caps in enumerate(captions):
            for c in caps:
                for w in tokenize(c):
                    k = index.get(w)
                    if k is None:
                        k = index[w] = len(words)
                        words.append(w)
                    ids.append(k)
                offsets.append(len(ids))
                item_of.append(item)
        packed = np.frombuffer(ids, dtype=np.int32)
        if len(words) <= np.iinfo(np.uint16).max + 1:  # (nearly always) half the memory
            packed = packed.astype(np.uint16)
        return cls(words, packed, np.array(offsets, dtype=np.int64), np.array(item_of, dtype=np.int32))

    def __len__(self) -> int:
        return len(self.item_of)

    def counts(self) -> Counter:
        """How often each word occurs (what the vocabulary's --min-word-count looks at)."""
        n = np.bincount(self.ids, minlength=len(self.words))
        return Counter(dict(zip(self.words, n.tolist())))


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
    _tokenized: TokenizedCaptions | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.image_ids)

    def tokenized(self) -> TokenizedCaptions:
        """The captions tokenised (once per corpus: the vocabulary and the dataset share them)."""
        if self._tokenized is None:
            self._tokenized = TokenizedCaptions.of(self.captions)
        return self._tokenized

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the data (not where its files live): a run resumes only on the same."""
        h = hashlib.sha1()
        content = [[str(i) for i in self.image_ids], self.captions, self.frames]
        for chunk in json.JSONEncoder(ensure_ascii=False).iterencode(content):  # json.dumps' text, in pieces
            h.update(chunk.encode())
        return {"source": self.source, "items": len(self), "sha1": h.hexdigest()}

    def items(self) -> list[tuple[int, str]]:
        """One (item index, caption) pair per caption."""
        return [(i, c) for i, caps in enumerate(self.captions) for c in caps]

    def item_frames(self) -> list[list[int]]:
        """Each item's images as indices into `paths`: its frames, or the image alone."""
        return self.frames if self.frames is not None else [[i] for i in range(len(self.paths))]

    def keep(self, items: list[int], skipped: int = 0) -> CaptionCorpus:
        """Only these items (and only the images they use)."""
        if self.frames is None:
            return CaptionCorpus(
                [self.paths[i] for i in items],
                [self.image_ids[i] for i in items],
                [self.captions[i] for i in items],
                self.skipped_missing + skipped,
                self.source,
            )
        used = sorted({f for i in items for f in self.frames[i]})
        new = {old: n for n, old in enumerate(used)}
        return CaptionCorpus(
            [self.paths[i] for i in used],
            [self.image_ids[i] for i in items],
            [self.captions[i] for i in items],
            self.skipped_missing + skipped,
            self.source,
            [[new[f] for f in self.frames[i]] for i in items],
        )

    def subset(self, n: int) -> CaptionCorpus:
        return self.keep(list(range(min(n, len(self)))))


def read_json(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text, so not JSON (byte {e.start})") from None
    except (OSError, RecursionError) as e:
        raise DataError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def _check_missing(corpus: CaptionCorpus, skip_missing: bool) -> CaptionCorpus:
    missing = {i for i, p in enumerate(corpus.paths) if not p.is_file()}
    if not missing:
        return corpus
    if not skip_missing:
        shown = ", ".join(str(corpus.paths[i]) for i in sorted(missing)[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DataError(
            f"{corpus.source}: {len(missing)} image file(s) missing: {shown}{more} "
            "(use --skip-missing to leave them out)"
        )
    keep = [k for k, fr in enumerate(corpus.item_frames()) if not missing.intersection(fr)]
    return corpus.keep(keep, skipped=len(corpus) - len(keep))


class DataProblems:
    """What is wrong in a dataset file, by kind, each with its offenders (for a short summary)."""

    def __init__(self, source: str) -> None:
        self.source, self.found = source, {}

    def add(self, kind: str, offender: str) -> None:
        self.found.setdefault(kind, []).append(offender)

    def __bool__(self) -> bool:
        return bool(self.found)

    def lines(self, shown: int = 3) -> list[str]:
        """One line per kind: the count and the first few offenders."""
        return [
            f"{len(v)} {k}: {', '.join(v[:shown])}{' ...' if len(v) > shown else ''}" for k, v in self.found.items()
        ]

    def refuse(self) -> None:
        if self:
            raise DataError(
                f"{self.source}: "
                + "; ".join(self.lines())
                + " (fix the file, or --skip-bad to leave those entries out)"
            )


def _is_id(x: Any) -> bool:
    """Ids are JSON integers or strings (a list or an object cannot name an image)."""
    return isinstance(x, (int, str)) and not isinstance(x, bool)


def _entries(path: str | os.PathLike, data: Any, kind: str) -> tuple[dict, dict | None, dict, DataProblems]:
    """Check a COCO caption ("coco") or sequence ("sequences") file's entries.

    Returns {image id: file_name}, {sequence id: image ids} (sequences only), {image or sequence
    id: [captions]} -- each holding only well-formed entries -- and the problems found.
    """
    need = ("images", "annotations") + (("sequences",) if kind == "sequences" else ())
    if not isinstance(data, dict) or any(not isinstance(data.get(k), list) for k in need):
        what = "sequence caption file" if kind == "sequences" else "COCO caption file"
        raise DataError(f"{path}: not a {what} (needs lists {', '.join(repr(k) for k in need)})")
    problems = DataProblems(str(path))
    files: dict[Any, str] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not _is_id(img.get("id")) or not isinstance(img.get("file_name"), str):
            problems.add("image entries without an id or file_name", f"images[{i}]")
        elif img["id"] in files:
            problems.add("duplicate image ids", repr(img["id"]))
        else:
            files[img["id"]] = img["file_name"]
    groups, seen = None, set()
    if kind == "sequences":
        groups = {}
        for i, seq in enumerate(data["sequences"]):
            if not isinstance(seq, dict) or not _is_id(seq.get("id")) or not isinstance(seq.get("image_ids"), list):
                problems.add("sequence entries without an id or image_ids", f"sequences[{i}]")
                continue
            if seq["id"] in seen:
                problems.add("duplicate sequence ids", repr(seq["id"]))
                continue
            seen.add(seq["id"])
            unknown = [f for f in seq["image_ids"] if not _is_id(f) or f not in files]
            if not seq["image_ids"]:
                problems.add("sequences without frames", repr(seq["id"]))
            elif unknown:
                problems.add("sequences naming image ids not in 'images'", f"{seq['id']!r} -> {unknown[0]!r}")
            else:
                groups[seq["id"]] = seq["image_ids"]
    key, known = ("sequence_id", seen) if kind == "sequences" else ("image_id", files)
    by_key: dict[Any, list[str]] = {}
    ann_ids: set = set()
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or not _is_id(a.get(key)) or "caption" not in a:
            problems.add(f"annotations without {key} or caption", f"annotations[{i}]")
        elif "id" in a and not _is_id(a["id"]):
            problems.add("annotation ids that are not numbers or strings", f"annotations[{i}]")
        elif "id" in a and a["id"] in ann_ids:
            problems.add("duplicate annotation ids", repr(a["id"]))
        elif a[key] not in known:
            problems.add(f"annotations naming an unknown {key}", f"annotations[{i}] ({a[key]!r})")
        elif not isinstance(a["caption"], str) or not a["caption"].strip():
            problems.add("empty or non-string captions", f"annotations[{i}]")
        elif groups is None or a[key] in groups:  # captions of a broken sequence are not kept
            by_key.setdefault(a[key], []).append(" ".join(a["caption"].split()))
        if isinstance(a, dict) and _is_id(a.get("id")):
            ann_ids.add(a["id"])
    return files, groups, by_key, problems


def check_file(path: str | os.PathLike) -> tuple[dict, dict | None, dict, DataProblems]:
    """`_entries` of a COCO caption or sequence file, whichever it is."""
    data = read_json(path)
    return _entries(path, data, "sequences" if isinstance(data, dict) and "sequences" in data else "coco")


def load_coco_references(annotations: str | os.PathLike) -> dict[Any, list[str]]:
    """{image_id: [reference captions]} of a COCO caption file, or {sequence_id: [...]} of a sequence
    file (no image files needed). A file with problems is refused."""
    _, _, by_key, problems = check_file(annotations)
    problems.refuse()
    return by_key


def load_coco(
    annotations: str | os.PathLike, images_dir: str | os.PathLike, skip_missing: bool = False, skip_bad: bool = False
) -> CaptionCorpus:
    """COCO caption JSON (`images[{id, file_name}]`, `annotations[{image_id, caption}]`, any order).

    Images without a caption are left out (nothing to learn or score against). A file with
    malformed entries is refused with a summary, unless skip_bad (then they are left out).
    """
    files, _, by_image, problems = _entries(annotations, read_json(annotations), "coco")
    if not skip_bad:
        problems.refuse()
    root = Path(images_dir)
    ids = [i for i in files if i in by_image]
    corpus = CaptionCorpus([root / files[i] for i in ids], ids, [by_image[i] for i in ids], source=str(annotations))
    return _check_missing(corpus, skip_missing)


def load_karpathy(
    path: str | os.PathLike,
    images_root: str | os.PathLike,
    split: str,
    skip_missing: bool = False,
    check_images: bool = True,
) -> CaptionCorpus:
    """Karpathy split JSON (`images[{filename, filepath?, split, sentences[{raw, tokens}]}]`).

    `split` may list several, comma-separated (e.g. "train,restval" as usual for COCO).
    check_images=False: the references alone (scoring needs no image files).
    """
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: not a Karpathy split file (needs a list 'images')")
    wanted = {s.strip() for s in split.split(",")}
    root = Path(images_root)
    paths, ids, caps = [], [], []
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not isinstance(img.get("split"), str) or img["split"] not in wanted:
            continue
        folder, name, sentences = img.get("filepath", ""), img.get("filename"), img.get("sentences")
        if not isinstance(folder, str) or not isinstance(name, str) or not isinstance(sentences, list):
            raise DataError(f"{path}: images[{i}] needs a string 'filename' (and 'filepath') and a list 'sentences'")
        texts = []
        for s in sentences:
            raw = s.get("raw") if isinstance(s, dict) else None
            tokens = s.get("tokens") if isinstance(s, dict) else None
            if isinstance(raw, str) and raw.strip():
                texts.append(raw)
            elif isinstance(tokens, list) and tokens and all(isinstance(t, str) for t in tokens):
                texts.append(" ".join(tokens))
            else:
                raise DataError(f"{path}: images[{i}] has a sentence with neither a 'raw' text nor 'tokens'")
        paths.append(root / folder / name)
        image_id = img.get("cocoid", img.get("imgid", i))
        ids.append(image_id if _is_id(image_id) else i)
        caps.append(texts)
    if not paths:
        raise DataError(f"{path}: no images in split {split!r}")
    corpus = CaptionCorpus(paths, ids, caps, source=str(path))
    return _check_missing(corpus, skip_missing) if check_images else corpus


def load_sequences(
    path: str | os.PathLike, images_dir: str | os.PathLike, skip_missing: bool = False, skip_bad: bool = False
) -> CaptionCorpus:
    """COCO-style sequence JSON: `images[{id, file_name}]`, `sequences[{id, image_ids}]` (frames in
    temporal order, any length >= 1, images may be shared) and `annotations[{sequence_id, caption}]`.

    Sequences without a caption are left out; with skip_missing, so are those with a missing
    frame; with skip_bad, malformed entries (else the file is refused with a summary).
    """
    files, groups, by_seq, problems = _entries(path, read_json(path), "sequences")
    if not skip_bad:
        problems.refuse()
    root = Path(images_dir)
    paths, row, ids, caps, frames = [], {}, [], [], []
    for sid, image_ids in groups.items():
        if sid not in by_seq:
            continue
        for iid in image_ids:
            if iid not in row:
                row[iid] = len(paths)
                paths.append(root / files[iid])
        ids.append(sid)
        caps.append(by_seq[sid])
        frames.append([row[iid] for iid in image_ids])
    return _check_missing(CaptionCorpus(paths, ids, caps, source=str(path), frames=frames), skip_missing)


@dataclass
class Batch:
    images: Tensor  # (B,) image indices, or (B, 3, H, W) pixels when images are loaded per step
    captions: Tensor  # (B, T) <start> ... <end> <pad>..., longest first
    lengths: Tensor  # (B,) including <start> and <end>


class CaptionDataset(Dataset):
    """One item per caption: (image index or pixels, token ids <start> ... <end>, at most `max_len`
    words). The captions are held packed (see `TokenizedCaptions`), encoded on access."""

    def __init__(
        self,
        corpus: CaptionCorpus,
        vocab: Vocabulary,
        max_len: int = 50,
        load_pixels: Callable[[Path], Tensor] | None = None,
    ) -> None:
        self.corpus, self.max_len, self.load_pixels = corpus, max_len, load_pixels
        tok = corpus.tokenized()
        small = len(vocab) <= np.iinfo(np.uint16).max + 1
        lookup = np.array([vocab.stoi.get(w, vocab.unk_id) for w in tok.words], np.uint16 if small else np.int32)
        self.tokens = lookup[tok.ids] if len(tok.ids) else tok.ids  # (total tokens,) vocabulary ids
        self.offsets, self.item_of = tok.offsets, tok.item_of
        self.start_id, self.end_id = vocab.start_id, vocab.end_id

    def __len__(self) -> int:
        return len(self.item_of)

    def encoded(self, i: int) -> list[int]:
        start = int(self.offsets[i])
        n = min(int(self.offsets[i + 1]) - start, self.max_len)
        return [self.start_id, *self.tokens[start : start + n].tolist(), self.end_id]

    def __getitem__(self, i: int) -> tuple[Tensor | int, list[int]]:
        img = int(self.item_of[i])
        if self.load_pixels is not None:
            return self.load_pixels(self.corpus.paths[img]), self.encoded(i)
        return img, self.encoded(i)


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
