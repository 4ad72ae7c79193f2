"""`captioner export`: a trained model as ONNX files plus one JSON manifest and one `.npz`, which
runtime.py captions with on onnxruntime and numpy, without torch.

The folder:
- encoder.onnx: pixels (B, 3, S, S) -> grid (B, R, D), the encoder's feature grid;
- classifier.onnx: pooled features (B, D) -> ImageNet logits (B, C), when the encoder has its head;
- decoder_init.onnx: the decoder's input (grid (B, R, D) or pooled (B, D)) -> the fields of its
  first state (decoder_init.onnx's outputs are named after the state's fields);
- decoder_step.onnx: tokens (N,), the state's per-row fields (N, ...) and its shared fields (B, ...)
  -> log-probabilities (N, V) and the next per-row fields: one word of the per-step interface;
- captioner.json: format, opset, the model config (preprocessing, decoding defaults), vocabulary,
  the state's field names, the files;
- guidance.npz: the guidance state calibration fitted (person classifier, typicality, confidence).

All inputs have a dynamic batch size. The graphs are fp32; `quantize="int8"` quantizes the
decoder's weights dynamically to int8 (onnxruntime.quantization): half the size, CIDEr-D within
0.01 of fp32 on Flickr8k val, coco_dev and coco_256. The encoder's would not hold (Flickr8k val
CIDEr-D 0.471 against 0.516), so it is not offered.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .errors import OutputError, UsageError
from .model import Model
from .paths import umask
from .runtime import FORMAT, FORMAT_VERSION, MANIFEST, OnnxModel  # what the runtime reads is defined there

OPSET = 17
QUANTIZE = ("int8",)
EXPORT_FILES = frozenset(
    [MANIFEST, "encoder.onnx", "classifier.onnx", "decoder_init.onnx", "decoder_step.onnx", "guidance.npz"]
)


class _Init(nn.Module):
    def __init__(self, decoder: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.decoder, self.names = decoder, names

    def forward(self, features: Tensor) -> tuple[Tensor, ...]:
        state = self.decoder.init_state(features)
        return tuple(getattr(state, n) for n in self.names)


class _Step(nn.Module):
    def __init__(self, decoder: nn.Module, state_cls: type, rows: list[str], shared: list[str]) -> None:
        super().__init__()
        self.decoder, self.state_cls, self.rows, self.shared = decoder, state_cls, rows, shared

    def forward(self, tokens: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
        given = dict(zip(self.rows + self.shared, tensors))
        absent = {f.name: None for f in fields(self.state_cls) if f.name not in given}
        logp, state = self.decoder.step(tokens, self.state_cls(**given, **absent))  # (N, V)
        return (logp, *(getattr(state, n) for n in self.rows))


def _onnx(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], axes: dict) -> None:
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notes
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("captioner")
    except PackageNotFoundError:
        return None


def _quantize(path: Path) -> None:
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_suffix(".fp32.onnx")
    path.rename(tmp)
    saved = logging.root.manager.disable
    logging.disable(max(saved, logging.WARNING))  # onnxruntime's quantizer advises on the root logger, at length
    try:
        quantize_dynamic(str(tmp), str(path), weight_type=QuantType.QInt8)
    finally:
        logging.disable(saved)
    tmp.unlink()


def _target(out: str | os.PathLike) -> Path:
    """The export folder, checked before any work: new, empty, or an earlier export (nothing but
    an export's files); never a link, a file, or the current folder or one above it."""
    given = Path(out)
    if given.is_symlink():
        raise UsageError(f"{given}: is a symbolic link; give the folder itself")
    path = Path(os.path.normpath(given.absolute()))
    if path == Path.cwd() or path in Path.cwd().parents:
        raise UsageError(f"{given}: holds the current folder; export into a folder of its own")
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{given}: exists and is not a folder")
        others = sorted(p.name for p in path.iterdir() if p.name not in EXPORT_FILES)
        if others:
            raise UsageError(f"{given}: holds other files than an export's ({others[0]}, ...); choose a new folder")
    return path


def _replace(tmp: Path, out: Path) -> None:
    """tmp renamed to out; an earlier export at out is moved aside first and removed only once
    the new one is in place (put back if the rename fails)."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f"{tmp.name}-old")
    out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@torch.no_grad()
def export(
    model: Model,
    out: str | os.PathLike,
    quantize: str | None = None,
    check: Callable[[Path], None] | None = None,
) -> dict[str, Any]:
    """Write `model` to the folder `out` (created; an earlier export there is replaced whole,
    anything else refused) -> the manifest written. `check(folder)` runs on the finished export
    before it takes `out`'s place; if it raises, nothing at `out` changes."""
    if quantize is not None and quantize not in QUANTIZE:
        raise UsageError(f"--quantize takes {' or '.join(QUANTIZE)}, not {quantize!r}")
    if model.is_sequence_model:
        raise UsageError("sequence models cannot be exported yet: export a single-image model")
    given, out = out, _target(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))  # beside `out`: the rename is atomic
    except OSError as e:
        raise OutputError(f"{given}: cannot write there ({e.strerror or type(e).__name__})") from None
    model.encoder.eval()
    decoder = model.decoder.eval()
    S = model.preprocess.crop
    pixels = torch.zeros(2, 3, S, S)
    grid = model.encoder(pixels)  # (2, R, D)
    features = grid if decoder.feature_kind == "grid" else grid.mean(1)
    state = decoder.init_state(features)
    present = [f for f in fields(state) if getattr(state, f.name) is not None]
    rows = [f.name for f in present if not f.metadata.get("shared")]
    shared = [f.name for f in present if f.metadata.get("shared")]
    B, N = {0: "B"}, {0: "N"}
    try:
        tmp.chmod(0o777 & ~umask())  # a folder like any other (mkdtemp makes it private)
        _onnx(model.encoder, (pixels,), tmp / "encoder.onnx", ["pixels"], ["grid"], {"pixels": B, "grid": B})
        has_head = model.has_classifier
        if has_head:
            _onnx(model.encoder.head, (grid.mean(1),), tmp / "classifier.onnx", ["pooled"], ["logits"],
                  {"pooled": B, "logits": B})  # fmt: skip
        _onnx(_Init(decoder, rows + shared), (features,), tmp / "decoder_init.onnx", ["features"], rows + shared,
              {"features": B} | {n: B for n in rows + shared})  # fmt: skip
        tokens = torch.full((2,), 1, dtype=torch.long)
        args = (tokens, *(getattr(state, n) for n in rows + shared))
        step_out = ["logp"] + [f"next_{n}" for n in rows]
        axes = {"tokens": N, "logp": N} | {n: N for n in rows} | {n: B for n in shared} | {f"next_{n}": N for n in rows}
        _onnx(_Step(decoder, type(state), rows, shared), args, tmp / "decoder_step.onnx", ["tokens", *rows, *shared],
              step_out, axes)  # fmt: skip
        if quantize:
            for name in ("decoder_init", "decoder_step"):
                _quantize(tmp / f"{name}.onnx")
        guidance = {k: np.asarray(v.detach().cpu().float()) for k, v in model.guidance_state.items()}
        if guidance:
            np.savez(tmp / "guidance.npz", **guidance)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "captioner": _version(),
            "opset": OPSET,
            "quantize": quantize,
            "files": {
                "encoder": "encoder.onnx",
                "classifier": "classifier.onnx" if has_head else None,
                "decoder_init": "decoder_init.onnx",
                "decoder_step": "decoder_step.onnx",
                "guidance": "guidance.npz" if guidance else None,
            },
            "decoder": {
                "feature_kind": decoder.feature_kind,
                "attends_over": decoder.attends_over,
                "rows": rows,
                "shared": shared,
                "vocab_size": len(model.vocab),
            },
            "config": model.config,
            "vocab": model.vocab.to_dict(),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        if check is not None:
            check(tmp)
        _replace(tmp, out)
    except OSError as e:
        raise OutputError(
            f"{given}: not written ({e.strerror or type(e).__name__}); an earlier export is untouched"
        ) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return manifest


@torch.no_grad()
def compare(
    model: Model, folder: str | os.PathLike, batch: int = 3, seed: int = 0, pixels: Tensor | None = None
) -> dict[str, float]:
    """The export at `folder` against `model` on `pixels` (B, 3, S, S) (default: `batch` random
    ones): the largest absolute difference of the encoder's grid, the ImageNet logits, and the
    log-probabilities of the first two decoder steps (what `captioner export` prints, and the
    parity tests hold to 1e-4)."""
    exported = OnnxModel.load(folder, "cpu")
    if pixels is None:
        g = torch.Generator().manual_seed(seed)
        S = model.preprocess.crop
        pixels = torch.randn(batch, 3, S, S, generator=g).clamp(-1, 1)
    batch = len(pixels)
    grid = model.encoder(pixels)  # (B, R, D)
    grid_x = exported._encoder.run(None, {"pixels": pixels.numpy()})[0]
    out = {"encoder": float(np.abs(grid_x - grid.numpy()).max())}
    features = grid if model.decoder.feature_kind == "grid" else grid.mean(1)
    if model.has_classifier:
        logits = model.encoder.head(grid.mean(1))
        logits_x = exported._classifier.run(None, {"pooled": grid.mean(1).numpy()})[0]
        out["classifier"] = float(np.abs(logits_x - logits.numpy()).max())
    decoder = model.decoder.eval()
    state, state_x = decoder.init_state(features), exported._steps.init_state(features.numpy())
    tokens = torch.full((batch,), 1, dtype=torch.long)
    worst = 0.0
    for _ in range(2):
        logp, state = decoder.step(tokens, state)
        logp_x, state_x = exported._steps.step(tokens.numpy(), state_x)
        worst = max(worst, float(np.abs(logp_x - logp.numpy()).max()))
        tokens = logp.argmax(-1)
    out["decoder_step"] = worst
    return out
