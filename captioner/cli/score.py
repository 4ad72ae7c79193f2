"""`captioner score`: score existing captions against reference captions."""

from __future__ import annotations

import argparse
import json


def add(sub) -> None:
    s = sub.add_parser("score", help="score an existing COCO results file against reference captions")
    s.add_argument(
        "--results",
        required=True,
        help='captions: a COCO results file [{"image_id": ..., "caption": ...}, ...], or JSON Lines '
        '(`captioner caption --json` output: each "path" is matched to a reference file name)',
    )
    refs = s.add_mutually_exclusive_group(required=True)
    refs.add_argument("--annotations", help="COCO caption (or sequence) JSON with the references")
    refs.add_argument("--karpathy-json", help="Karpathy split file with the references (of --split)")
    s.add_argument("--split", default="val", help="with --karpathy-json: which split(s)")
    s.add_argument(
        "--allow-partial",
        action="store_true",
        help="score results that cover only some of the reference images (refused otherwise)",
    )
    s.add_argument(
        "--train-annotations",
        help="the model's training caption file: the COCO kinds it rarely names are reported as novel "
        "(novel_object_recall)",
    )
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluation import check_coverage, load_references, read_results, score, training_novel_kinds

    refs, files = load_references(args.annotations, args.karpathy_json, args.split)
    results = read_results(args.results, files)
    check_coverage(refs, results, str(args.results), args.allow_partial)
    novel = training_novel_kinds(args.train_annotations) if args.train_annotations else None
    report = {
        "results": str(args.results),
        "reference_images": len(refs),
        **score(refs, results, novel=novel),
    }  # + "images" scored
    print(json.dumps(report))
    return 0
