"""Fitting a model's guidance state (guidance.py) from its own data: the person classifier and the
typicality centroids from the training photos, the confidence from captions of validation photos;
and measuring how well the confidence is calibrated (`captioner calibrate`, and `captioner train`
at the end of a run with val data).

Everything is fitted on features the feature cache already holds, in seconds; the result is a
few tensors saved in the checkpoint under "guidance".
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .checkpoint import load_checkpoint, save_checkpoint
from .concepts import word_kinds
from .data import CaptionCorpus
from .errors import UsageError
from .features import FeatureCache, ItemFeatures
from .guidance import ACCEPTABLE, Guidance
from .metrics import cider_d, normalize, normalize_corpus, split_words
from .objects import COCO_OBJECTS, kind_shares

if TYPE_CHECKING:
    from .api import Captioner

log = logging.getLogger("captioner")

#: fewest readable photos calibration fits on: the confidence's report is 5-fold cross-validated
MIN_PHOTOS = 5


def fit_logistic(x: Tensor, y: Tensor, weight_decay: float, steps: int = 300) -> tuple[Tensor, Tensor]:
    """Full-batch L-BFGS logistic regression on standardised x (N, F) -> (weight (F,), bias ()) for raw x."""
    x = x.float()
    mean, std = x.mean(0), x.std(0) + 1e-6
    xs = (x - mean) / std
    w = torch.zeros(x.size(1), requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(xs @ w + b, y.float()) + weight_decay * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():  # fold the standardisation in: the weights take raw features
        return w / std, b - (w / std * mean).sum()


def fit_person(pooled: Tensor, labels: Tensor, weight_decay: float = 0.1) -> dict[str, Tensor]:
    """The person classifier's weights from pooled features (N, D) and `person_labels` (N,)."""
    w, b = fit_logistic(pooled, labels, weight_decay)
    return {"person_weight": w, "person_bias": b}


def fit_centroids(pooled: Tensor, k: int = 32, iters: int = 30, seed: int = 0) -> Tensor:
    """k-means (cosine) centroids of the training photos' pooled features: (k, D), unit length."""
    x = nn.functional.normalize(pooled.float(), dim=1)  # (N, D)
    g = torch.Generator().manual_seed(seed)
    cent = x[torch.randperm(len(x), generator=g)[:k]].clone()  # (k, D)
    for _ in range(iters):
        assign = (x @ cent.T).argmax(1)  # (N,)
        for j in range(len(cent)):
            if (assign == j).any():
                cent[j] = nn.functional.normalize(x[assign == j].mean(0), dim=0)
    return cent


def _pooled(model: Captioner, feats: ItemFeatures, step: int = 256) -> Tensor:
    """Pooled features (N, D) of every item of `feats`."""
    return torch.cat([model.pooled(feats[s : s + step]).cpu() for s in range(0, len(feats), step)])


def check_calibratable(model: Captioner) -> None:
    """UsageError unless the model can have guidance: a single-image model whose encoder has its
    ImageNet classifier (the tags and the word prior come from it)."""
    if not model.model.has_classifier:
        raise UsageError("guidance needs a single-image model whose encoder has its ImageNet classifier")


def readable_inputs(model: Captioner, corpus: CaptionCorpus, cache: FeatureCache | None, what: str):
    """(decoder inputs, kept indices) of a corpus' readable photos; UsageError when fewer than
    MIN_PHOTOS can be read."""
    feats, kept, _ = model.corpus_inputs(corpus, cache)
    if len(kept) < MIN_PHOTOS:
        raise UsageError(
            f"{corpus.source}: {len(kept)} readable {what} photo(s); calibration needs at least {MIN_PHOTOS}"
        )
    return feats, kept


def corpus_pooled(model: Captioner, corpus: CaptionCorpus, cache: FeatureCache | None) -> tuple[Tensor, list[int]]:
    """(N, D) pooled features of a corpus' readable photos and their indices in the corpus."""
    check_calibratable(model)
    feats, kept = readable_inputs(model, corpus, cache, "training")
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
    model: Captioner, val_feats: ItemFeatures, val_refs: list[list[str]], step: int = 250, **decoding: Any
) -> tuple[Tensor, Tensor, Tensor]:
    """Decode the validation photos once: (features (N, F) of each best caption, its CIDEr-D (N,),
    the photos' pooled features (N, D))."""
    rows, pooled_all, texts = [], [], {}
    for s in range(0, len(val_feats), step):
        f = val_feats[s : s + step]
        pooled = model.pooled(f)
        probs = model.imagenet_probs(pooled).cpu()
        pooled = pooled.cpu()
        hyps = model.decode(f, **decoding)
        caps = [[(h[0].text, h[0].score, len(h[0].words))] for h in hyps]
        rows += [torch.from_numpy(r[0]) for r in model.guidance.confidence_features(pooled, probs, caps)]
        pooled_all.append(pooled)
        texts.update({s + i: h[0].text for i, h in enumerate(hyps)})
    quality = caption_quality(dict(enumerate(val_refs)), texts)
    return torch.stack(rows), torch.tensor([quality[i] for i in range(len(val_refs))]), torch.cat(pooled_all)


def fit_confidence(x: Tensor, quality: Tensor, weight_decay: float = 0.01) -> dict[str, Tensor]:
    w, b = fit_logistic(x, quality >= ACCEPTABLE, weight_decay)
    return {"confidence_weight": w, "confidence_bias": b}


def calibrate(
    model: Captioner, train: CaptionCorpus, val: CaptionCorpus, cache: FeatureCache | None, **decoding: Any
) -> dict[str, Any]:
    """Fit the whole guidance state into `model.guidance` (decoding: the settings the confidence is
    for, default the model's); returns a report: the validation captions' calibration measured
    by 5-fold cross-validation ("confidence", "quality", "acceptable") and the photos fitted on
    ("train_photos", "val_photos")."""
    train_pooled, kept = corpus_pooled(model, train, cache)
    val_feats, val_kept = readable_inputs(model, val, cache, "validation")  # (checked before any fitting)
    state = fit_photo_state(train_pooled, [train.captions[k] for k in kept])
    model.guidance = Guidance(model.vocab, state)
    val_refs = [val.captions[k] for k in val_kept]
    # typicality first: the val captions the confidence is fitted on must be decoded as the model
    # will decode them, and the decoding's guidance depends on how typical each photo is
    state |= {"val_typicality": torch.from_numpy(model.guidance.typicality(_pooled(model, val_feats))).sort().values}
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
    held_out = held_out * torch.from_numpy(model.guidance.familiarity(val_pooled))
    log.debug("calibrated on %d training and %d validation photos", len(train_pooled), len(x))
    return {
        "confidence": held_out.tolist(),
        "quality": quality.tolist(),
        "acceptable": ACCEPTABLE,
        "train_photos": len(train_pooled),
        "val_photos": len(x),
    }


def calibrate_checkpoint(
    path: str | os.PathLike,
    train: CaptionCorpus,
    val: CaptionCorpus,
    device: str | torch.device = "auto",
    cache_root: str | os.PathLike | None = None,
    use_cache: bool = True,
    **decoding: Any,
) -> dict[str, Any]:
    """Fit the guidance state of the model saved at `path` (see `calibrate`) and write it into that
    file, keeping everything else it holds (a run's best.pt keeps its training state); atomic, so
    an interruption leaves the file as it was. Returns calibrate's report."""
    from .api import Captioner

    model = Captioner.load(path, device)
    check_calibratable(model)
    report = calibrate(model, train, val, model.feature_cache(cache_root) if use_cache else None, **decoding)
    ckpt = load_checkpoint(path, map_location="cpu")
    ckpt["guidance"] = dict(model.guidance.state)
    save_checkpoint(path, ckpt)
    return report


def record_decoding(model: Captioner, settings: dict[str, Any]) -> None:
    """Make `settings` (e.g. the best of `captioner tune`) the model's decoding defaults, saved with
    it; refuses names that are no decoding setting."""
    if not isinstance(settings, dict):
        raise UsageError(f"decoding settings must be a JSON object of name: value, not {type(settings).__name__}")
    unknown = sorted(set(settings) - set(model.decoding))
    if unknown:
        raise UsageError(f"unknown decoding setting(s) {', '.join(unknown)}: known are {', '.join(model.decoding)}")
    model.decoding = model.decoding | settings  # (recorded in the model's config: `save` keeps them)


def measure(
    model: Captioner, corpus: CaptionCorpus, cache: FeatureCache | None, step: int = 250, **decoding: Any
) -> tuple[Tensor, Tensor]:
    """(confidence (N,), per-caption CIDEr-D (N,)) of the model's best captions of the readable
    photos of a set it was not fitted on."""
    feats, kept, _ = model.corpus_inputs(corpus, cache)
    conf, texts = [], {}
    for s in range(0, len(kept), step):
        for i, hyps in enumerate(model.decode(feats[s : s + step], **decoding)):
            conf.append(hyps[0].confidence)
            texts[s + i] = hyps[0].text
    quality = caption_quality({i: corpus.captions[k] for i, k in enumerate(kept)}, texts)
    return torch.tensor(conf), torch.tensor([quality[i] for i in range(len(kept))])


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


def reliability_table(name: str, confidence: Tensor, quality: Tensor) -> str:
    """A Markdown reliability table (see `reliability`) under a one-line summary of the set."""
    lines = [
        f"{name}: {len(confidence)} captions, {(quality >= ACCEPTABLE).float().mean():.3f} acceptable "
        f"(CIDEr-D >= {ACCEPTABLE}), mean confidence {confidence.mean():.3f}",
        "| confidence (bin mean) | acceptable | mean CIDEr-D | captions |",
        "|---|---|---|---|",
    ]
    for b in reliability(confidence, quality):
        lines.append(f"| {b['confidence']:.3f} | {b['acceptable']:.3f} | {b['cider']:.3f} | {b['n']} |")
    return "\n".join(lines)


def plot_reliability(path: str | os.PathLike, sets: list[tuple[str, Tensor, Tensor]]) -> None:
    """Reliability diagram (PNG) of (name, confidence, quality) sets against perfect calibration."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .checkpoint import atomic_write

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
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
