"""The model bundle: encoder + decoder + vocabulary + config + decoding defaults, and what every
user of a model needs from it — build, load and save a checkpoint; turn images into the decoder's
input; beam-search captions. Training, evaluation and the Python API (`Captioner`) all use it."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, Self

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .data import CaptionCorpus
from .decoding import beam_search, check_options, constraints_met, whole_number
from .device import resolve_device
from .encoders import Encoder, build_encoder
from .features import (
    FeatureCache,
    ItemFeatures,
    corpus_features,
    default_workers,
    encode_pixels,
    pool,
    prepared_batches,
    split_batch,
)
from .guidance import CONSTRAIN_SHARE, Guidance, Tag, top_tags
from .images import ImageError, Preprocess, check_size, from_array, load_image, to_rgb
from .models import CaptionModel, SequenceModel, build_model
from .naming import Naming
from .paths import bundled_model_path
from .vocab import Vocabulary

ImageInput = str | os.PathLike | Image.Image | Tensor | np.ndarray


class Caption(NamedTuple):
    text: str
    score: float  # summed log-prob (divided by the length penalty when one is set)
    attention: Tensor | None = None  # (words, R) attention weights, for attention decoders
    words: tuple[str, ...] = ()  # the caption's tokens, one per attention row (Chinese text has no spaces to split on)
    tags: tuple[Tag, ...] = ()  # the photo's top ImageNet classes (guidance.py), when the encoder has its classifier
    confidence: float | None = None  # P(acceptable caption), when the model is calibrated (calibration.py)

    def attention_grid(self) -> Tensor:
        """The attention as (words, h, w) over the encoder's square grid."""
        side = round(self.attention.size(1) ** 0.5)
        return self.attention.view(-1, side, side)


def caption_record(
    nbest: Sequence[Caption], n_tags: int = 5, min_confidence: float = 0.0, omit_low: bool = False
) -> dict[str, Any]:
    """An image's n-best Captions as the JSON object `captioner caption --json` prints (and the
    server answers): caption, confidence, nbest [{caption, score, confidence}], tags [{label, p}];
    "low_confidence" when `min_confidence` is set (omit_low: the caption is then null)."""
    best = nbest[0]
    low = best.confidence is not None and best.confidence < min_confidence
    entry: dict[str, Any] = {
        "caption": None if low and omit_low else best.text,
        "confidence": _rounded(best.confidence),
    }
    if min_confidence:
        entry["low_confidence"] = low
    entry["nbest"] = [
        {"caption": c.text, "score": round(c.score, 4), "confidence": _rounded(c.confidence)} for c in nbest
    ]
    if n_tags and best.tags:
        entry["tags"] = [t.to_dict() for t in best.tags[:n_tags]]
    return entry


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def load_encoder_weights(encoder: Encoder, ckpt: dict[str, Any]) -> None:
    """A checkpoint's fine-tuned encoder blocks (if any) into a freshly built encoder."""
    if ckpt.get("encoder") is not None:
        encoder.load_top_state_dict(ckpt["encoder"], ckpt["config"].get("fine_tune_encoder", 0))


#: decoding settings when neither the caller nor the checkpoint (config["decoding"]) gives one
DEFAULT_DECODING = {
    "beam_size": 5,
    "max_len": 20,
    "min_len": 1,
    "length_alpha": 0.0,
    "no_repeat_ngram": 0,
    "tag_boost": 0.0,
    "suppress_unseen": 0.0,
    "tag_subject": 0.0,
    "constrain": 0.0,
    "max_constraints": 2,
    "constraints_needed": 1,
}


def _rows(inputs: Any, idx: Tensor) -> Any:
    """The rows `idx` of a decoder input: a (B, ...) tensor, or a tuple of them (an ensemble's)."""
    if isinstance(inputs, tuple):
        return tuple(_rows(x, idx) for x in inputs)
    return inputs[idx.to(inputs.device)]


class ModelBundle:
    """A captioning model: encoder + decoder + vocabulary + config, ready to describe images.

    `decoding` holds the decoding defaults: those measured best on validation data when the
    checkpoint records them (config["decoding"]), else DEFAULT_DECODING; any call may override them.
    """

    def __init__(
        self,
        encoder: Encoder,
        decoder: CaptionModel,
        vocab: Vocabulary,
        config: dict[str, Any],
        device: str | torch.device = "auto",
        guidance: dict[str, Tensor] | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.encoder = encoder.to(self.device, memory_format=torch.channels_last).eval()
        self.decoder = decoder.to(self.device).eval()
        self.vocab = vocab
        self.config = config
        self.preprocess = Preprocess.from_dict(config["preprocess"])
        self.decoding = DEFAULT_DECODING | config.get("decoding", {})
        self.max_pixels: int | None = None  # images over this many pixels are refused (None: DEFAULT_MAX_PIXELS)
        self.guidance = Guidance(vocab, guidance)  # tags, word prior, confidence (see guidance.py)
        self._naming: Naming | None = None

    @property
    def naming(self) -> Naming:
        """Concepts, constraints and the extended vocabulary (naming.py), built on first use."""
        if self._naming is None or self._naming.base is not self.vocab:
            self._naming = Naming(self.vocab)
        return self._naming

    # ---- persistence -------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls, ckpt: dict[str, Any], device: str | torch.device = "auto", source: str = "checkpoint"
    ) -> Self:
        config, vocab = ckpt["config"], Vocabulary.from_dict(ckpt["vocab"])
        encoder = build_encoder(config["encoder"])
        try:
            load_encoder_weights(encoder, ckpt)
        except (KeyError, RuntimeError) as e:
            detail = str(e).strip().splitlines()[-1].strip()
            raise CheckpointError(
                f"{source}: its fine-tuned encoder weights do not fit {config['encoder']} ({detail})"
            ) from None
        embed = next((v for k, v in ckpt["decoder"].items() if k.endswith("embed.weight")), None)
        if embed is not None and embed.size(0) != len(vocab):
            raise CheckpointError(
                f"{source}: the vocabulary has {len(vocab)} tokens but the decoder weights "
                f"were trained for {embed.size(0)}: they do not belong together"
            )
        try:
            decoder = build_model(config, len(vocab), encoder.feature_dim)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: its model config cannot be built by this captioner ({e})") from None
        try:
            decoder.load_state_dict(ckpt["decoder"])
        except RuntimeError as e:
            detail = str(e).strip().splitlines()[-1].strip()
            raise CheckpointError(f"{source}: decoder weights do not match its config/vocabulary ({detail})") from None
        return cls(encoder, decoder, vocab, config, device, guidance=ckpt.get("guidance"))

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, device: str | torch.device = "auto") -> Self:
        """Load a checkpoint written by `captioner train` or `save`; None -> the bundled model."""
        if path is None:
            path = bundled_model_path()
            if not path.is_file():
                raise CheckpointError(
                    f"{path}: no bundled model is installed yet; pass a checkpoint "
                    "(train one with `captioner train`, then use RUN_DIR/best.pt)"
                )
        ckpt = load_checkpoint(path, map_location="cpu")
        return cls.from_checkpoint(ckpt, device, source=str(path))

    def checkpoint_payload(self) -> dict[str, Any]:
        """The parts every checkpoint of this model holds (training adds optimizer state etc.)."""
        n = self.config.get("fine_tune_encoder", 0)
        return {
            "config": self.config,
            "vocab": self.vocab.to_dict(),
            "decoder": {k: v.detach().cpu() for k, v in self.decoder.state_dict().items()},
            # only the fine-tuned blocks: the frozen ones come from the installed weight package
            "encoder": {k: v.detach().cpu() for k, v in self.encoder.top_state_dict(n).items()} if n else None,
            "guidance": dict(self.guidance.state) or None,  # what calibration.py fitted (small, kept fp32)
        }

    def save(self, path: str | os.PathLike, half: bool = False) -> None:
        """Write the model (no training state). half=True stores floating-point weights as fp16,
        half the size; they are loaded back into fp32 modules."""
        payload = self.checkpoint_payload()
        if half:
            for part in ("decoder", "encoder"):
                if payload[part] is not None:
                    payload[part] = {k: v.half() if v.is_floating_point() else v for k, v in payload[part].items()}
        save_checkpoint(path, payload)

    # ---- inference ---------------------------------------------------------------------------
    def prepare(self, item: ImageInput) -> Tensor:
        """One input as a preprocessed (3, S, S) tensor; ImageError if it cannot be used."""
        return self.preprocess(self.read_input(item))

    def read_input(self, item: ImageInput) -> Image.Image | Tensor:
        """One input, checked, as an RGB image (or uint8 tensor) before preprocessing; ImageError if
        it cannot be used."""
        if isinstance(item, (str, os.PathLike)):
            return load_image(item, self.max_pixels)
        if isinstance(item, Image.Image):
            return to_rgb(check_size(item, f"<PIL image {item.width}x{item.height} {item.mode}>"))
        if isinstance(item, (Tensor, np.ndarray)):
            return from_array(item)
        raise ImageError(
            f"<{type(item).__name__}>",
            "unsupported input: give a file path, a PIL image, an RGB tensor (3, H, W) or an array (H, W, 3)",
        )

    @property
    def is_sequence_model(self) -> bool:
        """Trained on image sequences with an order-aware temporal model (see models/sequence.py)."""
        return isinstance(self.decoder, SequenceModel)

    def _frame_features(self, pixels: Tensor) -> Tensor:
        """Preprocessed images (B, 3, S, S) -> per-image features of the decoder's kind (B, ...)."""
        return pool(encode_pixels(self.encoder, pixels, self.device), self.decoder.feature_kind)

    def encode(self, pixels: Tensor) -> Any:
        """Preprocessed images (B, 3, S, S) -> the decoder's input; a sequence model sees each image
        as a one-frame sequence."""
        feats = self._frame_features(pixels)  # (B, ...)
        return self.decoder.from_frames(list(feats.unsqueeze(1))) if self.is_sequence_model else feats

    def encode_sequences(self, sequences: Sequence[Tensor], batch_size: int = 32) -> Any:
        """Preprocessed frame sequences [(F_i, 3, S, S)] -> the decoder's input for the batch of them.

        A single-image decoder gets each sequence's mean frame, so a one-frame sequence is
        captioned exactly as the image.
        """
        frames = []
        for pixels in sequences:
            frames.append(
                torch.cat([self._frame_features(pixels[s : s + batch_size]) for s in range(0, len(pixels), batch_size)])
            )  # (F_i, ...)
        return self.decoder.from_frames(frames)

    def _decoder_input(self, features: Any) -> Any:
        """What `encode` gave (or features read from a cache), on the device, as fp32."""
        return features.to(self.device).float()

    def feature_cache(self, root: str | os.PathLike | None = None) -> FeatureCache:
        """The on-disk feature cache of this model's encoder (under `root`, else the user's cache)."""
        return FeatureCache(self.encoder, root, self.device)

    def corpus_inputs(
        self, corpus: CaptionCorpus, cache: FeatureCache | None, batch_size: int = 32, quiet: bool = False
    ) -> tuple[ItemFeatures, list[int], list[ImageError]]:
        """The decoder's inputs for every item of a corpus (see `features.corpus_features`)."""
        return corpus_features(
            self.encoder, self.decoder, corpus, cache, batch_size=batch_size, device=self.device, quiet=quiet
        )

    def resolve_decoding(self, n_best: int = 1, **given: Any) -> dict[str, Any]:
        """The decoding settings a call gets: `self.decoding` with what the caller set (None: not
        set), checked (UsageError for nonsense)."""
        o = self.decoding | {k: v for k, v in given.items() if v is not None}
        check_options(n_best=n_best, **o)
        return o

    def pooled(self, features: Any) -> Tensor | None:
        """The decoder's input for B single images (grid (B, R, D) or pooled (B, D)) -> pooled
        features (B, D) on the device, what the ImageNet head takes; None for sequences."""
        if self.is_sequence_model or not isinstance(features, Tensor):
            return None
        f = features.to(self.device).float()
        return f.mean(1) if f.dim() == 3 else f

    def imagenet_probs(self, pooled: Tensor | None) -> Tensor | None:
        """ImageNet class probabilities (B, 1000) from the encoder's own head, when it has one."""
        if pooled is None or self.encoder.head is None:
            return None
        with torch.no_grad():
            return self.encoder.head(pooled).float().softmax(-1)

    def decode(
        self,
        features: Any,
        beam_size: int | None = None,
        n_best: int = 1,
        max_len: int | None = None,
        min_len: int | None = None,
        length_alpha: float | None = None,
        no_repeat_ngram: int | None = None,
        tag_boost: float | None = None,
        suppress_unseen: float | None = None,
        tag_subject: float | None = None,
        constrain: float | None = None,
        max_constraints: int | None = None,
        constraints_needed: int | None = None,
    ) -> list[list[Caption]]:
        """The decoder's input for B images or sequences (see `encode`) -> for each its n-best Captions,
        best first, with the photo's tags and each caption's confidence when the model has them.
        Settings left None come from `self.decoding`; tag_boost / suppress_unseen: the word prior
        of guidance.py, tag_subject: its forced subject for unfamiliar photos (0 = off); constrain:
        the ImageNet confidence at which a concept becomes a constraint the caption must meet
        (constrained beam search, naming.py; 0 = off), the surest `max_constraints` of them, of
        which the caption must meet `constraints_needed` (when it can)."""
        o = self.resolve_decoding(
            n_best=n_best,
            beam_size=beam_size,
            max_len=max_len,
            min_len=min_len,
            length_alpha=length_alpha,
            no_repeat_ngram=no_repeat_ngram,
            tag_boost=tag_boost,
            suppress_unseen=suppress_unseen,
            tag_subject=tag_subject,
            constrain=constrain,
            max_constraints=max_constraints,
            constraints_needed=constraints_needed,
        )
        pooled = self.pooled(features)  # (B, D) or None
        probs = self.imagenet_probs(pooled)  # (B, 1000) or None
        bias = None
        if probs is not None and (o["tag_boost"] or o["suppress_unseen"]):
            bias = self.guidance.bias(pooled, probs, o["tag_boost"], o["suppress_unseen"])  # (B, V)
        constraints = self._constraints(pooled, probs, o) if probs is not None and o["constrain"] else None
        prefix = self.guidance.subject(pooled, probs, o["tag_subject"]) if probs is not None else None  # (B, 2)
        if prefix is not None and constraints is not None:  # never "a coffee": the constraint names it instead
            mass = [bool(w in self.naming.no_article_ids and any(w in ws for ws in sets)) for w, sets in
                    zip(prefix[:, 1].tolist(), constraints)]  # fmt: skip
            prefix = prefix.masked_fill(torch.tensor(mass, device=prefix.device)[:, None], -1)
        inputs = self._decoder_input(features)
        was_training = self.decoder.training
        self.decoder.eval()
        try:
            hyps = self._search(self.decoder, inputs, o, n_best, bias=bias, prefix=prefix)
            vocab, naming = self.vocab, None
            if constraints is not None:
                naming, vocab = self.naming, self.naming.vocab
                self._constrained_search(hyps, inputs, o, n_best, constraints, bias)
        finally:
            self.decoder.train(was_training)
        if naming is not None:
            for hs in hyps:
                for h in hs:
                    h.tokens = naming.fix_articles(h.tokens)
        texts = [[vocab.decode(h.tokens) for h in hs] for hs in hyps]
        tags = top_tags(probs) if probs is not None else [()] * len(hyps)
        conf = None
        if probs is not None:
            captions = [[(t, h.score, len(h.tokens)) for t, h in zip(ts, hs)] for ts, hs in zip(texts, hyps)]
            conf = self.guidance.confidence(pooled, probs, captions)
        return [
            [
                Caption(t, h.score, h.attention, vocab.words(h.tokens), tags[b], None if conf is None else conf[b][j])
                for j, (t, h) in enumerate(zip(texts[b], hs))
            ]
            for b, hs in enumerate(hyps)
        ]

    def _search(self, decoder: CaptionModel, inputs: Any, o: dict[str, Any], n_best: int, **kw: Any) -> list:
        """beam_search with the resolved settings `o`."""
        return beam_search(
            decoder,
            inputs,
            beam_size=max(o["beam_size"], n_best),
            max_len=o["max_len"],
            min_len=o["min_len"],
            length_alpha=o["length_alpha"],
            no_repeat_ngram=o["no_repeat_ngram"],
            n_best=n_best,
            suppress=[self.vocab.unk_id],  # "<unk>" is never a useful word to print
            **kw,
        )

    def _constraints(self, pooled: Tensor, probs: Tensor, o: dict[str, Any]) -> list[list[set[int]]]:
        """Each photo's constraints (naming.py): none on photos much like the training photos, where
        the decoder knows better what people mention (guidance.CONSTRAIN_SHARE)."""
        share = self.guidance.typical_share(pooled)  # (B,) or None
        threshold = torch.full((len(probs),), float(o["constrain"]))  # (B,)
        if share is not None:
            threshold = threshold.masked_fill(share.cpu() >= CONSTRAIN_SHARE, float("inf"))
        return self.naming.constraints(probs, threshold, o["max_constraints"])

    def _constrained_search(
        self,
        hyps: list,
        inputs: Any,
        o: dict[str, Any],
        n_best: int,
        constraints: list[list[set[int]]],
        bias: Tensor | None,
    ) -> None:
        """Decode again, under constraints, the photos whose free caption does not name the
        concepts the classifier is sure of; their hypotheses in `hyps` are replaced when the new
        best caption names more of them. A caption that already names them stays as the free
        search wrote it: a constrained search keeps separate beams per state and would rank
        other, shorter captions first."""
        naming, need = self.naming, o["constraints_needed"]
        met = [constraints_met(sets, hs[0].tokens) for hs, sets in zip(hyps, constraints)]
        redo = [b for b, sets in enumerate(constraints) if sets and met[b] < min(need, len(sets))]
        if not redo:
            return
        idx = torch.tensor(redo)
        sub = [constraints[b] for b in redo]
        allowed = naming.allowed_bias(sub)  # (R, V + E): borrowed words only where a photo asks for them
        if bias is not None:
            allowed = allowed + torch.nn.functional.pad(bias[idx], (0, naming.V - naming.V0))
        again = self._search(
            naming.wrap(self.decoder),
            _rows(inputs, idx),  # an ensemble's inputs are a tuple, one per member
            o,
            n_best,
            bias=allowed,
            constraints=sub,
            need=need,
            banned_bigrams=naming.banned_bigrams(sub),
        )
        for b, hs in zip(redo, again):
            if hs and hs[0].met > met[b]:
                hyps[b] = hs

    def generate(
        self, inputs: Sequence[ImageInput], batch_size: int = 32, num_workers: int | None = None, **decode_opts: Any
    ) -> Iterator[list[Caption] | ImageError]:
        """For each input, in order: its n-best Captions, or the ImageError it raised.

        A bad input never stops the others. Images are decoded in worker processes (when there is
        more than one batch), then encoded and beam-searched a batch at a time.
        decode_opts: beam_size, n_best, max_len, min_len, length_alpha, no_repeat_ngram, tag_boost,
        suppress_unseen, tag_subject, constrain, max_constraints, constraints_needed (see `decode`).
        """
        whole_number(batch_size, 1, "batch size (--batch-size, batch_size=)")
        if num_workers is not None:
            whole_number(num_workers, 0, "workers (num_workers=)")
        workers = default_workers(len(inputs), batch_size) if num_workers is None else num_workers
        for batch in prepared_batches(inputs, self.prepare, batch_size, workers):
            idx, pixels, _ = split_batch(batch)
            decoded = iter(self.decode(self.encode(pixels), **decode_opts) if idx else [])
            for item in batch:
                yield item if isinstance(item, ImageError) else next(decoded)
