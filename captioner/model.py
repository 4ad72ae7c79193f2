"""A loaded captioning model: encoder + decoder + vocabulary + config (+ the guidance state fitted
to it), and what every user of a model needs from it — build, load and save a checkpoint; turn
images into the decoder's input. How captions are searched for is the pipeline's (pipeline.py);
training, evaluation and the `Captioner` facade all hold one of these."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Self

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .data import CaptionCorpus
from .decoding import TorchSteps
from .device import resolve_device
from .encoders import Encoder, build_encoder
from .errors import ImageError
from .features import (
    FeatureCache,
    ItemFeatures,
    corpus_features,
    default_workers,
    encode_pixels,
    pool,
    prepared_batches,
)
from .images import Preprocess, read_image
from .models import CaptionModel, SequenceModel, build_model
from .paths import bundled_model_path
from .vocab import Vocabulary

ImageInput = str | os.PathLike | Image.Image | Tensor | np.ndarray


def load_encoder_weights(encoder: Encoder, ckpt: dict[str, Any]) -> None:
    """A checkpoint's fine-tuned encoder blocks (if any) into a freshly built encoder."""
    if ckpt.get("encoder") is not None:
        encoder.load_top_state_dict(ckpt["encoder"], ckpt["config"].get("fine_tune_encoder", 0))


def read_input(item: ImageInput, max_pixels: int | None = None) -> Image.Image | np.ndarray:
    """One input, checked, before preprocessing (images.read_image)."""
    return read_image(item, max_pixels)


class Model:
    """One trained model on a device. `guidance_state` holds the tensors calibration.py fitted
    (person classifier, typicality, confidence); it travels with the checkpoint and is read by the
    pipeline's guidance part, never by the model itself."""

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
        self.max_pixels: int | None = None  # images over this many pixels are refused (None: DEFAULT_MAX_PIXELS)
        self.guidance_state: dict[str, Tensor] = dict(guidance or {})

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
            "guidance": dict(self.guidance_state) or None,  # what calibration.py fitted (small, kept fp32)
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

    # ---- images to decoder inputs ------------------------------------------------------------
    def prepare(self, item: ImageInput) -> Tensor:
        """One input as a preprocessed (3, S, S) tensor; ImageError if it cannot be used."""
        return self.preprocess(self.read_input(item))

    def read_input(self, item: ImageInput) -> Image.Image | np.ndarray:
        """One input, checked, before preprocessing (see `read_input`)."""
        return read_input(item, self.max_pixels)

    @property
    def is_sequence_model(self) -> bool:
        """Trained on image sequences with an order-aware temporal model (see models/sequence.py)."""
        return isinstance(self.decoder, SequenceModel)

    @property
    def has_classifier(self) -> bool:
        """The encoder's ImageNet head is there to tag single images (and to guide the captions)."""
        return self.encoder.head is not None and not self.is_sequence_model

    def _frame_features(self, pixels: Tensor) -> Tensor:
        """Preprocessed images (B, 3, S, S) -> per-image features of the decoder's kind (B, ...)."""
        return pool(encode_pixels(self.encoder, pixels, self.device), self.decoder.feature_kind)

    def encode(self, pixels: Tensor) -> Any:
        """Preprocessed images (B, 3, S, S) -> the decoder's input; a sequence model sees each image
        as a one-frame sequence."""
        feats = self._frame_features(pixels)  # (B, ...)
        return self.decoder.from_frames(list(feats.unsqueeze(1))) if self.is_sequence_model else feats

    def encode_sequences(self, sequences: Sequence[Tensor | Sequence[Tensor]], batch_size: int = 32) -> Any:
        """Preprocessed frame sequences [(F_i, 3, S, S), or F_i prepared frames] -> the decoder's
        input for the batch of them.

        A single-image decoder gets each sequence's mean frame, so a one-frame sequence is
        captioned exactly as the image.
        """
        frames = []
        for pixels in sequences:
            pixels = pixels if isinstance(pixels, Tensor) else torch.stack(list(pixels))  # (F_i, 3, S, S)
            frames.append(
                torch.cat([self._frame_features(pixels[s : s + batch_size]) for s in range(0, len(pixels), batch_size)])
            )  # (F_i, ...)
        return self.decoder.from_frames(frames)

    def batches(
        self, inputs: Sequence[ImageInput], batch_size: int = 32, num_workers: int | None = None
    ) -> Iterator[list[Tensor | ImageError]]:
        """The inputs prepared (`prepare`), in order, a batch at a time, each bad one as its
        ImageError; decoded in worker processes when there is more than one batch (None: decide)."""
        workers = default_workers(len(inputs), batch_size) if num_workers is None else num_workers
        return prepared_batches(inputs, self.prepare, batch_size, workers)

    def encode_prepared(self, prepared: Sequence[Tensor]) -> Any:
        """What `batches` gave for the good inputs -> the decoder's input."""
        return self.encode(torch.stack(list(prepared)))

    @contextmanager
    def steps(self) -> Iterator[TorchSteps]:
        """The decoder as beam.py's step model, in eval mode for the while."""
        was_training = self.decoder.training
        self.decoder.eval()
        try:
            yield TorchSteps(self.decoder)
        finally:
            self.decoder.train(was_training)

    def classify(self, features: Any) -> tuple[np.ndarray, np.ndarray] | None:
        """B single images' decoder input -> (pooled features (B, D), ImageNet probabilities
        (B, C)) as numpy, what the guidance reads; None for sequences or without a classifier."""
        pooled = self.pooled(features)
        probs = self.imagenet_probs(pooled)
        if probs is None:
            return None
        return pooled.float().cpu().numpy(), probs.float().cpu().numpy()

    def decoder_input(self, features: Any) -> Any:
        """What `encode` gave (or features read from a cache), on the device, as fp32."""
        return features.to(self.device).float()

    def feature_cache(self, root: str | os.PathLike | None = None) -> FeatureCache:
        """The on-disk feature cache of this model's encoder (under `root`, else the user's cache)."""
        return FeatureCache(self.encoder, root, self.device)

    def corpus_inputs(
        self, corpus: CaptionCorpus, cache: FeatureCache | None, batch_size: int = 32
    ) -> tuple[ItemFeatures, list[int], list[ImageError]]:
        """The decoder's inputs for every item of a corpus (see `features.corpus_features`)."""
        return corpus_features(self.encoder, self.decoder, corpus, cache, batch_size=batch_size, device=self.device)

    def pooled(self, features: Any) -> Tensor | None:
        """The decoder's input for B single images (grid (B, R, D) or pooled (B, D)) -> pooled
        features (B, D) on the device, what the ImageNet head takes; None for sequences."""
        if self.is_sequence_model or not isinstance(features, Tensor):
            return None
        f = features.to(self.device).float()
        return f.mean(1) if f.dim() == 3 else f

    def imagenet_probs(self, pooled: Tensor | None) -> Tensor | None:
        """ImageNet class probabilities (B, C) from the encoder's own head, when it has one."""
        if pooled is None or self.encoder.head is None:
            return None
        with torch.no_grad():
            return self.encoder.head(pooled).float().softmax(-1)
