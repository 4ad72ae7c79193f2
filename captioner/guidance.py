"""Tags, tag-guided decoding and caption confidence: what the encoder's own ImageNet classifier
recognises, used to keep the decoder from naming what is not there and to say how far to trust
a caption.

The decoder learnt Flickr8k's world (people and dogs); out of it, it describes a cat as "a man in
a blue shirt". The encoder's ImageNet head, run on the same pooled features the decoder sees (no
extra encoder pass), still says "tabby cat". From that:

- tags: the top ImageNet classes with their probabilities;
- a word prior for beam search (decoding.beam_search's `bias`, renormalised at each step):
  `tag_boost` x the classifier's probability for each class's caption word (tabby -> "cat"), and
  up to `suppress_unseen` off the words of an animal or vehicle kind the classifier gives little
  probability (a dog on a photo of a coffee cup: under SEEN on photos unlike the training photos,
  under SEEN_FAMILIAR on the others); people are no ImageNet class, so the person
  words are judged by a small classifier trained on the model's own training captions;
- confidence: P(the caption is acceptable: per-caption CIDEr-D >= ACCEPTABLE), a logistic
  regression on the caption's score and the classifiers' outputs fitted on validation captions,
  times the photo's familiarity: a photo less typical of the training photos than all but a few
  validation photos is outside what the model has seen (calibration.py fits all of it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .beam import topk
from .concepts import CATEGORIES, GENERIC, imagenet_classes, kinds_named, word_kinds
from .objects import COCO_OBJECTS, novel_kinds
from .settings import TAGS_KEPT
from .vocab import Vocabulary

Array = Any  # a numpy array, or anything np.asarray takes (a CPU torch tensor)

SEEN = 0.5  # an animal/vehicle kind's evidence at or above which it counts as seen (no penalty)
SEEN_PERSON = 0.8  # the same for P(person); measured on Flickr8k val: fewer invented people than 0.5, same CIDEr-D
ACCEPTABLE = 0.5  # per-caption CIDEr-D at which a caption counts as acceptable (what confidence predicts)
NOVELTY_ALPHA = 0.05  # photos less typical than this share of the validation photos get less confidence
#: constrained search (naming.py) runs on photos less typical than this share of the validation photos:
#: Flickr8k val CIDEr-D 0.516 at 0.05, 0.2 and 0.3, 0.512 at 0.5, 0.504 everywhere; coco_256 object
#: recall 0.502, 0.523, 0.533, 0.547, 0.560 (novel 0.256, 0.304, 0.326, 0.356, 0.374)
CONSTRAIN_SHARE = 0.3
#: on photos like the training photos, an animal or vehicle kind the classifier gives less than this
#: counts as unseen too (ImageNet misses many a Flickr8k dog, but rarely gives a real dog under 1 %):
#: Flickr8k val CIDEr-D 0.516 -> 0.517; coco_256 captions inventing an object 32.1 % -> 29.9 %,
#: precision of named objects 0.693 -> 0.710 (0.05: 28.1 %, 0.724, but val 0.514)
SEEN_FAMILIAR = 0.01
CONFIDENCE_FEATURES = ("score", "score_per_token", "top_class_p", "p_person", "names_person", "person_agrees")


@dataclass(frozen=True)
class Tag:
    label: str
    p: float

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "p": self.p}


def _f32(x: Array) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(88+) is inf: the sigmoid is 0, as torch's gives it
        return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


def _normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (as torch's F.normalize: eps 1e-12)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def top_tags(probs: Array, k: int = TAGS_KEPT) -> list[tuple[Tag, ...]]:
    """ImageNet probabilities (B, C) -> for each image its k most probable classes, most probable first."""
    classes = imagenet_classes()
    p, idx = topk(_f32(probs), k)  # (B, k)
    return [
        tuple(Tag(classes[i]["label"], round(float(q), 4)) for q, i in zip(ps, ids))
        for ps, ids in zip(p.tolist(), idx.tolist())
    ]


class Guidance:
    """One model's word prior and confidence (see the module docstring). `state` holds what
    calibration.py fitted (arrays only, saved in the checkpoint under "guidance": torch tensors
    there, numpy arrays in an export); without it there are tags and the animal/vehicle prior,
    but no person prior and no confidence. Everything here is numpy, so the torch and the
    ONNX runtime paths guide their captions with the same code."""

    def __init__(self, vocab: Vocabulary, state: dict[str, Array] | None = None) -> None:
        self.state = dict(state or {})  # kept as given: the model saves this very dict
        V = len(vocab)
        kinds = word_kinds()
        kind_list = [(c, k) for c in ("animal", "vehicle") for k in CATEGORIES[c] if k != GENERIC[c]]
        kind_index = {ck: i for i, ck in enumerate(kind_list)}
        classes = imagenet_classes()
        C = len(classes)  # the ImageNet-1k head's classes, as resources/imagenet_words.json lists them
        self.tag_words = np.zeros((C, V), np.float32)  # (C, V) class -> the words its probability boosts
        self.class_kinds = np.zeros((C, len(kind_list)), np.float32)  # (C, K) class -> the animal/vehicle kind it is
        for c, entry in enumerate(classes):
            targets = [w for w in entry["words"] if w in vocab.stoi][:1]  # its most specific word we have
            for w in entry["words"]:
                if kinds.get(w) in kind_index:  # and the kind it is: a chihuahua is a dog
                    targets.append(w)
                    self.class_kinds[c, kind_index[kinds[w]]] = 1.0
            for w in targets:
                if w in vocab.stoi:
                    self.tag_words[c, vocab.stoi[w]] = 1.0
        self.kind_words = np.zeros((len(kind_list), V), np.float32)  # (K, V) the vocabulary's words for each kind
        self.person_words = np.zeros(V, np.float32)  # (V,)
        for w, ck in kinds.items():
            if w in vocab.stoi:
                if ck in kind_index:
                    self.kind_words[kind_index[ck], vocab.stoi[w]] = 1.0
                elif ck[0] == "person":
                    self.person_words[vocab.stoi[w]] = 1.0

        # "a" / "an" before a forced subject word (see `subject`)
        self.unk_id = vocab.unk_id
        self.article_ids = np.array([vocab.stoi.get("a", vocab.unk_id), vocab.stoi.get("an", vocab.unk_id)])
        self.vowel_start = np.array([w[:1] in "aeiou" and w[:1] != "" for w in vocab.itos])  # (V,)

    def _state(self, key: str) -> np.ndarray:
        return _f32(self.state[key])

    def novel_kinds(self) -> set[str] | None:
        """The COCO kinds the model's training captions rarely name (from the shares calibration
        recorded), or None when it recorded none."""
        shares = self.state.get("object_shares")
        if shares is None or len(shares) != len(COCO_OBJECTS):
            return None
        return novel_kinds(dict(zip(COCO_OBJECTS, _f32(shares).tolist())))

    @property
    def has_person(self) -> bool:
        return "person_weight" in self.state

    @property
    def calibrated(self) -> bool:
        return "confidence_weight" in self.state

    def p_person(self, pooled: Array) -> np.ndarray | None:
        """P(a person is in the photo) (B,), from pooled features (B, D); None when not fitted."""
        if not self.has_person:
            return None
        return _sigmoid(_f32(pooled) @ self._state("person_weight") + self._state("person_bias"))

    def evidence(self, probs: Array) -> np.ndarray:
        """ImageNet probabilities (B, C) -> the classifier's belief in each caption word (B, V)."""
        return np.minimum(_f32(probs) @ self.tag_words, 1.0)

    def fitted_familiarity(self, pooled: Array) -> np.ndarray | None:
        """`familiarity` (B,) when typicality was fitted, else None."""
        return self.familiarity(pooled) if "val_typicality" in self.state else None

    def bias(self, pooled: Array, probs: Array, boost: float, suppress: float) -> np.ndarray:
        """Pooled features (B, D) and ImageNet probabilities (B, C) -> log-prob bias (B, V)."""
        probs = _f32(probs)
        out = boost * self.evidence(probs)  # (B, V)
        if suppress:
            familiar = self.fitted_familiarity(pooled)  # (B,) or None
            # animals and vehicles: only on photos unlike the training photos (on the others the
            # decoder knows better: ImageNet misses many a Flickr8k dog that the decoder sees);
            # everywhere when the model has no typicality fitted
            unfamiliar = np.ones(len(probs), np.float32) if familiar is None else 1.0 - familiar  # (B,)
            seen = np.minimum(probs @ self.class_kinds, 1.0)  # (B, K)
            missing = np.maximum(1.0 - seen / SEEN, 0.0) * unfamiliar[:, None]  # (B, K)
            missing = missing + np.maximum(1.0 - seen / SEEN_FAMILIAR, 0.0) * (1.0 - unfamiliar[:, None])
            out = out - suppress * missing @ self.kind_words  # (B, V)
            p = self.p_person(pooled)
            if p is not None:  # trusted less on photos unlike the ones it was trained on
                p = p if familiar is None else p * familiar
                out = out - (suppress * np.maximum(1.0 - p / SEEN_PERSON, 0.0))[:, None] * self.person_words
        return out.astype(np.float32)

    def subject(self, pooled: Array, probs: Array, threshold: float) -> np.ndarray | None:
        """For photos outside the training photos' world (familiarity < 1) whose classifier is
        at least `threshold` sure of one caption word: the caption's forced start "a <word>"
        (B, 2) word ids, -1 for the other photos; None when no photo qualifies (or no typicality
        was fitted)."""
        familiar = self.fitted_familiarity(pooled) if threshold else None  # (B,)
        if familiar is None or self.unk_id in self.article_ids.tolist():
            return None  # (a vocabulary without "a" and "an": not English, no subject to force)
        ev = self.evidence(probs)  # (B, V)
        word = ev.argmax(-1)  # (B,) the first of equals, as torch's max
        best = ev[np.arange(len(ev)), word]
        use = (best >= threshold) & (familiar < 1.0)  # (B,)
        if not use.any():
            return None
        article = np.where(self.vowel_start[word], self.article_ids[1], self.article_ids[0])  # (B,)
        out = np.stack([article, word], 1).astype(np.int64)  # (B, 2)
        return np.where(use[:, None], out, -1)

    def typicality(self, pooled: Array) -> np.ndarray:
        """How close each photo is to the training photos (B,): cosine to the nearest centroid."""
        x = _normalize(_f32(pooled))  # (B, D)
        return (x @ self._state("centroids").T).max(1)

    def typical_share(self, pooled: Array) -> np.ndarray | None:
        """(B,) in [0, 1]: the share of the validation photos each photo is more typical than;
        None when typicality was not fitted."""
        if "val_typicality" not in self.state:
            return None
        ref = self._state("val_typicality")  # (M,) sorted
        return (np.searchsorted(ref, self.typicality(pooled), side="left") / len(ref)).astype(np.float32)  # (B,)

    def familiarity(self, pooled: Array) -> np.ndarray:
        """How familiar each photo is (B,) in [0, 1]: 1 (familiar) unless it is less typical than all
        but NOVELTY_ALPHA of the validation photos, then the share of them it beats over NOVELTY_ALPHA
        (0: stranger than every one)."""
        return np.minimum(self.typical_share(pooled) / NOVELTY_ALPHA, 1.0).astype(np.float32)

    def confidence_features(
        self, pooled: Array, probs: Array, captions: Sequence[Sequence[tuple[str, float, int]]]
    ) -> list[np.ndarray]:
        """For each image, (n, F) features of its n captions: (text, score, tokens) each."""
        p_person = self.p_person(pooled)
        top = _f32(probs).max(-1)  # (B,)
        out = []
        for b, caps in enumerate(captions):
            rows = []
            pp = float(p_person[b]) if p_person is not None else 0.5
            for text, score, n_tokens in caps:
                person = float(any(c == "person" for c, _ in kinds_named(text.split())))
                agrees = pp if person else 1.0 - pp
                rows.append([score, score / max(n_tokens + 1, 1), float(top[b]), pp, person, agrees])
            out.append(np.array(rows, np.float32).reshape(len(rows), len(CONFIDENCE_FEATURES)))
        return out

    def confidence(
        self, pooled: Array, probs: Array, captions: Sequence[Sequence[tuple[str, float, int]]]
    ) -> list[list[float]] | None:
        """For each image, each caption's confidence in [0, 1]; None when not calibrated."""
        if not self.calibrated:
            return None
        w, b = self._state("confidence_weight"), self._state("confidence_bias")
        familiar = self.familiarity(pooled)  # (B,)
        feats = self.confidence_features(pooled, probs, captions)
        return [(_sigmoid(f @ w + b) * familiar[i]).tolist() for i, f in enumerate(feats)]
