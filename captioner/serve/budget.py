"""How much memory decoding uploads may take at once: each image's cost is read from its header
(images.decode_bytes) before anything is decoded, and held from a request's budget and from the
server's while it is decoded; a request that would go over waits, and gets 503 when waiting takes
too long. After decoding, the C allocator is asked to give freed memory back to the system."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util


class Busy(Exception):
    """The server's decoding budget stayed full for longer than the request may wait."""


class ByteBudget:
    """A count of bytes that holders take and give back; `hold` waits (up to `wait_s`) for room."""

    def __init__(self, capacity: int, wait_s: float | None = None) -> None:
        self.capacity, self.wait_s, self.used = capacity, wait_s, 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, n: int):
        async with self._changed:
            if self.used + n > self.capacity:  # room now is taken now: Python 3.11's wait_for(..., 0) never waits
                try:
                    await asyncio.wait_for(self._changed.wait_for(lambda: self.used + n <= self.capacity), self.wait_s)
                except TimeoutError:
                    raise Busy from None
            self.used += n
        try:
            yield
        finally:
            async with self._changed:
                self.used -= n
                self._changed.notify_all()


def _trimmer():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc: nothing to ask
        return None


_MALLOC_TRIM = _trimmer()


def give_back_memory() -> None:
    """Return the heap's free pages to the system (glibc keeps freed 16 MB image blocks otherwise:
    a 10000x10000 upload would leave its 400 MB in the process)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
