"""The server's cross-request batching, against a fake model (no server, no weights)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from captioner.pipeline import Caption
from captioner.serve.batcher import Batcher


class FakeModel:
    """encode_prepared: stacks; decode: each image's caption is its pixel value; records the batches."""

    def __init__(self, fail_on: float | None = None) -> None:
        self.calls: list[tuple[int, dict]] = []
        self.fail_on = fail_on

    def encode_prepared(self, prepared):
        return torch.stack(prepared)

    def decode(self, feats, **options):
        self.calls.append((len(feats), options))
        values = feats[:, 0, 0, 0].tolist()
        if self.fail_on in values:
            raise RuntimeError("model failed")
        return [[Caption(f"image {v:g}", -1.0)] for v in values]


def image(v: float):
    return torch.full((3, 2, 2), v)


async def _gather(batcher: Batcher, jobs):
    batcher.start()
    try:
        return await asyncio.gather(*(batcher.caption(image(v), **opts) for v, opts in jobs), return_exceptions=True)
    finally:
        await batcher.stop()


def test_concurrent_requests_share_one_batch_and_get_their_own_answers():
    model = FakeModel()
    batcher = Batcher(model, max_batch=32, max_wait_ms=50)
    out = asyncio.run(_gather(batcher, [(v, {"beam_size": 3}) for v in range(8)]))
    assert [r[0].text for r in out] == [f"image {v}" for v in range(8)]
    assert batcher.batches == [8] and model.calls == [(8, {"beam_size": 3})]


def test_batches_are_capped_and_split_by_decoding_settings():
    model = FakeModel()
    batcher = Batcher(model, max_batch=4, max_wait_ms=50)
    jobs = [(v, {"beam_size": 3}) for v in range(6)] + [(9, {"beam_size": 1})]
    out = asyncio.run(_gather(batcher, jobs))
    assert [r[0].text for r in out] == [f"image {v}" for v, _ in jobs]
    assert batcher.batches[0] == 4 and all(n <= 4 for n in batcher.batches) and sum(batcher.batches) == 7
    assert sorted(n for n, opts in model.calls if opts == {"beam_size": 1}) == [1]  # one setting per batch
    assert sum(n for n, opts in model.calls if opts == {"beam_size": 3}) == 6


def test_a_failing_batch_fails_its_requests_only():
    model = FakeModel(fail_on=2.0)
    batcher = Batcher(model, max_batch=2, max_wait_ms=50)
    out = asyncio.run(_gather(batcher, [(v, {}) for v in range(4)]))
    assert isinstance(out[2], RuntimeError) and isinstance(out[3], RuntimeError)  # the batch of 2 and 3
    assert [r[0].text for r in out[:2]] == ["image 0", "image 1"]


@pytest.mark.parametrize("wait_ms", [0.0, 5.0])
def test_a_lone_request_is_not_held_back(wait_ms):
    batcher = Batcher(FakeModel(), max_batch=32, max_wait_ms=wait_ms)
    [r] = asyncio.run(_gather(batcher, [(1, {})]))
    assert r[0].text == "image 1" and batcher.batches == [1]


@pytest.mark.parametrize("extra", [0, 1])
def test_a_batch_takes_max_batch_images_and_not_one_more(extra):
    max_batch = 4
    batcher = Batcher(FakeModel(), max_batch=max_batch, max_wait_ms=50)
    out = asyncio.run(_gather(batcher, [(v, {}) for v in range(max_batch + extra)]))
    assert [r[0].text for r in out] == [f"image {v}" for v in range(max_batch + extra)]
    assert batcher.batches == [max_batch] + [1] * extra
