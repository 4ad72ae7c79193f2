"""An exported model (export.py) on onnxruntime and numpy: the model interface the pipeline
(pipeline.py) decodes over, without torch. Beam search, guidance, naming and the Captioner facade
are the very code the torch path runs; only the networks run on onnxruntime, and the images are
prepared with Pillow and numpy (images.Preprocess.to_array, the same pixels as the torch path).

Single images only: sequence models and ensembles take checkpoints.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
from PIL import Image

from .beam import log_softmax
from .errors import CaptionerError, CheckpointError, ImageError, UsageError, first_line
from .images import Preprocess, read_image
from .vocab import Vocabulary

MANIFEST = "captioner.json"  # the export's manifest (export.py writes what this module reads)
#: images per encoder run: a CNN on the CPU is no faster per image in larger batches, and
#: onnxruntime keeps the largest batch's activations (32 photos: 0.9 GB peak; 4: 0.2 GB)
ENCODE_BATCH = 4
FORMAT, FORMAT_VERSION = "captioner-export", 1


def _session(path: Path, device: str) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # onnxruntime's threads spin-wait after each run; between two decoder steps numpy's own work
    # (beam search, guidance) then shares the cores with spinning threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), options, providers=providers)


def _device(device: Any) -> str:
    """ "auto" is the CPU here: onnxruntime-gpu is not among the runtime's requirements."""
    name = str(device)
    if name in ("auto", "cpu"):
        return "cpu"
    if name.startswith("cuda"):
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UsageError("--device cuda: this onnxruntime has no CUDA provider (install onnxruntime-gpu)")
        return "cuda"
    raise UsageError(f"unknown device {name!r} (auto, cpu or cuda)")


@dataclass
class OnnxState:
    """A decoder state as numpy arrays: per-row fields (N, ...) and shared fields (B, ...), the
    names export.py gave them (rows point into the shared fields through "image")."""

    rows: dict[str, np.ndarray]
    shared: dict[str, np.ndarray]

    @property
    def batch_size(self) -> int:
        return len(next(iter(self.rows.values())))

    @property
    def alpha(self) -> np.ndarray | None:
        return self.rows.get("alpha")  # (N, R)

    def index(self, idx: np.ndarray) -> OnnxState:
        return OnnxState({k: v[idx] for k, v in self.rows.items()}, self.shared)

    def put(self, idx: np.ndarray, rows: OnnxState) -> OnnxState:
        out = {k: v.copy() for k, v in self.rows.items()}
        for k, v in out.items():
            v[idx] = rows.rows[k]
        return OnnxState(out, self.shared)

    def repeat_interleave(self, k: int) -> OnnxState:
        return OnnxState({n: np.repeat(v, k, axis=0) for n, v in self.rows.items()}, self.shared)


class OnnxSteps:
    """decoder_init.onnx + decoder_step.onnx as beam.py's step model."""

    def __init__(self, init: Any, step: Any, rows: list[str], shared: list[str]) -> None:
        self.init, self.step_session, self.rows, self.shared = init, step, rows, shared
        self.inputs = {i.name for i in step.get_inputs()}  # (a field the step never reads is no input: alpha)

    def init_state(self, features: np.ndarray) -> OnnxState:
        out = self.init.run(None, {"features": np.ascontiguousarray(features, dtype=np.float32)})
        named = dict(zip(self.rows + self.shared, out))
        return OnnxState({n: named[n] for n in self.rows}, {n: named[n] for n in self.shared})

    def step(self, tokens: np.ndarray, state: OnnxState) -> tuple[np.ndarray, OnnxState]:
        feed = {"tokens": np.ascontiguousarray(tokens, dtype=np.int64)}
        feed |= {n: np.ascontiguousarray(v) for n, v in (state.rows | state.shared).items() if n in self.inputs}
        logp, *rows = self.step_session.run(None, feed)
        return logp, OnnxState(dict(zip(self.rows, rows)), state.shared)


@dataclass(frozen=True)
class DecoderInfo:
    """What callers ask of a decoder besides stepping it."""

    feature_kind: str
    attends_over: str | None


class OnnxModel:
    """An export folder loaded for onnxruntime: the model interface of model.py (prepare, batches,
    encode, classify, steps, ...) over numpy arrays."""

    is_sequence_model = False

    def __init__(self, folder: Path, manifest: dict[str, Any], device: str = "cpu") -> None:
        self.folder, self.manifest, self.device = folder, manifest, device
        files, dec = manifest["files"], manifest["decoder"]
        self.config = manifest["config"]
        self.vocab = Vocabulary.from_dict(manifest["vocab"])
        self.preprocess = Preprocess.from_dict(self.config["preprocess"])
        self.max_pixels: int | None = None
        self.decoder = DecoderInfo(dec["feature_kind"], dec["attends_over"])
        self.encoder = None  # (no torch module: the encoder is encoder.onnx)
        self._encoder = _session(folder / files["encoder"], device)
        self._classifier = _session(folder / files["classifier"], device) if files.get("classifier") else None
        self._steps = OnnxSteps(
            _session(folder / files["decoder_init"], device),
            _session(folder / files["decoder_step"], device),
            list(dec["rows"]),
            list(dec["shared"]),
        )
        self.guidance_state: dict[str, np.ndarray] = {}
        if files.get("guidance"):
            with np.load(folder / files["guidance"], allow_pickle=False) as z:
                self.guidance_state = {k: z[k] for k in z.files}

    @classmethod
    def load(cls, path: str | os.PathLike, device: Any = "auto") -> Self:
        """An export folder (`captioner export`); CheckpointError when it is not one this runtime reads."""
        folder = Path(path)
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            hint = f"; a training run? give {folder / 'best.pt'}" if (folder / "best.pt").is_file() else ""
            raise CheckpointError(
                f"{folder}: not an export folder (no {MANIFEST}; make one with `captioner export`{hint})"
            ) from None
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{folder / MANIFEST}: unreadable ({e})") from None
        if not isinstance(manifest, dict):
            raise CheckpointError(f"{folder / MANIFEST}: not an export manifest (a JSON object)")
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{folder}: an export of format {manifest.get('format')} {manifest.get('format_version')}; "
                f"this captioner reads {FORMAT} {FORMAT_VERSION}"
            )
        files = manifest.get("files")
        lacking = [k for k in ("files", "decoder", "config", "vocab") if not isinstance(manifest.get(k), dict)]
        if lacking or not all(files.get(k) for k in ("encoder", "decoder_init", "decoder_step")):
            raise CheckpointError(f"{folder / MANIFEST}: an incomplete manifest ({(lacking or ['files'])[0]})")
        names = [f for f in files.values() if f]
        if any(not isinstance(f, str) or Path(f).name != f for f in names):
            raise CheckpointError(f"{folder / MANIFEST}: names files outside the export folder")
        missing = [f for f in names if not (folder / f).is_file()]
        if missing:
            raise CheckpointError(f"{folder}: the export is incomplete ({missing[0]} is missing)")
        device = _device(device)
        try:
            return cls(folder, manifest, device)
        except CaptionerError:
            raise
        except Exception as e:  # onnxruntime's own (InvalidProtobuf, Fail, ...) derive from Exception only
            raise CheckpointError(f"{folder}: a damaged export ({type(e).__name__}: {first_line(e)})") from None

    @property
    def has_classifier(self) -> bool:
        return self._classifier is not None

    # ---- images to decoder inputs ------------------------------------------------------------
    def read_input(self, item: Any) -> Image.Image | np.ndarray:
        return read_image(item, self.max_pixels)

    def prepare(self, item: Any) -> np.ndarray:
        """One input as a preprocessed (3, S, S) float32 array; ImageError if it cannot be used."""
        return self.preprocess.to_array(self.read_input(item))

    def _prepared(self, item: Any) -> np.ndarray | ImageError:
        try:
            return self.prepare(item)
        except ImageError as e:
            return e

    def batches(
        self, inputs: Sequence[Any], batch_size: int = 32, num_workers: int | None = None
    ) -> Iterator[list[np.ndarray | ImageError]]:
        """The inputs prepared, in order, a batch at a time, each bad one as its ImageError; with
        more than one batch, the next batch is read in threads (Pillow decodes and resizes without
        the GIL) while this one is captioned."""
        chunks = [inputs[s : s + batch_size] for s in range(0, len(inputs), batch_size)]
        workers = (0 if len(chunks) <= 1 else 2) if num_workers is None else num_workers
        if workers == 0:
            for chunk in chunks:
                yield [self._prepared(x) for x in chunk]
            return
        pool = ThreadPoolExecutor(workers, thread_name_prefix="captioner-read")
        try:
            pending = [pool.map(self._prepared, chunk) for chunk in chunks[:2]]
            for i in range(len(chunks)):
                batch = list(pending[i])
                if i + 2 < len(chunks):
                    pending.append(pool.map(self._prepared, chunks[i + 2]))
                yield batch
        finally:  # also when the caller stops early: the photos read ahead are not waited for
            pool.shutdown(wait=False, cancel_futures=True)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """Preprocessed images (B, 3, S, S) -> the decoder's input: the grid (B, R, D) or pooled (B, D)."""
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        parts = [
            self._encoder.run(None, {"pixels": pixels[s : s + ENCODE_BATCH]})[0]
            for s in range(0, len(pixels), ENCODE_BATCH)
        ]
        grid = np.concatenate(parts)  # (B, R, D)
        return grid if self.decoder.feature_kind == "grid" else grid.mean(1)

    def encode_prepared(self, prepared: Sequence[np.ndarray]) -> np.ndarray:
        return self.encode(np.stack(list(prepared)))

    def encode_sequences(self, sequences: Sequence[Any], batch_size: int = 32) -> Any:
        raise UsageError("an exported model captions single images; image sequences need the checkpoint")

    def decoder_input(self, features: Any) -> np.ndarray:
        return np.asarray(features, dtype=np.float32)

    def pooled(self, features: Any) -> np.ndarray:
        f = np.asarray(features, dtype=np.float32)
        return f.mean(1) if f.ndim == 3 else f  # (B, D)

    def imagenet_probs(self, pooled: np.ndarray | None) -> np.ndarray | None:
        if pooled is None or self._classifier is None:
            return None
        (logits,) = self._classifier.run(None, {"pooled": np.ascontiguousarray(pooled, dtype=np.float32)})
        return np.exp(log_softmax(logits))  # (B, C)

    def classify(self, features: Any) -> tuple[np.ndarray, np.ndarray] | None:
        pooled = self.pooled(features)
        probs = self.imagenet_probs(pooled)
        return None if probs is None else (pooled, probs)

    @contextmanager
    def steps(self) -> Iterator[OnnxSteps]:
        yield self._steps

    # ---- what needs the checkpoint -----------------------------------------------------------
    def _needs_checkpoint(self, what: str) -> UsageError:
        return UsageError(f"{self.folder}: an exported model cannot {what}; use the checkpoint it came from")

    def save(self, path: Any, half: bool = False) -> None:
        raise self._needs_checkpoint("be saved as a checkpoint")

    def checkpoint_payload(self) -> dict[str, Any]:
        raise self._needs_checkpoint("be saved as a checkpoint")

    def feature_cache(self, root: Any = None) -> None:
        """None: an export keeps no feature cache; its photos are encoded as they are captioned
        (`captioner evaluate --model DIR` reads every photo)."""
        return None

    def corpus_inputs(self, corpus: Any, cache: Any, batch_size: int = 32) -> Any:
        raise self._needs_checkpoint("read a feature cache")
