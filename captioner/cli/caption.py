"""`captioner caption`: images, folders, globs or stdin paths -> one caption each; or sequences."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ImageError, UsageError
from ..paths import check_output_dir, list_images
from ..settings import LOW_CONFIDENCE, TAGS_KEPT
from .common import decoding, decoding_args, err, expand_inputs, max_pixels_arg, model_arg

MAX_TAGS = TAGS_KEPT  # the most --tags K: all the tags each caption carries
SHOWN_TAGS = 5  # --json's tags unless --tags K: guidance.TAGS_SHOWN
LOW_TAGS = 3  # the plain line's tags after a low-confidence caption, unless --tags K


class _Given(argparse.Action):
    """Stores the value and notes that the flag was given (`args.<dest>_given`), the default unchanged."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, self.dest + "_given", True)


def add(sub) -> None:
    c = sub.add_parser("caption", help="caption images, folders or glob patterns")
    c.add_argument(
        "inputs",
        nargs="*",
        help="image files, folders of images, glob patterns, or - to read paths from standard input, "
        "one per line (one caption each)",
    )
    c.add_argument(
        "--sequence",
        nargs="+",
        metavar="FRAME",
        help="one caption for these images as an ordered sequence (album, burst, video frames)",
    )
    c.add_argument(
        "--sequence-dir",
        action="append",
        metavar="DIR",
        help="one caption for a folder's images as a sequence, in natural file-name order "
        "(frame2 before frame10); repeat for several",
    )
    model_arg(c)
    decoding_args(c, n_best=True)
    c.add_argument("--batch-size", type=int, default=32, help="images encoded and beam-searched together")
    max_pixels_arg(c)
    c.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per line, with the n-best list, each caption's confidence and the photo's tags",
    )
    c.add_argument(
        "--tags",
        type=int,
        metavar="K",
        help="also print the K most probable ImageNet classes with their probabilities (the encoder's own "
        f"classifier, from the same pass), 0 to {MAX_TAGS}; 0 = none, not even after a low-confidence caption "
        f"(unset: none, {LOW_TAGS} after a low-confidence caption; --json: {SHOWN_TAGS})",
    )
    c.add_argument(
        "--min-confidence",
        type=float,
        default=LOW_CONFIDENCE,
        action=_Given,
        metavar="C",
        help="mark captions whose confidence (P(acceptable caption), calibrated on validation captions) "
        "is below C, and print the photo's top tags after them; 0 = mark none",
    )
    c.add_argument(
        "--omit-low-confidence",
        action="store_true",
        help="with --min-confidence: leave such captions out, of --json's nbest too (the tags are still printed)",
    )
    c.add_argument(
        "--attention-map",
        metavar="OUT_DIR",
        help="attention models: write OUT_DIR/<image>.png, the image and each word's attention",
    )
    c.add_argument("--device", default="auto", help="auto | cpu | cuda")
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..api import Captioner

    given = [bool(args.inputs), bool(args.sequence), bool(args.sequence_dir)]
    if sum(given) != 1:
        raise UsageError(
            "give images to caption one by one, or --sequence FRAME..., or --sequence-dir DIR (one of them)"
        )
    if args.attention_map:
        check_output_dir(args.attention_map)
    if args.tags is not None and not 0 <= args.tags <= MAX_TAGS:
        raise UsageError(f"--tags must be 0 to {MAX_TAGS}, not {args.tags}")
    if not 0.0 <= args.min_confidence <= 1.0:
        raise UsageError(f"--min-confidence must be between 0 and 1, not {args.min_confidence:g}")
    if args.omit_low_confidence and not args.min_confidence:
        raise UsageError("--omit-low-confidence with --min-confidence 0 would omit nothing")
    model = Captioner.load(args.model, device=args.device)
    model.max_pixels = args.max_pixels
    asked = getattr(args, "min_confidence_given", False) or args.omit_low_confidence
    if asked and args.min_confidence and not model.calibrated:  # said once, not left to be noticed
        what = (
            "an ensemble has no confidence (it is fitted per model)"
            if len(args.model or []) > 1
            else "this model has no confidence (none fitted: captioner calibrate fits one)"
        )
        err(f"{what}: --min-confidence/--omit-low-confidence mark and omit nothing")
    # the model's decoding settings with what the command line set, checked before any image is read
    decode_opts = decoding(model, args) | {"n_best": args.n_best, "batch_size": args.batch_size}
    if args.attention_map and model.decoder.attends_over != "regions":
        raise UsageError(
            f"--attention-map needs a single-image model trained with --decoder attention "
            f"(this one has --decoder {model.config['decoder']}"
            f"{' on sequences' if model.is_sequence_model else ''})"
        )
    if not args.inputs:
        return _caption_sequences(model, args, decode_opts)
    paths, failed = expand_inputs(args.inputs)
    maps_written: set[str] = set()
    inputs = {Path(p).resolve() for p in paths} if args.attention_map else set()  # never overwritten by a map
    for e in failed:
        err(str(e))
    n_failed = len(failed)
    for path, r in zip(paths, model.generate(paths, **decode_opts)):
        if isinstance(r, ImageError):
            err(str(r))
            n_failed += 1
            continue
        if args.attention_map:
            try:
                _write_attention_map(model, path, r[0], Path(args.attention_map), maps_written, inputs)
            except (OSError, ValueError) as e:  # the caption still gets printed below
                err(f"{path}: attention map not written ({e})")
                n_failed += 1
        _print_caption(args, {"path": path}, path, r)
    return 1 if n_failed else 0


def _print_caption(args: argparse.Namespace, key: dict, label: str, nbest: list) -> None:
    best = nbest[0]
    low = best.confidence is not None and best.confidence < args.min_confidence
    text = None if low and args.omit_low_confidence else best.text
    # --tags K: K of them (0: none); unset, JSON carries 5 and the plain line shows them for a
    # caption marked as low-confidence (then the tags are what there is to go on)
    n_tags = args.tags if args.tags is not None else SHOWN_TAGS if args.json else LOW_TAGS if low else 0
    tags = best.tags[:n_tags]
    if args.json:
        from ..pipeline import caption_record

        entry = key | caption_record(nbest, len(tags), args.min_confidence, args.omit_low_confidence)
        line = json.dumps(entry, ensure_ascii=False)
    else:
        fields = [label, text if text is not None else "(no caption)"]
        if low:
            fields.append(f"(low confidence: {best.confidence:.2f})")
        if tags:
            fields.append("tags: " + ", ".join(f"{t.label} {t.p:.2f}" for t in tags))
        line = "\t".join(fields)
    print(line, flush=True)


def _caption_sequences(model, args: argparse.Namespace, decode_opts: dict) -> int:
    """--sequence F1 F2 ... (order as given) or --sequence-dir DIR ... (each folder's images in
    natural order): one caption per sequence."""
    if args.sequence:
        sequences, labels = [args.sequence], [" ".join(args.sequence)]
    else:
        sequences, labels = [], []
        for d in args.sequence_dir:
            if not Path(d).is_dir():
                err(f"{d}: not a folder")
                continue
            frames = [str(f) for f in list_images(d)]
            if not frames:
                err(f"{d}: folder holds no image files")
                continue
            sequences.append(frames)
            labels.append(d)
    n_failed = len(args.sequence_dir or []) - len(sequences) if not args.sequence else 0
    for frames, label, r in zip(sequences, labels, model.generate_sequences(sequences, **decode_opts)):
        if isinstance(r, ImageError):
            err(f"{r} (sequence not captioned)")
            n_failed += 1
            continue
        _print_caption(args, {"sequence": frames}, label, r)
    return 1 if n_failed else 0


def _write_attention_map(model, path: str, caption, out_dir: Path, taken: set[str], model_inputs: set[Path]) -> None:
    from ..images import load_image
    from ..viz import attention_map

    name = Path(path).stem
    while name in taken:  # two inputs with the same file name: keep both maps
        name += "_"
    taken.add(name)
    target = out_dir / f"{name}.png"
    if target.exists() and target.resolve() in model_inputs:
        raise ValueError(f"{target} is one of the images being captioned; it is not overwritten")
    words = list(caption.words)
    attention_map(load_image(path, model.max_pixels), words, caption.attention_grid(), model.preprocess, target)
