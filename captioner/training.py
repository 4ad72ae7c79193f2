"""Training loop: teacher forcing + BPTT; per-epoch validation (loss, and the COCO caption metrics
of captions decoded from the val images); best.pt by a chosen metric; early stopping; exact resume."""
from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from .bundle import ModelBundle
from .checkpoint import CheckpointError, atomic_write, load_checkpoint, save_checkpoint, signals_held
from .data import Batch, CaptionCorpus, CaptionDataset, DataError, collate
from .decoding import sample
from .device import resolve_device
from .distributed import Dist, current
from .encoders import Encoder, build_encoder
from .errors import TrainingDiverged, UsageError
from .evaluation import caption_corpus, caption_features, references
from .features import FeatureCache, ItemFeatures, LoadImage, corpus_features, pool
from .metrics import METRICS, CiderD, diversity, evaluate, meteor_backend, normalize
from .models import CaptionModel, Frames, LossTerms, build_model
from .paths import check_output_dir
from .vocab import SPECIALS, Vocabulary, word_counts


@dataclass
class TrainOptions:
    """Everything that defines a run; stored (as JSON) in every checkpoint it writes."""

    encoder: str = "efficientnet_lite0"
    decoder: str = "attention"  # measured better on Flickr8k val (CIDEr-D .51 vs .39) and on sequences
    embed_size: int = 256
    hidden_size: int = 512
    num_layers: int = 1
    dropout: float = 0.5
    attention_size: int = 512  # attention decoder only
    alpha_c: float = 1.0  # attention decoder: weight of the doubly stochastic attention penalty
    min_word_count: int = 5
    max_caption_len: int = 30
    epochs: int = 10
    batch_size: int = 64  # per process: the global batch is batch_size x world_size
    lr: float = 4e-4
    optimizer: str = "adam"  # adam | sgd | momentum
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "plateau"  # plateau | constant | step | cosine
    lr_step_epochs: int = 3  # step: decay every N epochs
    lr_patience: int = 2  # plateau: decay after this many epochs without improvement
    lr_gamma: float = 0.8  # step / plateau: decay factor
    grad_clip: float = 5.0
    fine_tune_encoder: int = 0  # last N encoder blocks to train (0: frozen)
    encoder_lr: float = 1e-4
    seed: int = 0
    num_workers: int = 1
    amp: str = "auto"  # mixed precision: auto (bf16 on CUDA, off on CPU) | off | bf16 | fp16
    select_metric: str = "CIDEr-D"  # what best.pt, early stopping and plateau decay follow
    patience: int = 0  # stop after this many epochs without improvement (0: never)
    val_beam_size: int = 1  # 1: greedy
    temporal: str = "auto"  # sequences: gru | lstm over frames, none (mean frame: order-blind); auto: gru
    temporal_size: int = 512  # hidden size of the temporal RNN
    keypoints: int = 16  # per-frame soft keypoints (where things are) fed to the temporal RNN
    tbptt: int = 0  # truncated BPTT over frames: back-propagate through at most K frames (0: all)
    init_from: str = ""  # start from this checkpoint's weights, vocabulary and architecture
    self_critical: bool = False  # train on sampled captions with a CIDEr-D reward (Rennie et al. 2017)
    scst_samples: int = 5  # captions sampled per image; each one's baseline is the mean reward of the others
    scst_max_len: int = 16  # most words per sampled caption
    world_size: int = 1  # processes the run trains on (set by the trainer; see Trainer._keep_global_batch)

    def check(self) -> None:
        """Refuse settings that cannot train, naming the flag (UsageError): nonsense is never
        quietly turned into something else."""
        for name, low in _AT_LEAST.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise UsageError(f"{_flag(name)} must be a whole number >= {low}, not {v!r}")
        for name, (low, high, closed) in _WITHIN.items():
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and low <= v <= high
            if not ok or (v == low and "low" not in closed) or (v == high and "high" not in closed):
                span = f"{'[' if 'low' in closed else '('}{low:g}, {high:g}{']' if 'high' in closed else ')'}"
                raise UsageError(f"{_flag(name)} must be a number in {span}, not {v!r}")
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise UsageError(f"{_flag(name)} {getattr(self, name)!r} is not one of: {', '.join(allowed)}")
        canonical_metric(self.select_metric)
        if self.self_critical and self.scst_samples < 2:
            raise UsageError("--self-critical needs --scst-samples >= 2 (each sample's baseline is the others' mean)")

    def temporal_config(self) -> dict[str, Any] | None:
        """The checkpoint's "temporal" entry (None: a single-image decoder); `temporal` resolved."""
        if self.temporal == "none":
            return None
        return {"kind": self.temporal, "hidden_size": self.temporal_size, "keypoints": self.keypoints,
                "dropout": self.dropout, "tbptt": self.tbptt}

    def decoder_hparams(self) -> dict[str, Any]:
        hp = {"embed_size": self.embed_size, "hidden_size": self.hidden_size, "num_layers": self.num_layers,
              "dropout": self.dropout}
        if self.decoder == "attention":
            hp |= {"attention_size": self.attention_size, "alpha_c": self.alpha_c}
        return hp


#: TrainOptions fields that no flag sets: the trainer fills them in
CLI_UNSET = ("world_size",)

#: what `TrainOptions.check` accepts: whole numbers from a minimum, numbers in a range, choices
_AT_LEAST = {"epochs": 1, "batch_size": 1, "embed_size": 1, "hidden_size": 1, "num_layers": 1, "attention_size": 1,
             "min_word_count": 1, "max_caption_len": 1, "lr_step_epochs": 1, "lr_patience": 0, "fine_tune_encoder": 0,
             "seed": 0, "num_workers": 0, "patience": 0, "val_beam_size": 1, "temporal_size": 1, "keypoints": 1,
             "tbptt": 0, "scst_samples": 1, "scst_max_len": 1, "world_size": 1}
_INF = math.inf
_WITHIN = {"lr": (0, _INF, "high"), "encoder_lr": (0, _INF, "high"), "grad_clip": (0, _INF, "high"),
           "dropout": (0, 1, "low"), "momentum": (0, 1, "low"), "weight_decay": (0, _INF, "low high"),
           "lr_gamma": (0, 1, "high"), "alpha_c": (0, _INF, "low high")}
_CHOICES = {"decoder": ("attention", "lstm"), "optimizer": ("adam", "sgd", "momentum"),
            "lr_schedule": ("plateau", "constant", "step", "cosine"), "amp": ("auto", "off", "bf16", "fp16"),
            "temporal": ("auto", "gru", "lstm", "none")}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")

#: what a run started with --init-from takes from that checkpoint's options (shapes, vocabulary)
ARCHITECTURE = ("encoder", "decoder", "embed_size", "hidden_size", "num_layers", "dropout", "attention_size",
                "alpha_c", "temporal", "temporal_size", "keypoints", "min_word_count", "max_caption_len")


def _optimizer(opts: TrainOptions, groups: list[dict]) -> torch.optim.Optimizer:
    if opts.optimizer == "adam":
        return torch.optim.Adam(groups, lr=opts.lr, weight_decay=opts.weight_decay)
    if opts.optimizer in ("sgd", "momentum"):
        momentum = opts.momentum if opts.optimizer == "momentum" else 0.0
        return torch.optim.SGD(groups, lr=opts.lr, momentum=momentum, weight_decay=opts.weight_decay)
    raise UsageError(f"unknown optimizer {opts.optimizer!r}: adam, sgd or momentum")


_METRIC_NAMES = {"bleu1": "BLEU-1", "bleu2": "BLEU-2", "bleu3": "BLEU-3", "bleu4": "BLEU-4", "meteor": "METEOR",
                 "rougel": "ROUGE-L", "cider": "CIDEr-D", "ciderd": "CIDEr-D", "valloss": "val_loss"}


def canonical_metric(name: str) -> str:
    """'cider', 'CIDEr-D', 'bleu4', 'BLEU-4', 'val_loss', ... -> the key used in metrics.jsonl."""
    key = "".join(ch for ch in name.lower() if ch.isalnum())
    if key not in _METRIC_NAMES:
        raise UsageError(f"unknown metric {name!r}: choose from {', '.join(sorted(set(_METRIC_NAMES.values())))}")
    return _METRIC_NAMES[key]


def _training_vocabulary(train: CaptionCorpus, min_count: int) -> Vocabulary:
    """The words of the training captions; refuses a vocabulary with no words (nothing to learn)."""
    counts = word_counts(c for caps in train.captions for c in caps)
    vocab = Vocabulary.from_counts(counts, min_count)
    if len(vocab) == len(SPECIALS):
        if not counts:
            raise DataError(f"{train.source}: the training captions hold no words (only punctuation or symbols?)")
        raise UsageError(f"--min-word-count {min_count} leaves no words: the most frequent word of "
                         f"{train.source} occurs {max(counts.values())} time(s)")
    return vocab


class CosineFactor:
    """The cosine schedule's LR factor at an epoch, 1 -> 0 over `epochs` (then 0, never rising again).
    A callable object rather than a function so that LambdaLR keeps it in its state_dict; a
    resume with more epochs sets `epochs`, and the rest of the run follows the longer curve."""

    def __init__(self, epochs: int) -> None:
        self.epochs = max(1, epochs)

    def __call__(self, epoch: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(epoch, self.epochs) / self.epochs))


def _scheduler(opts: TrainOptions, optim: torch.optim.Optimizer, mode: str):
    if opts.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optim, mode=mode, factor=opts.lr_gamma,
                                                          patience=opts.lr_patience, eps=0.0)
    if opts.lr_schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optim, lambda epoch: 1.0)
    if opts.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optim, step_size=opts.lr_step_epochs, gamma=opts.lr_gamma)
    if opts.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optim, CosineFactor(opts.epochs))
    raise UsageError(f"unknown lr schedule {opts.lr_schedule!r}: plateau, constant, step or cosine")


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for --amp on this device, or None for full fp32."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if amp in ("off", "none"):
        return None
    if amp in ("bf16", "fp16"):
        return torch.bfloat16 if amp == "bf16" else torch.float16
    raise UsageError(f"unknown --amp {amp!r}: auto, off, bf16 or fp16")


class TrainStep(nn.Module):
    """The trainable modules and the one forward that uses them. This is what DistributedDataParallel
    wraps: DDP averages the gradients of whatever ran through its forward, so teacher forcing and
    self-critical sampling both go through here."""

    def __init__(self, encoder: Encoder | None, decoder: CaptionModel) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder  # encoder: only when it is being fine-tuned

    def forward(self, inputs: Tensor | Frames, captions: Tensor | None = None, lengths: Tensor | None = None,
                samples: int = 0, max_len: int = 0) -> LossTerms | tuple[Tensor, Tensor, Tensor]:
        """inputs: features (B, ...) or, when fine-tuning, pixels (B, 3, S, S). Teacher forcing on
        captions (B, T) -> LossTerms; samples > 0 -> `decoding.sample` (tokens, log-probs, mask),
        never drawing <unk> (inference never prints it either)."""
        features = inputs if self.encoder is None else pool(self.encoder(inputs), self.decoder.feature_kind)
        if samples:
            return sample(self.decoder, features, n=samples, max_len=max_len, suppress=[Vocabulary.unk_id])
        return self.decoder(features, captions, lengths)


def scst_rewards(cider: CiderD, images: list[int], tokens: Tensor, vocab: Vocabulary) -> Tensor:
    """Self-critical reward of each sampled caption (N, T) of images[i]: its CIDEr-D against that
    image's references, or 0 when it was cut at the length limit without <end> (an unfinished
    sentence is not a caption: rewarding it like one teaches the model to run on)."""
    ended = (tokens == Vocabulary.end_id).any(dim=1).tolist()  # (N,)
    return torch.tensor([cider.score(i, normalize(vocab.decode(t))) if done else 0.0
                         for i, t, done in zip(images, tokens.tolist(), ended)])  # (N,)


class RunFolderError(CheckpointError):
    """--out names a folder that already holds a run, and neither --resume nor --overwrite was given."""


class TrainingInterrupted(Exception):
    """Training stopped by Ctrl-C / SIGTERM after saving RUN/interrupted.pt; the message says where."""


#: what --resume may change: how far to go, when to stop early, how many processes read images
RESUMABLE = ("epochs", "patience", "num_workers")


def _set_fields(opts: TrainOptions | None) -> set[str]:
    """The options a caller chose: those that differ from the defaults (the CLI passes the flags given)."""
    if opts is None:
        return set()
    default = TrainOptions()
    return {k for k in asdict(opts) if getattr(opts, k) != getattr(default, k)}


def _refuse_clashes(saved: TrainOptions, opts: TrainOptions, names: set[str], what: str, alternative: str) -> None:
    """UsageError listing the chosen options that differ from `saved`: never silently dropped."""
    clashes = [f"{_flag(k)} {getattr(opts, k)} (it has {getattr(saved, k)})" for k in sorted(names)
               if getattr(opts, k) != getattr(saved, k) and not (k == "temporal" and opts.temporal == "auto")]
    if clashes:
        raise UsageError(f"{what}, and these differ: {'; '.join(clashes)}. Drop them, {alternative}")


class Trainer:
    """Owns one run directory: RUN/last.pt every epoch, RUN/best.pt on the best `select_metric`
    (with no val set: the latest epoch), RUN/metrics.jsonl one line per epoch.

    resume=True continues RUN/last.pt with the run's own settings: options in `given` (the CLI's
    flags; by default, those of `opts` that differ from the defaults) other than RESUMABLE ones
    must agree with the run, and the training and val data must be the same.

    Under torchrun (a `Dist` of several processes) every process trains on its shard of each
    epoch with DistributedDataParallel; rank 0 alone validates, logs and writes checkpoints, and
    hands the epoch's record to the others so that LR schedules and early stopping agree.
    """

    def __init__(self, train: CaptionCorpus, val: CaptionCorpus | None, out_dir: str | Path,
                 opts: TrainOptions | None = None, device: str = "auto", resume: bool = False,
                 quiet: bool = False, use_cache: bool = True, cache_dir: str | Path | None = None,
                 skip_bad: bool = False, dist: Dist | None = None, compile: bool = False,
                 overwrite: bool = False, given: Collection[str] | None = None) -> None:
        self.out = Path(out_dir)
        self.skip_bad = skip_bad  # leave out images that cannot be read instead of refusing to train
        self.use_cache, self.cache_dir = use_cache, cache_dir
        self.dist = dist or current(resolve_device(device))  # a process group set up by the caller is used
        self.device = self.dist.device
        self.quiet = quiet or not self.dist.is_main  # one display per job: rank 0's
        if self.dist.is_main:
            check_output_dir(self.out)  # before any work: a run that cannot save is not started
            self.out.mkdir(parents=True, exist_ok=True)
        # a fresh run refuses a folder holding another run; with --overwrite that run's files go
        # when training starts (fit), not before every option and file has been checked
        self._stale = [] if resume else self.dist.on_main(lambda: self._claim_folder(overwrite))
        ckpt = None
        given = set(given) & set(TrainOptions.__dataclass_fields__) if given is not None else _set_fields(opts)
        if resume:  # rank 0 reads it and hands it to every rank: all resume from the same bytes
            ckpt = self.dist.on_main(lambda: load_checkpoint(self.out / "last.pt", map_location="cpu"))
            saved = TrainOptions(**ckpt["config"]["train"])
            if opts is not None:
                _refuse_clashes(saved, opts, given - set(RESUMABLE), f"{self.out}: --resume continues the run with its "
                                f"own settings", f"or start a new run from its weights with --init-from "
                                f"{self.out / 'last.pt'}")
                saved = replace(saved, **{k: getattr(opts, k) for k in RESUMABLE if k in given})
            self._check_same_data(ckpt.get("data") or {}, train, val)
            opts = self._keep_global_batch(saved)
        self.opts = opts = replace(opts or TrainOptions(), world_size=self.dist.world_size)
        init = None
        if opts.init_from and not ckpt:
            init = self.dist.on_main(lambda: load_checkpoint(opts.init_from, map_location="cpu"))
            saved = TrainOptions(**init["config"]["train"])
            _refuse_clashes(saved, opts, given & set(ARCHITECTURE), f"--init-from {opts.init_from} takes its "
                            "architecture and vocabulary from that checkpoint", "or train a new model without it")
            self.opts = opts = replace(opts, **{k: getattr(saved, k) for k in ARCHITECTURE})
        opts.check()
        self.data = {"train": train.fingerprint(), "val": val.fingerprint() if val is not None else None}
        for corpus in (train, val):
            if corpus is not None and len(corpus) == 0:
                raise DataError(f"{corpus.source}: no captioned images to {'train' if corpus is train else 'validate'} on")
        if opts.temporal == "auto":  # resolved once; the checkpoint keeps the resolved value
            self.opts = opts = replace(opts, temporal="gru" if train.frames is not None else "none")
        if opts.temporal not in ("gru", "lstm", "none"):
            raise UsageError(f"unknown --temporal {opts.temporal!r}: auto, gru, lstm or none")
        if opts.fine_tune_encoder and (train.frames is not None or opts.temporal != "none"):
            raise UsageError("--fine-tune-encoder works for single images only: sequence training reads "
                             "its frames from the feature cache")
        if opts.fine_tune_encoder and opts.self_critical:
            raise UsageError("--self-critical trains the decoder from cached features: drop --fine-tune-encoder")
        self.has_val = val is not None and len(val) > 0
        self.select = canonical_metric(opts.select_metric) if self.has_val else "train_loss"
        self.higher_is_better = self.select not in ("val_loss", "train_loss")
        if self.select == "METEOR" and meteor_backend() == "unavailable":
            raise UsageError("--select-metric METEOR, but no METEOR is available here (see README: Metrics)")
        torch.manual_seed(opts.seed)  # the same initial weights on every rank (DDP checks them, too)
        random.seed(opts.seed)

        source = ckpt or init
        vocab = Vocabulary.from_dict(source["vocab"]) if source else _training_vocabulary(train, opts.min_word_count)
        encoder = build_encoder(opts.encoder)
        config = {"encoder": opts.encoder, "decoder": opts.decoder, "decoder_hparams": opts.decoder_hparams(),
                  "temporal": opts.temporal_config(), "preprocess": encoder.spec.preprocess.to_dict(),
                  "fine_tune_encoder": opts.fine_tune_encoder, "train": asdict(opts)}
        decoder = build_model(config, len(vocab), encoder.feature_dim)
        encoder_params = encoder.unfreeze_last(opts.fine_tune_encoder)
        self.model = ModelBundle(encoder, decoder, vocab, config, self.device)
        groups = [{"params": list(decoder.parameters())}]
        if encoder_params:
            groups.append({"params": encoder_params, "lr": opts.encoder_lr})
        self.optim = _optimizer(opts, groups)
        self.amp = amp_dtype(opts.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.sched = _scheduler(opts, self.optim, "max" if self.higher_is_better else "min")
        self.start_epoch = self.epochs_done = 0
        self.finished: str | None = None  # why a resumed run has nothing left to do
        self.best_score = -math.inf if self.higher_is_better else math.inf
        self.bad_epochs = 0  # epochs since the selection metric last improved
        if init:
            if init.get("encoder") is not None:
                encoder.load_state_dict(init["encoder"])
            decoder.load_state_dict(init["decoder"])
        if ckpt:
            if ckpt.get("encoder") is not None:
                encoder.load_state_dict(ckpt["encoder"])
            decoder.load_state_dict(ckpt["decoder"])
            self.optim.load_state_dict(ckpt["optimizer"])
            if isinstance(self.sched, torch.optim.lr_scheduler.LambdaLR) and "lr_lambdas" not in ckpt["scheduler"]:
                self.sched.last_epoch = ckpt["scheduler"]["last_epoch"]  # a cosine run saved by an older version
            else:
                self.sched.load_state_dict(ckpt["scheduler"])
            self._stretch_cosine(ckpt["epoch"])
            self.scaler.load_state_dict(ckpt.get("scaler") or {})
            self.start_epoch = self.epochs_done = ckpt["epoch"]
            self.best_score, self.bad_epochs = ckpt["best_score"], ckpt["bad_epochs"]
            self.finished = self._nothing_left(ckpt["epoch"])
        if self.dist.is_main and resume:
            self._trim_metrics(self.start_epoch)  # lines a crash wrote past the checkpoint
        if self.finished:
            return  # no features to extract: fit() has nothing to do
        # features: each process fills the cache; the first to take its lock extracts, the others
        # wait on the lock (not on a collective, so a long extraction cannot time out) and read
        self.train_data = self._dataset(train, "train features")
        self.cider: CiderD | None = None  # self-critical reward over the training references, built on first use
        self.val_data = self._dataset(val, "val features") if self.has_val and self.dist.is_main else None
        self.core = TrainStep(encoder if encoder.trainable else None, decoder)
        if compile:
            self._compile()
        self.wrapped: nn.Module = self.core
        if self.dist.enabled:
            self.wrapped = DistributedDataParallel(
                self.core, device_ids=[self.device.index] if self.device.type == "cuda" else None)

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
            raise UsageError(f"{self.out}: --resume needs the run's own {name} data, {had}, but got {got}: its "
                             f"vocabulary and {'data order' if name == 'training' else 'best score'} belong to "
                             f"that data. To train on other data, start a new run from its weights with "
                             f"--init-from {self.out / 'last.pt'}")

    def _nothing_left(self, done: int) -> str | None:
        """Why a resumed run has nothing to train (None: it goes on); asking for fewer epochs than
        were trained is a mistake, not a no-op."""
        opts = self.opts
        if opts.epochs < done:
            raise UsageError(f"{self.out}: has trained {done} epochs already, more than --epochs {opts.epochs}: "
                             f"give --epochs above {done} to train further")
        if opts.epochs == done:
            return f"nothing left to do: {self.out} has trained all {done} epochs (give --epochs above {done} to go on)"
        if opts.patience and self.bad_epochs >= opts.patience:
            return (f"nothing left to do: {self.out} stopped early after epoch {done} ({self.select} had not "
                    f"improved for {self.bad_epochs} epochs; a larger --patience goes on)")
        return None

    def _keep_global_batch(self, saved: TrainOptions) -> TrainOptions:
        """A run resumed on another number of processes keeps its global batch, and with it the
        learning rate it was tuned for and the data order: the per-process batch changes instead."""
        world = self.dist.world_size
        if saved.world_size == world:
            return saved
        total = saved.batch_size * saved.world_size
        per = max(1, round(total / world))
        if not self.quiet:
            kept = f"global batch {total} kept" if per * world == total else \
                f"global batch {total} -> {per * world}: {total} is not a multiple of {world}"
            print(f"resuming a {saved.world_size}-process run on {world} process(es): per-process batch "
                  f"{saved.batch_size} -> {per} ({kept})", file=sys.stderr, flush=True)
        return replace(saved, batch_size=per, world_size=world)

    def _compile(self) -> None:
        """--compile: torch.compile the decoder's per-word step and a fine-tuned encoder, in place
        (state_dict keys unchanged, so checkpoints do not care)."""
        done = []
        if self.model.decoder.compile_step():
            done.append("the decoder step")
        if self.core.encoder is not None:
            self.core.encoder.compile()
            done.append("the encoder")
        if not self.quiet:
            print("--compile: " + (" and ".join(done) + " compiled (the first batches compile; later ones reuse it)"
                                   if done else f"nothing to compile for the {self.opts.decoder} decoder with a frozen "
                                   "encoder (its LSTM is already one fused kernel)"), file=sys.stderr, flush=True)

    RUN_FILES = ("last.pt", "best.pt", "interrupted.pt", "metrics.jsonl")

    def _claim_folder(self, overwrite: bool) -> list[str]:
        """A fresh run does not start in a folder that holds another run's checkpoints: they would
        mix (a first epoch interrupted here, then --resume, would continue the other run).
        Returns the files --overwrite will delete."""
        held = [name for name in self.RUN_FILES if (self.out / name).exists()]
        if held and not overwrite:
            raise RunFolderError(f"{self.out} holds a run ({', '.join(held)}): --resume continues it, "
                                 "--overwrite starts afresh in it (deleting those files), or choose another --out")
        return held

    def _stretch_cosine(self, epoch: int) -> None:
        """On a resume with another --epochs, the cosine schedule runs over the new horizon: the
        coming epochs get the LR the longer (or shorter) schedule gives them."""
        if not isinstance(self.sched, torch.optim.lr_scheduler.LambdaLR):
            return
        for group, base, factor in zip(self.optim.param_groups, self.sched.base_lrs, self.sched.lr_lambdas):
            if isinstance(factor, CosineFactor) and factor.epochs != max(1, self.opts.epochs):
                factor.epochs = max(1, self.opts.epochs)
                group["lr"] = base * factor(epoch)

    # ---- data ----------------------------------------------------------------------------------
    def _dataset(self, corpus: CaptionCorpus, desc: str) -> tuple[CaptionDataset, ItemFeatures | None]:
        """Frozen encoder: features computed once (cached on disk unless --no-cache), items are
        image or sequence indices. Fine-tuning: items carry pixels and the encoder runs every step."""
        vocab, opts, encoder = self.model.vocab, self.opts, self.model.encoder
        if encoder.trainable:
            return CaptionDataset(corpus, vocab, opts.max_caption_len, LoadImage(self.model.preprocess)), None
        cache = FeatureCache(encoder, self.cache_dir, self.device) if self.use_cache else None
        feats, kept, failed = corpus_features(encoder, self.model.decoder, corpus, cache, device=self.device,
                                              num_workers=opts.num_workers, quiet=self.quiet, desc=desc)
        if failed:
            shown = "; ".join(str(e) for e in failed[:3])
            if not self.skip_bad:
                raise DataError(f"{corpus.source}: {len(failed)} image(s) could not be read: {shown} "
                                "(use --skip-bad to leave them out)")
            if not self.quiet:
                print(f"{corpus.source}: left out {len(corpus) - len(kept)} item(s) with unreadable images: {shown}",
                      file=sys.stderr, flush=True)
            corpus = corpus.keep(kept)  # the features were gathered for these items, in this order
        return CaptionDataset(corpus, vocab, opts.max_caption_len), feats

    def _inputs(self, batch: Batch, feats: ItemFeatures | None) -> Tensor | Frames:
        """What TrainStep takes: cached features, or (fine-tuning) the pixels, on the device."""
        if feats is not None:
            f = feats[batch.images]  # (B, ...)
            if self.device.type == "cuda":
                f = f.pin_memory()  # so the copy below overlaps with compute
            return f.to(self.device, non_blocking=True).float()
        return batch.images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)

    def _loader(self, dataset: CaptionDataset, train: bool, epoch: int = 0) -> DataLoader:
        """Training: this rank's shard of the epoch's shuffle, which depends on (seed, epoch) only,
        so N ranks with batch B see, step by step, exactly the batches of one rank with batch N*B."""
        workers = self.opts.num_workers if dataset.load_pixels is not None else 0
        sampler = None
        if train:
            sampler = DistributedSampler(dataset, num_replicas=self.dist.world_size, rank=self.dist.rank,
                                         shuffle=True, seed=self.opts.seed)
            sampler.set_epoch(epoch)
        return DataLoader(dataset, batch_size=self.opts.batch_size, sampler=sampler, collate_fn=collate,
                          num_workers=workers, pin_memory=self.device.type == "cuda",
                          persistent_workers=workers > 0)

    def _seed(self, epoch: int) -> None:
        """Each epoch's random stream (dropout, sampling) comes from (seed, epoch, rank), so a resume
        on any number of processes continues without saved RNG state and ranks draw different masks."""
        torch_seed, py_seed = np.random.SeedSequence([self.opts.seed, epoch, self.dist.rank]).generate_state(2)
        torch.manual_seed(int(torch_seed))
        random.seed(int(py_seed))

    # ---- loop ----------------------------------------------------------------------------------
    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)

    def _run_epoch(self, data: tuple[CaptionDataset, ItemFeatures | None], train: bool, desc: str,
                   epoch: int = 0) -> float:
        """The loss over the whole set (all ranks' shards when training): per-token NLL + the mean
        regulariser, each averaged over everything, so it is the same for any number of ranks."""
        dataset, feats = data
        self.model.decoder.train(train)
        step = self.wrapped if train else self.core  # validation runs on rank 0 alone: no DDP
        nll, tokens, reg, items = 0.0, 0, 0.0, 0
        bar = tqdm(self._loader(dataset, train, epoch), desc=desc, unit="batch", disable=self.quiet, leave=False)
        for batch in bar:
            with torch.set_grad_enabled(train), self._autocast():
                terms = step(self._inputs(batch, feats), batch.captions.to(self.device), batch.lengths)
            if train:  # normalised by the global batch's tokens; DDP's gradient average undoes the x world
                global_tokens = self.dist.sum([terms.tokens])[0]
                self._step(terms.nll_sum * (self.dist.world_size / global_tokens) + terms.reg)
            nll, tokens = nll + terms.nll_sum.item(), tokens + terms.tokens
            reg, items = reg + terms.reg.item() * len(batch.lengths), items + len(batch.lengths)
            bar.set_postfix(loss=f"{nll / max(tokens, 1) + reg / max(items, 1):.3f}")
        if train:
            nll, tokens, reg, items = self.dist.sum([nll, tokens, reg, items])
        return nll / max(tokens, 1) + reg / max(items, 1)

    def _step(self, loss: Tensor) -> None:
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"non-finite training loss ({loss.item()}); stopping "
                                     f"(last good checkpoint: {self.out / 'last.pt'})")
        self.optim.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # the scaler is a no-op unless --amp fp16; DDP all-reduces here
        self.scaler.unscale_(self.optim)
        params = [p for g in self.optim.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.opts.grad_clip)
        self.scaler.step(self.optim)
        self.scaler.update()

    def _run_self_critical_epoch(self, desc: str, epoch: int = 0) -> tuple[float, float]:
        """One pass over the training images: sample `scst_samples` captions per image, reward each
        with its CIDEr-D against the image's references, baseline = the mean reward of the image's
        other samples, and raise the log-probability of the captions that beat it (Rennie et al.
        2017, with the leave-one-out baseline of Luo 2020 instead of a greedy decode).
        Returns (mean loss, mean sampled-caption CIDEr-D)."""
        dataset, feats = self.train_data
        corpus, vocab, n = dataset.corpus, self.model.vocab, self.opts.scst_samples
        world = self.dist.world_size
        if self.cider is None:
            self.cider = CiderD({i: [normalize(c) for c in caps] for i, caps in enumerate(corpus.captions)})
        self.model.decoder.train()
        shard = DistributedSampler(range(len(corpus)), num_replicas=world, rank=self.dist.rank, shuffle=True,
                                   seed=self.opts.seed)
        shard.set_epoch(epoch)
        order = torch.tensor(list(shard), dtype=torch.long)
        total_loss, total_reward, batches = 0.0, 0.0, 0
        bar = tqdm(range(0, len(order), self.opts.batch_size), desc=desc, unit="batch", disable=self.quiet,
                   leave=False)
        for s in bar:
            idx = order[s:s + self.opts.batch_size]  # (B,) images
            with self._autocast():
                features = feats[idx].to(self.device).float()
                tokens, logp, mask = self.wrapped(features, samples=n, max_len=self.opts.scst_max_len)  # (B*n, T)
            reward = scst_rewards(self.cider, idx.repeat_interleave(n).tolist(), tokens, vocab).view(-1, n)  # (B, n)
            baseline = (reward.sum(1, keepdim=True) - reward) / (n - 1)  # (B, n) mean of the other samples
            advantage = (reward - baseline).view(-1, 1).to(self.device)  # (B*n, 1)
            global_tokens = self.dist.sum([mask.sum().item()])[0]
            loss = -(advantage * logp * mask).sum() * (world / global_tokens)
            self._step(loss)
            total_loss, total_reward = total_loss + loss.item(), total_reward + reward.mean().item()
            batches += 1
            bar.set_postfix(cider=f"{total_reward / batches:.3f}")
        # summed over ranks, each step's losses add up to world x that step's loss: the mean comes out right
        total_loss, total_reward, batches = self.dist.sum([total_loss, total_reward, batches])
        return total_loss / max(batches, 1), total_reward / max(batches, 1)

    def _val_captions(self) -> dict:
        """Decode every val image once (greedy, or beam with val_beam_size): {image_id: caption}."""
        dataset, feats = self.val_data
        corpus = dataset.corpus
        if feats is None:  # fine-tuning: no cached features, encode the images
            return caption_corpus(self.model, corpus, beam_size=self.opts.val_beam_size, quiet=True)[0]
        return caption_features(self.model, corpus.image_ids, feats, beam_size=self.opts.val_beam_size)

    def _validate(self) -> dict[str, Any]:
        val_loss = self._run_epoch(self.val_data, False, "val")
        record = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}
        captions = self._val_captions()
        scores = evaluate(references(self.val_data[0].corpus), captions)
        return record | {k: scores[k] for k in METRICS} | {"METEOR_backend": scores["METEOR_backend"]} | \
            diversity(captions)

    def _better(self, score: float) -> bool:
        return score > self.best_score if self.higher_is_better else score < self.best_score

    def fit(self) -> Path:
        """Train to `opts.epochs` or until early stopping; returns the path of best.pt.

        Interrupted (Ctrl-C, or SIGTERM through the CLI), it writes RUN/interrupted.pt, the
        weights of the moment (usable for captioning), and raises TrainingInterrupted; last.pt
        stays the end of the last whole epoch, which is where --resume continues.
        """
        if self.finished:
            return self.out / "best.pt"
        if self._stale and self.dist.is_main:
            for name in self._stale:
                (self.out / name).unlink(missing_ok=True)
        epoch = self.start_epoch
        try:
            for epoch in range(self.start_epoch, self.opts.epochs):
                self._fit_epoch(epoch)
                if self.opts.patience and self.bad_epochs >= self.opts.patience:
                    if not self.quiet:
                        print(f"early stop: {self.select} has not improved for {self.bad_epochs} epochs",
                              file=sys.stderr, flush=True)
                    break
        except KeyboardInterrupt:
            done = max(epoch, self.epochs_done)  # the signal may have waited for the epoch's checkpoints
            if self.dist.is_main:
                save_checkpoint(self.out / "interrupted.pt", self.model.checkpoint_payload() | {"epoch": done})
            when = f"after epoch {done}" if done > epoch else f"during epoch {epoch + 1}"
            raise TrainingInterrupted(f"interrupted {when}: weights saved to "
                                      f"{self.out / 'interrupted.pt'}; `--resume` continues from "
                                      f"{self.out / 'last.pt'} (end of epoch {done})") from None
        if self.dist.is_main and not (self.out / "best.pt").is_file():
            raise CheckpointError(f"{self.out}: no epochs were run, so there is no best.pt "
                                  f"(already at epoch {self.start_epoch} of {self.opts.epochs}?)")
        return self.out / "best.pt"

    def _fit_epoch(self, epoch: int) -> None:
        """One epoch: train (every rank), validate (rank 0; the record goes to every rank), log and
        checkpoint (rank 0)."""
        t0 = time.time()
        self._seed(epoch)
        lr = self.optim.param_groups[0]["lr"]
        desc = f"epoch {epoch + 1}/{self.opts.epochs}"
        if self.opts.self_critical:
            train_loss, reward = self._run_self_critical_epoch(desc, epoch)
            record = {"epoch": epoch + 1, "train_loss": train_loss, "train_CIDEr-D": reward, "lr": lr}
        else:
            train_loss = self._run_epoch(self.train_data, True, desc, epoch)
            record = {"epoch": epoch + 1, "train_loss": train_loss, "train_ppl": math.exp(min(train_loss, 50)),
                      "lr": lr}
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
        with signals_held():  # Ctrl-C here waits: the log line, last.pt and best.pt are written together
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            self._save(record["epoch"], improved)  # after the log line: a resume trims lines past the checkpoint
            self.epochs_done = record["epoch"]
        if not self.quiet:
            shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                             if k not in ("best", "METEOR_backend"))
            print(shown + (f" * best {self.select}" if improved else ""), file=sys.stderr, flush=True)

    def _save(self, epoch: int, best: bool) -> None:
        payload = self.model.checkpoint_payload() | {
            "optimizer": self.optim.state_dict(), "scheduler": self.sched.state_dict(), "epoch": epoch,
            "scaler": self.scaler.state_dict(),
            "best_score": self.best_score, "bad_epochs": self.bad_epochs, "select_metric": self.select,
            "data": self.data}
        save_checkpoint(self.out / "last.pt", payload)
        if best:
            save_checkpoint(self.out / "best.pt", payload)

    def _trim_metrics(self, epoch: int) -> None:
        """Drop metric lines from epochs after the checkpoint (written just before a crash)."""
        path = self.out / "metrics.jsonl"
        if path.is_file():
            lines = [l for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
            kept = [l for l in lines if json.loads(l)["epoch"] <= epoch]
            atomic_write(path, lambda f: f.write("".join(l + "\n" for l in kept).encode()))
