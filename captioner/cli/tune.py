"""`captioner tune`: measure decoding settings on a validation set, print a Markdown table (one row per
setting) and write the best by CIDEr-D as JSON, for `captioner calibrate --decoding`."""

from __future__ import annotations

import argparse
import json

from ..settings import DecodingConfig, Grid
from .common import cache_args, dataset_args, model_arg

#: the grid's flags (the names scripts/tune_decoding.py had): each varies the decoding setting of
#: its key; type and meaning come from DecodingConfig, the values tried by default from tuning.Grid
GRID_FLAGS = {
    "beam_size": "--beam-sizes",
    "length_alpha": "--length-penalties",
    "no_repeat_ngram": "--no-repeat-ngrams",
    "tag_boost": "--tag-boosts",
    "suppress_unseen": "--suppress-unseen",
    "tag_subject": "--tag-subjects",
    "constrain": "--constrain",
}


def add(sub) -> None:
    t = sub.add_parser(
        "tune",
        help="measure decoding settings on a validation set and write the best (by CIDEr-D) as JSON",
        description="Caption a validation set once per combination of the values given (encoder features "
        "come from the feature cache, so each costs only the decoding); print a Markdown table of the "
        "scores and write the best setting by CIDEr-D, for `captioner calibrate --decoding`.",
    )
    model_arg(t)
    d = t.add_argument_group("validation data")
    dataset_args(d)
    d.add_argument(
        "--train-annotations",
        help="the model's training caption file, for novel_object_recall (default: the kinds the "
        "model's calibration recorded, if any)",
    )
    g = t.add_argument_group("settings tried (comma-separated values; every combination is measured)")
    for name, flag in GRID_FLAGS.items():
        setting = next(s for s in DecodingConfig.settings() if s.name == name)
        default = ",".join(f"{v:g}" for v in getattr(Grid(), name))
        g.add_argument(
            flag, dest=name, default=default, metavar="V[,V...]", help=f"values of {setting.flag}: {setting.help}"
        )
    t.add_argument("--out", help="write the best setting here (JSON)")
    t.add_argument("--device", default="auto", help="auto | cpu | cuda")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    cache_args(t)
    t.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..api import Captioner
    from ..checkpoint import atomic_write
    from ..errors import DataError
    from ..evaluation import training_novel_kinds
    from ..paths import check_output_file
    from ..tuning import best, parse_values, table_header, table_row, tune
    from .common import load_corpus

    kinds = {s.name: s.kind for s in DecodingConfig.settings()}
    grid = Grid(**{name: parse_values(getattr(args, name), kinds[name], flag) for name, flag in GRID_FLAGS.items()})
    if args.out:
        check_output_file(args.out)  # before the measuring, not after
    corpus = load_corpus(
        args.annotations, args.images, args.karpathy_json, args.images_root, args.split, args.skip_missing
    )
    if corpus is None:
        raise DataError("give --annotations and --images, or --karpathy-json and --split")
    novel = training_novel_kinds(args.train_annotations) if args.train_annotations else None
    model = Captioner.load(args.model, device=args.device)
    cache = None if args.no_cache else model.feature_cache(args.cache_dir)
    print(table_header(), flush=True)
    rows = []
    for row in tune(model, corpus, cache, grid, novel=novel):
        rows.append(row)
        print(table_row(row), flush=True)
    top = best(rows)
    print(
        f"best by CIDEr-D: {json.dumps(top.setting)} ({top.cider:.3f}); METEOR: {top.scores['METEOR_backend']}",
        flush=True,
    )
    if args.out:
        atomic_write(args.out, lambda f: f.write((json.dumps(top.setting) + "\n").encode("utf-8")))
    return 0
