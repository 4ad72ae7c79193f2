"""The package's layers, bottom to top. A module may import from its own layer and the layers
below it, never from one above; no modules import each other in a circle (tests/test_layers.py
checks both, the manual's "How it is built" page shows this table).

Names are module paths under `captioner`; a package name covers its modules."""

from __future__ import annotations

LAYERS: dict[str, tuple[tuple[str, ...], str]] = {
    "core": (
        (
            "errors",
            "settings",
            "paths",
            "progress",
            "device",
            "distributed",
            "cjk",
            "_ptb_chars",
            "ptb",
            "vocab",
            "data",
            "checkpoint",
            "images",
            "synthetic",
            "layers",
        ),  # fmt: skip
        "errors, settings, files and images, tokenisation, vocabulary, datasets, checkpoints",
    ),
    "vision": (("encoders", "features"), "pretrained encoders and the feature cache"),
    "models": (("models",), "the decoders: Show-and-Tell, Show-Attend-Tell, the sequence model"),
    "decoding": (
        ("beam", "decoding"),
        "beam search and constraints (numpy, written once over the per-step interface); torch models' steps, sampling",
    ),
    "guidance": (
        ("concepts", "objects", "guidance", "naming"),
        "what the ImageNet classifier sees: tags, word prior, confidence, concepts to name",
    ),
    "inference": (
        ("model", "pipeline", "ensemble", "export", "runtime", "api"),
        "a loaded model, the decoding pipeline over it, ensembles, ONNX export and its runtime, the Captioner facade",
    ),
    "evaluation": (("metrics", "evaluation", "calibration", "tuning"), "scores, and fitting guidance and settings"),
    "training": (("training",), "the Trainer, its objectives, batches, run folders"),
    "apps": (("cli", "serve", "viz", "__main__", ""), "the command line, the server, plots"),
}


def layer_of(module: str) -> str:
    """The layer of `captioner.X.Y` (or of the package itself, ""): its longest listed prefix."""
    name = module.removeprefix("captioner").removeprefix(".")
    best, best_len = None, -1
    for layer, (modules, _) in LAYERS.items():
        for m in modules:
            if (name == m or name.startswith(m + ".") or m == "") and len(m) > best_len:
                best, best_len = layer, len(m)
    if best is None:
        raise KeyError(f"captioner.{name} is in no layer: add it to captioner/layers.py")
    return best
