"""`captioner evaluate`: caption a dataset once per image and score it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import DataError, UsageError
from ..paths import check_output_file
from .common import cache_args, corpus_of, dataset_args, decoding, decoding_args, err, model_arg


def add(sub) -> None:
    e = sub.add_parser("evaluate", help="caption a dataset's images and score them (BLEU, METEOR, ROUGE-L, CIDEr-D)")
    model_arg(e)
    dataset_args(e)
    e.add_argument("--sequences", help="sequence caption JSON instead of --annotations (one caption per sequence)")
    e.add_argument("--skip-bad", action="store_true", help="leave out malformed entries instead of refusing the file")
    decoding_args(e)
    e.add_argument("--batch-size", type=int, default=32, help="images encoded and beam-searched together")
    e.add_argument("--results", help="also write the captions here, in the COCO results format")
    e.add_argument(
        "--train-annotations",
        help="the model's training caption file, for novel_object_recall (default: the kinds the "
        "model's calibration recorded, if any)",
    )
    e.add_argument("--device", default="auto", help="auto | cpu | cuda")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    cache_args(e)
    e.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..api import Captioner
    from ..evaluation import caption_corpus, references, score, training_novel_kinds, write_results

    if args.results:
        check_output_file(args.results)  # before captioning everything, not after
        for given in (args.annotations, args.sequences, args.karpathy_json):
            if given and Path(given).exists() and Path(args.results).exists() and Path(given).samefile(args.results):
                raise UsageError(f"{args.results}: is the reference file itself; --results would overwrite it")
    corpus = corpus_of(args)
    if corpus is None:
        raise DataError("give --annotations (or --sequences) and --images, or --karpathy-json and --split")
    novel = training_novel_kinds(args.train_annotations) if args.train_annotations else None
    model = Captioner.load(args.model, device=args.device)
    settings = decoding(model, args)  # checked before any image is read
    if novel is None and model.guidance is not None:
        novel = model.guidance.novel_kinds()
    cache = None if args.no_cache else model.feature_cache(args.cache_dir)
    results, failed = caption_corpus(model, corpus, batch_size=args.batch_size, cache=cache, **settings)
    for e in failed:
        err(str(e))
    if args.results:
        write_results(args.results, results)
    report = {
        "model": " + ".join(args.model) if args.model else "bundled",
        "decoding": settings,
        "failed": len(failed),
        "skipped_missing": corpus.skipped_missing,
        **score(references(corpus), results, novel=novel),
    }
    print(json.dumps(report))
    return 1 if failed else 0
