"""`captioner plot`: a run's training curves as a PNG."""

from __future__ import annotations

import argparse


def add(sub) -> None:
    pl = sub.add_parser("plot", help="draw a run's training curves (loss, val metrics) as a PNG")
    pl.add_argument("run_dir", help="a run folder with metrics.jsonl")
    pl.add_argument("--out", help="PNG path (default: RUN_DIR/curves.png)")
    pl.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..viz import plot_training

    out = plot_training(args.run_dir, args.out)
    print(out)
    return 0
