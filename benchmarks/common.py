"""Shared set-up for the benchmark scripts: a decoder and features that both sides use."""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path

import torch

from captioner.models import ShowTellDecoder
from captioner.vocab import Vocabulary

# the benchmarks print their own lines: the library's progress bars and reports would only interleave
logging.getLogger("captioner").setLevel(logging.WARNING)

REPO = Path(__file__).resolve().parents[1]
FLICKR8K = REPO.parent / "shared" / "data" / "flickr8k"


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def random_decoder(
    vocab_size: int = 2500, feature_dim: int = 1280, seed: int = 0
) -> tuple[ShowTellDecoder, Vocabulary]:
    """A Show-and-Tell decoder of the default size with random weights, and a matching vocabulary."""
    torch.manual_seed(seed)
    vocab = Vocabulary([f"w{i}" for i in range(vocab_size - 4)], min_count=1)
    return ShowTellDecoder(len(vocab), feature_dim).eval(), vocab


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0
