"""Fitting a model's guidance state (guidance.py) from its own data: the person classifier and the
typicality centroids from the training photos, the confidence from captions of validation photos.

Everything is fitted on features the feature cache already holds, in seconds; the result is a
few tensors saved in the checkpoint under "guidance".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .bundle import ModelBundle
from .concepts import word_kinds
from .data import CaptionCorpus
from .errors import UsageError
from .features import FeatureCache, ItemFeatures
from .guidance import ACCEPTABLE, Guidance, _logistic, fit_centroids, fit_person
from .metrics import cider_d, normalize, normalize_corpus, split_words
from .objects import COCO_OBJECTS, kind_shares

log = logging.getLogger("captioner")


def _pooled(model: ModelBundle, feats: ItemFeatures, step: int = 256) -> Tensor:
    """Pooled features (N, D) of every item of `feats`."""
    return torch.cat([model.pooled(feats[s : s + step]).cpu() for s in range(0, len(feats), step)])


def corpus_pooled(
    model: ModelBundle, corpus: CaptionCorpus, cache: FeatureCache | None, quiet: bool = True
) -> tuple[Tensor, list[int]]:
    """(N, D) pooled features of a corpus' readable photos and their indices in the corpus."""
    if model.is_sequence_model or model.encoder.head is None:
        raise UsageError("guidance needs a single-image model whose encoder has its ImageNet classifier")
    feats, kept, _ = model.corpus_inputs(corpus, cache, quiet=quiet)
    return _pooled(model, feats), kept


def caption_quality(refs: dict[Any, list[str]], captions: dict[Any, str]) -> dict[Any, float]:
    """Per-caption CIDEr-D against its own photo's references (corpus document frequencies)."""
    r_tok, c_tok = normalize_corpus(refs, captions)
    return cider_d(
        {k: [split_words(r) for r in rs] for k, rs in r_tok.items()}, {k: split_words(c) for k, c in c_tok.items()}
    )


def person_labels(captions: Sequence[Sequence[str]]) -> Tensor:
    """1 for a photo most of whose references name a person, else 0: (N,)."""
    table = word_kinds()
    votes = [sum(any(table.get(t, ("",))[0] == "person" for t in normalize(r)) for r in refs) for refs in captions]
    return torch.tensor([float(v * 2 > len(refs)) for v, refs in zip(votes, captions)])


def fit_photo_state(train_pooled: Tensor, train_refs: list[list[str]]) -> dict[str, Tensor]:
    """The person classifier, the typicality centroids and how often the training captions name
    each COCO kind, from the training photos."""
    labels = person_labels(train_refs)
    shares = kind_shares(normalize(c) for refs in train_refs for c in refs)
    return fit_person(train_pooled, labels) | {
        "centroids": fit_centroids(train_pooled),
        "object_shares": torch.tensor([shares[k] for k in COCO_OBJECTS]),  # what "novel" means for this model
    }


def confidence_data(
    model: ModelBundle, val_feats: ItemFeatures, val_refs: list[list[str]], step: int = 250, **decoding: Any
) -> tuple[Tensor, Tensor, Tensor]:
    """Decode the validation photos once: (features (N, F) of each best caption, its CIDEr-D (N,),
    the photos' pooled features (N, D))."""
    rows, pooled_all, texts = [], [], {}
    for s in range(0, len(val_feats), step):
        f = val_feats[s : s + step]
        pooled = model.pooled(f)
        probs = model.imagenet_probs(pooled)
        hyps = model.decode(f, **decoding)
        caps = [[(h[0].text, h[0].score, len(h[0].words))] for h in hyps]
        rows += [r[0] for r in model.guidance.confidence_features(pooled, probs, caps)]
        pooled_all.append(pooled.cpu())
        texts.update({s + i: h[0].text for i, h in enumerate(hyps)})
    quality = caption_quality(dict(enumerate(val_refs)), texts)
    return torch.stack(rows), torch.tensor([quality[i] for i in range(len(val_refs))]), torch.cat(pooled_all)


def fit_confidence(x: Tensor, quality: Tensor, weight_decay: float = 0.01) -> dict[str, Tensor]:
    w, b = _logistic(x, quality >= ACCEPTABLE, weight_decay)
    return {"confidence_weight": w, "confidence_bias": b}


def calibrate(
    model: ModelBundle,
    train: CaptionCorpus,
    val: CaptionCorpus,
    cache: FeatureCache | None,
    quiet: bool = True,
    **decoding: Any,
) -> dict[str, Any]:
    """Fit the whole guidance state into `model.guidance` (decoding: the settings the confidence is
    for, default the model's); returns a report: the validation captions' calibration measured
    by 5-fold cross-validation."""
    train_pooled, kept = corpus_pooled(model, train, cache, quiet)
    state = fit_photo_state(train_pooled, [train.captions[k] for k in kept])
    model.guidance = Guidance(model.vocab, state)
    val_feats, val_kept, _ = model.corpus_inputs(val, cache, quiet=quiet)
    val_refs = [val.captions[k] for k in val_kept]
    # typicality first: the val captions the confidence is fitted on must be decoded as the model
    # will decode them, and the decoding's guidance depends on how typical each photo is
    state |= {"val_typicality": model.guidance.typicality(_pooled(model, val_feats)).sort().values}
    model.guidance = Guidance(model.vocab, state)
    x, quality, val_pooled = confidence_data(model, val_feats, val_refs, **decoding)
    # 5-fold cross-validated confidence on val: what the report (and the README's plot) shows
    folds = torch.arange(len(x)) % 5
    held_out = torch.empty(len(x))
    for f in range(5):
        part = fit_confidence(x[folds != f], quality[folds != f])
        held_out[folds == f] = torch.sigmoid(x[folds == f] @ part["confidence_weight"] + part["confidence_bias"])
    state |= fit_confidence(x, quality)
    model.guidance = Guidance(model.vocab, state)
    held_out = held_out * model.guidance.novelty_factor(val_pooled)
    log.info("calibrated on %d training and %d validation photos", len(train_pooled), len(x))
    return {"confidence": held_out.tolist(), "quality": quality.tolist(), "acceptable": ACCEPTABLE}


def reliability(confidence: Tensor, quality: Tensor, bins: int = 5) -> list[dict[str, float]]:
    """Confidence against measured quality in equal-count bins: mean confidence, share acceptable,
    mean CIDEr-D, count."""
    order = confidence.argsort()
    out = []
    for part in order.chunk(bins):
        if len(part):
            out.append(
                {
                    "confidence": confidence[part].mean().item(),
                    "acceptable": (quality[part] >= ACCEPTABLE).float().mean().item(),
                    "cider": quality[part].mean().item(),
                    "n": len(part),
                }
            )
    return out
