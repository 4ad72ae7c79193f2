"""Planning a run before any training work: the checkpoint it resumes or starts from, the options it
trains with (resolved and checked once), what best.pt follows, and which files of an earlier run
--overwrite deletes. Reads checkpoints and claims the run folder; builds nothing."""

from __future__ import annotations

import logging
import math
from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any

from ..checkpoint import load_checkpoint
from ..data import CaptionCorpus, DataError
from ..distributed import Dist
from ..errors import UsageError
from ..metrics import meteor_backend
from .options import ARCHITECTURE, RESUMABLE, TrainOptions, canonical_metric, chosen_fields, refuse_clashes
from .run_folder import RunFolder

log = logging.getLogger("captioner")


@dataclass
class RunPlan:
    """What a run starts from and trains with, decided once before any model is built."""

    opts: TrainOptions  # resolved: a resumed run's own, --init-from's architecture, `temporal` decided
    resume: dict[str, Any] | None  # RUN/last.pt to continue (--resume)
    init: dict[str, Any] | None  # the checkpoint a new run starts from (--init-from)
    stale: list[str]  # files of an earlier run in the folder: --overwrite deletes them when training starts
    data: dict[str, Any]  # fingerprints of the training and val data, kept in every checkpoint
    has_val: bool
    select: str  # the metric best.pt, early stopping and plateau decay follow
    higher_is_better: bool

    def start_score(self) -> float:
        """The best score of a run that has none yet: any first score beats it."""
        return -math.inf if self.higher_is_better else math.inf


def plan_run(
    run: RunFolder,
    dist: Dist,
    train: CaptionCorpus,
    val: CaptionCorpus | None,
    opts: TrainOptions | None,
    given: Collection[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> RunPlan:
    """Claim the run folder (rank 0), read the checkpoints the run continues or starts from (rank 0
    reads, every rank gets the same bytes) and check the options against them and the data.

    resume=True continues RUN/last.pt with the run's own settings: options in `given` (the CLI's
    flags; by default, those of `opts` that differ from the defaults) other than RESUMABLE ones
    must agree with the run, and the training and val data must be the same."""
    if dist.is_main:
        run.create()
    stale = [] if resume else dist.on_main(lambda: run.claim(overwrite))
    given = set(given) & set(TrainOptions.__dataclass_fields__) if given is not None else chosen_fields(opts)
    ckpt = init = None
    if resume:  # rank 0 reads it and hands it to every rank: all resume from the same bytes
        ckpt = dist.on_main(run.load_last)
        saved = TrainOptions(**ckpt["config"]["train"])
        if opts is not None:
            refuse_clashes(
                saved,
                opts,
                given - set(RESUMABLE),
                f"{run.path}: --resume continues the run with its own settings",
                f"or start a new run from its weights with --init-from {run.last}",
            )
            saved = replace(saved, **{k: getattr(opts, k) for k in RESUMABLE if k in given})
        check_same_data(run, ckpt.get("data") or {}, train, val)
        opts = keep_global_batch(saved, dist)
    opts = replace(opts or TrainOptions(), world_size=dist.world_size)
    if opts.init_from and not ckpt:
        init = dist.on_main(lambda: load_checkpoint(opts.init_from, map_location="cpu"))
        opts = _take_architecture(opts, TrainOptions(**init["config"]["train"]), given)
    opts.check()
    if opts.temporal == "auto":  # resolved once; the checkpoint keeps the resolved value
        opts = replace(opts, temporal="gru" if train.frames is not None else "none")
    has_val, select = check_inputs(opts, train, val)
    return RunPlan(
        opts=opts,
        resume=ckpt,
        init=init,
        stale=stale,
        data={"train": train.fingerprint(), "val": val.fingerprint() if val is not None else None},
        has_val=has_val,
        select=select,
        higher_is_better=select not in ("val_loss", "train_loss"),
    )


def _take_architecture(opts: TrainOptions, saved: TrainOptions, given: set[str]) -> TrainOptions:
    """--init-from: the run takes its architecture and vocabulary from the checkpoint; chosen
    options that contradict it are refused, never dropped."""
    refuse_clashes(
        saved,
        opts,
        given & set(ARCHITECTURE),
        f"--init-from {opts.init_from} takes its architecture and vocabulary from that checkpoint",
        "or train a new model without it",
    )
    opts = replace(opts, **{k: getattr(saved, k) for k in ARCHITECTURE})
    if opts.fine_tune_encoder < saved.fine_tune_encoder:
        raise UsageError(
            f"--init-from {opts.init_from} fine-tuned {saved.fine_tune_encoder} encoder block(s): give "
            f"--fine-tune-encoder {saved.fine_tune_encoder} or more (fewer would drop those weights)"
        )
    return opts


def check_inputs(opts: TrainOptions, train: CaptionCorpus, val: CaptionCorpus | None) -> tuple[bool, str]:
    """Refuse data and option combinations that cannot train; returns (whether there is val data,
    the metric best.pt follows)."""
    for corpus in (train, val):
        if corpus is not None and len(corpus) == 0:
            what = "train" if corpus is train else "validate"
            raise DataError(f"{corpus.source}: no captioned images to {what} on")
    if opts.fine_tune_encoder and (train.frames is not None or opts.temporal != "none"):
        raise UsageError(
            "--fine-tune-encoder works for single images only: sequence training reads "
            "its frames from the feature cache"
        )
    if opts.fine_tune_encoder and opts.self_critical:
        raise UsageError("--self-critical trains the decoder from cached features: drop --fine-tune-encoder")
    if opts.flip and opts.self_critical:
        raise UsageError("--self-critical rewards captions of the photos as they are: drop --flip")
    has_val = val is not None and len(val) > 0
    select = canonical_metric(opts.select_metric) if has_val else "train_loss"
    if select == "METEOR" and meteor_backend() == "unavailable":
        raise UsageError("--select-metric METEOR, but no METEOR is available here (see README: Metrics)")
    return has_val, select


def check_same_data(run: RunFolder, saved: dict, train: CaptionCorpus, val: CaptionCorpus | None) -> None:
    """A resumed run trains on the data it started with: its vocabulary, data order and best
    score belong to that data (checkpoints from before this check carry no fingerprint)."""
    for name, corpus in (("training", train), ("val", val)):
        was = saved.get("train" if name == "training" else "val", "unknown")
        now = corpus.fingerprint() if corpus is not None else None
        if was == "unknown" or (was or {}).get("sha1") == (now or {}).get("sha1"):
            continue
        had = f"{was['source']} ({was['items']} items)" if was else "none"
        got = f"{now['source']} ({now['items']} items)" if now else "none"
        raise UsageError(
            f"{run.path}: --resume needs the run's own {name} data, {had}, but got {got}: its "
            f"vocabulary and {'data order' if name == 'training' else 'best score'} belong to "
            f"that data. To train on other data, start a new run from its weights with "
            f"--init-from {run.last}"
        )


def keep_global_batch(saved: TrainOptions, dist: Dist) -> TrainOptions:
    """A run resumed on another number of processes keeps its global batch, and with it the
    learning rate it was tuned for and the data order: the per-process batch changes instead."""
    world = dist.world_size
    if saved.world_size == world:
        return saved
    total = saved.batch_size * saved.world_size
    per = max(1, round(total / world))
    if dist.is_main:
        kept = (
            f"global batch {total} kept"
            if per * world == total
            else f"global batch {total} -> {per * world}: {total} is not a multiple of {world}"
        )
        log.info(
            f"resuming a {saved.world_size}-process run on {world} process(es): per-process batch "
            f"{saved.batch_size} -> {per} ({kept})"
        )
    return replace(saved, batch_size=per, world_size=world)
