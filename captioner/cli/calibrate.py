"""`captioner calibrate`: fit a model's guidance state (tags guidance, person classifier, typicality,
confidence: calibration.py) on training and validation photos, write the model with it, and print
how well the confidence is calibrated."""

from __future__ import annotations

import argparse
import json
import logging

from .common import cache_args, train_val_args

log = logging.getLogger("captioner")


def add(sub) -> None:
    c = sub.add_parser(
        "calibrate",
        help="fit a model's tags guidance and confidence on your data; write the model with them",
        description="Fit the guidance state of a model (person classifier and typicality from the training "
        "photos, the confidence from captions of the validation photos, under --decoding or the model's "
        "decoding defaults) and write the model with it (fp16 weights). Prints the confidence's 5-fold "
        "cross-validated reliability on the validation photos, and with --measure-* on a set it was not "
        "fitted on. `captioner train` does this at the end of a run with val data.",
    )
    c.add_argument("--model", metavar="CKPT", help="checkpoint (default: the bundled model)")
    d = c.add_argument_group("data")
    train_val_args(d)
    d.add_argument("--images", help="folder of the training and validation images (for --train/val-images)")
    d.add_argument("--measure-annotations", help="another set to measure the confidence on (not fitted on)")
    d.add_argument("--measure-images", help="folder of its photos")
    c.add_argument(
        "--decoding",
        metavar="JSON",
        help="decoding settings (`captioner tune --out`) recorded as the model's defaults; the confidence "
        "is fitted for them",
    )
    c.add_argument("--plot", metavar="PNG", help="also draw the reliability diagram here")
    c.add_argument("--out", required=True, help="the model with its guidance state (fp16 weights)")
    c.add_argument("--device", default="auto", help="auto | cpu | cuda")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    cache_args(c)
    c.set_defaults(func=run)


def _corpora(args: argparse.Namespace):
    """(training, validation, measured or None) corpora named by the flags."""
    from ..errors import DataError
    from .common import load_corpus

    def one(annotations, images, split, what):
        corpus = load_corpus(
            annotations, images or args.images, args.karpathy_json, args.images_root, split, args.skip_missing
        )
        if corpus is None:
            raise DataError(f"give --{what}-annotations and --{what}-images (or --images), or --karpathy-json")
        return corpus

    train = one(args.train_annotations, args.train_images, args.split, "train")
    val = one(args.val_annotations, args.val_images, args.val_split, "val")
    measured = None
    if args.measure_annotations:
        measured = load_corpus(args.measure_annotations, args.measure_images, None, None, "", args.skip_missing)
    return train, val, measured


def _read_decoding(path: str) -> dict:
    from ..errors import DataError

    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise DataError(f"{path}: {e.strerror or type(e).__name__}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None


def run(args: argparse.Namespace) -> int:
    import torch

    from ..api import Captioner
    from ..calibration import (
        calibrate,
        check_calibratable,
        measure,
        plot_reliability,
        record_decoding,
        reliability_table,
    )
    from ..paths import check_output_file

    for path in (args.out, args.plot):
        if path:
            check_output_file(path)  # before the fitting, not after
    train, val, measured = _corpora(args)
    settings = _read_decoding(args.decoding) if args.decoding else None
    model = Captioner.load(args.model, device=args.device)
    check_calibratable(model)
    if settings is not None:
        record_decoding(model, settings)
    cache = None if args.no_cache else model.feature_cache(args.cache_dir)
    report = calibrate(model, train, val, cache)
    conf, quality = torch.tensor(report["confidence"]), torch.tensor(report["quality"])
    print(reliability_table(f"{val.source} (5-fold cross-validated)", conf, quality), flush=True)
    sets = [(f"{val.source} (cross-validated)", conf, quality)]
    if measured is not None:
        conf, quality = measure(model, measured, cache)
        print("\n" + reliability_table(f"{measured.source} (measured only)", conf, quality), flush=True)
        sets.append((f"{measured.source} (not fitted on)", conf, quality))
    if args.plot:
        plot_reliability(args.plot, sets)
    model.save(args.out, half=True)
    log.info(f"wrote {args.out}: guidance fitted on {report['train_photos']} training and "
             f"{report['val_photos']} validation photos")  # fmt: skip
    return 0
