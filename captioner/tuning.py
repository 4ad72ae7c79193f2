"""Measuring decoding settings on a validation set and picking the best by CIDEr-D (`captioner tune`).

Encoder features come from the feature cache, so each setting of the grid costs only the decoding.
The best setting is what `captioner calibrate --decoding` records as a model's defaults.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .data import CaptionCorpus
from .errors import DataError, UsageError
from .settings import Grid

if TYPE_CHECKING:
    from .api import Captioner
    from .features import FeatureCache


def parse_values(text: str, kind: type, flag: str) -> tuple:
    """'1,3,5' -> (1, 3, 5) of `kind`; UsageError naming the flag for anything else."""
    try:
        values = tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated {kind.__name__} values, not {text!r}") from None
    if not values:
        raise UsageError(f"{flag} needs at least one value")
    return values


@dataclass
class Row:
    """One measured setting: its scores (evaluation.score) and the seconds its decoding took."""

    setting: dict[str, Any]
    scores: dict[str, Any]
    seconds: float

    @property
    def cider(self) -> float:
        return self.scores["CIDEr-D"]


def tune(
    model: Captioner, corpus: CaptionCorpus, cache: FeatureCache | None, grid: Grid, novel: set[str] | None = None
) -> Iterator[Row]:
    """Caption the corpus' photos under each setting of the grid and score the captions; yields
    one Row per setting as it is measured. novel: the COCO kinds the training captions rarely name
    (for novel_object_recall; default: those the model's calibration recorded, if any).
    DataError when a photo cannot be read (a tuned setting must be measured on the whole set)."""
    from .evaluation import caption_features, references, score

    settings = list(grid.settings())
    for setting in settings:  # every value checked before any photo is read
        model.resolve_decoding(**setting)
    feats, kept, failed = model.corpus_inputs(corpus, cache)
    if failed:
        raise DataError(f"{len(failed)} image(s) could not be read, e.g. {failed[0]}")
    if novel is None and model.guidance is not None:
        novel = model.guidance.novel_kinds()
    ids, refs = [corpus.image_ids[k] for k in kept], references(corpus)
    for setting in settings:
        t0 = time.time()
        scores = score(refs, caption_features(model, ids, feats, **setting), novel=novel)
        yield Row(setting, scores, time.time() - t0)


def best(rows: list[Row]) -> Row:
    """The row with the highest CIDEr-D (the first of equals)."""
    if not rows:
        raise UsageError("no decoding setting was measured")
    return max(rows, key=lambda r: r.cider)


#: the Markdown table's columns: (header, how a row shows it)
_COLUMNS = (
    ("beam", lambda r: f"{r.setting['beam_size']}"),
    ("length penalty", lambda r: f"{r.setting['length_alpha']:g}"),
    ("no-repeat n-gram", lambda r: f"{r.setting['no_repeat_ngram'] or 'off'}"),
    ("tag boost", lambda r: f"{r.setting['tag_boost']:g}"),
    ("suppress unseen", lambda r: f"{r.setting['suppress_unseen']:g}"),
    ("tag subject", lambda r: f"{r.setting['tag_subject']:g}"),
    ("BLEU-4", lambda r: f"{r.scores['BLEU-4']:.3f}"),
    ("METEOR", lambda r: _num(r.scores["METEOR"])),
    ("ROUGE-L", lambda r: f"{r.scores['ROUGE-L']:.3f}"),
    ("CIDEr-D", lambda r: f"{r.scores['CIDEr-D']:.3f}"),
    ("hallucinated", lambda r: f"{r.scores['hallucinated']:.3f}"),
    ("person invented", lambda r: _num(r.scores["person_invented"])),
    ("constrain", lambda r: f"{r.setting['constrain']:g}"),
    ("object recall", lambda r: _num(r.scores["object_recall"])),
    ("novel object recall", lambda r: _num(r.scores["novel_object_recall"])),
    ("object precision", lambda r: _num(r.scores["object_precision"])),
    ("distinct captions", lambda r: f"{r.scores['distinct_captions']}"),
    ("unique", lambda r: f"{r.scores['unique_fraction']:.2f}"),
    ("words used", lambda r: f"{r.scores['words_used']}"),
    ("s", lambda r: f"{r.seconds:.0f}"),
)


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def table_header() -> str:
    """The Markdown table's header and rule lines."""
    return "| " + " | ".join(h for h, _ in _COLUMNS) + " |\n" + "|---" * len(_COLUMNS) + "|"


def table_row(row: Row) -> str:
    return "| " + " | ".join(show(row) for _, show in _COLUMNS) + " |"
