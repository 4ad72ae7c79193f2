"""The Trainer: records a run's inputs; `prepare()` plans the run (plan.py), builds or restores the
model and reads its features; `fit()` runs the epochs — train (every rank), validate (rank 0), log
and checkpoint (rank 0) — until the last epoch or early stopping (exact resume), then fits best.pt's
guidance and confidence when the run has val data (calibration.py)."""

from __future__ import annotations

import itertools
import logging
import math
import random
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..api import Captioner
from ..checkpoint import CheckpointError, signals_held
from ..data import CaptionCorpus, CaptionDataset, DataError
from ..device import resolve_device
from ..distributed import Dist, current
from ..encoders import build_encoder
from ..errors import CaptionerError, UsageError
from ..features import FeatureCache
from ..metrics import CiderD, normalize
from ..model import load_encoder_weights
from ..models import build_model
from ..vocab import SPECIALS, Vocabulary
from .batches import item_data, loader, seed_epoch, to_inputs
from .objectives import EpochContext, SelfCritical, TrainStep, cross_entropy_epoch, self_critical_epoch
from .optim import Optimisation
from .options import TrainOptions
from .plan import RunPlan, plan_run
from .run_folder import RunFolder
from .validation import AboveCut, val_scores

log = logging.getLogger("captioner")


class TrainingInterrupted(Exception):
    """Training stopped by Ctrl-C / SIGTERM after saving RUN/interrupted.pt; the message says where."""


def training_vocabulary(train: CaptionCorpus, min_count: int) -> Vocabulary:
    """The words of the training captions; refuses a vocabulary with no words (nothing to learn)."""
    counts = train.tokenized().counts()
    vocab = Vocabulary.from_counts(counts, min_count)
    if len(vocab) == len(SPECIALS):
        if not counts:
            raise DataError(f"{train.source}: the training captions hold no words (only punctuation or symbols?)")
        raise UsageError(
            f"--min-word-count {min_count} leaves no words: the most frequent word of "
            f"{train.source} occurs {max(counts.values())} time(s)"
        )
    return vocab


@dataclass
class Standing:
    """Where a run stands: whole epochs done (what last.pt holds), the best selection score so far
    and the epochs since it last improved."""

    epoch: int
    best_score: float
    bad_epochs: int = 0


class Trainer:
    """Owns one run folder (see run_folder.py): best.pt follows `select_metric` (with no val set:
    the latest epoch).

    Constructing a Trainer only records its inputs; `prepare()` (which `fit()` calls when it has not
    run) claims the run folder, checks the options, builds or restores the model and extracts the
    features. resume=True continues RUN/last.pt with the run's own settings (see plan.plan_run).

    Under torchrun (a `Dist` of several processes) every process trains on its shard of each
    epoch with DistributedDataParallel; rank 0 alone validates, logs and writes checkpoints, and
    hands the epoch's record to the others so that LR schedules and early stopping agree.

    Progress bars and per-epoch lines go through the `captioner` logger (see progress.py).
    """

    def __init__(
        self,
        train: CaptionCorpus,
        val: CaptionCorpus | None,
        out_dir: str | Path,
        opts: TrainOptions | None = None,
        device: str = "auto",
        resume: bool = False,
        use_cache: bool = True,
        cache_dir: str | Path | None = None,
        skip_bad: bool = False,
        dist: Dist | None = None,
        compile: bool = False,
        overwrite: bool = False,
        given: Collection[str] | None = None,
        cached_trunk: bool = True,
    ) -> None:
        self.train, self.val = train, val
        self.out = Path(out_dir)
        self.run = RunFolder(self.out)  # paths only: nothing is touched before prepare()
        self.options, self.given = opts, given  # as asked for; the run's own: `opts`, after prepare()
        self.resume, self.overwrite = resume, overwrite
        self.device_name = device
        self.use_cache, self.cache_dir = use_cache, cache_dir
        self.skip_bad = skip_bad  # leave out images that cannot be read instead of refusing to train
        self.compile = compile
        self.cached_trunk = cached_trunk  # False: fine-tuning runs the whole encoder every step (for comparison)
        self._dist = dist  # a process group set up by the caller is used
        self._prepared = False

    # ---- what prepare() makes, available on first use ----------------------------------------------
    @property
    def dist(self) -> Dist:
        if self._dist is None:
            self._dist = current(resolve_device(self.device_name))
        return self._dist

    @dist.setter
    def dist(self, value: Dist) -> None:
        self._dist = value

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def plan(self) -> RunPlan:
        self.prepare()
        return self._plan

    @property
    def opts(self) -> TrainOptions:
        """The run's options, resolved (a resumed run's own, --init-from's architecture)."""
        return self.plan.opts

    @opts.setter
    def opts(self, value: TrainOptions) -> None:
        self.plan.opts = value

    @property
    def model(self) -> Captioner:
        self.prepare()
        return self._model

    @property
    def finished(self) -> str | None:
        """Why a resumed run has nothing left to do (None: it goes on)."""
        self.prepare()
        return self._finished

    @property
    def train_data(self):
        """(training dataset, its features) (see batches.item_data)."""
        self.prepare()
        return self._train_data

    @property
    def val_data(self):
        self.prepare()
        return self._val_data

    @property
    def core(self) -> TrainStep:
        """The trainable step; `wrapped` is what trains: the step, in DDP when several processes train."""
        self.prepare()
        return self._core

    @property
    def wrapped(self) -> nn.Module:
        self.prepare()
        return self._wrapped

    # ---- preparation: plan, model, features ---------------------------------------------------------
    def prepare(self) -> None:
        """Everything before the first epoch, once: plan the run (claim the folder, read the
        checkpoints, check the options), build or restore the model and its optimisation, then
        (unless a resumed run has nothing left to do) the features, the step, --compile and DDP."""
        if self._prepared:
            return
        self._prepared = True  # the properties above read what the steps below set, in order
        try:
            self._plan = plan_run(
                self.run, self.dist, self.train, self.val, self.options, self.given, self.resume, self.overwrite
            )
            self._start()
            if not self._finished:  # with nothing left to do, fit() needs no features
                self._prepare_steps()
        except BaseException:
            self._prepared = False  # a failed preparation is not half-kept: the next call starts again
            raise

    def _start(self) -> None:
        """The model where the run starts: built and seeded, from --init-from's weights or restored
        with its optimisation and standing from RUN/last.pt."""
        plan = self._plan
        torch.manual_seed(plan.opts.seed)  # the same initial weights on every rank (DDP checks them, too)
        random.seed(plan.opts.seed)
        self._model, self.cut, self.optimisation = self._build(plan.resume or plan.init)
        self.standing = Standing(0, plan.start_score())
        self._finished: str | None = None
        if plan.init:
            load_encoder_weights(self.model.encoder, plan.init)
            self.model.decoder.load_state_dict(plan.init["decoder"])
        if plan.resume:
            self._restore(plan.resume)
        if self.dist.is_main and self.resume:
            self.run.trim(self.standing.epoch)  # lines a crash wrote past the checkpoint
        self._train_data = self._val_data = self._core = self._wrapped = None
        self.cider: CiderD | None = None  # self-critical reward over the training references, built on first use

    def _build(self, source: dict | None) -> tuple[Captioner, int | None, Optimisation]:
        """The model (vocabulary from `source` when starting from a checkpoint, else from the
        training captions), the cut of a cached trunk, and the optimisation."""
        plan = self._plan
        opts = plan.opts
        vocab = (
            Vocabulary.from_dict(source["vocab"]) if source else training_vocabulary(self.train, opts.min_word_count)
        )
        encoder = build_encoder(opts.encoder)
        config = {
            "encoder": opts.encoder,
            "decoder": opts.decoder,
            "decoder_hparams": opts.decoder_hparams(),
            "temporal": opts.temporal_config(),
            "preprocess": encoder.spec.preprocess.to_dict(),
            "fine_tune_encoder": opts.fine_tune_encoder,
            "train": asdict(opts),
        }
        decoder = build_model(config, len(vocab), encoder.feature_dim)
        encoder_params = encoder.unfreeze_last(opts.fine_tune_encoder)
        # fine-tuning: the frozen trunk below the trained blocks runs once, into the cache
        cut = encoder.cut(opts.fine_tune_encoder) if self.cached_trunk else None
        model = Captioner(encoder, decoder, vocab, config, self.device)
        groups = [{"params": list(decoder.parameters())}]
        if encoder_params:
            groups.append({"params": encoder_params, "lr": opts.encoder_lr})
        mode = "max" if plan.higher_is_better else "min"
        return model, cut, Optimisation.build(opts, groups, self.device, mode, self.run.last)

    def _restore(self, ckpt: dict[str, Any]) -> None:
        """Weights, optimisation and the run's standing from RUN/last.pt."""
        load_encoder_weights(self.model.encoder, ckpt)
        self.model.decoder.load_state_dict(ckpt["decoder"])
        self.optimisation.load_state_dict(ckpt, self.opts.epochs)
        self.standing = Standing(ckpt["epoch"], ckpt["best_score"], ckpt["bad_epochs"])
        self._finished = self._nothing_left(ckpt["epoch"])

    def _nothing_left(self, done: int) -> str | None:
        """Why a resumed run has nothing to train (None: it goes on); asking for fewer epochs than
        were trained is a mistake, not a no-op."""
        opts = self.opts
        if opts.epochs < done:
            raise UsageError(
                f"{self.out}: has trained {done} epochs already, more than --epochs {opts.epochs}: "
                f"give --epochs above {done} to train further"
            )
        if opts.epochs == done:
            return f"nothing left to do: {self.out} has trained all {done} epochs (give --epochs above {done} to go on)"
        if opts.patience and self.standing.bad_epochs >= opts.patience:
            return (
                f"nothing left to do: {self.out} stopped early after epoch {done} ({self.plan.select} had not "
                f"improved for {self.standing.bad_epochs} epochs; a larger --patience goes on)"
            )
        return None

    def _prepare_steps(self) -> None:
        """Features (each process fills the cache; the first to take its lock extracts, the others
        wait on the lock, not on a collective, so a long extraction cannot time out, and read),
        the trainable step, --compile, and DDP around the step."""
        self._train_data = self._data(self.train, "train features", mirror=self.opts.flip)
        self._val_data = self._data(self.val, "val features") if self.plan.has_val and self.dist.is_main else None
        encoder = self.model.encoder
        self._core = TrainStep(encoder if encoder.trainable else None, self.model.decoder, self.cut or 0)
        if self.compile:
            self._compile()
        self._wrapped = self._core
        if self.dist.enabled:
            self._wrapped = DistributedDataParallel(
                self._core, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )

    def _compile(self) -> None:
        """--compile: torch.compile the decoder's per-word step and a fine-tuned encoder, in place
        (state_dict keys unchanged, so checkpoints do not care)."""
        done = []
        if self.model.decoder.compile_step():
            done.append("the decoder step")
        if self._core.encoder is not None and self.cut is not None:  # only the blocks above the cut run
            for layer in self._core.encoder.trunk[self.cut :]:
                layer.compile()
            done.append("the fine-tuned encoder blocks")
        elif self._core.encoder is not None:
            self._core.encoder.compile()
            done.append("the encoder")
        if self.dist.is_main:
            log.info(
                "--compile: "
                + (
                    " and ".join(done) + " compiled (the first batches compile; later ones reuse it)"
                    if done
                    else f"nothing to compile for the {self.opts.decoder} decoder with a "
                    "frozen encoder (its LSTM is already one fused kernel)"
                )
            )

    # ---- data --------------------------------------------------------------------------------------
    def _data(self, corpus: CaptionCorpus, desc: str, mirror: bool = False):
        """(dataset, its features): the frozen encoder's features, or when fine-tuning the frozen
        trunk's activations at the cut (pixels for encoders that cannot be cut)."""
        cacheable = self.cut is not None or not self.model.encoder.trainable
        cache = (
            FeatureCache(self.model.encoder, self.cache_dir, self.device, self.cut)
            if self.use_cache and cacheable
            else None
        )
        return item_data(self.model, corpus, self.opts, self.device, cache, self.skip_bad, desc, self.cut, mirror)

    def _loader(self, dataset: CaptionDataset, train: bool, epoch: int = 0) -> DataLoader:
        return loader(dataset, self.opts, self.dist, self.device, train, epoch)

    # ---- the loop ----------------------------------------------------------------------------------
    def _autocast(self) -> torch.autocast:
        return self.optimisation.autocast(self.device)

    def _context(self, train: bool) -> EpochContext:
        """A training epoch runs on every rank through DDP; the val loss on rank 0 alone, no DDP."""
        step = self.wrapped if train else self.core
        update = self.optimisation.update if train else None
        return EpochContext(step, self.device, self.dist, update, self._autocast)

    def _run_epoch(self, data, train: bool, desc: str, epoch: int = 0, steps: int | None = None) -> float:
        """Cross-entropy over a dataset: a training epoch (or its first `steps` batches) or the val loss."""
        dataset, feats = data
        self.model.decoder.train(train)
        batches = self._loader(dataset, train, epoch)  # whole: the progress bar knows its length
        return cross_entropy_epoch(
            self._context(train),
            batches if steps is None else itertools.islice(batches, steps),
            lambda batch: to_inputs(batch, feats, self.device),
            desc,
        )

    def _run_self_critical_epoch(self, desc: str, epoch: int = 0) -> tuple[float, float]:
        dataset, feats = self.train_data
        if self.cider is None:
            self.cider = CiderD({i: [normalize(c) for c in caps] for i, caps in enumerate(dataset.corpus.captions)})
        self.model.decoder.train()
        opts = self.opts
        scst = SelfCritical(
            feats, self.cider, self.model.vocab, opts.scst_samples, opts.scst_max_len, opts.batch_size, opts.seed
        )
        return self_critical_epoch(self._context(True), scst, epoch, desc)

    def train_steps(self, steps: int, epoch: int = 0) -> float:
        """The first `steps` cross-entropy batches of `epoch`'s shuffle, with no validation and no
        checkpoint: what a benchmark (benchmarks/scale.py) or a quick check of a data set runs.
        Returns their mean loss."""
        self.prepare()
        seed_epoch(self.opts.seed, epoch, self.dist.rank)
        return self._run_epoch(self.train_data, True, f"{steps} steps", epoch, steps)

    def _validate(self) -> dict[str, Any]:
        val_loss = self._run_epoch(self.val_data, False, "val")
        dataset, feats = self.val_data
        if self.cut is not None:  # a cached trunk: the fine-tuned blocks turn it into the decoder's input
            feats = AboveCut(feats, self.model, self.cut)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))} | val_scores(
            self.model, dataset.corpus, feats, self.opts.val_beam_size
        )

    def _better(self, score: float) -> bool:
        best = self.standing.best_score
        return score > best if self.plan.higher_is_better else score < best

    def fit(self) -> Path:
        """Train to `opts.epochs` or until early stopping; returns the path of best.pt, calibrated
        (guidance and confidence, see `calibrate_best`) when the run has val data.

        Interrupted (Ctrl-C, or SIGTERM through the CLI), it writes RUN/interrupted.pt, the
        weights of the moment (usable for captioning), and raises TrainingInterrupted; last.pt
        stays the end of the last whole epoch, which is where --resume continues.
        """
        self.prepare()
        if self.finished:
            return self.run.best
        if self.plan.stale and self.dist.is_main:
            self.run.clear(self.plan.stale)
            self.plan.stale = []
        start = epoch = self.standing.epoch
        try:
            for epoch in range(start, self.opts.epochs):
                self._fit_epoch(epoch)
                if self.opts.patience and self.standing.bad_epochs >= self.opts.patience:
                    if self.dist.is_main:
                        log.info(
                            f"early stop: {self.plan.select} has not improved for {self.standing.bad_epochs} epochs"
                        )
                    break
        except KeyboardInterrupt:
            done = max(epoch, self.standing.epoch)  # the signal may have waited for the epoch's checkpoints
            if self.dist.is_main:
                self.run.save_interrupted(self.model.checkpoint_payload() | {"epoch": done})
            when = f"after epoch {done}" if done > epoch else f"during epoch {epoch + 1}"
            raise TrainingInterrupted(
                f"interrupted {when}: weights saved to {self.run.interrupted}; `--resume` "
                f"continues from {self.run.last} (end of epoch {done})"
            ) from None
        if self.dist.is_main and not self.run.best.is_file():
            raise CheckpointError(
                f"{self.out}: no epochs were run, so there is no best.pt "
                f"(already at epoch {start} of {self.opts.epochs}?)"
            )
        if self.dist.is_main:  # the other ranks are done: calibration is rank 0's alone, no collective
            self.calibrate_best()
        return self.run.best

    def _fit_epoch(self, epoch: int) -> None:
        """One epoch: train (every rank), validate (rank 0; the record goes to every rank), log and
        checkpoint (rank 0)."""
        t0 = time.time()
        seed_epoch(self.opts.seed, epoch, self.dist.rank)
        lr = self.optimisation.optim.param_groups[0]["lr"]
        desc = f"epoch {epoch + 1}/{self.opts.epochs}"
        if self.opts.self_critical:
            train_loss, reward = self._run_self_critical_epoch(desc, epoch)
            record = {"epoch": epoch + 1, "train_loss": train_loss, "train_CIDEr-D": reward, "lr": lr}
        else:
            train_loss = self._run_epoch(self.train_data, True, desc, epoch)
            record = {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "train_ppl": math.exp(min(train_loss, 50)),
                "lr": lr,
            }
        if self.plan.has_val:
            record |= self.dist.on_main(self._validate)
        score = record[self.plan.select]
        if score is None:  # e.g. METEOR unavailable: cannot happen for the chosen metric (checked above)
            raise ValueError(f"validation produced no {self.plan.select}")
        improved = not self.plan.has_val or self._better(score)
        if improved:
            self.standing.best_score, self.standing.bad_epochs = score, 0
        else:
            self.standing.bad_epochs += 1
        self.optimisation.step_schedule(score)
        record |= {"best": improved, "time_s": round(time.time() - t0, 2)}
        self.dist.on_main(lambda: self._log_and_save(record, improved))
        self.standing.epoch = record["epoch"]  # every rank: (rank 0 set it when its checkpoints were written)

    def _log_and_save(self, record: dict[str, Any], improved: bool) -> None:
        payload = (
            self.model.checkpoint_payload()
            | self.optimisation.state_dict()
            | {
                "epoch": record["epoch"],
                "best_score": self.standing.best_score,
                "bad_epochs": self.standing.bad_epochs,
                "select_metric": self.plan.select,
                "data": self.plan.data,
            }
        )
        with signals_held():  # Ctrl-C waits until the log line, last.pt and best.pt are written
            self.run.record(record, payload, improved)
            self.standing.epoch = record["epoch"]
        shown = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in record.items()
            if k not in ("best", "METEOR_backend")
        )
        log.info(shown + (f" * best {self.plan.select}" if improved else ""))

    # ---- the end: guidance and confidence -----------------------------------------------------------
    def why_not_calibrate(self) -> str | None:
        """Why best.pt gets no guidance or confidence (None: it does); "" when --no-calibrate asked."""
        if not self.opts.calibrate:
            return ""
        if not self.plan.has_val:
            return "no validation data to fit the confidence on (give val annotations or a val split)"
        if self.model.is_sequence_model:
            return "a sequence model: guidance and confidence are for single-image models"
        if self.model.encoder.head is None:
            return f"the {self.opts.encoder} encoder has no ImageNet classifier to give tags"
        return None

    def calibrate_best(self) -> dict[str, Any] | None:
        """Fit best.pt's guidance state (tags guidance, person classifier, typicality, confidence:
        calibration.py) on the run's training and val photos and write it into best.pt, which keeps
        its training state (atomic). Logs one line: what was fitted, or why nothing was. Returns
        calibration's report, or None."""
        why = self.why_not_calibrate()
        if why is not None:
            if why:
                log.info(f"{self.run.best}: no tags guidance or confidence fitted: {why}")
            return None
        from ..calibration import calibrate_checkpoint

        try:
            report = calibrate_checkpoint(
                self.run.best, self.train, self.val, self.device, self.cache_dir, use_cache=self.use_cache
            )
        except UsageError as e:  # e.g. too few readable val photos: the model works as before
            log.info(f"{self.run.best}: no tags guidance or confidence fitted: {e}")
            return None
        except (CaptionerError, OSError) as e:  # the run is done and best.pt intact: never lose it to this step
            log.warning(f"{self.run.best}: fitting its guidance failed ({e}); the model works without it")
            return None
        log.info(
            f"{self.run.best}: tags guidance and confidence fitted on {report['train_photos']} training and "
            f"{report['val_photos']} validation photos (`captioner calibrate` refits them for other settings)"
        )
        return report
