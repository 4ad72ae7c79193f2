"""What one epoch optimises: cross-entropy with teacher forcing (BPTT through the caption), or
self-critical sequence training on sampled captions rewarded by their CIDEr-D."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DistributedSampler

from ..data import Batch
from ..decoding import sample
from ..distributed import Dist
from ..encoders import Encoder
from ..errors import TrainingDiverged
from ..features import ItemFeatures, pool
from ..metrics import CiderD, normalize
from ..models import CaptionModel, Frames, LossTerms
from ..progress import progress
from ..vocab import Vocabulary


class TrainStep(nn.Module):
    """The trainable modules and the one forward that uses them. This is what DistributedDataParallel
    wraps: DDP averages the gradients of whatever ran through its forward, so teacher forcing and
    self-critical sampling both go through here."""

    def __init__(self, encoder: Encoder | None, decoder: CaptionModel, cut: int = 0) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder  # encoder: only when it is being fine-tuned
        self.cut = cut  # fine-tuning: inputs are the trunk's activations at this layer (0: pixels)

    def forward(
        self,
        inputs: Tensor | Frames,
        captions: Tensor | None = None,
        lengths: Tensor | None = None,
        samples: int = 0,
        max_len: int = 0,
    ) -> LossTerms | tuple[Tensor, Tensor, Tensor]:
        """inputs: features (B, ...) or, when fine-tuning, the cached trunk's activations (B, C, h, w)
        (pixels (B, 3, S, S) when cut is 0). Teacher forcing on captions (B, T) -> LossTerms;
        samples > 0 -> `decoding.sample` (tokens, log-probs, mask), never drawing <unk>
        (inference never prints it either)."""
        if self.encoder is None:
            features = inputs
        else:
            features = pool(self.encoder.above(inputs, self.cut), self.decoder.feature_kind)  # (B, R, D) / (B, D)
        if samples:
            return sample(self.decoder, features, n=samples, max_len=max_len, suppress=[Vocabulary.unk_id])
        return self.decoder(features, captions, lengths)


@dataclass
class Update:
    """One optimizer step on a loss: refuses a non-finite loss (the last good checkpoint is kept),
    scales it for fp16, clips the global gradient norm."""

    optim: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    grad_clip: float
    last_good: Path

    def __call__(self, loss: Tensor) -> None:
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"non-finite training loss ({loss.item()}); stopping (last good checkpoint: {self.last_good})"
            )
        self.optim.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # the scaler is a no-op unless --amp fp16; DDP all-reduces here
        self.scaler.unscale_(self.optim)
        params = [p for g in self.optim.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.scaler.step(self.optim)
        self.scaler.update()


@dataclass
class EpochContext:
    """What every epoch takes from the run: the step to run (DDP-wrapped when training on several
    processes), where it runs, the job, the optimizer step (None: evaluation only) and the
    autocast of the run's --amp."""

    step: nn.Module
    device: torch.device
    dist: Dist
    update: Update | None
    autocast: Callable[[], AbstractContextManager]


def cross_entropy_epoch(
    ctx: EpochContext, batches: Iterable[Batch], to_inputs: Callable[[Batch], Tensor | Frames], desc: str
) -> float:
    """Teacher forcing over the batches, a step per batch when `ctx.update` is given (else evaluation).

    Returns the loss over the whole set (all ranks' shards when training): per-token NLL + the
    mean regulariser, each averaged over everything, so it is the same for any number of ranks."""
    train, dist = ctx.update is not None, ctx.dist
    nll, tokens, reg, items = 0.0, 0, 0.0, 0
    bar = progress(batches, show=ctx.dist.is_main, desc=desc, unit="batch")  # one display per job
    for batch in bar:
        with torch.set_grad_enabled(train), ctx.autocast():
            terms = ctx.step(to_inputs(batch), batch.captions.to(ctx.device), batch.lengths)
        if train:  # normalised by the global batch's tokens; DDP's gradient average undoes the x world
            global_tokens = dist.sum([terms.tokens])[0]
            ctx.update(terms.nll_sum * (dist.world_size / global_tokens) + terms.reg)
        nll, tokens = nll + terms.nll_sum.item(), tokens + terms.tokens
        reg, items = reg + terms.reg.item() * len(batch.lengths), items + len(batch.lengths)
        bar.set_postfix(loss=f"{nll / max(tokens, 1) + reg / max(items, 1):.3f}")
    if train:
        nll, tokens, reg, items = dist.sum([nll, tokens, reg, items])
    return nll / max(tokens, 1) + reg / max(items, 1)


def scst_rewards(cider: CiderD, images: list[int], tokens: Tensor, vocab: Vocabulary) -> Tensor:
    """Self-critical reward of each sampled caption (N, T) of images[i]: its CIDEr-D against that
    image's references, or 0 when it was cut at the length limit without <end> (an unfinished
    sentence is not a caption: rewarding it like one teaches the model to run on)."""
    ended = (tokens == Vocabulary.end_id).any(dim=1).tolist()  # (N,)
    return torch.tensor(
        [
            cider.score(i, normalize(vocab.decode(t))) if done else 0.0
            for i, t, done in zip(images, tokens.tolist(), ended)
        ]
    )  # (N,)


@dataclass
class SelfCritical:
    """What self-critical training samples from and rewards against: the training images' features,
    their references' CIDEr-D, and the run's sampling settings."""

    feats: ItemFeatures
    cider: CiderD
    vocab: Vocabulary
    samples: int  # captions sampled per image (each one's baseline: the mean reward of the others)
    max_len: int  # most words per sample
    batch_size: int  # images per step (per process)
    seed: int  # with the epoch: the shuffle of the images


def self_critical_epoch(ctx: EpochContext, scst: SelfCritical, epoch: int, desc: str) -> tuple[float, float]:
    """One pass over the training images: sample `scst.samples` captions per image, reward each with
    its CIDEr-D against the image's references, baseline = the mean reward of the image's other
    samples, and raise the log-probability of the captions that beat it (Rennie et al. 2017, with
    the leave-one-out baseline of Luo 2020 instead of a greedy decode).
    Returns (mean loss, mean sampled-caption CIDEr-D)."""
    if ctx.update is None:
        raise ValueError("self-critical training needs an optimizer step (ctx.update)")
    n, dist, world = scst.samples, ctx.dist, ctx.dist.world_size
    shard = DistributedSampler(range(len(scst.feats)), num_replicas=world, rank=dist.rank, shuffle=True, seed=scst.seed)
    shard.set_epoch(epoch)
    order = torch.tensor(list(shard), dtype=torch.long)
    total_loss, total_reward, batches = 0.0, 0.0, 0
    bar = progress(range(0, len(order), scst.batch_size), show=ctx.dist.is_main, desc=desc, unit="batch")
    for s in bar:
        idx = order[s : s + scst.batch_size]  # (B,) images
        with ctx.autocast():
            features = scst.feats[idx].to(ctx.device).float()
            tokens, logp, mask = ctx.step(features, samples=n, max_len=scst.max_len)  # (B*n, T)
        reward = scst_rewards(scst.cider, idx.repeat_interleave(n).tolist(), tokens, scst.vocab).view(-1, n)  # (B, n)
        baseline = (reward.sum(1, keepdim=True) - reward) / (n - 1)  # (B, n) mean of the other samples
        advantage = (reward - baseline).view(-1, 1).to(ctx.device)  # (B*n, 1)
        global_tokens = dist.sum([mask.sum().item()])[0]
        loss = -(advantage * logp * mask).sum() * (world / global_tokens)
        ctx.update(loss)
        total_loss, total_reward = total_loss + loss.item(), total_reward + reward.mean().item()
        batches += 1
        bar.set_postfix(cider=f"{total_reward / batches:.3f}")
    # summed over ranks, each step's losses add up to world x that step's loss: the mean comes out right
    total_loss, total_reward, batches = dist.sum([total_loss, total_reward, batches])
    return total_loss / max(batches, 1), total_reward / max(batches, 1)
