"""`captioner train`: the flags of every training option are generated from `TrainOptions` (each
field's help, group and metavar sit next to it in training/options.py); this module adds the
dataset and run flags, and runs the Trainer."""

from __future__ import annotations

import argparse
import logging
import signal
from dataclasses import MISSING, fields

from .common import cache_args, err, load_corpus, rank_prefix, train_val_args

log = logging.getLogger("captioner")


def add_option_flags(groups: dict[str, argparse._ArgumentGroup]) -> None:
    """One flag per TrainOptions field (except those the trainer sets), in its group."""
    from ..training.options import CLI_UNSET, TrainOptions, flag  # pure: no torch

    for f in fields(TrainOptions):
        if f.name in CLI_UNSET:
            continue
        meta, default = f.metadata, f.default if f.default is not MISSING else None
        kwargs = {"help": meta["help"], "default": default}
        if default is True:  # a switch that is on unless --no-NAME
            kwargs |= {"action": "store_false", "dest": f.name}
        elif isinstance(default, bool):
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = type(default)
            if meta.get("choices"):
                kwargs["choices"] = list(meta["choices"])
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
        groups[meta["group"]].add_argument(flag(f.name), **kwargs)


def add(sub) -> None:
    from ..training.options import DATA, MODEL, OPTIM, VALIDATION  # pure: no torch

    t = sub.add_parser(
        "train", help="train a captioning model on a COCO-style or Karpathy-split dataset", allow_abbrev=False
    )  # (flags are matched whole: --resume checks which ones were given)
    g = t.add_argument_group(DATA)
    train_val_args(g, sequences=True)
    g.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out malformed entries and unreadable images (see validate-data) instead of refusing",
    )
    groups = {
        DATA: g,
        MODEL: t.add_argument_group(MODEL),
        OPTIM: t.add_argument_group(OPTIM),
        VALIDATION: t.add_argument_group(VALIDATION),
    }
    add_option_flags(groups)
    r = t.add_argument_group("run")
    r.add_argument("--out", required=True, help="run folder: last.pt, best.pt, metrics.jsonl")
    r.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/last.pt with its own settings and data (--epochs may grow; --patience "
        "and --num-workers may change; other flags that differ are refused)",
    )
    r.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an OUT that holds another run (its checkpoints and log are deleted)",
    )
    r.add_argument(
        "--device",
        default="auto",
        help="auto | cpu | cuda (under torchrun each process takes the GPU of its LOCAL_RANK)",
    )
    r.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decoder's per-word step and a fine-tuned encoder (pays on GPUs; "
        "the first batches are slow while it compiles)",
    )
    r.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines (warnings still show)")
    cache_args(r)
    t.set_defaults(func=run)


def corpora(args: argparse.Namespace):
    from ..errors import DataError

    train = load_corpus(
        args.train_annotations,
        args.train_images,
        args.karpathy_json,
        args.images_root,
        args.split,
        args.skip_missing,
        args.train_sequences,
        args.skip_bad,
    )
    if train is None:
        raise DataError("give --train-annotations (or --train-sequences) and --train-images, or --karpathy-json")
    val = load_corpus(
        args.val_annotations,
        args.val_images,
        args.karpathy_json if args.val_split else None,
        args.images_root,
        args.val_split,
        args.skip_missing,
        args.val_sequences,
        args.skip_bad,
    )
    for name, c in (("train", train), ("val", val)):
        if c is not None and c.skipped_missing:
            log.info(f"{name}: skipped {c.skipped_missing} missing image(s) from {c.source}")
    return train, val


def stop_on_sigterm() -> None:
    """SIGTERM (a scheduler or `kill`) stops training like Ctrl-C: weights saved, clean exit."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def run(args: argparse.Namespace) -> int:
    from .. import distributed
    from ..training import Trainer, TrainingInterrupted
    from ..training.options import CLI_UNSET, TrainOptions

    stop_on_sigterm()
    dist = distributed.init(args.device)  # under torchrun: join the job (gloo on CPUs, nccl on GPUs)
    if not dist.is_main:  # one display per job, rank 0's: the others report only errors
        logging.getLogger("captioner").setLevel(logging.ERROR)
    train, val = corpora(args)
    opts = TrainOptions(**{f.name: getattr(args, f.name) for f in fields(TrainOptions) if f.name not in CLI_UNSET})
    trainer = Trainer(
        train,
        val,
        args.out,
        opts,
        device=args.device,
        resume=args.resume,
        use_cache=not args.no_cache,
        cache_dir=args.cache_dir,
        skip_bad=args.skip_bad,
        dist=dist,
        compile=args.compile,
        overwrite=args.overwrite,
        given=args.given,
    )
    trainer.prepare()  # plan, build or restore, features: errors surface before any epoch
    if trainer.finished:
        err(trainer.finished)
        return 0
    try:
        best = trainer.fit()
    except TrainingInterrupted as e:  # rank 0 saved the weights; the others have nothing to add
        err(rank_prefix() + (str(e) if dist.is_main else "interrupted"))
        return 130
    distributed.shutdown()
    log.info(f"best checkpoint: {best}")
    return 0
