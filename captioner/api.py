"""`Captioner`: the Python API — load a checkpoint, caption images (one, a list, a sequence), save.

A facade over two parts: the loaded model (model.py; an ensemble.py `Ensemble` for several; an
exported model on onnxruntime, runtime.py, which needs no torch) and
the decoding pipeline over it (pipeline.py, with the guidance part when the encoder has its
ImageNet classifier). Training and evaluation use the same parts; this class adds the
conveniences people call. Decoding settings are `DecodingConfig`'s fields (settings.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ImageError, UsageError
from .guidance import Guidance, Tag, top_tags
from .pipeline import Caption, Pipeline
from .settings import TAGS_SHOWN, DecodingConfig, whole_number

if TYPE_CHECKING:  # torch is imported only where a torch model is loaded: an export needs none
    from torch import Tensor

    from .model import ImageInput
else:
    ImageInput = Any

__all__ = ["Caption", "Captioner", "DecodingConfig", "ImageInput", "Tag"]


class Captioner:
    """A trained captioning model, ready to describe images: `Captioner.load()` (the bundled model)
    or `Captioner.load(path)`, then `caption`, `caption_nbest`, `caption_sequence`, `generate`.
    `Captioner.load([a, b, ...])` loads an ensemble with the same methods.
    `Captioner(encoder, decoder, vocab, config)` wraps parts built in code (training does)."""

    def __init__(
        self,
        encoder: Any,
        decoder: Any,
        vocab: Any,
        config: dict[str, Any],
        device: Any = "auto",
        guidance: dict[str, Tensor] | None = None,
    ) -> None:
        from .model import Model

        self.pipeline = Pipeline.for_model(Model(encoder, decoder, vocab, config, device, guidance))

    @classmethod
    def of(cls, model: Any) -> Captioner:
        """The facade over a loaded model.Model or ensemble.Ensemble."""
        self = cls.__new__(cls)
        self.pipeline = Pipeline.for_model(model)
        return self

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], device: Any = "auto", source: str = "checkpoint"):
        """A checkpoint already read into memory (`checkpoint.load_checkpoint`)."""
        from .model import Model

        return cls.of(Model.from_checkpoint(ckpt, device, source))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike | Sequence[str | os.PathLike | None] | None = None,
        device: Any = "auto",
    ) -> Captioner:
        """A checkpoint (None: the bundled model), a folder written by `captioner export` (run on
        onnxruntime, without torch), or a list of checkpoints captioning as an ensemble."""
        if isinstance(path, (list, tuple)):
            if len(path) == 1:
                return cls.load(path[0], device)
            exports = [p for p in path if p is not None and Path(p).is_dir()]
            if exports:
                raise UsageError(f"{exports[0]}: an exported model captions alone; ensembles take checkpoints")
            try:
                from .ensemble import Ensemble
            except ImportError as e:  # the torch-free runtime install
                raise UsageError(f"an ensemble of checkpoints needs torch, which is not installed here ({e})") from None
            return cls.of(Ensemble.load_all(path, device))
        if path is not None and Path(path).is_dir():
            from .runtime import OnnxModel

            return cls.of(OnnxModel.load(path, device))
        try:
            from .model import Model
        except ImportError as e:  # the torch-free runtime install (requirements-runtime.txt)
            raise UsageError(
                f"{path or 'the bundled model'}: a checkpoint needs torch, which is not installed here ({e}); "
                "caption an export folder instead (made with `captioner export` where torch is)"
            ) from None
        return cls.of(Model.load(path, device))

    # ---- the parts ---------------------------------------------------------------------------
    @property
    def model(self) -> Any:
        """The loaded model (model.Model) or ensemble (ensemble.Ensemble)."""
        return self.pipeline.model

    @property
    def guidance(self) -> Guidance | None:
        """The guidance part (tags, word prior, confidence); None when the encoder has no classifier."""
        return self.pipeline.guidance

    @guidance.setter
    def guidance(self, guidance: Guidance) -> None:
        """Plug in newly fitted guidance (calibration.py); the model's checkpoint then carries its state."""
        self.pipeline.guidance = guidance
        self.model.guidance_state = guidance.state  # one dict: saved as the guidance holds it

    @property
    def decoding(self) -> dict[str, Any]:
        """The decoding defaults (DecodingConfig, as a dict): the checkpoint's, else DecodingConfig's."""
        return self.pipeline.defaults.model_defaults()

    @decoding.setter
    def decoding(self, values: dict[str, Any]) -> None:
        """New defaults, checked, recorded in the config (so `save` keeps them)."""
        self.model.config["decoding"] = DecodingConfig.from_dict(values).model_defaults()

    @property
    def naming(self) -> Any:
        """Concepts, constraints and the extended vocabulary of constrained search (naming.py)."""
        return self.pipeline.naming

    @property
    def calibrated(self) -> bool:
        """Captions carry a confidence (the guidance state holds a fitted confidence model)."""
        return self.guidance is not None and self.guidance.calibrated

    # what the model part answers
    encoder = property(lambda self: self.model.encoder)
    decoder = property(lambda self: self.model.decoder)
    vocab = property(lambda self: self.model.vocab)
    config = property(lambda self: self.model.config)
    device = property(lambda self: self.model.device)
    preprocess = property(lambda self: self.model.preprocess)
    is_sequence_model = property(lambda self: self.model.is_sequence_model)

    @property
    def max_pixels(self) -> int | None:
        """Images declaring more pixels are refused before decoding (None: DEFAULT_MAX_PIXELS)."""
        return self.model.max_pixels

    @max_pixels.setter
    def max_pixels(self, value: int | None) -> None:
        self.model.max_pixels = value

    def save(self, path: str | os.PathLike, half: bool = False) -> None:
        """Write the model (no training state); half=True: fp16 weights (half the size)."""
        self.model.save(path, half=half)

    def checkpoint_payload(self) -> dict[str, Any]:
        return self.model.checkpoint_payload()

    def prepare(self, item: ImageInput) -> Tensor:
        """One input preprocessed for the model; ImageError if it cannot be used."""
        return self.model.prepare(item)

    def encode(self, pixels: Tensor) -> Any:
        """Preprocessed images (from `prepare`, stacked) -> the decoder's input."""
        return self.model.encode(pixels)

    def encode_prepared(self, prepared: Sequence[Any]) -> Any:
        """Inputs from `prepare` (a list) -> the decoder's input for the batch of them."""
        return self.model.encode_prepared(prepared)

    def encode_sequences(self, sequences: Sequence[Tensor], batch_size: int = 32) -> Any:
        return self.model.encode_sequences(sequences, batch_size)

    def feature_cache(self, root: str | os.PathLike | None = None) -> Any:
        return self.model.feature_cache(root)

    def corpus_inputs(self, corpus: Any, cache: Any, batch_size: int = 32) -> tuple[Any, list[int], list[ImageError]]:
        """The decoder's inputs for every item of a corpus, through the feature cache."""
        return self.model.corpus_inputs(corpus, cache, batch_size)

    def pooled(self, features: Any) -> Tensor | None:
        return self.model.pooled(features)

    def imagenet_probs(self, pooled: Tensor | None) -> Tensor | None:
        return self.model.imagenet_probs(pooled)

    # ---- what the pipeline answers -----------------------------------------------------------
    def resolve_decoding(self, **given: Any) -> dict[str, Any]:
        """The settings a call would get (the defaults with what is set; None: unset), checked:
        UsageError for an unknown name or nonsense."""
        return self.pipeline.settings(**given).to_dict()

    def decode(self, features: Any, **settings: Any) -> list[list[Caption]]:
        """The decoder's input for B images (`encode`, or a feature cache) -> each one's n-best Captions."""
        return self.pipeline.decode(features, **settings)

    def generate(
        self, inputs: Sequence[ImageInput], batch_size: int = 32, num_workers: int | None = None, **settings: Any
    ) -> Iterator[list[Caption] | ImageError]:
        """For each input, in order: its n-best Captions, or the ImageError it raised (a bad input never
        stops the others)."""
        return self.pipeline.generate(inputs, batch_size, num_workers, **settings)

    def caption(
        self,
        x: ImageInput | Sequence[ImageInput],
        beam_size: int | None = None,
        max_len: int | None = None,
        errors: str = "raise",
        return_attention: bool = False,
        return_tags: bool = False,
        return_confidence: bool = False,
        **decode_opts: Any,
    ) -> Any:
        """Caption one image (-> str) or a list (-> list[str]).

        errors="raise" raises the first ImageError; errors="skip" puts None for failed items.
        return_attention=True (attention decoders) gives (caption, weights (words, h, w)) instead,
        the weights of each word over the encoder's h x w grid (one row per token: a word, or a
        character of Chinese/Japanese; `generate` gives the tokens as `Caption.words`).
        return_tags=True adds the photo's TAGS_SHOWN (5) top ImageNet classes (a tuple of Tag(label, p);
        `tags(x, k)` or `generate`'s Caption.tags for more),
        return_confidence=True the caption's confidence (P(acceptable caption), None when the
        model is not calibrated): the result is then a tuple (caption[, weights][, tags][, confidence]).
        decode_opts: batch_size, num_workers, and the decoding settings below.
        """
        if return_attention and self.decoder.attends_over != "regions":
            raise UsageError(
                "this model has no attention over image regions to return "
                f"(decoder {self.config['decoder']}{', sequence model' if self.is_sequence_model else ''})"
            )
        if errors not in ("raise", "skip"):
            raise UsageError(f"errors must be 'raise' or 'skip', not {errors!r}")
        single = not isinstance(x, (list, tuple))
        results: list = []
        for r in self.generate([x] if single else list(x), beam_size=beam_size, max_len=max_len, **decode_opts):
            if isinstance(r, ImageError):
                if errors != "skip" or single:
                    raise r
                results.append(None)
            else:
                best = r[0]
                extra = [best.attention_grid()] if return_attention else []
                extra += [best.tags[:TAGS_SHOWN]] if return_tags else []
                extra += [best.confidence] if return_confidence else []
                results.append((best.text, *extra) if extra else best.text)
        return results[0] if single else results

    def tags(self, x: ImageInput | Sequence[ImageInput], k: int = 5, batch_size: int = 32) -> Any:
        """The k most probable ImageNet classes of one image (-> tuple of Tag(label, p)) or of a
        list (-> a list of them): the encoder's own classifier, no decoding. Raises ImageError."""
        whole_number(k, 1, "k")
        if not self.model.has_classifier:
            raise UsageError(f"this model's encoder ({self.config['encoder']}) has no ImageNet classifier to tag with")
        single = not isinstance(x, (list, tuple))
        out = []
        for batch in self.model.batches([x] if single else list(x), batch_size, 0):
            for item in batch:
                if isinstance(item, ImageError):
                    raise item
            _, probs = self.model.classify(self.model.encode_prepared(batch))
            out += top_tags(probs, k)
        return out[0] if single else out

    def generate_sequences(
        self,
        sequences: Sequence[Sequence[ImageInput]],
        batch_size: int = 32,
        num_workers: int | None = None,
        **decode_opts: Any,
    ) -> Iterator[list[Caption] | ImageError]:
        """For each sequence of images (frames in temporal order): its n-best Captions, or the
        ImageError of its first bad frame (a sequence with a bad frame is not captioned; the
        others still are). decode_opts: the decoding settings below."""
        for frames in sequences:
            if len(frames) == 0:
                yield ImageError("<sequence>", "a sequence needs at least one frame")
                continue
            prepared = [x for batch in self.model.batches(list(frames), batch_size, num_workers) for x in batch]
            errors = [x for x in prepared if isinstance(x, ImageError)]
            if errors:
                yield errors[0]
                continue
            yield self.decode(self.encode_sequences([prepared], batch_size), **decode_opts)[0]

    def caption_sequence(
        self,
        frames: Sequence[ImageInput],
        beam_size: int | None = None,
        max_len: int | None = None,
        return_attention: bool = False,
        **decode_opts: Any,
    ) -> Any:
        """One caption for an ordered sequence of images (an album, a burst, video frames).

        A sequence model reads the frames in order; a single-image model describes their mean
        frame (order-blind). Raises ImageError for a bad frame. return_attention=True (sequence
        models with the attention decoder) gives (caption, weights (words, frames)).
        decode_opts: batch_size, num_workers, and the decoding settings below.
        """
        if return_attention and self.decoder.attends_over != "frames":
            raise UsageError(
                "this model has no attention over frames to return (train on sequences with --decoder attention)"
            )
        r = next(self.generate_sequences([frames], beam_size=beam_size, max_len=max_len, **decode_opts))
        if isinstance(r, ImageError):
            raise r
        return (r[0].text, r[0].attention) if return_attention else r[0].text

    def caption_nbest(
        self,
        x: ImageInput | Sequence[ImageInput],
        n: int = 5,
        beam_size: int | None = None,
        max_len: int | None = None,
        **decode_opts: Any,
    ) -> list[tuple[str, float]] | list[list[tuple[str, float]]]:
        """The n best (caption, score) pairs, best first; score = summed log-prob (length-penalised if
        asked). The first is `caption`'s, whatever n is (the configured beam's best); when n is more
        than the beam, a second search n wide gives the others, which may then score above it (a
        wider beam finds captions a narrower one misses). decode_opts: as for `caption`."""
        whole_number(n, 1, "n-best (--n-best, n_best= / n=)")
        single = not isinstance(x, (list, tuple))
        out = []
        settings = {"beam_size": beam_size, "n_best": n, "max_len": max_len}
        for r in self.generate([x] if single else list(x), **settings, **decode_opts):
            if isinstance(r, ImageError):
                raise r
            out.append([(c.text, c.score) for c in r])
        return out[0] if single else out


def _document_settings() -> None:
    """The decoding settings' list, generated from DecodingConfig, at the end of each method that takes them."""
    text = "\n\n        Decoding settings (keyword arguments; unset: the model's defaults, see DecodingConfig):\n"
    lines = [f"        {s.name} ({s.kind.__name__}, {s.default:g}): {s.help}" for s in DecodingConfig.settings()]
    text += "\n".join(lines)
    for name in ("caption", "caption_nbest", "caption_sequence", "generate", "generate_sequences", "decode"):
        method = getattr(Captioner, name)
        method.__doc__ = (method.__doc__ or "").rstrip() + text + "\n"


_document_settings()
