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
from .decoding import beam_search, check_options, whole_number
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
from .images import ImageError, Preprocess, check_size, from_array, load_image, to_rgb
from .models import CaptionModel, SequenceModel, build_model
from .paths import bundled_model_path
from .vocab import Vocabulary

ImageInput = str | os.PathLike | Image.Image | Tensor | np.ndarray


class Caption(NamedTuple):
    text: str
    score: float  # summed log-prob (divided by the length penalty when one is set)
    attention: Tensor | None = None  # (words, R) attention weights, for attention decoders
    words: tuple[str, ...] = ()  # the caption's tokens, one per attention row (Chinese text has no spaces to split on)

    def attention_grid(self) -> Tensor:
        """The attention as (words, h, w) over the encoder's square grid."""
        side = round(self.attention.size(1) ** 0.5)
        return self.attention.view(-1, side, side)


def load_encoder_weights(encoder: Encoder, ckpt: dict[str, Any]) -> None:
    """A checkpoint's fine-tuned encoder blocks (if any) into a freshly built encoder."""
    if ckpt.get("encoder") is not None:
        encoder.load_top_state_dict(ckpt["encoder"], ckpt["config"].get("fine_tune_encoder", 0))


#: decoding settings when neither the caller nor the checkpoint (config["decoding"]) gives one
DEFAULT_DECODING = {"beam_size": 5, "max_len": 20, "min_len": 1, "length_alpha": 0.0, "no_repeat_ngram": 0}


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
    ) -> None:
        self.device = resolve_device(device)
        self.encoder = encoder.to(self.device, memory_format=torch.channels_last).eval()
        self.decoder = decoder.to(self.device).eval()
        self.vocab = vocab
        self.config = config
        self.preprocess = Preprocess.from_dict(config["preprocess"])
        self.decoding = DEFAULT_DECODING | config.get("decoding", {})
        self.max_pixels: int | None = None  # images over this many pixels are refused (None: DEFAULT_MAX_PIXELS)

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
        return cls(encoder, decoder, vocab, config, device)

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

    def decode(
        self,
        features: Any,
        beam_size: int | None = None,
        n_best: int = 1,
        max_len: int | None = None,
        min_len: int | None = None,
        length_alpha: float | None = None,
        no_repeat_ngram: int | None = None,
    ) -> list[list[Caption]]:
        """The decoder's input for B images or sequences (see `encode`) -> for each its n-best Captions,
        best first. Settings left None come from `self.decoding`."""
        o = self.resolve_decoding(
            n_best=n_best,
            beam_size=beam_size,
            max_len=max_len,
            min_len=min_len,
            length_alpha=length_alpha,
            no_repeat_ngram=no_repeat_ngram,
        )
        was_training = self.decoder.training
        self.decoder.eval()
        try:
            hyps = beam_search(
                self.decoder,
                self._decoder_input(features),
                beam_size=max(o["beam_size"], n_best),
                max_len=o["max_len"],
                min_len=o["min_len"],
                length_alpha=o["length_alpha"],
                no_repeat_ngram=o["no_repeat_ngram"],
                n_best=n_best,
                suppress=[self.vocab.unk_id],
            )  # "<unk>" is never a useful word to print
        finally:
            self.decoder.train(was_training)
        return [
            [Caption(self.vocab.decode(h.tokens), h.score, h.attention, self.vocab.words(h.tokens)) for h in hs]
            for hs in hyps
        ]

    def generate(
        self, inputs: Sequence[ImageInput], batch_size: int = 32, num_workers: int | None = None, **decode_opts: Any
    ) -> Iterator[list[Caption] | ImageError]:
        """For each input, in order: its n-best Captions, or the ImageError it raised.

        A bad input never stops the others. Images are decoded in worker processes (when there is
        more than one batch), then encoded and beam-searched a batch at a time.
        decode_opts: beam_size, n_best, max_len, min_len, length_alpha, no_repeat_ngram (see `decode`).
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
