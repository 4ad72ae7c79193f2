"""Training loop: teacher forcing + BPTT; per-epoch validation (loss, and the COCO caption metrics
of captions decoded from the val images); best.pt by a chosen metric; early stopping; exact resume."""
from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler
from tqdm import tqdm

from .api import Captioner
from .checkpoint import CheckpointError, atomic_write, load_checkpoint, save_checkpoint
from .data import Batch, CaptionCorpus, CaptionDataset, DataError, collate
from .decoding import sample
from .device import resolve_device
from .encoders import build_encoder
from .evaluation import caption_corpus, caption_features, references
from .features import FeatureCache, ItemFeatures, LoadImage, corpus_features, pool
from .metrics import METRICS, CiderD, diversity, evaluate, meteor_backend, normalize
from .models import Frames, build_model
from .vocab import Vocabulary


@dataclass
class TrainOptions:
    """Everything that defines a run; stored (as JSON) in every checkpoint it writes."""

    encoder: str = "efficientnet_lite0"
    decoder: str = "lstm"
    embed_size: int = 256
    hidden_size: int = 512
    num_layers: int = 1
    dropout: float = 0.5
    attention_size: int = 512  # attention decoder only
    alpha_c: float = 1.0  # attention decoder: weight of the doubly stochastic attention penalty
    min_word_count: int = 5
    max_caption_len: int = 30
    epochs: int = 10
    batch_size: int = 64
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


#: what a run started with --init-from takes from that checkpoint's options (shapes, vocabulary)
ARCHITECTURE = ("encoder", "decoder", "embed_size", "hidden_size", "num_layers", "dropout", "attention_size",
                "alpha_c", "temporal", "temporal_size", "keypoints", "min_word_count", "max_caption_len")


def _optimizer(opts: TrainOptions, groups: list[dict]) -> torch.optim.Optimizer:
    if opts.optimizer == "adam":
        return torch.optim.Adam(groups, lr=opts.lr, weight_decay=opts.weight_decay)
    if opts.optimizer in ("sgd", "momentum"):
        momentum = opts.momentum if opts.optimizer == "momentum" else 0.0
        return torch.optim.SGD(groups, lr=opts.lr, momentum=momentum, weight_decay=opts.weight_decay)
    raise ValueError(f"unknown optimizer {opts.optimizer!r}: adam, sgd or momentum")


_METRIC_NAMES = {"bleu1": "BLEU-1", "bleu2": "BLEU-2", "bleu3": "BLEU-3", "bleu4": "BLEU-4", "meteor": "METEOR",
                 "rougel": "ROUGE-L", "cider": "CIDEr-D", "ciderd": "CIDEr-D", "valloss": "val_loss"}


def canonical_metric(name: str) -> str:
    """'cider', 'CIDEr-D', 'bleu4', 'BLEU-4', 'val_loss', ... -> the key used in metrics.jsonl."""
    key = "".join(ch for ch in name.lower() if ch.isalnum())
    if key not in _METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}: choose from {', '.join(sorted(set(_METRIC_NAMES.values())))}")
    return _METRIC_NAMES[key]


def _scheduler(opts: TrainOptions, optim: torch.optim.Optimizer, mode: str):
    if opts.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optim, mode=mode, factor=opts.lr_gamma,
                                                          patience=opts.lr_patience, eps=0.0)
    if opts.lr_schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optim, lambda epoch: 1.0)
    if opts.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optim, step_size=opts.lr_step_epochs, gamma=opts.lr_gamma)
    if opts.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=max(1, opts.epochs))
    raise ValueError(f"unknown lr schedule {opts.lr_schedule!r}: plateau, constant, step or cosine")


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for --amp on this device, or None for full fp32."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if amp in ("off", "none"):
        return None
    if amp in ("bf16", "fp16"):
        return torch.bfloat16 if amp == "bf16" else torch.float16
    raise ValueError(f"unknown --amp {amp!r}: auto, off, bf16 or fp16")


def _rng_state(sampler_gen: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "sampler": sampler_gen.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], sampler_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    sampler_gen.set_state(state["sampler"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


class TrainingInterrupted(Exception):
    """Training stopped by Ctrl-C / SIGTERM after saving RUN/interrupted.pt; the message says where."""


class Trainer:
    """Owns one run directory: RUN/last.pt every epoch, RUN/best.pt on the best `select_metric`
    (with no val set: the latest epoch), RUN/metrics.jsonl one line per epoch."""

    def __init__(self, train: CaptionCorpus, val: CaptionCorpus | None, out_dir: str | Path,
                 opts: TrainOptions | None = None, device: str = "auto", resume: bool = False,
                 quiet: bool = False, use_cache: bool = True, cache_dir: str | Path | None = None,
                 skip_bad: bool = False) -> None:
        self.out = Path(out_dir)
        self.skip_bad = skip_bad  # leave out images that cannot be read instead of refusing to train
        self.use_cache, self.cache_dir = use_cache, cache_dir
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(device)
        self.quiet = quiet
        self.sampler_gen = torch.Generator()
        ckpt = None
        if resume:
            ckpt = load_checkpoint(self.out / "last.pt", map_location="cpu")
            saved = TrainOptions(**ckpt["config"]["train"])
            if opts is not None:
                saved.epochs = opts.epochs  # the one thing a resume may change: how far to go
            opts = saved
        self.opts = opts = opts or TrainOptions()
        init = None
        if opts.init_from and not ckpt:
            init = load_checkpoint(opts.init_from, map_location="cpu")
            saved = init["config"]["train"]
            self.opts = opts = replace(opts, **{k: saved[k] for k in ARCHITECTURE if k in saved})
        if opts.self_critical and opts.scst_samples < 2:
            raise ValueError("--self-critical needs --scst-samples >= 2 (each sample's baseline is the others' mean)")
        if opts.temporal == "auto":  # resolved once; the checkpoint keeps the resolved value
            self.opts = opts = replace(opts, temporal="gru" if train.frames is not None else "none")
        if opts.temporal not in ("gru", "lstm", "none"):
            raise ValueError(f"unknown --temporal {opts.temporal!r}: auto, gru, lstm or none")
        if opts.fine_tune_encoder and (train.frames is not None or opts.temporal != "none"):
            raise ValueError("--fine-tune-encoder works for single images only: sequence training reads "
                             "its frames from the feature cache")
        if opts.fine_tune_encoder and opts.self_critical:
            raise ValueError("--self-critical trains the decoder from cached features: drop --fine-tune-encoder")
        has_val = val is not None and len(val) > 0
        self.select = canonical_metric(opts.select_metric) if has_val else "train_loss"
        self.higher_is_better = self.select not in ("val_loss", "train_loss")
        if self.select == "METEOR" and meteor_backend() == "unavailable":
            raise ValueError("--select-metric METEOR, but no METEOR is available here (see README: Metrics)")
        torch.manual_seed(opts.seed)
        random.seed(opts.seed)
        self.sampler_gen.manual_seed(opts.seed)

        source = ckpt or init
        vocab = Vocabulary.from_dict(source["vocab"]) if source else Vocabulary.build(
            (c for caps in train.captions for c in caps), min_count=opts.min_word_count)
        encoder = build_encoder(opts.encoder)
        config = {"encoder": opts.encoder, "decoder": opts.decoder, "decoder_hparams": opts.decoder_hparams(),
                  "temporal": opts.temporal_config(), "preprocess": encoder.spec.preprocess.to_dict(),
                  "fine_tune_encoder": opts.fine_tune_encoder, "train": asdict(opts)}
        decoder = build_model(config, len(vocab), encoder.feature_dim)
        encoder_params = encoder.unfreeze_last(opts.fine_tune_encoder)
        self.model = Captioner(encoder, decoder, vocab, config, self.device)
        groups = [{"params": list(decoder.parameters())}]
        if encoder_params:
            groups.append({"params": encoder_params, "lr": opts.encoder_lr})
        self.optim = _optimizer(opts, groups)
        self.amp = amp_dtype(opts.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.sched = _scheduler(opts, self.optim, "max" if self.higher_is_better else "min")
        self.start_epoch = 0
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
            self.sched.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt.get("scaler") or {})
            self.start_epoch = ckpt["epoch"]
            self.best_score, self.bad_epochs = ckpt["best_score"], ckpt["bad_epochs"]
            self._trim_metrics(self.start_epoch)
        else:
            self._trim_metrics(0)  # a fresh run in an old run folder starts a fresh log
        self.train_data = self._dataset(train, "train features")
        self.cider: CiderD | None = None  # self-critical reward over the training references, built on first use
        self.val_data = self._dataset(val, "val features") if has_val else None
        # the training RNG stream starts here, so whether features came from the cache or were just
        # extracted (DataLoader workers draw seeds) cannot change a run; a resume continues the stream
        torch.manual_seed(opts.seed)
        random.seed(opts.seed)
        if ckpt:
            _set_rng_state(ckpt["rng"], self.sampler_gen)

    # ---- data ----------------------------------------------------------------------------------
    def _dataset(self, corpus: CaptionCorpus, desc: str) -> tuple[CaptionDataset, ItemFeatures | None]:
        """Frozen encoder: features computed once (cached on disk unless --no-cache), items are
        image or sequence indices. Fine-tuning: items carry pixels and the encoder runs every step."""
        vocab, opts, encoder = self.model.vocab, self.opts, self.model.encoder
        if encoder.trainable:
            return CaptionDataset(corpus, vocab, opts.max_caption_len, LoadImage(self.model.preprocess)), None
        cache = FeatureCache(encoder, self.cache_dir) if self.use_cache else None
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

    def _features(self, batch: Batch, feats: ItemFeatures | None) -> Tensor | Frames:
        if feats is not None:
            f = feats[batch.images]  # (B, ...)
            if self.device.type == "cuda":
                f = f.pin_memory()  # so the copy below overlaps with compute
            return f.to(self.device, non_blocking=True).float()
        x = batch.images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        return pool(self.model.encoder(x), self.model.decoder.feature_kind)  # (B, ...)

    def _loader(self, dataset: CaptionDataset, shuffle: bool) -> DataLoader:
        workers = self.opts.num_workers if dataset.load_pixels is not None else 0
        sampler = RandomSampler(dataset, generator=self.sampler_gen) if shuffle else None
        return DataLoader(dataset, batch_size=self.opts.batch_size, sampler=sampler, collate_fn=collate,
                          num_workers=workers, pin_memory=self.device.type == "cuda",
                          persistent_workers=workers > 0)

    # ---- loop ----------------------------------------------------------------------------------
    def _run_epoch(self, data: tuple[CaptionDataset, ItemFeatures | None], train: bool, desc: str) -> float:
        """Mean per-token cross-entropy over the whole set (weighted by real tokens)."""
        dataset, feats = data
        decoder = self.model.decoder
        decoder.train(train)
        total, tokens = 0.0, 0
        bar = tqdm(self._loader(dataset, shuffle=train), desc=desc, unit="batch", disable=self.quiet, leave=False)
        autocast = dict(device_type=self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)
        for batch in bar:
            with torch.set_grad_enabled(train), torch.autocast(**autocast):
                features = self._features(batch, feats)
                loss = decoder(features, batch.captions.to(self.device), batch.lengths).float()
            if train:
                self._step(loss)
            n = int((batch.lengths - 1).sum())
            total += loss.item() * n
            tokens += n
            bar.set_postfix(loss=f"{total / tokens:.3f}")
        return total / max(tokens, 1)

    def _step(self, loss: Tensor) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss ({loss.item()}); stopping "
                                     f"(last good checkpoint: {self.out / 'last.pt'})")
        self.optim.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # the scaler is a no-op unless --amp fp16
        self.scaler.unscale_(self.optim)
        params = [p for g in self.optim.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.opts.grad_clip)
        self.scaler.step(self.optim)
        self.scaler.update()

    def _run_self_critical_epoch(self, desc: str) -> tuple[float, float]:
        """One pass over the training images: sample `scst_samples` captions per image, reward each
        with its CIDEr-D against the image's references, baseline = the mean reward of the image's
        other samples, and raise the log-probability of the captions that beat it (Rennie et al.
        2017, with the leave-one-out baseline of Luo 2020 instead of a greedy decode).
        Returns (mean loss, mean sampled-caption CIDEr-D)."""
        dataset, feats = self.train_data
        corpus, vocab, decoder, n = dataset.corpus, self.model.vocab, self.model.decoder, self.opts.scst_samples
        if self.cider is None:
            self.cider = CiderD({i: [normalize(c) for c in caps] for i, caps in enumerate(corpus.captions)})
        decoder.train()
        order = torch.randperm(len(corpus), generator=self.sampler_gen)
        autocast = dict(device_type=self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)
        total_loss, total_reward, batches = 0.0, 0.0, 0
        bar = tqdm(range(0, len(order), self.opts.batch_size), desc=desc, unit="batch", disable=self.quiet,
                   leave=False)
        for s in bar:
            idx = order[s:s + self.opts.batch_size]  # (B,) images
            with torch.autocast(**autocast):
                features = feats[idx].to(self.device).float()
                tokens, logp, mask = sample(decoder, features, n=n, max_len=self.opts.scst_max_len)  # (B*n, T) each
            images = idx.repeat_interleave(n).tolist()
            reward = torch.tensor([self.cider.score(i, normalize(vocab.decode(t)))
                                   for i, t in zip(images, tokens.tolist())]).view(-1, n)  # (B, n)
            baseline = (reward.sum(1, keepdim=True) - reward) / (n - 1)  # (B, n) mean of the other samples
            advantage = (reward - baseline).view(-1, 1).to(self.device)  # (B*n, 1)
            loss = -(advantage * logp * mask).sum() / mask.sum()
            self._step(loss)
            total_loss, total_reward, batches = total_loss + loss.item(), total_reward + reward.mean().item(), batches + 1
            bar.set_postfix(cider=f"{total_reward / batches:.3f}")
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
            save_checkpoint(self.out / "interrupted.pt", self.model.checkpoint_payload() | {"epoch": epoch})
            raise TrainingInterrupted(f"interrupted during epoch {epoch + 1}: weights saved to "
                                      f"{self.out / 'interrupted.pt'}; `--resume` continues from "
                                      f"{self.out / 'last.pt'} (end of epoch {epoch})") from None
        if not (self.out / "best.pt").is_file():
            raise CheckpointError(f"{self.out}: no epochs were run, so there is no best.pt "
                                  f"(already at epoch {self.start_epoch} of {self.opts.epochs}?)")
        return self.out / "best.pt"

    def _fit_epoch(self, epoch: int) -> None:
        """One epoch: train, validate, log, checkpoint."""
        t0 = time.time()
        lr = self.optim.param_groups[0]["lr"]
        desc = f"epoch {epoch + 1}/{self.opts.epochs}"
        if self.opts.self_critical:
            train_loss, reward = self._run_self_critical_epoch(desc)
            record = {"epoch": epoch + 1, "train_loss": train_loss, "train_CIDEr-D": reward, "lr": lr}
        else:
            train_loss = self._run_epoch(self.train_data, True, desc)
            record = {"epoch": epoch + 1, "train_loss": train_loss, "train_ppl": math.exp(min(train_loss, 50)),
                      "lr": lr}
        if self.val_data is not None:
            record |= self._validate()
        score = record[self.select]
        if score is None:  # e.g. METEOR unavailable: cannot happen for the chosen metric (checked above)
            raise ValueError(f"validation produced no {self.select}")
        improved = self.val_data is None or self._better(score)
        if improved:
            self.best_score, self.bad_epochs = score, 0
        else:
            self.bad_epochs += 1
        if isinstance(self.sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.sched.step(score)
        else:
            self.sched.step()
        record |= {"best": improved, "time_s": round(time.time() - t0, 2)}
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self._save(epoch + 1, improved)  # after the log line: a resume trims lines past the checkpoint
        if not self.quiet:
            shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                             if k not in ("best", "METEOR_backend"))
            print(shown + (f" * best {self.select}" if improved else ""), file=sys.stderr, flush=True)

    def _save(self, epoch: int, best: bool) -> None:
        payload = self.model.checkpoint_payload() | {
            "optimizer": self.optim.state_dict(), "scheduler": self.sched.state_dict(), "epoch": epoch,
            "scaler": self.scaler.state_dict(),
            "best_score": self.best_score, "bad_epochs": self.bad_epochs, "select_metric": self.select,
            "rng": _rng_state(self.sampler_gen)}
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
