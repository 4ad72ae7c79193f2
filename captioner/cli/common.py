"""What several commands share: messages, input expansion, datasets, decoding and cache flags."""

from __future__ import annotations

import argparse
import glob
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import DataError, ImageError, UsageError
from ..paths import list_images
from ..settings import DEFAULT_MAX_PIXELS, DecodingConfig

GLOB_CHARS = set("*?[")


def err(msg: str) -> None:
    print(f"captioner: {msg}", file=sys.stderr, flush=True)


def _stdin_paths() -> list[str]:
    """`-`: paths read from standard input, one per line (as `find ... | captioner caption -`)."""
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("`-` reads image paths from standard input, one per line, but nothing is piped in")
    return [line.rstrip("\r\n") for line in sys.stdin if line.strip()]


def expand_inputs(args: Sequence[str]) -> tuple[list[str], list[ImageError]]:
    """Files, folders (their images, sorted), globs and `-` (paths on standard input) -> image
    paths, plus what matched nothing."""
    paths: list[str] = []
    problems: list[ImageError] = []
    if list(args).count("-") > 1:
        raise UsageError("`-` (paths from standard input) can be given once")
    args = [x for a in args for x in (_stdin_paths() if a == "-" else [a])]
    for a in args:
        p = Path(a)
        if p.is_dir():
            found = list_images(p)
            paths += [str(f) for f in found]
            if not found:
                problems.append(ImageError(a, "folder holds no image files"))
        elif not p.exists() and GLOB_CHARS & set(a):
            matches = sorted(m for m in glob.glob(a, recursive=True) if Path(m).is_file())
            paths += matches
            if not matches:
                problems.append(ImageError(a, "no files match this pattern"))
        else:
            paths.append(a)
    return paths, problems


def load_corpus(
    annotations: str | None,
    images: str | None,
    karpathy_json: str | None,
    images_root: str | None,
    split: str,
    skip_missing: bool,
    sequences: str | None = None,
    skip_bad: bool = False,
):
    """A COCO caption file + image folder, a sequence file + image folder, or a Karpathy split file's
    split(s); None if none is given."""
    from ..data import load_coco, load_karpathy, load_sequences

    if karpathy_json:
        return load_karpathy(karpathy_json, images_root or Path(karpathy_json).parent, split, skip_missing)
    for path, loader in ((annotations, load_coco), (sequences, load_sequences)):
        if path:
            if not images:
                raise DataError(f"{path}: give the folder of its images too")
            return loader(path, images, skip_missing, skip_bad)
    return None


def decoding(model, args: argparse.Namespace) -> dict:
    """The model's decoding defaults, with what the command line set; checked before any work."""
    return model.resolve_decoding(**{s.name: getattr(args, s.name, None) for s in DecodingConfig.settings()})


def model_arg(parser) -> None:
    """--model, repeatable: one checkpoint, or several captioning as an ensemble."""
    parser.add_argument(
        "--model",
        action="append",
        metavar="CKPT",
        help="checkpoint (default: the bundled model), or a folder written by `captioner export` (runs on "
        "onnxruntime, no torch needed); give checkpoints again for an ensemble: beam search over the mean "
        "of the models' log-probabilities (one vocabulary)",
    )


def max_pixels_arg(parser) -> None:
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="refuse images declaring more pixels than this, before decoding them (decompression bombs)",
    )


def dataset_args(group, split: str = "val") -> None:
    """One captioned set: a COCO caption file and its image folder, or a Karpathy split file's split(s)."""
    group.add_argument("--annotations", help="COCO caption JSON with the references")
    group.add_argument("--images", help="folder of its images")
    group.add_argument("--karpathy-json", help="Karpathy split file instead of --annotations/--images")
    group.add_argument("--images-root", help="with --karpathy-json: folder the filepaths are relative to")
    group.add_argument("--split", default=split, help="with --karpathy-json: which split(s)")
    group.add_argument("--skip-missing", action="store_true", help="leave out missing image files instead of failing")


def train_val_args(group, sequences: bool = False) -> None:
    """A training set and a validation set: COCO caption files (and with `sequences`, sequence
    files) with their image folders, or a Karpathy split file's splits."""
    group.add_argument("--train-annotations", help="COCO caption JSON of the training images")
    group.add_argument("--train-images", help="folder of the training images")
    group.add_argument("--val-annotations", help="COCO caption JSON of the validation images")
    group.add_argument("--val-images", help="folder of the validation images")
    if sequences:
        group.add_argument(
            "--train-sequences", help="sequence caption JSON for training (images, sequences, annotations)"
        )
        group.add_argument("--val-sequences", help="sequence caption JSON for validation")
    group.add_argument("--karpathy-json", help="Karpathy split file (dataset_coco.json / dataset_flickr8k.json)")
    group.add_argument("--images-root", help="with --karpathy-json: folder the filepaths are relative to")
    group.add_argument("--split", default="train", help="with --karpathy-json: training split(s), e.g. train,restval")
    group.add_argument("--val-split", default="val", help="with --karpathy-json: validation split ('' for none)")
    group.add_argument("--skip-missing", action="store_true", help="leave out missing image files instead of failing")


def cache_args(group) -> None:
    group.add_argument("--cache-dir", help="feature cache folder (default: $CAPTIONER_CACHE_DIR or ~/.cache/captioner)")
    group.add_argument("--no-cache", action="store_true", help="compute encoder features in memory, cache nothing")


def corpus_of(args: argparse.Namespace):
    """The dataset a command names with --annotations/--sequences + --images or --karpathy-json + --split."""
    return load_corpus(
        args.annotations,
        args.images,
        args.karpathy_json,
        args.images_root,
        args.split,
        args.skip_missing,
        args.sequences,
        getattr(args, "skip_bad", False),
    )


def decoding_args(parser, n_best: bool = False) -> None:
    """The decoding flags, generated from DecodingConfig (settings.py); left unset, each comes from the
    model (its measured best, or DecodingConfig's default). n_best: also --n-best (a per-call setting)."""
    for s in DecodingConfig.settings():
        shown = s.flag[2:].upper().replace("-", "_")  # --length-penalty LENGTH_PENALTY, not its keyword
        if s.model_default:
            text = f"{s.help} (default: the model's, else {s.default:g})"
            parser.add_argument(s.flag, dest=s.name, type=s.kind, metavar=shown, help=text)
        elif n_best:
            parser.add_argument(s.flag, dest=s.name, type=s.kind, default=s.default, metavar=shown, help=s.help)


def rank_prefix() -> str:
    """'rank R of W: ' inside a multi-process job (torchrun), so every line says who failed."""
    from ..settings import from_env

    rank, world, _ = from_env()
    return f"rank {rank} of {world}: " if world > 1 else ""
