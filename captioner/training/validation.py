"""Validation after every epoch: the val images captioned once, scored with the COCO metrics."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..api import Captioner
from ..data import CaptionCorpus
from ..evaluation import caption_corpus, caption_features, references
from ..features import ItemFeatures
from ..metrics import METRICS, diversity, evaluate


class AboveCut:
    """Decoder inputs from a cached trunk (ItemFeatures of the activations at `cut`): the
    fine-tuned blocks above the cut applied a chunk at a time, without gradients."""

    def __init__(self, trunk: ItemFeatures, model: Captioner, cut: int) -> None:
        self.trunk, self.model, self.cut = trunk, model, cut

    def __len__(self) -> int:
        return len(self.trunk)

    @torch.no_grad()
    def __getitem__(self, idx) -> Tensor:
        x = self.trunk[idx].to(self.model.device)  # (b, C, h, w)
        grid = self.model.encoder.above(x, self.cut)  # (b, R, D)
        return grid.mean(dim=1) if self.model.decoder.feature_kind == "pooled" else grid


def val_captions(model: Captioner, corpus: CaptionCorpus, feats: ItemFeatures | None, beam_size: int) -> dict:
    """Decode every val item once (greedy, or beam with beam_size > 1): {image_id: caption}."""
    if feats is None:  # fine-tuning: no cached features, encode the images
        return caption_corpus(model, corpus, beam_size=beam_size)[0]
    return caption_features(model, corpus.image_ids, feats, beam_size=beam_size)


def val_scores(model: Captioner, corpus: CaptionCorpus, feats: ItemFeatures | None, beam_size: int) -> dict[str, Any]:
    """BLEU-1..4, METEOR (and its backend), ROUGE-L, CIDEr-D and diversity of the val captions."""
    captions = val_captions(model, corpus, feats, beam_size)
    scores = evaluate(references(corpus), captions)
    return {k: scores[k] for k in METRICS} | {"METEOR_backend": scores["METEOR_backend"]} | diversity(captions)
