"""The decoding pipeline: images -> features -> beam search -> `Caption`s, over one model or an
ensemble (anything with the model interface of model.py), with the guidance part (guidance.py,
naming.py) plugged in when the model's encoder has its ImageNet classifier.

Settings come from `DecodingConfig` (settings.py): the model's recorded defaults, with what a call
sets on top.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .beam import StepModel, beam_search, constraints_met
from .errors import ImageError
from .guidance import CONSTRAIN_SHARE, Guidance, Tag, top_tags
from .naming import Naming
from .settings import TAGS_SHOWN, DecodingConfig, whole_number


class Caption(NamedTuple):
    text: str
    score: float  # summed log-prob (divided by the length penalty when one is set)
    attention: np.ndarray | None = None  # (words, R) attention weights, for attention decoders
    words: tuple[str, ...] = ()  # the caption's tokens, one per attention row (Chinese text has no spaces to split on)
    tags: tuple[Tag, ...] = ()  # the photo's TAGS_KEPT top ImageNet classes (guidance.py), if it has a classifier
    confidence: float | None = None  # P(acceptable caption), when the model is calibrated (calibration.py)

    def attention_grid(self) -> np.ndarray:
        """The attention as (words, h, w) over the encoder's square grid."""
        side = round(self.attention.shape[1] ** 0.5)
        return self.attention.reshape(-1, side, side)


def caption_record(
    nbest: Sequence[Caption], n_tags: int = TAGS_SHOWN, min_confidence: float = 0.0, omit_low: bool = False
) -> dict[str, Any]:
    """An image's n-best Captions as the JSON object `captioner caption --json` prints (and the
    server answers): caption, confidence, nbest [{caption, score, confidence}], tags [{label, p}]
    (n_tags of them, none for 0); "low_confidence" when `min_confidence` is set (omit_low: the
    caption is then null, and every caption below `min_confidence` is left out of nbest too)."""

    def low(c: Caption) -> bool:
        return c.confidence is not None and c.confidence < min_confidence

    best = nbest[0]
    entry: dict[str, Any] = {
        "caption": None if low(best) and omit_low else best.text,
        "confidence": _rounded(best.confidence),
    }
    if min_confidence:
        entry["low_confidence"] = low(best)
    entry["nbest"] = [
        {"caption": c.text, "score": round(c.score, 4), "confidence": _rounded(c.confidence)}
        for c in nbest
        if not (omit_low and low(c))
    ]
    if n_tags and best.tags:
        entry["tags"] = [t.to_dict() for t in best.tags[:n_tags]]
    return entry


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _first_then(first: Any, more: Sequence[Any], n: int, vocab: Any) -> list:
    """`first`, then the hypotheses of `more` that read differently (best first), n in all."""
    seen = {vocab.decode(first.tokens)}
    out = [first]
    for h in more:
        text = vocab.decode(h.tokens)
        if len(out) < n and text not in seen:
            seen.add(text)
            out.append(h)
    return out


def _rows(inputs: Any, idx: list[int]) -> Any:
    """The rows `idx` of a decoder input: a (B, ...) array or tensor, or a tuple of them (an ensemble's)."""
    if isinstance(inputs, tuple):
        return tuple(_rows(x, idx) for x in inputs)
    return inputs[idx]


@dataclass
class _Guide:
    """What the guidance part makes of one batch of photos."""

    pooled: np.ndarray  # (B, D)
    probs: np.ndarray  # (B, C) ImageNet class probabilities
    bias: np.ndarray | None  # (B, V) log-prob bias: the word prior
    prefix: np.ndarray | None  # (B, 2) a forced first words (-1: none)
    constraints: list[list[set[int]]] | None  # per photo, the word sets its caption must meet


class Pipeline:
    """Decodes captions for `model`: a model.Model, an ensemble.Ensemble of them, or an exported
    model on onnxruntime (runtime.py). It imports no torch: the model supplies the step model
    (beam.py) and the classifier's outputs as numpy. `guidance` (None: no tags, word prior,
    forced subject, constraints or confidence) reads the model's ImageNet classifier;
    `for_model` plugs it in when the model has one.

    The model interface it uses: vocab, config, guidance_state, has_classifier, decoder_input,
    classify (pooled features and ImageNet probabilities as numpy), steps() (a context giving
    the step model), batches (inputs prepared in batches, ImageErrors in place) and
    encode_prepared."""

    def __init__(self, model: Any, guidance: Guidance | None = None) -> None:
        self.model = model
        self.guidance = guidance
        self._naming: Naming | None = None

    @classmethod
    def for_model(cls, model: Any) -> Pipeline:
        if not model.has_classifier:
            return cls(model)
        guidance = Guidance(model.vocab, model.guidance_state)
        model.guidance_state = guidance.state  # one dict: what the guidance holds is what the model saves
        return cls(model, guidance)

    @property
    def defaults(self) -> DecodingConfig:
        """The model's decoding defaults: measured best on validation data when its checkpoint records
        them (config["decoding"]), else DecodingConfig's."""
        return DecodingConfig.from_dict(self.model.config.get("decoding"))

    def settings(self, **given: Any) -> DecodingConfig:
        """The settings a call gets: the defaults with what it set (None: not set); UsageError for nonsense."""
        return self.defaults.with_(**given)

    @property
    def naming(self) -> Naming:
        """Concepts, constraints and the extended vocabulary (naming.py), built on first use."""
        if self._naming is None or self._naming.base is not self.model.vocab:
            self._naming = Naming(self.model.vocab)
        return self._naming

    # ---- decoding ----------------------------------------------------------------------------
    def decode(self, features: Any, **settings: Any) -> list[list[Caption]]:
        """The decoder's input for B images or sequences (model.encode / a feature cache) -> for each
        its n-best Captions, with the photo's tags and each caption's confidence when the model has
        them. `settings`: any DecodingConfig field; unset ones are the model's defaults.

        The first caption is the configured beam's best whatever `n_best` is (what `n_best=1`
        gives). The others are that beam's next best; when `n_best` is more than `beam_size`, a
        second search `n_best` wide supplies them instead (best first, the first caption left
        out), so they may score above the first: a wider beam finds captions a narrower one misses.
        No caption is listed twice (two hypotheses can read alike once articles are mended).
        """
        o = self.settings(**settings)
        guide = self._guide(features, o)
        inputs = self.model.decoder_input(features)
        constrained = guide is not None and guide.constraints is not None
        vocab = self.naming.vocab if constrained else self.model.vocab
        with self.model.steps() as steps:
            wider = o.n_best > o.beam_size
            hyps, redone = self._hypotheses(steps, inputs, o, guide, o.beam_size, 1 if wider else o.n_best)
            others = [hs[1:] for hs in hyps]
            if wider:  # photos whose first caption had to name what the classifier sees: the others too
                others, _ = self._hypotheses(steps, inputs, o, guide, o.n_best, o.n_best, redo=redone)
            hyps = [_first_then(hs[0], more, o.n_best, vocab) for hs, more in zip(hyps, others)]
        return self._captions(hyps, vocab, guide)

    def _hypotheses(
        self,
        steps: StepModel,
        inputs: Any,
        o: DecodingConfig,
        guide: _Guide | None,
        beam_size: int,
        n_best: int,
        redo: list[int] | None = None,
    ) -> tuple[list, list[int]]:
        """Beam search `beam_size` wide, its `n_best` hypotheses per input, with the constrained
        search where the guidance asks for it (`redo`: on these photos, whatever the free search
        found) -> (hypotheses, the photos whose hypotheses the constrained search gave)."""
        hyps = self._search(
            steps,
            inputs,
            o,
            beam_size,
            n_best,
            bias=guide.bias if guide else None,
            prefix=guide.prefix if guide else None,
        )
        redone: list[int] = []
        if guide is not None and guide.constraints is not None:
            redone = self._constrained_search(steps, hyps, inputs, o, guide, beam_size, n_best, redo)
            for hs in hyps:
                for h in hs:
                    h.tokens = self.naming.fix_articles(h.tokens)
        return hyps, redone

    def _guide(self, features: Any, o: DecodingConfig) -> _Guide | None:
        """The guidance part's view of a batch: None without guidance or for sequences."""
        if self.guidance is None:
            return None
        classified = self.model.classify(features)  # (B, D), (B, C) or None
        if classified is None:
            return None
        pooled, probs = classified
        g = self.guidance
        bias = g.bias(pooled, probs, o.tag_boost, o.suppress_unseen) if o.tag_boost or o.suppress_unseen else None
        constraints = self._constraints(pooled, probs, o) if o.constrain else None
        prefix = g.subject(pooled, probs, o.tag_subject)  # (B, 2) or None
        if prefix is not None and constraints is not None:  # never "a coffee": the constraint names it instead
            mass = [bool(w in self.naming.no_article_ids and any(w in ws for ws in sets)) for w, sets in
                    zip(prefix[:, 1].tolist(), constraints)]  # fmt: skip
            prefix = np.where(np.array(mass)[:, None], -1, prefix)
        return _Guide(pooled, probs, bias, prefix, constraints)

    def _captions(self, hyps: list, vocab: Any, guide: _Guide | None) -> list[list[Caption]]:
        texts = [[vocab.decode(h.tokens) for h in hs] for hs in hyps]
        tags = top_tags(guide.probs) if guide is not None else [()] * len(hyps)
        conf = None
        if guide is not None:
            captions = [[(t, h.score, len(h.tokens)) for t, h in zip(ts, hs)] for ts, hs in zip(texts, hyps)]
            conf = self.guidance.confidence(guide.pooled, guide.probs, captions)
        return [
            [
                Caption(t, h.score, h.attention, vocab.words(h.tokens), tags[b], None if conf is None else conf[b][j])
                for j, (t, h) in enumerate(zip(texts[b], hs))
            ]
            for b, hs in enumerate(hyps)
        ]

    def _search(self, steps: StepModel, inputs: Any, o: DecodingConfig, beam_size: int, n_best: int, **kw: Any) -> list:
        """beam_search `beam_size` wide for `n_best` hypotheses, with the other settings of `o`."""
        return beam_search(
            steps,
            inputs,
            beam_size=beam_size,
            max_len=o.max_len,
            min_len=o.min_len,
            length_alpha=o.length_alpha,
            no_repeat_ngram=o.no_repeat_ngram,
            n_best=n_best,
            suppress=[self.model.vocab.unk_id],  # "<unk>" is never a useful word to print
            **kw,
        )

    def _constraints(self, pooled: np.ndarray, probs: np.ndarray, o: DecodingConfig) -> list[list[set[int]]]:
        """Each photo's constraints (naming.py): none on photos much like the training photos, where
        the decoder knows better what people mention (guidance.CONSTRAIN_SHARE)."""
        share = self.guidance.typical_share(pooled)  # (B,) or None
        threshold = np.full(len(probs), float(o.constrain), np.float32)  # (B,)
        if share is not None:
            threshold = np.where(share >= CONSTRAIN_SHARE, np.inf, threshold)
        return self.naming.constraints(probs, threshold, o.max_constraints)

    def _constrained_search(
        self,
        steps: StepModel,
        hyps: list,
        inputs: Any,
        o: DecodingConfig,
        guide: _Guide,
        beam_size: int,
        n_best: int,
        redo: list[int] | None = None,
    ) -> list[int]:
        """Decode again, under constraints, the photos whose free caption does not name the
        concepts the classifier is sure of; their hypotheses in `hyps` are replaced when the new
        best caption names more of them. A caption that already names them stays as the free
        search wrote it: a constrained search keeps separate beams per state and would rank
        other, shorter captions first. `redo`: these photos instead, replaced whatever the
        searches found (the wider search of `decode` follows the configured one's choice).
        -> the photos replaced."""
        naming, need, constraints = self.naming, o.constraints_needed, guide.constraints
        met = [constraints_met(sets, hs[0].tokens) if hs else 0 for hs, sets in zip(hyps, constraints)]
        forced = redo is not None
        if redo is None:
            redo = [b for b, sets in enumerate(constraints) if sets and met[b] < min(need, len(sets))]
        if not redo:
            return []
        sub = [constraints[b] for b in redo]
        allowed = naming.allowed_bias(sub)  # (R, V + E): borrowed words only where a photo asks for them
        if guide.bias is not None:
            allowed = allowed + np.pad(guide.bias[redo], ((0, 0), (0, naming.V - naming.V0)))
        again = self._search(
            naming.wrap(steps),
            _rows(inputs, redo),  # an ensemble's inputs are a tuple, one per member
            o,
            beam_size,
            n_best,
            bias=allowed,
            constraints=sub,
            need=need,
            banned_bigrams=naming.banned_bigrams(sub),
        )
        replaced = []
        for b, hs in zip(redo, again):
            if hs and (forced or hs[0].met > met[b]):
                hyps[b] = hs
                replaced.append(b)
        return replaced

    def generate(
        self, inputs: Sequence[Any], batch_size: int = 32, num_workers: int | None = None, **settings: Any
    ) -> Iterator[list[Caption] | ImageError]:
        """For each input, in order: its n-best Captions, or the ImageError it raised.

        A bad input never stops the others. Images are decoded in worker processes (when there is
        more than one batch), then encoded and beam-searched a batch at a time.
        """
        whole_number(batch_size, 1, "batch size (--batch-size, batch_size=)")
        if num_workers is not None:
            whole_number(num_workers, 0, "workers (num_workers=)")
        self.settings(**settings)  # nonsense is refused before any image is read
        for batch in self.model.batches(inputs, batch_size, num_workers):
            good = [x for x in batch if not isinstance(x, ImageError)]
            decoded = iter(self.decode(self.model.encode_prepared(good), **settings) if good else [])
            for item in batch:
                yield item if isinstance(item, ImageError) else next(decoded)
