"""`Captioner`: the Python API — load a checkpoint, caption images (one, a list, a sequence), save.

Loading, saving, encoding and beam search belong to the model bundle (bundle.py), which training
and evaluation use too; this class adds the conveniences people call."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .bundle import DEFAULT_DECODING, Caption, ImageInput, ModelBundle
from .decoding import whole_number
from .errors import UsageError
from .features import default_workers, prepared_batches, split_batch
from .guidance import Tag, top_tags
from .images import ImageError

__all__ = ["Caption", "Captioner", "DEFAULT_DECODING", "ImageInput", "Tag"]


class Captioner(ModelBundle):
    """A trained captioning model, ready to describe images: `Captioner.load()` (the bundled model)
    or `Captioner.load(path)`, then `caption`, `caption_nbest`, `caption_sequence`, `generate`.
    `Captioner.load([a, b, ...])` loads an ensemble (see ensemble.py) with the same methods."""

    @classmethod
    def load(
        cls,
        path: str | os.PathLike | Sequence[str | os.PathLike | None] | None = None,
        device: str | torch.device = "auto",
    ) -> Captioner:
        """A checkpoint (None: the bundled model), or a list of them captioning as an ensemble."""
        if isinstance(path, (list, tuple)):
            if len(path) == 1:
                return super().load(path[0], device)
            from .ensemble import Ensemble

            return Ensemble.load_all(path, device)
        return super().load(path, device)

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
        return_tags=True adds the photo's top ImageNet classes (a tuple of Tag(label, p)),
        return_confidence=True the caption's confidence (P(acceptable caption), None when the
        model is not calibrated): the result is then a tuple (caption[, weights][, tags][, confidence]).
        decode_opts: min_len, length_alpha, no_repeat_ngram, tag_boost, suppress_unseen,
        tag_subject, constrain, max_constraints, constraints_needed, batch_size, num_workers.
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
                extra += [best.tags] if return_tags else []
                extra += [best.confidence] if return_confidence else []
                results.append((best.text, *extra) if extra else best.text)
        return results[0] if single else results

    def tags(self, x: ImageInput | Sequence[ImageInput], k: int = 5, batch_size: int = 32) -> Any:
        """The k most probable ImageNet classes of one image (-> tuple of Tag(label, p)) or of a
        list (-> a list of them): the encoder's own classifier, no decoding. Raises ImageError."""
        whole_number(k, 1, "k")
        if self.encoder.head is None or self.is_sequence_model:
            raise UsageError(f"this model's encoder ({self.config['encoder']}) has no ImageNet classifier to tag with")
        single = not isinstance(x, (list, tuple))
        out = []
        for batch in prepared_batches([x] if single else list(x), self.prepare, batch_size, 0):
            for item in batch:
                if isinstance(item, ImageError):
                    raise item
            _, pixels, _ = split_batch(batch)
            out += top_tags(self.imagenet_probs(self.pooled(self.encode(pixels))), k)
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
        others still are). decode_opts as for `generate`."""
        for frames in sequences:
            if len(frames) == 0:
                yield ImageError("<sequence>", "a sequence needs at least one frame")
                continue
            workers = default_workers(len(frames), batch_size) if num_workers is None else num_workers
            pixels, errors = [], []
            for batch in prepared_batches(list(frames), self.prepare, batch_size, workers):
                _, p, errs = split_batch(batch)
                errors += errs
                if p is not None:
                    pixels.append(p)
            if errors:
                yield errors[0]
                continue
            yield self.decode(self.encode_sequences([torch.cat(pixels)], batch_size), **decode_opts)[0]

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
        decode_opts: n_best, min_len, length_alpha, no_repeat_ngram, batch_size, num_workers.
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
        """The n best (caption, score) pairs, best first; score = summed log-prob (length-penalised if asked)."""
        whole_number(n, 1, "n-best (--n-best, n_best= / n=)")
        single = not isinstance(x, (list, tuple))
        out = []
        beam = max(n, self.decoding["beam_size"]) if beam_size is None else beam_size
        for r in self.generate([x] if single else list(x), beam_size=beam, n_best=n, max_len=max_len, **decode_opts):
            if isinstance(r, ImageError):
                raise r
            out.append([(c.text, c.score) for c in r])
        return out[0] if single else out
