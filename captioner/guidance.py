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

import torch
from torch import Tensor, nn

from .concepts import CATEGORIES, GENERIC, imagenet_classes, kinds_named, word_kinds
from .objects import COCO_OBJECTS, novel_kinds
from .settings import TAGS_KEPT
from .vocab import Vocabulary

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


def top_tags(probs: Tensor, k: int = TAGS_KEPT) -> list[tuple[Tag, ...]]:
    """ImageNet probabilities (B, C) -> for each image its k most probable classes, most probable first."""
    classes = imagenet_classes()
    p, idx = probs.float().topk(k, dim=-1)  # (B, k)
    return [
        tuple(Tag(classes[i]["label"], round(float(q), 4)) for q, i in zip(ps, ids))
        for ps, ids in zip(p.tolist(), idx.tolist())
    ]


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


class Guidance:
    """One model's word prior and confidence (see the module docstring). `state` holds what
    calibration.py fitted (tensors only, saved in the checkpoint under "guidance"); without it
    there are tags and the animal/vehicle prior, but no person prior and no confidence."""

    def __init__(self, vocab: Vocabulary, state: dict[str, Tensor] | None = None) -> None:
        self.state = {k: v.float() for k, v in (state or {}).items()}
        V = len(vocab)
        kinds = word_kinds()
        kind_list = [(c, k) for c in ("animal", "vehicle") for k in CATEGORIES[c] if k != GENERIC[c]]
        kind_index = {ck: i for i, ck in enumerate(kind_list)}
        classes = imagenet_classes()
        C = len(classes)  # the ImageNet-1k head's classes, as resources/imagenet_words.json lists them
        self.tag_words = torch.zeros(C, V)  # (C, V) class -> the words its probability boosts
        self.class_kinds = torch.zeros(C, len(kind_list))  # (C, K) class -> the animal/vehicle kind it is
        for c, entry in enumerate(classes):
            targets = [w for w in entry["words"] if w in vocab.stoi][:1]  # its most specific word we have
            for w in entry["words"]:
                if kinds.get(w) in kind_index:  # and the kind it is: a chihuahua is a dog
                    targets.append(w)
                    self.class_kinds[c, kind_index[kinds[w]]] = 1.0
            for w in targets:
                if w in vocab.stoi:
                    self.tag_words[c, vocab.stoi[w]] = 1.0
        self.kind_words = torch.zeros(len(kind_list), V)  # (K, V) the vocabulary's words for each kind
        self.person_words = torch.zeros(V)  # (V,)
        for w, ck in kinds.items():
            if w in vocab.stoi:
                if ck in kind_index:
                    self.kind_words[kind_index[ck], vocab.stoi[w]] = 1.0
                elif ck[0] == "person":
                    self.person_words[vocab.stoi[w]] = 1.0

        # "a" / "an" before a forced subject word (see `subject`)
        self.unk_id = vocab.unk_id
        self.article_ids = torch.tensor([vocab.stoi.get("a", vocab.unk_id), vocab.stoi.get("an", vocab.unk_id)])
        self.vowel_start = torch.tensor([w[:1] in "aeiou" and w[:1] != "" for w in vocab.itos])  # (V,)

    def novel_kinds(self) -> set[str] | None:
        """The COCO kinds the model's training captions rarely name (from the shares calibration
        recorded), or None when it recorded none."""
        shares = self.state.get("object_shares")
        if shares is None or len(shares) != len(COCO_OBJECTS):
            return None
        return novel_kinds(dict(zip(COCO_OBJECTS, shares.tolist())))

    @property
    def has_person(self) -> bool:
        return "person_weight" in self.state

    @property
    def calibrated(self) -> bool:
        return "confidence_weight" in self.state

    def p_person(self, pooled: Tensor) -> Tensor | None:
        """P(a person is in the photo) (B,), from pooled features (B, D); None when not fitted."""
        if not self.has_person:
            return None
        return torch.sigmoid(pooled.float().cpu() @ self.state["person_weight"] + self.state["person_bias"])

    def evidence(self, probs: Tensor) -> Tensor:
        """ImageNet probabilities (B, C) -> the classifier's belief in each caption word (B, V)."""
        return (probs.float().cpu() @ self.tag_words).clamp(max=1.0)

    def fitted_familiarity(self, pooled: Tensor) -> Tensor | None:
        """`familiarity` (B,) when typicality was fitted, else None."""
        return self.familiarity(pooled) if "val_typicality" in self.state else None

    def bias(self, pooled: Tensor, probs: Tensor, boost: float, suppress: float) -> Tensor:
        """Pooled features (B, D) and ImageNet probabilities (B, C) -> log-prob bias (B, V)."""
        probs = probs.float().cpu()
        out = boost * self.evidence(probs)  # (B, V)
        if suppress:
            familiar = self.fitted_familiarity(pooled)  # (B,) or None
            # animals and vehicles: only on photos unlike the training photos (on the others the
            # decoder knows better: ImageNet misses many a Flickr8k dog that the decoder sees);
            # everywhere when the model has no typicality fitted
            unfamiliar = torch.ones(len(probs)) if familiar is None else 1.0 - familiar  # (B,)
            seen = (probs @ self.class_kinds).clamp(max=1.0)  # (B, K)
            missing = (1.0 - seen / SEEN).clamp(min=0.0) * unfamiliar[:, None]  # (B, K)
            missing = missing + (1.0 - seen / SEEN_FAMILIAR).clamp(min=0.0) * (1.0 - unfamiliar[:, None])
            out = out - suppress * missing @ self.kind_words  # (B, V)
            p = self.p_person(pooled)
            if p is not None:  # trusted less on photos unlike the ones it was trained on
                p = p if familiar is None else p * familiar
                out = out - (suppress * (1.0 - p / SEEN_PERSON).clamp(min=0.0))[:, None] * self.person_words
        return out

    def subject(self, pooled: Tensor, probs: Tensor, threshold: float) -> Tensor | None:
        """For photos outside the training photos' world (familiarity < 1) whose classifier is
        at least `threshold` sure of one caption word: the caption's forced start "a <word>"
        (B, 2) word ids, -1 for the other photos; None when no photo qualifies (or no typicality
        was fitted)."""
        familiar = self.fitted_familiarity(pooled) if threshold else None  # (B,)
        if familiar is None or self.unk_id in self.article_ids.tolist():
            return None  # (a vocabulary without "a" and "an": not English, no subject to force)
        best, word = self.evidence(probs).max(-1)  # (B,)
        use = (best >= threshold) & (familiar < 1.0)  # (B,)
        if not bool(use.any()):
            return None
        article = torch.where(self.vowel_start[word], self.article_ids[1], self.article_ids[0])  # (B,)
        out = torch.stack([article, word], 1)  # (B, 2)
        return torch.where(use[:, None], out, torch.full_like(out, -1))

    def typicality(self, pooled: Tensor) -> Tensor:
        """How close each photo is to the training photos (B,): cosine to the nearest centroid."""
        x = nn.functional.normalize(pooled.float().cpu(), dim=1)  # (B, D)
        return (x @ self.state["centroids"].T).max(1).values

    def typical_share(self, pooled: Tensor) -> Tensor | None:
        """(B,) in [0, 1]: the share of the validation photos each photo is more typical than;
        None when typicality was not fitted."""
        if "val_typicality" not in self.state:
            return None
        ref = self.state["val_typicality"]  # (M,) sorted
        return torch.searchsorted(ref, self.typicality(pooled)).float() / len(ref)  # (B,)

    def familiarity(self, pooled: Tensor) -> Tensor:
        """How familiar each photo is (B,) in [0, 1]: 1 (familiar) unless it is less typical than all
        but NOVELTY_ALPHA of the validation photos, then the share of them it beats over NOVELTY_ALPHA
        (0: stranger than every one)."""
        return (self.typical_share(pooled) / NOVELTY_ALPHA).clamp(max=1.0)

    def confidence_features(
        self, pooled: Tensor, probs: Tensor, captions: Sequence[Sequence[tuple[str, float, int]]]
    ) -> list[Tensor]:
        """For each image, (n, F) features of its n captions: (text, score, tokens) each."""
        p_person = self.p_person(pooled)
        top = probs.float().cpu().max(-1).values  # (B,)
        out = []
        for b, caps in enumerate(captions):
            rows = []
            pp = float(p_person[b]) if p_person is not None else 0.5
            for text, score, n_tokens in caps:
                person = float(any(c == "person" for c, _ in kinds_named(text.split())))
                agrees = pp if person else 1.0 - pp
                rows.append([score, score / max(n_tokens + 1, 1), float(top[b]), pp, person, agrees])
            out.append(torch.tensor(rows).reshape(len(rows), len(CONFIDENCE_FEATURES)))
        return out

    def confidence(
        self, pooled: Tensor, probs: Tensor, captions: Sequence[Sequence[tuple[str, float, int]]]
    ) -> list[list[float]] | None:
        """For each image, each caption's confidence in [0, 1]; None when not calibrated."""
        if not self.calibrated:
            return None
        w, b = self.state["confidence_weight"], self.state["confidence_bias"]
        familiar = self.familiarity(pooled)  # (B,)
        feats = self.confidence_features(pooled, probs, captions)
        return [(torch.sigmoid(f @ w + b) * familiar[i]).tolist() for i, f in enumerate(feats)]
