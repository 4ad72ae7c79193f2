"""Requests batched together: concurrent requests' images go through one encoder pass and one
batched beam search (up to `max_batch` images, gathered for at most `max_wait_ms` after the
first), on one worker thread, so the event loop keeps accepting connections while the model works.

Batched beam search needs one set of decoding settings, so images are grouped by their
request's settings; a request with its own settings still shares the batch's encoder pass
time with nothing else, but waits no longer than `max_wait_ms`.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..api import Captioner
from ..pipeline import Caption


@dataclass
class _Job:
    pixels: Any  # (3, S, S) one preprocessed image (a tensor, or an array for an exported model)
    options: tuple[tuple[str, Any], ...]  # decoding settings, hashable
    future: asyncio.Future = field(repr=False)


class Batcher:
    """`await batcher.caption(pixels, **options)` -> that image's n-best Captions."""

    def __init__(self, model: Captioner, max_batch: int = 32, max_wait_ms: float = 5.0) -> None:
        self.model = model
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="captioner-model")
        self.batches: list[int] = []  # sizes of the batches run (for tests and /api/health)
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None

    # ---- lifecycle (the app's lifespan starts and stops it) -----------------------------------
    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True, cancel_futures=True)

    @property
    def waiting(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    # ---- use -----------------------------------------------------------------------------------
    async def caption(self, pixels: Any, **options: Any) -> list[Caption]:
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(pixels, tuple(sorted(options.items())), future))
        return await future

    async def run(self, fn, *args: Any) -> Any:
        """Run other model work (a sequence) on the model's thread, in turn with the batches."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            deadline = time.monotonic() + self.max_wait
            while len(jobs) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    jobs.append(await asyncio.wait_for(self._queue.get(), left))
                except TimeoutError:
                    break
            groups: dict[tuple, list[_Job]] = {}
            for job in jobs:
                if not job.future.done():  # a client that left no longer waits for its answer
                    groups.setdefault(job.options, []).append(job)
            for options, group in groups.items():
                try:
                    results = await loop.run_in_executor(self.executor, self._decode, group, dict(options))
                except Exception as e:  # noqa: BLE001 - handed to the requests, which answer it
                    for job in group:
                        if not job.future.done():
                            job.future.set_exception(e)
                    continue
                for job, result in zip(group, results):
                    if not job.future.done():
                        job.future.set_result(result)

    def _decode(self, group: list[_Job], options: dict[str, Any]) -> list[list[Caption]]:
        self.batches.append(len(group))
        return self.model.decode(self.model.encode_prepared([job.pixels for job in group]), **options)
