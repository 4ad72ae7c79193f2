"""The GPU plan for COCO 2017 on paper: what this machine measures, and what one H100 would take.

    python benchmarks/gpu_plan.py [--batch 64] [--vocab 10000] [--photos 99] [--rows 1024] [--encoder-batch 16]
                                  [--gpu-batches 64,256] [--cores 16] [--threads N] [--quick] [--json OUT]

Measured here, on the CPU (no GPU is involved anywhere):

- the encoder (EfficientNet-Lite0, 224 px): FLOPs, bytes moved and operator calls of a forward
  pass per photo (extraction), of the frozen layers below the cut of `--fine-tune-encoder 2`
  (the cached trunk's extraction);
- one training step at --batch captions (real COCO caption lengths, from coco_dev's 495 captions
  tokenised as training tokenises them; a vocabulary of --vocab words): `TrainStep` forward,
  backward, gradient clipping and Adam, under bf16 autocast as `--amp bf16` runs it, for the
  attention decoder, Show-and-Tell (`--decoder lstm`) and fine-tuning (the last 2 Lite0 blocks
  from the cached trunk + the attention decoder); its FLOPs per caption-word, bytes, operator
  calls, and its CPU time here for reference;
- the host's cost of issuing one operator (the same step at toy sizes, one thread: time / calls)
  and how many operator calls each further word of a caption adds;
- the data path: photos/s one core's image loader delivers (`LoadImage`: JPEG decode + resize +
  crop + normalise, one thread, as in a DataLoader worker) on real photos (coco_dev: COCO 2017
  photos about 640x480; Flickr8k's, stored at 224x224), and the time `to_inputs` takes to read a
  step's features from a feature cache (--rows rows written with `FeatureCache.put`, so read
  from the OS page cache: the warm case), plus the main process' per-photo cost during extraction;
- how long the CPU part of validation takes (the metrics on coco_dev, METEOR left out).

Estimated for one H100 SXM (nothing below was run on a GPU): published peaks (dense bf16
989 TFLOP/s, fp32 non-tensor 67 TFLOP/s, HBM3 3.35 TB/s) and assumed utilisations. Each operator
call is put on a roofline: max(FLOPs / (peak x util), bytes / (HBM x util_mem), a floor per
kernel); their sum is the device time. The host issues the calls one by one (eager PyTorch), at
the measured cost per call plus an assumed CUDA launch cost; the step takes the longer of the
two, plus its data path (each training step synchronises: the loss is checked and logged), so
a small-batch LSTM step comes out latency-bound, not FLOP-bound. Counted bytes are every
operator's inputs and outputs (eager, nothing fused): an upper bound for compiled code.

FLOPs: 2 x multiply-accumulate of convolutions and matrix products, with the formulas of
torch.utils.flop_counter (the encoder's forward equals FlopCounterMode's count); the backward of
a grouped (depthwise) convolution is counted as its forward's FLOPs per gradient computed, as
FlopCounterMode's formula leaves out the groups and counts its weight gradient `groups` times too large.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import FLICKR8K, REPO, machine
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import conv_flop_count, flop_registry

from captioner.data import Batch, load_coco
from captioner.encoders import build_encoder
from captioner.features import FeatureCache, ItemFeatures, LoadImage
from captioner.images import load_image
from captioner.metrics import evaluate
from captioner.models import build_decoder
from captioner.training import TrainOptions
from captioner.training.batches import to_inputs
from captioner.training.objectives import TrainStep
from captioner.vocab import tokenize

COCO_DEV = REPO.parent / "shared" / "data" / "coco_dev"
COCO = {"train_photos": 118_287, "train_captions": 591_753, "val_photos": 5_000, "val_captions": 25_014}
#: published peaks of an H100 SXM5 (NVIDIA's data sheet): dense bf16 tensor, fp32 non-tensor, HBM3
H100 = {"bf16_flops": 989e12, "fp32_flops": 67e12, "hbm_bytes_per_s": 3.35e12}
#: assumptions, not measurements (see the docstring and docs/coco.md for how they were chosen)
ASSUMED = {
    "util_compute": 0.35,  # of the bf16 peak, for convolutions and matrix products (cuDNN/cuBLAS)
    "util_memory": 0.6,  # of HBM bandwidth, for the memory-bound kernels (elementwise, depthwise)
    "kernel_floor_s": 3e-6,  # device time of the smallest kernel
    "launch_s": 3e-6,  # host time of one CUDA launch, on top of the measured cost per operator call
    "vocab_note": "COCO captions with --min-word-count 5 keep about 10k words (Karpathy's split: 9,487)",
}
MAX_WORDS = TrainOptions().max_caption_len  # training cuts longer captions
DECODE_STEP = 256  # val photos captioned together (evaluation.caption_features)
VAL_MAX_WORDS = 20  # greedy val captions: at most this many words


# ---- counting what a piece of work runs ---------------------------------------------------------
@dataclass
class Work:
    """Operator calls of some work: per call (FLOPs, bytes in + out, launches a kernel)."""

    calls: list[tuple[float, float, bool]] = field(default_factory=list)

    @property
    def ops(self) -> int:
        return len(self.calls)

    @property
    def flops(self) -> float:
        return sum(c[0] for c in self.calls)

    @property
    def bytes(self) -> float:
        return sum(c[1] for c in self.calls)

    def device_s(self, scale: float, a: dict[str, float]) -> float:
        """Seconds on the GPU: each call on its roofline, FLOPs and bytes times `scale` (a larger batch)."""
        peak, bw = H100["bf16_flops"] * a["util_compute"], H100["hbm_bytes_per_s"] * a["util_memory"]
        floor = a["kernel_floor_s"]
        return sum(max(f * scale / peak, b * scale / bw, floor if k else 0.0) for f, b, k in self.calls)


NO_KERNEL = ("empty", "new_empty", "_local_scalar_dense", "lift_fresh", "set_", "resize_")


def _flops(func, args, kwargs, out) -> float:
    packet = func.overloadpacket
    if packet is torch.ops.aten.convolution_backward:  # per gradient computed, its forward's FLOPs
        grad_out, x, w, mask = args[0], args[1], args[2], args[10]
        return conv_flop_count(x.shape, w.shape, grad_out.shape, args[7]) * (int(mask[0]) + int(mask[1]))
    if packet in flop_registry:
        return flop_registry[packet](*args, **kwargs, out_val=out)
    return 0.0


class Count(TorchDispatchMode):
    """Records every operator call below autograd (what runs on the device): its FLOPs, the bytes of
    its tensor inputs and outputs, whether it launches a kernel. Views are free and not recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.work = Work()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        outs = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
        storages = {t.untyped_storage().data_ptr() for t in ins}
        if func.is_view or (
            not func._schema.is_mutable and outs and all(o.untyped_storage().data_ptr() in storages for o in outs)
        ):
            return out
        nbytes = sum(t.numel() * t.element_size() for t in ins + outs)
        kernel = not func.__name__.startswith(NO_KERNEL)
        self.work.calls.append((float(_flops(func, args, kwargs, out)), float(nbytes), kernel))
        return out


def count(fn: Callable[[], Any]) -> Work:
    with Count() as c:
        fn()
    return c.work


def best_time(fn: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


# ---- captions --------------------------------------------------------------------------------------
def caption_lengths() -> tuple[list[int], str]:
    """Token counts of real COCO captions as training sees them (<start> words <end>, cut at the
    training limit): coco_dev's 495 captions; a stand-in of COCO's mean when coco_dev is absent."""
    path = COCO_DEV / "captions.json"
    if path.is_file():
        caps = [a["caption"] for a in json.loads(path.read_text())["annotations"]]
        return [min(len(tokenize(c)), MAX_WORDS) + 2 for c in caps], f"{len(caps)} coco_dev captions (COCO 2017)"
    return [12] * 50 + [13] * 50, "no coco_dev: assumed 10.5 words per caption"


def expected_steps(lengths: list[int], batch: int, draws: int = 400) -> float:
    """Mean LSTM time steps of a random batch: its longest caption's tokens - 1."""
    rng = np.random.default_rng(0)
    return float((rng.choice(lengths, size=(draws, batch)).max(axis=1) - 1).mean())


def sample_batch(lengths: list[int], batch: int, vocab: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(captions (B, T), lengths (B,)) drawn from the real lengths, longest first, random words."""
    rng = random.Random(seed)
    lens = sorted((rng.choice(lengths) for _ in range(batch)), reverse=True)
    g = torch.Generator().manual_seed(seed)
    caps = torch.zeros(batch, lens[0], dtype=torch.long)
    for i, n in enumerate(lens):
        caps[i, :n] = torch.randint(4, vocab, (n,), generator=g)
        caps[i, 0], caps[i, n - 1] = 1, 2  # <start>, <end>
    return caps, torch.tensor(lens)


# ---- the training step ---------------------------------------------------------------------------
def make_step(kind: str, vocab: int, encoder, cut: int, **sizes: int) -> tuple[TrainStep, torch.optim.Optimizer]:
    """A TrainStep as the trainer builds it (decoder of the default size unless `sizes` say
    otherwise; fine-tune: the encoder's last 2 blocks trained above `cut`) and its Adam, with the
    multi-tensor kernels CUDA uses by default."""
    name = "lstm" if kind == "lstm" else "attention"
    feature_dim = sizes.pop("feature_dim", 1280)
    decoder = build_decoder(name, vocab, feature_dim, **(TrainOptions(decoder=name).decoder_hparams() | sizes))
    groups = [{"params": list(decoder.parameters())}]
    if kind == "fine-tune":
        groups.append({"params": encoder.unfreeze_last(2), "lr": TrainOptions().encoder_lr})
    step = TrainStep(encoder if kind == "fine-tune" else None, decoder, cut if kind == "fine-tune" else 0)
    return step.train(), torch.optim.Adam(groups, lr=4e-4, foreach=True)


def inputs_for(kind: str, batch: int, regions: int = 49, dim: int = 1280) -> Tensor:
    if kind == "lstm":
        return torch.randn(batch, dim)
    if kind == "fine-tune":
        return torch.randn(batch, 192, 7, 7)  # the cached trunk at the cut of --fine-tune-encoder 2
    return torch.randn(batch, regions, dim)


def forward(step: TrainStep, inputs: Tensor, caps: Tensor, lens: Tensor):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return step(inputs, caps, lens)


def train_step(step: TrainStep, optim, inputs: Tensor, caps: Tensor, lens: Tensor) -> None:
    """What one training batch runs (objectives.cross_entropy_epoch + Update), under bf16 autocast."""
    terms = forward(step, inputs, caps, lens)
    loss = terms.nll_sum / terms.tokens + terms.reg
    if not torch.isfinite(loss):
        raise RuntimeError("non-finite loss")
    optim.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optim.param_groups for p in g["params"]], 5.0, foreach=True)
    optim.step()
    terms.nll_sum.item(), terms.reg.item()  # the epoch loop logs them: a sync per step


def measure_step(kind: str, batch: int, vocab: int, lengths: list[int], encoder, cut: int) -> dict[str, Any]:
    torch.manual_seed(0)
    step, optim = make_step(kind, vocab, encoder, cut)
    caps, lens = sample_batch(lengths, batch, vocab)
    x = inputs_for(kind, batch)
    work = count(lambda: train_step(step, optim, x, caps, lens))  # also the warm-up
    cpu_s = best_time(lambda: train_step(step, optim, x, caps, lens), 2)
    ops = work.ops
    if kind == "lstm":  # cuDNN runs a packed LSTM as one call; the CPU splits it per time step
        same = torch.full_like(lens, int(lens[0]))  # unless every caption has the same length
        ops = count(lambda: train_step(step, optim, x, caps, same)).ops
    words = int((lens - 1).sum())
    if kind == "fine-tune":
        encoder.freeze()
    return {
        "batch": batch,
        "steps": int(lens[0] - 1),
        "words": words,
        "flops": work.flops,
        "flops_per_word": work.flops / words,
        "bytes": work.bytes,
        "ops": ops,
        "cpu_s": cpu_s,
        "work": work,
    }


def host_cost(lengths_pair: tuple[int, int] = (6, 14), repeats: int = 30) -> dict[str, Any]:
    """The host's cost per operator call, and the calls each word adds, from the same training
    step at toy sizes (batch 4, 8 units, 16 words), one thread: there the time is all overhead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    try:
        for kind in ("attention", "lstm"):
            sizes = dict(embed_size=8, hidden_size=8, feature_dim=8) | (
                {"attention_size": 8} if kind == "attention" else {}
            )
            ops, times = [], []
            for n in lengths_pair:
                torch.manual_seed(0)
                step, optim = make_step(kind, 16, None, 0, **sizes)
                caps, lens = sample_batch([n], 4, 16)
                x = inputs_for(kind, 4, regions=4, dim=8)
                fwd = count(lambda: forward(step, x, caps, lens))  # noqa: B023
                ops.append(count(lambda: train_step(step, optim, x, caps, lens)).ops)  # noqa: B023
                times.append(best_time(lambda: train_step(step, optim, x, caps, lens), repeats))  # noqa: B023
                out.setdefault(kind, {})[f"fwd_ops_{n}"] = fwd.ops
            per_word = (ops[1] - ops[0]) / (lengths_pair[1] - lengths_pair[0])
            fwd_per_word = (out[kind][f"fwd_ops_{lengths_pair[1]}"] - out[kind][f"fwd_ops_{lengths_pair[0]}"]) / (
                lengths_pair[1] - lengths_pair[0]
            )
            out[kind] |= {
                "ops_per_word": per_word,
                "fwd_ops_per_word": fwd_per_word,
                "fwd_share": out[kind][f"fwd_ops_{lengths_pair[1]}"] / ops[1],
                "s_per_op": times[1] / ops[1],
                "toy_ops": ops,
            }
    finally:
        torch.set_num_threads(threads)
    out["s_per_op"] = out["attention"]["s_per_op"]  # the decoder that issues most calls per step
    return out


# ---- the data path ---------------------------------------------------------------------------------
def loaders(encoder, photos: int, repeats: int = 3) -> dict[str, Any]:
    """Photos/s one core delivers (one thread, as in a DataLoader worker): LoadImage, its mirrored
    view (--flip) and the JPEG decode alone, on coco_dev's and Flickr8k's photos; the three passes
    interleaved, each the best of `repeats`, after a pass that brings the files into the page cache."""
    pre = encoder.spec.preprocess
    sets = {
        "coco_dev": sorted((COCO_DEV / "images").glob("*.jpg"))[:photos],
        "flickr8k": sorted((FLICKR8K / "images").glob("*.jpg"))[:photos],
    }
    ways = {"photos_per_s_per_core": LoadImage(pre), "mirrored_photos_per_s_per_core": LoadImage(pre, mirror=True),
            "decode_only_photos_per_s_per_core": load_image}  # fmt: skip
    out: dict[str, Any] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, paths in sets.items():
            if not paths:
                out[name] = None
                continue
            for p in paths:
                p.read_bytes()
            best = dict.fromkeys(ways, float("inf"))
            for _ in range(repeats):
                for way, load in ways.items():
                    best[way] = min(best[way], best_time(lambda load=load, paths=paths: [load(p) for p in paths], 1))
            size = load_image(paths[0]).size
            out[name] = {"photos": len(paths), "first_size": f"{size[0]}x{size[1]}"}
            out[name] |= {way: len(paths) / s for way, s in best.items()}
    finally:
        torch.set_num_threads(threads)
    return out


def data_path(encoder, cut: int, decoder_from_frames, rows: int, batch: int, repeats: int = 7) -> dict[str, Any]:
    """A feature cache of `rows` photos (random numbers, written with FeatureCache.put like an
    extraction writes them): seconds per training step to read --batch rows through `to_inputs`
    (+ one more copy of them, standing in for the pin_memory copy on CUDA), per kind of features;
    and the main process' seconds per photo during extraction (stacking a batch of pixels, the
    pin copy, writing the batch's features)."""
    if not hasattr(FeatureCache, "put"):
        sys.exit("needs FeatureCache.put (captioner/features/cache.py) to write a synthetic feature cache")
    out: dict[str, Any] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core's worth (the main process' copies run on few cores)
    try:
        _read_steps(encoder, cut, decoder_from_frames, rows, batch, repeats, out)
        pixels = [torch.randn(3, 224, 224) for _ in range(32)]
        stack_s = best_time(lambda: torch.stack(pixels).clone(), 5) / 32
    finally:
        torch.set_num_threads(threads)
    out["extraction_main_s_per_photo"] = out["cache_write_s_per_photo"] + stack_s
    return out


def _read_steps(encoder, cut: int, decoder_from_frames, rows: int, batch: int, repeats: int, out: dict) -> None:
    with tempfile.TemporaryDirectory(prefix="gpu_plan_") as tmp:
        files = Path(tmp) / "photos"
        files.mkdir()
        paths = [files / f"{i:06d}.jpg" for i in range(rows)]
        for p in paths:
            p.touch()  # the cache keys on path, size and mtime only
        frames = [[i] for i in range(rows)]
        grid_cache = FeatureCache(encoder, Path(tmp) / "cache")
        grid = torch.randn(32, 49, encoder.feature_dim)
        chunk = max(32, rows // 4)  # written in a few puts; the quickest (least disturbed) one counts
        out["cache_write_s_per_photo"] = float("inf")
        for start in range(0, rows, chunk):
            part = paths[start : start + chunk]
            t = time.perf_counter()
            grid_cache.put(part, (grid[: len(part[s : s + 32])] for s in range(0, len(part), 32)))
            out["cache_write_s_per_photo"] = min(out["cache_write_s_per_photo"], (time.perf_counter() - t) / len(part))
        trunk_cache = FeatureCache(encoder, Path(tmp) / "cache", cut=cut)
        trunk = torch.randn(32, 192, 7, 7)
        trunk_cache.put(paths, (trunk[: len(paths[s : s + 32])] for s in range(0, rows, 32)))
        stores = {
            "attention": (grid_cache.load(paths, "grid"), 49 * encoder.feature_dim * 2),
            "lstm": (grid_cache.load(paths, "pooled"), encoder.feature_dim * 2),
            "fine-tune": (trunk_cache.load(paths, "trunk"), 192 * 7 * 7 * 2),
        }
        rng = np.random.default_rng(0)
        for kind, (store, row_bytes) in stores.items():
            feats = ItemFeatures(store, frames, decoder_from_frames)
            picks = [torch.from_numpy(rng.choice(rows, size=min(batch, rows), replace=False)) for _ in range(repeats)]

            def read(idx: Tensor, feats: ItemFeatures = feats) -> None:
                x = to_inputs(Batch(idx, torch.zeros(1, 1), torch.ones(1)), feats, torch.device("cpu"))
                x.clone()  # (pin_memory's copy on CUDA)

            read(picks[0])
            times = []
            for idx in picks:
                t = time.perf_counter()
                read(idx)
                times.append(time.perf_counter() - t)
            out[kind] = {
                "row_bytes": row_bytes,
                "bytes_per_step": row_bytes * len(picks[0]),
                "s_per_step": min(times),
                "median_s_per_step": statistics.median(times),
                "batch": len(picks[0]),
            }


def val_scoring() -> dict[str, Any] | None:
    """Seconds per val photo of the metrics (BLEU, ROUGE-L, CIDEr-D, the object measures; METEOR
    off): coco_dev's first reference scored against the other four."""
    path = COCO_DEV / "captions.json"
    if not path.is_file():
        return None
    corpus = load_coco(path, COCO_DEV / "images")
    refs = {i: caps[1:] for i, caps in zip(corpus.image_ids, corpus.captions)}
    cands = {i: caps[0] for i, caps in zip(corpus.image_ids, corpus.captions)}
    s = best_time(lambda: evaluate(refs, cands, use_meteor=False), 2)
    return {"photos": len(cands), "s_per_photo": s / len(cands)}


# ---- the estimates ------------------------------------------------------------------------------------
def extraction_estimate(
    work: Work, per: int, host_s_per_op: float, loader: float, main_s: float, gpu_batch: int, cores: int, a: dict
) -> dict[str, Any]:
    """Photos/s of extraction on one H100 at `gpu_batch` photos per batch: the GPU's (device and
    host, each batch synchronised by the write to the cache) against what loader workers deliver."""
    device = work.device_s(gpu_batch / per, a)
    host = work.ops * (host_s_per_op + a["launch_s"])
    compute_floor = work.flops / per * gpu_batch / (H100["bf16_flops"] * a["util_compute"])
    gpu_rate = gpu_batch / (max(device, host) + main_s * gpu_batch)
    workers = max(1, cores - 2)
    return {
        "gpu_batch": gpu_batch,
        "compute_floor_s_per_batch": compute_floor,
        "device_s_per_batch": device,
        "host_s_per_batch": host,
        "gpu_photos_per_s": gpu_rate,
        "cores_to_keep_up": gpu_rate / loader,
        "photos_per_s_1_worker": min(gpu_rate, loader),
        "workers": workers,
        "photos_per_s_workers": min(gpu_rate, loader * workers),
    }


def epoch_estimate(
    m: dict[str, Any], kind: str, batch: int, lengths: list[int], host: dict, data: dict, scoring: dict | None, a: dict
) -> dict[str, Any]:
    """One epoch of COCO's training captions at `batch`, and its validation, on one H100."""
    per_word = host["attention" if kind != "lstm" else "lstm"]
    steps_b = expected_steps(lengths, batch)
    ops = m["ops"] + per_word["ops_per_word"] * (steps_b - m["steps"])
    mean_words = float(np.mean(lengths)) - 1
    scale = batch * mean_words / m["words"]  # the step's work grows with its words (an upper bound)
    device = m["work"].device_s(scale, a)
    host_s = ops * (host["s_per_op"] + a["launch_s"])
    read = data[kind]["s_per_step"] * batch / data[kind]["batch"]
    step_s = read + max(device, host_s)
    flops = m["flops"] * scale
    steps = math.ceil(COCO["train_captions"] / batch)
    # validation: the val loss (forward only) over the val captions, greedy captions of the val
    # photos in chunks of 256 (the decoder's forward per word), the metrics on the CPU
    fwd_host = per_word["fwd_share"] * host_s
    val_loss = math.ceil(COCO["val_captions"] / batch) * (read + max(fwd_host, device / 3))
    decode = math.ceil(COCO["val_photos"] / DECODE_STEP) * VAL_MAX_WORDS * per_word["fwd_ops_per_word"]
    decode *= host["s_per_op"] + a["launch_s"]
    score = scoring["s_per_photo"] * COCO["val_photos"] if scoring else 0.0
    return {
        "batch": batch,
        "lstm_steps_per_batch": steps_b,
        "ops_per_step": ops,
        "flops_per_step": flops,
        "compute_floor_s": flops / (H100["bf16_flops"] * a["util_compute"]),
        "compute_floor_fp32_s": flops / (H100["fp32_flops"] * a["util_compute"]),
        "device_s": device,
        "host_s": host_s,
        "read_s": read,
        "step_s": step_s,
        "bound": "host (operator calls)" if host_s >= device else "device",
        "effective_util": flops / step_s / H100["bf16_flops"],
        "read_bytes_per_s": data[kind]["row_bytes"] * batch / step_s,
        "steps": steps,
        "epoch_s": steps * step_s,
        "val_s": val_loss + decode + score,
        "val_parts_s": {"loss": val_loss, "decode": decode, "metrics_cpu": score},
    }


def cache_sizes(grid_row: int, pooled_row: int, trunk_row: int) -> dict[str, float]:
    """Bytes on disk for COCO: the frozen features (grid + pooled) and the cached trunk."""
    frozen = grid_row + pooled_row
    train, val = COCO["train_photos"], COCO["val_photos"]
    return {
        "frozen_train": frozen * train,
        "frozen_train_flip": 2 * frozen * train,
        "frozen_val": frozen * val,
        "trunk_train_flip": 2 * trunk_row * train,
        "trunk_val": trunk_row * val,
    }


#: what scripts/train_coco.sh does on a GPU by default (tests/test_coco_recipe.py checks they agree)
RECIPE = {"batch": 256, "epochs": 8, "ft_epochs": 4, "cal_photos": 20_000}


def extraction_times(frozen: dict, trunk: dict, per_core: float, per_core_mirror: float) -> dict[str, Any]:
    """Seconds to extract COCO's photos during `captioner train` (batch 32): the frozen features of
    the train photos (with one loader worker, the default, and with one per core but two), their
    mirror images too (--flip), the val photos; the cached trunk of stage 2 (train photos and their
    mirror images, val photos)."""
    w = frozen["workers"]
    train, val = COCO["train_photos"], COCO["val_photos"]
    rate = frozen["photos_per_s_workers"]
    rate_mirror = min(frozen["gpu_photos_per_s"], per_core_mirror * w)
    trunk_rate = min(trunk["gpu_photos_per_s"], per_core * w)
    trunk_mirror = min(trunk["gpu_photos_per_s"], per_core_mirror * w)
    return {
        "workers": w,
        "train_1_worker_s": train / frozen["photos_per_s_1_worker"],
        "train_s": train / rate,
        "train_flip_s": train / rate + train / rate_mirror,
        "val_s": val / rate,
        "trunk_train_flip_val_s": (train + val) / trunk_rate + train / trunk_mirror,
    }


def recipe_estimate(times: dict, epochs: dict, frozen: dict) -> dict[str, Any]:
    """scripts/train_coco.sh's GPU defaults on one H100: stage 1 (extraction, epochs of the
    attention decoder and their validation), stage 2 (the cached trunk, fine-tuning epochs), and the
    extraction that tune, calibrate and evaluate do with one loader process (the fine-tuned model's
    val features, its features of CAL_PHOTOS train photos, the fp16 model's val features; their
    decoding is not estimated)."""
    b = f"batch {RECIPE['batch']}"
    xe, ft = epochs["attention"][b], epochs["fine-tune"][b]
    stage1 = times["train_s"] + times["val_s"] + RECIPE["epochs"] * (xe["epoch_s"] + xe["val_s"])
    stage2 = times["trunk_train_flip_val_s"] + RECIPE["ft_epochs"] * (ft["epoch_s"] + ft["val_s"])
    one_worker = frozen["photos_per_s_1_worker"]
    after = (2 * COCO["val_photos"] + RECIPE["cal_photos"]) / one_worker  # new encoder weights: new features
    return RECIPE | {"stage1_s": stage1, "stage2_s": stage2, "tune_calibrate_extraction_s": after,
                     "total_s": stage1 + stage2 + after}  # fmt: skip


# ---- report ---------------------------------------------------------------------------------------
def fmt_s(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    if s >= 1:
        return f"{s:.1f} s"
    return f"{s * 1e3:.2f} ms"


def strip(obj: Any) -> Any:
    """The report as JSON: without the per-call lists."""
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if not isinstance(v, Work)}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64, help="training batch of the measured step (the recipe's: 64)")
    ap.add_argument("--vocab", type=int, default=10_000, help="vocabulary size (COCO, min count 5: ~10k)")
    ap.add_argument("--photos", type=int, default=99, help="photos per loader measurement")
    ap.add_argument("--rows", type=int, default=1024, help="rows of the feature cache the data path reads")
    ap.add_argument("--encoder-batch", type=int, default=16, help="photos in the counted encoder forward")
    ap.add_argument("--gpu-batches", default="64,256", help="training batches estimated for the H100")
    ap.add_argument("--cores", type=int, default=16, help="CPU cores of the GPU machine (workers: cores - 2)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a test (seconds)")
    ap.add_argument("--json", metavar="OUT", help="write the numbers here as JSON")
    a = ap.parse_args()
    if a.quick:
        a.batch, a.vocab, a.photos, a.rows, a.encoder_batch = 8, 1000, 6, 64, 2
    if a.threads:
        torch.set_num_threads(a.threads)
    gpu_batches = sorted({int(b) for b in a.gpu_batches.split(",")} | {a.batch})
    load_before = os.getloadavg()[0]
    t_start = time.perf_counter()
    torch.manual_seed(0)

    # -- the encoder: extraction, and the frozen layers below the cut
    encoder = build_encoder().to(memory_format=torch.channels_last)
    cut = encoder.cut(2)
    x = torch.randn(a.encoder_batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        enc_work = count(lambda: encoder(x))
        below_work = count(lambda: encoder.below(x, cut))
    with torch.no_grad():
        encoder(x)
        cpu_encoder_s = best_time(lambda: encoder(x), 2) / a.encoder_batch  # fp32, as the CPU extracts
    n = a.encoder_batch

    # -- the training steps, and what the host pays per operator call
    lengths, length_source = caption_lengths()
    steps = {k: measure_step(k, a.batch, a.vocab, lengths, encoder, cut) for k in ("attention", "lstm", "fine-tune")}
    host = host_cost()

    # -- the data path
    loader = loaders(encoder, a.photos)
    step_decoder = build_decoder("attention", a.vocab, encoder.feature_dim)
    data = data_path(encoder, cut, step_decoder.from_frames, a.rows, a.batch)
    scoring = val_scoring()
    per_core = (loader["coco_dev"] or loader["flickr8k"] or {}).get("photos_per_s_per_core")
    if per_core is None:
        sys.exit("needs photos: ../shared/data/coco_dev or ../shared/data/flickr8k")
    per_core_mirror = (loader["coco_dev"] or loader["flickr8k"])["mirrored_photos_per_s_per_core"]

    # -- estimates for one H100
    assumed = ASSUMED | {"h100": H100, "cores": a.cores, "coco": COCO}
    host_op = host["s_per_op"]
    main_s = data["extraction_main_s_per_photo"]
    extraction = {
        f"batch {gb}": extraction_estimate(enc_work, n, host_op, per_core, main_s, gb, a.cores, assumed)
        for gb in (32, 256)
    }
    trunk = extraction_estimate(below_work, n, host_op, per_core, main_s, 32, a.cores, assumed)
    coco_extraction = extraction_times(extraction["batch 32"], trunk, per_core, per_core_mirror)
    epochs = {
        kind: {
            f"batch {b}": epoch_estimate(steps[kind], kind, b, lengths, host, data, scoring, assumed)
            for b in gpu_batches
        }
        for kind in steps
    }
    sizes = cache_sizes(data["attention"]["row_bytes"], data["lstm"]["row_bytes"], data["fine-tune"]["row_bytes"])
    recipe = recipe_estimate(coco_extraction, epochs, extraction["batch 32"])

    # -- print
    print(f"machine: {machine()}, {os.cpu_count()} cores; 1-min load average {load_before:.1f} before")
    print(f"caption lengths: {length_source}: {np.mean(lengths) - 2:.2f} words + <end> per caption on average")
    print("\n## Measured here (CPU)\n")
    print("| what | value |")
    print("|---|---|")
    rows = [
        ("encoder forward, GFLOP per photo (extraction)", f"{enc_work.flops / n / 1e9:.3f}"),
        ("encoder forward, MB moved per photo (bf16, unfused)", f"{enc_work.bytes / n / 1e6:.1f}"),
        ("encoder forward, operator calls per batch", f"{enc_work.ops}"),
        ("frozen layers below the cut (trunk extraction), GFLOP per photo", f"{below_work.flops / n / 1e9:.3f}"),
        ("encoder forward on this CPU (fp32, all cores), ms per photo", f"{1e3 * cpu_encoder_s:.1f}"),
    ]
    for kind, m in steps.items():
        label = {"attention": "attention", "lstm": "Show-and-Tell", "fine-tune": "fine-tune (2 blocks + attention)"}
        rows += [
            (f"{label[kind]} step at batch {m['batch']}: GFLOP (fwd + bwd + Adam)", f"{m['flops'] / 1e9:.2f}"),
            (f"{label[kind]}: MFLOP per caption-word", f"{m['flops_per_word'] / 1e6:.1f}"),
            (f"{label[kind]}: GB moved per step (bf16 autocast, unfused)", f"{m['bytes'] / 1e9:.2f}"),
            (f"{label[kind]}: operator calls per step ({m['steps']} LSTM steps)", f"{m['ops']}"),
            (f"{label[kind]}: CPU time per step here (--amp bf16)", fmt_s(m["cpu_s"])),
        ]
    rows += [
        ("host cost per operator call (toy step, 1 thread)", f"{1e6 * host['s_per_op']:.1f} us"),
        ("operator calls per caption-word: attention / Show-and-Tell", f"{host['attention']['ops_per_word']:.0f} / "
         f"{host['lstm']['ops_per_word']:.0f}"),
    ]  # fmt: skip
    for name, r in loader.items():
        if r:
            rows.append(
                (
                    f"loader photos/s per core, {name} ({r['photos']} photos, {r['first_size']}...)",
                    f"{r['photos_per_s_per_core']:.0f} (mirrored {r['mirrored_photos_per_s_per_core']:.0f}; "
                    f"JPEG decode alone {r['decode_only_photos_per_s_per_core']:.0f})",
                )
            )
    for kind in ("attention", "lstm", "fine-tune"):
        d = data[kind]
        rows.append(
            (
                f"feature read per step, {kind} (batch {d['batch']} x {d['row_bytes']:,} B, page cache)",
                f"{d['bytes_per_step'] / 1e6:.2f} MB in {fmt_s(d['s_per_step'])}",
            )
        )
    rows.append(("extraction, main process per photo (stack, pin copy, cache write)", fmt_s(main_s)))
    if scoring:
        rows.append(("val metrics on the CPU per photo (METEOR off)", fmt_s(scoring["s_per_photo"])))
    for k, v in rows:
        print(f"| {k} | {v} |")

    u, um = assumed["util_compute"], assumed["util_memory"]
    print(
        f"\n## Estimated for one H100 SXM (not measured): peaks bf16 {H100['bf16_flops'] / 1e12:.0f} TFLOP/s, "
        f"fp32 {H100['fp32_flops'] / 1e12:.0f} TFLOP/s, HBM {H100['hbm_bytes_per_s'] / 1e12:.2f} TB/s; "
        f"assumed {100 * u:.0f}% of compute, {100 * um:.0f}% of bandwidth, "
        f"{1e6 * assumed['kernel_floor_s']:.0f} us per kernel at least, "
        f"{1e6 * assumed['launch_s']:.0f} us per launch on the host; {a.cores} cores "
        f"({coco_extraction['workers']} loader workers)\n"
    )
    print("| extraction (Lite0 forward) | batch 32 (train's) | batch 256 (extract-features) |")
    print("|---|---|---|")
    e32, e256 = extraction["batch 32"], extraction["batch 256"]
    for label, key, f in (
        ("compute floor per batch", "compute_floor_s_per_batch", fmt_s),
        ("device time per batch (roofline per kernel)", "device_s_per_batch", fmt_s),
        ("host time per batch (operator calls)", "host_s_per_batch", fmt_s),
        ("GPU photos/s (incl. main process)", "gpu_photos_per_s", lambda v: f"{v:,.0f}"),
        ("loader cores to keep up", "cores_to_keep_up", lambda v: f"{v:.0f}"),
        ("photos/s with --num-workers 1 (the default)", "photos_per_s_1_worker", lambda v: f"{v:,.0f}"),
        (f"photos/s with --num-workers {e32['workers']}", "photos_per_s_workers", lambda v: f"{v:,.0f}"),
    ):
        print(f"| {label} | {f(e32[key])} | {f(e256[key])} |")
    w = coco_extraction["workers"]
    print("\n| COCO extraction in `captioner train` (batch 32) | time |")
    print("|---|---|")
    for label, key in (
        ("train photos, --num-workers 1", "train_1_worker_s"),
        (f"train photos, --num-workers {w}", "train_s"),
        (f"train photos and their mirror images (--flip), --num-workers {w}", "train_flip_s"),
        (f"val photos, --num-workers {w}", "val_s"),
        (f"cached trunk: train photos, mirror images, val photos, --num-workers {w}", "trunk_train_flip_val_s"),
    ):
        print(f"| {label} | {fmt_s(coco_extraction[key])} |")

    print(f"\n| one COCO epoch ({COCO['train_captions']:,} captions) | " + " | ".join(
        f"{kind} b{b}" for kind in epochs for b in gpu_batches) + " |")  # fmt: skip
    print("|---|" + "---|" * (len(epochs) * len(gpu_batches)))
    cells = [epochs[k][f"batch {b}"] for k in epochs for b in gpu_batches]
    for label, key, f in (
        ("LSTM steps per batch (mean longest caption)", "lstm_steps_per_batch", lambda v: f"{v:.1f}"),
        ("operator calls per step", "ops_per_step", lambda v: f"{v:,.0f}"),
        ("compute floor per step (bf16)", "compute_floor_s", fmt_s),
        ("compute floor per step (fp32, --amp off)", "compute_floor_fp32_s", fmt_s),
        ("device time per step (roofline per kernel)", "device_s", fmt_s),
        ("host time per step (operator calls)", "host_s", fmt_s),
        ("feature read per step (measured here, scaled)", "read_s", fmt_s),
        ("**step**", "step_s", fmt_s),
        ("bound by", "bound", str),
        ("effective share of the bf16 peak", "effective_util", lambda v: f"{100 * v:.2f}%"),
        ("feature-cache read bandwidth needed", "read_bytes_per_s", lambda v: f"{v / 1e6:,.0f} MB/s"),
        ("**epoch (training)**", "epoch_s", fmt_s),
        ("validation (loss, greedy captions, metrics)", "val_s", fmt_s),
    ):
        print(f"| {label} | " + " | ".join(f(c[key]) for c in cells) + " |")
    gb = 1e9
    print(
        f"\ncache on disk for COCO: frozen features {sizes['frozen_train'] / gb:.1f} GB train "
        f"({sizes['frozen_train_flip'] / gb:.1f} GB with --flip) + {sizes['frozen_val'] / gb:.2f} GB val; "
        f"cached trunk (--fine-tune-encoder 2, --flip) {sizes['trunk_train_flip'] / gb:.2f} GB train + "
        f"{sizes['trunk_val'] / gb:.2f} GB val"
    )
    print(
        f"scripts/train_coco.sh on the GPU (batch {recipe['batch']}, {recipe['epochs']} + {recipe['ft_epochs']} "
        f"epochs): stage 1 {fmt_s(recipe['stage1_s'])}, stage 2 {fmt_s(recipe['stage2_s'])}, the extraction in tune, "
        f"calibrate and evaluate ({recipe['cal_photos']:,} train + 2 x val photos, 1 loader) "
        f"{fmt_s(recipe['tune_calibrate_extraction_s'])}: {fmt_s(recipe['total_s'])} in all, their decoding not counted"
    )
    print(f"(ran {time.perf_counter() - t_start:.0f} s; 1-min load average {os.getloadavg()[0]:.1f} after)")

    if a.json:
        report = {
            "machine": machine(),
            "load_average": [load_before, os.getloadavg()[0]],
            "caption_lengths": {"source": length_source, "mean_tokens": float(np.mean(lengths)), "n": len(lengths)},
            "assumed": assumed,
            "measured": {
                "encoder": {
                    "photos_counted": n,
                    "flops_per_photo": enc_work.flops / n,
                    "bytes_per_photo": enc_work.bytes / n,
                    "ops_per_batch": enc_work.ops,
                    "below_cut_flops_per_photo": below_work.flops / n,
                    "cut": cut,
                    "cpu_s_per_photo": cpu_encoder_s,
                },
                "steps": steps,
                "host": host,
                "loaders": loader,
                "data_path": data,
                "val_scoring": scoring,
            },
            "estimates": {
                "extraction": extraction,
                "trunk_extraction": trunk,
                "coco_extraction": coco_extraction,
                "epochs": epochs,
                "cache_bytes": sizes,
                "recipe": recipe,
            },
        }
        Path(a.json).write_text(json.dumps(strip(report), indent=2) + "\n")


if __name__ == "__main__":
    main()
