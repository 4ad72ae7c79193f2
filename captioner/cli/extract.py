"""`captioner extract-features`: fill the feature cache ahead of training or evaluation."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import DataError
from ..training.options import TrainOptions
from .common import corpus_of, err, expand_inputs

log = logging.getLogger("captioner")  # the CLI shows its reports on stderr (--quiet: warnings only)


def add(sub) -> None:
    x = sub.add_parser("extract-features", help="fill the feature cache ahead of training or evaluation")
    x.add_argument("inputs", nargs="*", help="image files, folders or glob patterns")
    x.add_argument("--annotations", help="COCO caption JSON: its images")
    x.add_argument("--sequences", help="sequence caption JSON: the frames of its sequences")
    x.add_argument("--images", help="with --annotations or --sequences: the folder its file_names are in")
    x.add_argument("--karpathy-json", help="Karpathy split file: the images of --split")
    x.add_argument("--images-root", help="with --karpathy-json: folder the filepaths are relative to")
    x.add_argument("--split", default="train,restval,val,test", help="with --karpathy-json: which split(s)")
    x.add_argument("--skip-missing", action="store_true", help="leave out missing image files instead of failing")
    x.add_argument(
        "--encoder", default=TrainOptions().encoder, help="the encoder the features are for (as train --encoder)"
    )
    x.add_argument("--batch-size", type=int, default=32, help="images encoded together")
    x.add_argument("--num-workers", type=int, default=1, help="image-decoding worker processes")
    x.add_argument("--device", default="auto", help="auto | cpu | cuda")
    x.add_argument("--quiet", action="store_true", help="no progress bar")
    x.add_argument("--cache-dir", help="feature cache folder (default: $CAPTIONER_CACHE_DIR or ~/.cache/captioner)")
    x.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..device import resolve_device
    from ..encoders import build_encoder
    from ..features import FeatureCache

    corpus = corpus_of(args)
    found, problems = expand_inputs(args.inputs)
    paths = (corpus.paths if corpus is not None else []) + [Path(p) for p in found]
    if not paths and not problems:
        raise DataError(
            "nothing to extract: give image files/folders/globs, --annotations with --images, or --karpathy-json"
        )
    cache = FeatureCache(build_encoder(args.encoder), args.cache_dir, resolve_device(args.device))
    failed = problems + cache.fill(paths, batch_size=args.batch_size, num_workers=args.num_workers)
    for e in failed:
        err(str(e))
    log.info(f"{len(paths) - len(failed)} image(s) cached in {cache.dir}")
    return 1 if failed else 0
