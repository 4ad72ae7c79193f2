"""Scoring a model (or a results file) on a captioned image set with the COCO caption metrics."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .api import Captioner
from .checkpoint import atomic_write
from .data import CaptionCorpus, DataError, check_file, load_karpathy
from .features import FeatureCache, ItemFeatures
from .images import ImageError
from .metrics import diversity, evaluate, normalize
from .objects import kind_shares, novel_kinds
from .progress import progress


def caption_corpus(
    model: Captioner,
    corpus: CaptionCorpus,
    batch_size: int = 32,
    cache: FeatureCache | list[FeatureCache] | None = None,
    **decode_opts: Any,
) -> tuple[dict[Any, str], list[ImageError]]:
    """Caption every item (image or sequence) of the corpus once: {id: caption}, and the images that failed.

    With a feature cache the images are encoded only if they are not cached yet. A sequence with
    a failed frame gets no caption.
    """
    if cache is not None or corpus.frames is not None:
        feats, kept, failed = model.corpus_inputs(corpus, cache, batch_size=batch_size)
        return caption_features(model, [corpus.image_ids[k] for k in kept], feats, **decode_opts), failed
    results: dict[Any, str] = {}
    failed: list[ImageError] = []
    with progress(total=len(corpus), desc="captioning", unit="img") as bar:
        for image_id, r in zip(corpus.image_ids, model.generate(corpus.paths, batch_size=batch_size, **decode_opts)):
            if isinstance(r, ImageError):
                failed.append(r)
            else:
                results[image_id] = r[0].text
            bar.update(1)
    return results, failed


def caption_features(
    model: Captioner, image_ids: list, feats: ItemFeatures, step: int = 256, **decode_opts: Any
) -> dict[Any, str]:
    """Caption items from their features in chunks: {id: best caption}."""
    results: dict[Any, str] = {}
    for s in progress(range(0, len(image_ids), step), desc="captioning", unit="batch"):
        for image_id, hyps in zip(image_ids[s : s + step], model.decode(feats[s : s + step], **decode_opts)):
            results[image_id] = hyps[0].text
    return results


def references(corpus: CaptionCorpus) -> dict[Any, list[str]]:
    return dict(zip(corpus.image_ids, corpus.captions))


def load_references(
    annotations: str | os.PathLike | None = None, karpathy_json: str | os.PathLike | None = None, split: str = "val"
) -> tuple[dict[Any, list[str]], dict[Any, str]]:
    """A set's reference captions and its images' file names ({id: [captions]}, {id: file_name}),
    from a COCO caption (or sequence) file or a Karpathy split file's split; no image files needed."""
    if karpathy_json:
        corpus = load_karpathy(karpathy_json, "", split, check_images=False)
        return references(corpus), {i: str(p) for i, p in zip(corpus.image_ids, corpus.paths)}
    if not annotations:
        raise DataError("give --annotations (COCO caption or sequence file) or --karpathy-json with --split")
    files, groups, by_key, problems = check_file(annotations)
    problems.refuse()
    return by_key, (files if groups is None else {})


def score(
    refs: Mapping[Any, list[str]], results: Mapping[Any, str], use_meteor: bool = True, novel: set[str] | None = None
) -> dict[str, Any]:
    """Metrics of `results` against `refs`; every result must have references. `novel`: the COCO
    kinds the training captions rarely name (`training_novel_kinds`), for novel_object_recall."""
    unknown = [k for k in results if k not in refs]
    if unknown:
        raise DataError(f"{len(unknown)} result(s) name images without references, e.g. image_id {unknown[0]!r}")
    return evaluate(refs, results, use_meteor=use_meteor, novel=novel) | diversity(results)


def training_object_shares(annotations: str | os.PathLike) -> dict[str, float]:
    """For each COCO kind, the share of a training caption file's captions that name it."""
    refs, _ = load_references(annotations)
    return kind_shares(normalize(c) for cs in refs.values() for c in cs)


def training_novel_kinds(annotations: str | os.PathLike) -> set[str]:
    """The COCO kinds a training caption file's captions rarely or never name (objects.NOVEL_SHARE)."""
    return novel_kinds(training_object_shares(annotations))


def write_results(path: str | os.PathLike, results: Mapping[Any, str]) -> None:
    """COCO results format: [{"image_id": ..., "caption": ...}, ...]."""
    rows = [{"image_id": k, "caption": c} for k, c in results.items()]
    atomic_write(path, lambda f: f.write(json.dumps(rows, indent=1, ensure_ascii=False).encode("utf-8")))


def read_results(path: str | os.PathLike, files: Mapping[Any, str] | None = None) -> dict[Any, str]:
    """Read captions to score: a COCO results file (a JSON list of {"image_id", "caption"}) or
    JSON Lines, one object per line, with an "image_id" or, as `captioner caption --json` writes
    them, a "path" that ends with one of the references' file names (`files`: {image_id:
    file_name}). Refuses malformed rows and images captioned twice."""
    text = _read_text(path)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as first:
        rows = _json_lines(path, text, first)
    if isinstance(rows, dict) and "caption" in rows:  # a JSON Lines file of one line
        rows = [rows]
    if not isinstance(rows, list):
        raise DataError(f'{path}: results are a JSON list of {{"image_id", "caption"}} objects, or JSON Lines')
    by_name = _file_index(files or {})
    out: dict[Any, str] = {}
    for i, row in enumerate(rows):
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("caption"), str)
            or ("image_id" not in row and not isinstance(row.get("path"), str))
        ):
            raise DataError(
                f'{path}: entry {i + 1} is not an {{"image_id" (or "path"), "caption"}} object with a string caption'
            )
        key = row["image_id"] if "image_id" in row else _image_of(row["path"], by_name)
        if key is None:
            raise DataError(
                f"{path}: entry {i + 1}: {row['path']} is none of the references' images "
                "(its path must end with one of their file names)"
            )
        if key in out:
            raise DataError(f"{path}: image_id {key!r} has more than one caption")
        out[key] = row["caption"]
    if not out:
        raise DataError(f"{path}: holds no captions to score")
    return out


def _read_text(path: str | os.PathLike) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: unreadable ({e.strerror or type(e).__name__})") from None


def _json_lines(path: str | os.PathLike, text: str, first: json.JSONDecodeError) -> list:
    """Rows of a JSON Lines file; the error names the line that is not JSON."""
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines or first.msg != "Extra data":  # one JSON document, broken
        raise DataError(f"{path}: malformed JSON at line {first.lineno} column {first.colno}: {first.msg}")
    rows = []
    for n, line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {n} is not JSON ({e.msg}); results are a JSON list or JSON Lines") from None
    return rows


def _file_index(files: Mapping[Any, str]) -> dict[tuple[str, ...], Any]:
    return {Path(name).parts: image_id for image_id, name in files.items()}


def _image_of(path: str, by_name: dict[tuple[str, ...], Any]) -> Any:
    """The image whose file name (a relative path) is the tail of `path`, longest match first."""
    parts = Path(path).parts
    for k in range(len(parts)):
        if parts[k:] in by_name:
            return by_name[parts[k:]]
    return None


def check_coverage(
    refs: Mapping[Any, list[str]], results: Mapping[Any, str], source: str, allow_partial: bool = False
) -> None:
    """Scores over part of a set are not comparable with scores over all of it: refuse them unless asked."""
    unknown = [k for k in results if k not in refs]
    if unknown:
        raise DataError(
            f"{source}: {len(unknown)} result(s) name images without references, e.g. image_id {unknown[0]!r}"
        )
    missing = len([k for k in refs if k not in results])
    if missing and not allow_partial:
        raise DataError(
            f"{source}: captions for {len(refs) - missing} of the {len(refs)} reference images; "
            "scores over a part of the set are not comparable with scores over all of it "
            "(caption them all, or pass --allow-partial)"
        )
