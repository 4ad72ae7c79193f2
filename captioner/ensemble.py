"""Ensembles at decode time: several trained models over one vocabulary caption as one.

`Ensemble` offers the model interface of model.py (prepare, encode, pooled, corpus_inputs, ...)
over its members, so the decoding pipeline (pipeline.py) runs over it unchanged. Beam search runs
over `decoding.EnsembleDecoder` (the mean of the members' log-probabilities at every step), so
nothing about decoding is written twice. Each image is read once; members whose
encoders are the same (same encoder, no fine-tuned blocks or the same ones) share one encoder
pass, and members with another input size get their own preprocessing of the same image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .checkpoint import CheckpointError
from .data import CaptionCorpus
from .decoding import EnsembleDecoder
from .device import resolve_device
from .errors import ImageError, UsageError
from .features import FeatureCache, ItemFeatures, corpus_features, encode_pixels, pool
from .images import Preprocess
from .model import ImageInput, Model, read_input


def _same_encoder(a: Model, b: Model) -> bool:
    if a.config["encoder"] != b.config["encoder"] or a.preprocess != b.preprocess:
        return False
    sa, sb = a.encoder.state_dict(), b.encoder.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in sa.items())


class _Zipped:
    """Per-member decoder inputs of a corpus, read together: feats[idx] -> a tuple, one per member."""

    def __init__(self, parts: list[ItemFeatures]) -> None:
        self.parts = parts

    def __len__(self) -> int:
        return len(self.parts[0])

    def __getitem__(self, idx) -> tuple:
        return tuple(p[idx] for p in self.parts)


class Ensemble:
    """Models that caption together (`Captioner.load([a, b, ...])`), seen as one model: decoding
    defaults, vocabulary and guidance are the first model's; image sequences are not taken."""

    is_sequence_model = False

    def __init__(self, members: Sequence[Model], sources: Sequence[str] | None = None) -> None:
        if len(members) < 2:
            raise UsageError("an ensemble needs at least two models")
        sources = list(sources or [f"model {i + 1}" for i in range(len(members))])
        for m, src in zip(members[1:], sources[1:]):
            if m.vocab != members[0].vocab:
                raise CheckpointError(
                    f"{src}: its vocabulary differs from that of {sources[0]}: an ensemble averages "
                    "next-word probabilities, so its models must share one vocabulary (train them on the same data "
                    "with the same --min-word-count)"
                )
        for m, src in zip(members, sources):
            if m.is_sequence_model:
                raise UsageError(f"{src}: a sequence model; ensembles caption single images only")
        self.members = list(members)
        # one encoder pass per distinct encoder; one preprocessing per distinct input size
        self.groups: list[int] = []  # member -> index of the first member with the same encoder
        for i, m in enumerate(self.members):
            self.groups.append(next(j for j in range(i + 1) if j == i or _same_encoder(self.members[j], m)))
        self.preprocesses: list[Preprocess] = []
        for m in self.members:
            if m.preprocess not in self.preprocesses:
                self.preprocesses.append(m.preprocess)
        first = self.members[0]
        self.vocab, self.device, self.preprocess = first.vocab, resolve_device(first.device), first.preprocess
        self.encoder = first.encoder  # the tags come from the first model's classifier
        self.config = first.config | {"ensemble": [m.config for m in self.members]}
        self.decoder = EnsembleDecoder([m.decoder for m in self.members])
        if len(self.preprocesses) > 1:  # grids of different sizes: no one attention map to average
            self.decoder.attends_over = None
        # the first model's guidance (tags, person classifier, typicality: its pooled features are
        # what `pooled` gives), but no confidence: that was fitted to the first model's captions
        self.guidance_state = {k: v for k, v in first.guidance_state.items() if not k.startswith("confidence")}
        self.max_pixels: int | None = None

    @classmethod
    def load_all(cls, paths: Sequence[str | os.PathLike | None], device: str | torch.device = "auto") -> Ensemble:
        return cls([Model.load(p, device) for p in paths], [str(p or "bundled model") for p in paths])

    @property
    def has_classifier(self) -> bool:
        return self.members[0].has_classifier

    # ---- what differs from one model ----------------------------------------------------------
    def checkpoint_payload(self) -> dict[str, Any]:
        raise UsageError("an ensemble is not one checkpoint: save (and load) its models one by one")

    def save(self, path: str | os.PathLike, half: bool = False) -> None:
        self.checkpoint_payload()

    def read_input(self, item: ImageInput) -> Any:
        return read_input(item, self.max_pixels)

    def prepare(self, item: ImageInput) -> Tensor:
        """One input, read once, preprocessed for every input size the members take:
        (P, 3, S, S), each zero-padded to the largest size S."""
        image = read_input(item, self.max_pixels)
        views = [p(image) for p in self.preprocesses]  # (3, S_p, S_p) each
        size = max(v.size(-1) for v in views)
        out = views[0].new_zeros((len(views), 3, size, size))
        for i, v in enumerate(views):
            out[i, :, : v.size(-2), : v.size(-1)] = v
        return out  # (P, 3, S, S)

    def encode(self, pixels: Tensor) -> tuple:
        """(B, P, 3, S, S) from `prepare` -> the tuple of the members' decoder inputs."""
        grids: dict[int, Tensor] = {}
        out = []
        for m, g in zip(self.members, self.groups):
            if g not in grids:
                p = self.preprocesses.index(m.preprocess)
                s = m.preprocess.crop
                grids[g] = encode_pixels(self.members[g].encoder, pixels[:, p, :, :s, :s], self.device)  # (B, R, D)
            out.append(pool(grids[g], m.decoder.feature_kind))
        return tuple(out)

    def encode_sequences(self, sequences, batch_size: int = 32):
        raise UsageError("ensembles caption single images, not image sequences")

    def pooled(self, features: Any) -> Tensor | None:
        """The first member's pooled features: the tags come from its encoder (self.encoder)."""
        return self.members[0].pooled(features[0]) if isinstance(features, tuple) else None

    def imagenet_probs(self, pooled: Tensor | None) -> Tensor | None:
        return self.members[0].imagenet_probs(pooled)

    # read through the methods above, so written once in Model
    batches = Model.batches
    encode_prepared = Model.encode_prepared
    steps = Model.steps
    classify = Model.classify

    def decoder_input(self, features: tuple) -> tuple:
        return tuple(f.to(self.device).float() for f in features)

    def feature_cache(self, root: str | os.PathLike | None = None) -> list[FeatureCache]:
        return [FeatureCache(self.members[g].encoder, root, self.device) for g in sorted(set(self.groups))]

    def corpus_inputs(
        self, corpus: CaptionCorpus, cache: list[FeatureCache] | None, batch_size: int = 32
    ) -> tuple[_Zipped, list[int], list[ImageError]]:
        if corpus.frames is not None:
            raise UsageError("ensembles caption single images, not image sequences")
        distinct = sorted(set(self.groups))
        per_group = {}
        for n, g in enumerate(distinct):
            group = [m for m, h in zip(self.members, self.groups) if h == g]
            # the grid when any member of the group reads it (pooled members take its mean)
            reader = next((m.decoder for m in group if m.decoder.feature_kind == "grid"), group[0].decoder)
            per_group[g] = (
                reader.feature_kind,
                corpus_features(
                    self.members[g].encoder,
                    reader,
                    corpus,
                    cache[n] if cache else None,
                    batch_size=batch_size,
                    device=self.device,
                    desc=f"features ({n + 1}/{len(distinct)})",
                ),
            )
        kept = sorted(set.intersection(*(set(k) for _, (_, k, _) in per_group.values())))
        failed = list({str(e.path): e for _, (_, _, f) in per_group.values() for e in f}.values())
        parts: list = []
        for m, g in zip(self.members, self.groups):
            kind, (feats, k, _) = per_group[g]
            pos = {item: r for r, item in enumerate(k)}
            part = ItemFeatures(feats.store, [feats.frames[pos[i]] for i in kept], m.decoder.from_frames)
            parts.append(_Pooled(part) if kind != m.decoder.feature_kind else part)
        return _Zipped(parts), kept, failed


class _Pooled:
    """Grid inputs (B, R, D) read as pooled ones (B, D), for a member that shares a grid-reading encoder."""

    def __init__(self, feats: ItemFeatures) -> None:
        self.feats = feats

    def __len__(self) -> int:
        return len(self.feats)

    def __getitem__(self, idx) -> Tensor:
        return self.feats[idx].mean(dim=1)
