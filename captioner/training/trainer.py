"""The Trainer: resolves a run's options once, builds or restores the model, then runs the
epochs — train (every rank), validate (rank 0), log and checkpoint (rank 0) — until the last
epoch or early stopping; exact resume."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Collection
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..bundle import ModelBundle, load_encoder_weights
from ..checkpoint import CheckpointError, load_checkpoint, signals_held
from ..data import CaptionCorpus, CaptionDataset, DataError
from ..device import resolve_device
from ..distributed import Dist, current
from ..encoders import build_encoder
from ..errors import UsageError
from ..features import FeatureCache
from ..metrics import CiderD, meteor_backend, normalize
from ..models import build_model
from ..vocab import SPECIALS, Vocabulary, word_counts
from .batches import item_data, loader, seed_epoch, to_inputs
from .objectives import TrainStep, Update, cross_entropy_epoch, self_critical_epoch
from .optim import amp_dtype, build_optimizer, build_scheduler, stretch_cosine
from .options import ARCHITECTURE, RESUMABLE, TrainOptions, canonical_metric, chosen_fields, refuse_clashes
from .run_folder import RunFolder
from .validation import AboveCut, val_scores

log = logging.getLogger("captioner")


class TrainingInterrupted(Exception):
    """Training stopped by Ctrl-C / SIGTERM after saving RUN/interrupted.pt; the message says where."""


def training_vocabulary(train: CaptionCorpus, min_count: int) -> Vocabulary:
    """The words of the training captions; refuses a vocabulary with no words (nothing to learn)."""
    counts = word_counts(c for caps in train.captions for c in caps)
    vocab = Vocabulary.from_counts(counts, min_count)
    if len(vocab) == len(SPECIALS):
        if not counts:
            raise DataError(f"{train.source}: the training captions hold no words (only punctuation or symbols?)")
        raise UsageError(
            f"--min-word-count {min_count} leaves no words: the most frequent word of "
            f"{train.source} occurs {max(counts.values())} time(s)"
        )
    return vocab


class Trainer:
    """Owns one run folder (see run_folder.py): best.pt follows `select_metric` (with no val set:
    the latest epoch).

    resume=True continues RUN/last.pt with the run's own settings: options in `given` (the CLI's
    flags; by default, those of `opts` that differ from the defaults) other than RESUMABLE ones
    must agree with the run, and the training and val data must be the same.

    Under torchrun (a `Dist` of several processes) every process trains on its shard of each
    epoch with DistributedDataParallel; rank 0 alone validates, logs and writes checkpoints, and
    hands the epoch's record to the others so that LR schedules and early stopping agree.
    """

    def __init__(
        self,
        train: CaptionCorpus,
        val: CaptionCorpus | None,
        out_dir: str | Path,
        opts: TrainOptions | None = None,
        device: str = "auto",
        resume: bool = False,
        quiet: bool = False,
        use_cache: bool = True,
        cache_dir: str | Path | None = None,
        skip_bad: bool = False,
        dist: Dist | None = None,
        compile: bool = False,
        overwrite: bool = False,
        given: Collection[str] | None = None,
        cached_trunk: bool = True,
    ) -> None:
        self.out = Path(out_dir)
        self.cached_trunk = cached_trunk  # False: fine-tuning runs the whole encoder every step (for comparison)
        self.run = RunFolder(self.out)
        self.skip_bad = skip_bad  # leave out images that cannot be read instead of refusing to train
        self.use_cache, self.cache_dir = use_cache, cache_dir
        self.dist = dist or current(resolve_device(device))  # a process group set up by the caller is used
        self.device = self.dist.device
        self.quiet = quiet or not self.dist.is_main  # one display per job: rank 0's
        if self.dist.is_main:
            self.run.create()
        self._stale = [] if resume else self.dist.on_main(lambda: self.run.claim(overwrite))
        ckpt, init, self.opts = self._resolve(opts, given, resume, train, val)
        self._check_inputs(train, val)
        torch.manual_seed(self.opts.seed)  # the same initial weights on every rank (DDP checks them, too)
        random.seed(self.opts.seed)
        self._build(ckpt or init, train)
        self.start_epoch = self.epochs_done = 0
        self.finished: str | None = None  # why a resumed run has nothing left to do
        self.best_score = -math.inf if self.higher_is_better else math.inf
        self.bad_epochs = 0  # epochs since the selection metric last improved
        if init:
            load_encoder_weights(self.model.encoder, init)
            self.model.decoder.load_state_dict(init["decoder"])
        if ckpt:
            self._restore(ckpt)
        if self.dist.is_main and resume:
            self.run.trim(self.start_epoch)  # lines a crash wrote past the checkpoint
        if not self.finished:  # (with nothing left to do, fit() needs no features)
            self._prepare(train, val, compile)

    # ---- options: resolved once ------------------------------------------------------------------
    def _resolve(
        self,
        opts: TrainOptions | None,
        given: Collection[str] | None,
        resume: bool,
        train: CaptionCorpus,
        val: CaptionCorpus | None,
    ) -> tuple[dict | None, dict | None, TrainOptions]:
        """(checkpoint to resume, checkpoint to start from, the run's options, checked)."""
        given = set(given) & set(TrainOptions.__dataclass_fields__) if given is not None else chosen_fields(opts)
        ckpt = init = None
        if resume:  # rank 0 reads it and hands it to every rank: all resume from the same bytes
            ckpt = self.dist.on_main(self.run.load_last)
            saved = TrainOptions(**ckpt["config"]["train"])
            if opts is not None:
                refuse_clashes(
                    saved,
                    opts,
                    given - set(RESUMABLE),
                    f"{self.out}: --resume continues the run with its own settings",
                    f"or start a new run from its weights with --init-from {self.run.last}",
                )
                saved = replace(saved, **{k: getattr(opts, k) for k in RESUMABLE if k in given})
            self._check_same_data(ckpt.get("data") or {}, train, val)
            opts = self._keep_global_batch(saved)
        opts = replace(opts or TrainOptions(), world_size=self.dist.world_size)
        if opts.init_from and not ckpt:
            init = self.dist.on_main(lambda: load_checkpoint(opts.init_from, map_location="cpu"))
            saved = TrainOptions(**init["config"]["train"])
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
        opts.check()
        if opts.temporal == "auto":  # resolved once; the checkpoint keeps the resolved value
            opts = replace(opts, temporal="gru" if train.frames is not None else "none")
        return ckpt, init, opts

    def _check_inputs(self, train: CaptionCorpus, val: CaptionCorpus | None) -> None:
        """Refuse data and option combinations that cannot train; decide what best.pt follows."""
        opts = self.opts
        self.data = {"train": train.fingerprint(), "val": val.fingerprint() if val is not None else None}
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
        self.has_val = val is not None and len(val) > 0
        self.select = canonical_metric(opts.select_metric) if self.has_val else "train_loss"
        self.higher_is_better = self.select not in ("val_loss", "train_loss")
        if self.select == "METEOR" and meteor_backend() == "unavailable":
            raise UsageError("--select-metric METEOR, but no METEOR is available here (see README: Metrics)")

    # ---- the model and its optimisation ------------------------------------------------------------
    def _build(self, source: dict | None, train: CaptionCorpus) -> None:
        """The model (vocabulary from `source` when starting from a checkpoint, else from the
        training captions), its optimizer, LR schedule, AMP scaler and update step."""
        opts = self.opts
        vocab = Vocabulary.from_dict(source["vocab"]) if source else training_vocabulary(train, opts.min_word_count)
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
        self.cut = encoder.cut(opts.fine_tune_encoder) if self.cached_trunk else None
        self.model = ModelBundle(encoder, decoder, vocab, config, self.device)
        groups = [{"params": list(decoder.parameters())}]
        if encoder_params:
            groups.append({"params": encoder_params, "lr": opts.encoder_lr})
        self.optim = build_optimizer(opts, groups)
        self.amp = amp_dtype(opts.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.sched = build_scheduler(opts, self.optim, "max" if self.higher_is_better else "min")
        self.update = Update(self.optim, self.scaler, opts.grad_clip, self.run.last)

    def _prepare(self, train: CaptionCorpus, val: CaptionCorpus | None, compile: bool) -> None:
        """Features (each process fills the cache; the first to take its lock extracts, the others
        wait on the lock, not on a collective, so a long extraction cannot time out, and read),
        the trainable step, --compile, and DDP around the step."""
        self.train_data = self._data(train, "train features", mirror=self.opts.flip)
        self.cider: CiderD | None = None  # self-critical reward over the training references, built on first use
        self.val_data = self._data(val, "val features") if self.has_val and self.dist.is_main else None
        encoder = self.model.encoder
        self.core = TrainStep(encoder if encoder.trainable else None, self.model.decoder, self.cut or 0)
        if compile:
            self._compile()
        self.wrapped: nn.Module = self.core
        if self.dist.enabled:
            self.wrapped = DistributedDataParallel(
                self.core, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )

    def _check_same_data(self, saved: dict, train: CaptionCorpus, val: CaptionCorpus | None) -> None:
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
                f"{self.out}: --resume needs the run's own {name} data, {had}, but got {got}: its "
                f"vocabulary and {'data order' if name == 'training' else 'best score'} belong to "
                f"that data. To train on other data, start a new run from its weights with "
                f"--init-from {self.run.last}"
            )

    def _keep_global_batch(self, saved: TrainOptions) -> TrainOptions:
        """A run resumed on another number of processes keeps its global batch, and with it the
        learning rate it was tuned for and the data order: the per-process batch changes instead."""
        world = self.dist.world_size
        if saved.world_size == world:
            return saved
        total = saved.batch_size * saved.world_size
        per = max(1, round(total / world))
        if not self.quiet:
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

    def _restore(self, ckpt: dict[str, Any]) -> None:
        """Weights, optimizer, schedule, scaler and the run's progress from RUN/last.pt."""
        load_encoder_weights(self.model.encoder, ckpt)
        self.model.decoder.load_state_dict(ckpt["decoder"])
        self.optim.load_state_dict(ckpt["optimizer"])
        if isinstance(self.sched, torch.optim.lr_scheduler.LambdaLR) and "lr_lambdas" not in ckpt["scheduler"]:
            self.sched.last_epoch = ckpt["scheduler"]["last_epoch"]  # a cosine run saved by an older version
        else:
            self.sched.load_state_dict(ckpt["scheduler"])
        stretch_cosine(self.sched, self.optim, self.opts.epochs, ckpt["epoch"])
        self.scaler.load_state_dict(ckpt.get("scaler") or {})
        self.start_epoch = self.epochs_done = ckpt["epoch"]
        self.best_score, self.bad_epochs = ckpt["best_score"], ckpt["bad_epochs"]
        self.finished = self._nothing_left(ckpt["epoch"])

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
        if opts.patience and self.bad_epochs >= opts.patience:
            return (
                f"nothing left to do: {self.out} stopped early after epoch {done} ({self.select} had not "
                f"improved for {self.bad_epochs} epochs; a larger --patience goes on)"
            )
        return None

    def _compile(self) -> None:
        """--compile: torch.compile the decoder's per-word step and a fine-tuned encoder, in place
        (state_dict keys unchanged, so checkpoints do not care)."""
        done = []
        if self.model.decoder.compile_step():
            done.append("the decoder step")
        if self.core.encoder is not None and self.cut is not None:  # only the blocks above the cut run
            for layer in self.core.encoder.trunk[self.cut :]:
                layer.compile()
            done.append("the fine-tuned encoder blocks")
        elif self.core.encoder is not None:
            self.core.encoder.compile()
            done.append("the encoder")
        if not self.quiet:
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
        return item_data(
            self.model, corpus, self.opts, self.device, cache, self.skip_bad, self.quiet, desc, self.cut, mirror
        )

    def _loader(self, dataset: CaptionDataset, train: bool, epoch: int = 0) -> DataLoader:
        return loader(dataset, self.opts, self.dist, self.device, train, epoch)

    # ---- the loop ----------------------------------------------------------------------------------
    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)

    def _run_epoch(self, data, train: bool, desc: str, epoch: int = 0) -> float:
        """Cross-entropy over a dataset: a training epoch (every rank, through DDP) or the val loss
        (rank 0 alone: no DDP)."""
        dataset, feats = data
        self.model.decoder.train(train)
        return cross_entropy_epoch(
            self.wrapped if train else self.core,
            self._loader(dataset, train, epoch),
            lambda batch: to_inputs(batch, feats, self.device),
            self.device,
            self.dist,
            self.update if train else None,
            self._autocast,
            desc,
            self.quiet,
        )

    def _run_self_critical_epoch(self, desc: str, epoch: int = 0) -> tuple[float, float]:
        dataset, feats = self.train_data
        if self.cider is None:
            self.cider = CiderD({i: [normalize(c) for c in caps] for i, caps in enumerate(dataset.corpus.captions)})
        self.model.decoder.train()
        opts = self.opts
        return self_critical_epoch(
            self.wrapped,
            feats,
            self.cider,
            self.model.vocab,
            opts.scst_samples,
            opts.scst_max_len,
            opts.batch_size,
            opts.seed,
            epoch,
            self.device,
            self.dist,
            self.update,
            self._autocast,
            desc,
            self.quiet,
        )

    def _validate(self) -> dict[str, Any]:
        val_loss = self._run_epoch(self.val_data, False, "val")
        dataset, feats = self.val_data
        if self.cut is not None:  # a cached trunk: the fine-tuned blocks turn it into the decoder's input
            feats = AboveCut(feats, self.model, self.cut)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))} | val_scores(
            self.model, dataset.corpus, feats, self.opts.val_beam_size
        )

    def _better(self, score: float) -> bool:
        return score > self.best_score if self.higher_is_better else score < self.best_score

    def fit(self) -> Path:
        """Train to `opts.epochs` or until early stopping; returns the path of best.pt.

        Interrupted (Ctrl-C, or SIGTERM through the CLI), it writes RUN/interrupted.pt, the
        weights of the moment (usable for captioning), and raises TrainingInterrupted; last.pt
        stays the end of the last whole epoch, which is where --resume continues.
        """
        if self.finished:
            return self.run.best
        if self._stale and self.dist.is_main:
            self.run.clear(self._stale)
        epoch = self.start_epoch
        try:
            for epoch in range(self.start_epoch, self.opts.epochs):
                self._fit_epoch(epoch)
                if self.opts.patience and self.bad_epochs >= self.opts.patience:
                    if not self.quiet:
                        log.info(f"early stop: {self.select} has not improved for {self.bad_epochs} epochs")
                    break
        except KeyboardInterrupt:
            done = max(epoch, self.epochs_done)  # the signal may have waited for the epoch's checkpoints
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
                f"(already at epoch {self.start_epoch} of {self.opts.epochs}?)"
            )
        return self.run.best

    def _fit_epoch(self, epoch: int) -> None:
        """One epoch: train (every rank), validate (rank 0; the record goes to every rank), log and
        checkpoint (rank 0)."""
        t0 = time.time()
        seed_epoch(self.opts.seed, epoch, self.dist.rank)
        lr = self.optim.param_groups[0]["lr"]
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
        if self.has_val:
            record |= self.dist.on_main(self._validate)
        score = record[self.select]
        if score is None:  # e.g. METEOR unavailable: cannot happen for the chosen metric (checked above)
            raise ValueError(f"validation produced no {self.select}")
        improved = not self.has_val or self._better(score)
        if improved:
            self.best_score, self.bad_epochs = score, 0
        else:
            self.bad_epochs += 1
        if isinstance(self.sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.sched.step(score)
        else:
            self.sched.step()
        record |= {"best": improved, "time_s": round(time.time() - t0, 2)}
        self.dist.on_main(lambda: self._log_and_save(record, improved))

    def _log_and_save(self, record: dict[str, Any], improved: bool) -> None:
        payload = self.model.checkpoint_payload() | {
            "optimizer": self.optim.state_dict(),
            "scheduler": self.sched.state_dict(),
            "epoch": record["epoch"],
            "scaler": self.scaler.state_dict(),
            "best_score": self.best_score,
            "bad_epochs": self.bad_epochs,
            "select_metric": self.select,
            "data": self.data,
        }
        with signals_held():  # Ctrl-C waits until the log line, last.pt and best.pt are written
            self.run.record(record, payload, improved)
            self.epochs_done = record["epoch"]
        if not self.quiet:
            shown = " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in record.items()
                if k not in ("best", "METEOR_backend")
            )
            log.info(shown + (f" * best {self.select}" if improved else ""))
