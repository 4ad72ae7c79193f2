"""Scoring a model (or a results file) on a captioned image set with the COCO caption metrics."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from tqdm import tqdm

from .api import Captioner
from .checkpoint import atomic_write
from .data import CaptionCorpus, DataError, read_json
from .features import FeatureCache, ItemFeatures, corpus_features
from .images import ImageError
from .metrics import diversity, evaluate


def caption_corpus(model: Captioner, corpus: CaptionCorpus, batch_size: int = 32, quiet: bool = False,
                   cache: FeatureCache | None = None, **decode_opts: Any) -> tuple[dict[Any, str], list[ImageError]]:
    """Caption every item (image or sequence) of the corpus once: {id: caption}, and the images that failed.

    With a feature cache the images are encoded only if they are not cached yet. A sequence with
    a failed frame gets no caption.
    """
    if cache is not None or corpus.frames is not None:
        feats, kept, failed = corpus_features(model.encoder, model.decoder, corpus, cache, batch_size=batch_size,
                                              device=model.device, quiet=quiet)
        return caption_features(model, [corpus.image_ids[k] for k in kept], feats, quiet, **decode_opts), failed
    results: dict[Any, str] = {}
    failed: list[ImageError] = []
    with tqdm(total=len(corpus), desc="captioning", unit="img", disable=quiet, leave=False) as bar:
        for image_id, r in zip(corpus.image_ids, model.generate(corpus.paths, batch_size=batch_size, **decode_opts)):
            if isinstance(r, ImageError):
                failed.append(r)
            else:
                results[image_id] = r[0].text
            bar.update(1)
    return results, failed


def caption_features(model: Captioner, image_ids: list, feats: ItemFeatures, quiet: bool = True, step: int = 256,
                     **decode_opts: Any) -> dict[Any, str]:
    """Caption items from their features in chunks: {id: best caption}."""
    results: dict[Any, str] = {}
    for s in tqdm(range(0, len(image_ids), step), desc="captioning", unit="batch", disable=quiet, leave=False):
        for image_id, hyps in zip(image_ids[s:s + step], model.decode(feats[s:s + step], **decode_opts)):
            results[image_id] = hyps[0].text
    return results


def references(corpus: CaptionCorpus) -> dict[Any, list[str]]:
    return dict(zip(corpus.image_ids, corpus.captions))


def score(refs: Mapping[Any, list[str]], results: Mapping[Any, str], use_meteor: bool = True) -> dict[str, Any]:
    """Metrics of `results` against `refs`; every result must have references."""
    unknown = [k for k in results if k not in refs]
    if unknown:
        raise DataError(f"{len(unknown)} result(s) name images without references, e.g. image_id {unknown[0]!r}")
    return evaluate(refs, results, use_meteor=use_meteor) | diversity(results)


def write_results(path: str | os.PathLike, results: Mapping[Any, str]) -> None:
    """COCO results format: [{"image_id": ..., "caption": ...}, ...]."""
    rows = [{"image_id": k, "caption": c} for k, c in results.items()]
    atomic_write(path, lambda f: f.write(json.dumps(rows, indent=1, ensure_ascii=False).encode("utf-8")))


def read_results(path: str | os.PathLike) -> dict[Any, str]:
    """Read a COCO results file; refuses malformed rows and images captioned twice."""
    rows = read_json(path)
    if not isinstance(rows, list):
        raise DataError(f"{path}: a COCO results file is a JSON list of {{\"image_id\", \"caption\"}} objects")
    out: dict[Any, str] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "image_id" not in row or not isinstance(row.get("caption"), str):
            raise DataError(f"{path}: entry {i} is not an {{\"image_id\", \"caption\"}} object with a string caption")
        if row["image_id"] in out:
            raise DataError(f"{path}: image_id {row['image_id']!r} has more than one caption")
        out[row["image_id"]] = row["caption"]
    return out
