"""Data-parallel training across processes: who this process is, the process group, and the few
collectives the training loop needs.

`torchrun` starts one process per device and sets RANK, WORLD_SIZE and LOCAL_RANK; `init()` joins
them into a process group (gloo on CPUs, nccl on CUDA). Without torchrun, or with one process,
`Dist()` is a single process and every collective here returns its input, so single-process
training runs the same code with no process group at all.

When one process fails, the others must not wait for it forever. Gloo notices a peer whose
sockets closed and raises in the waiting collective; torchrun also stops the remaining workers
when one exits non-zero. Work that only rank 0 does (loading the checkpoint, validation,
writing files) goes through `on_main`, which hands rank 0's result *or its exception* to every
rank, so a bad checkpoint path, say, stops all ranks with the same one-line message.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist

from .device import resolve_device
from .errors import first_line
from .settings import from_env

T = TypeVar("T")

#: how long a collective may wait for the other processes before failing
DEFAULT_TIMEOUT_MIN = 30


class PeerFailure(RuntimeError):
    """Another process of this job stopped (its own error is printed by that process)."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; the default is a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world_size}"

    # ---- collectives (no-ops for a single process) -------------------------------------------------
    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over all processes (token counts, loss totals), in float64."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self._collective("all_reduce", lambda: torch_dist.all_reduce(t))
        return t.tolist()

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank (pickled in memory only; nothing touches the disk)."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        self._collective("broadcast", lambda: torch_dist.broadcast_object_list(box, src=0, device=self.device))
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only; every rank returns its result, or raises the exception it raised."""
        if not self.enabled:
            return fn()
        outcome: tuple[bool, Any] = (True, None)
        if self.is_main:
            try:
                outcome = (True, fn())
            except Exception as e:  # handed to every rank, raised there too
                outcome = (False, e)
        ok, value = self.broadcast(outcome)
        if not ok:
            raise value
        return value

    def _collective(self, what: str, op: Callable[[], Any]) -> None:
        try:
            op()
        except RuntimeError as e:  # gloo: "Connection closed by peer", nccl: watchdog / abort
            raise PeerFailure(
                f"{self}: lost contact with the other processes during {what} "
                f"({first_line(e)}); another rank probably failed: see its message"
            ) from e


#: how the backends word a peer that went away (gloo raises plain RuntimeErrors from DDP's hooks)
_PEER_GONE = ("closed by peer", "reset by peer", "broken pipe", "connection refused", "nccl communicator was aborted")


def lost_peer(e: BaseException) -> bool:
    """Did this error come from another process of the job going away (rather than from here)?"""
    return isinstance(e, PeerFailure) or (isinstance(e, RuntimeError) and any(m in str(e).lower() for m in _PEER_GONE))


def init(device: str | torch.device = "auto", timeout_min: float = DEFAULT_TIMEOUT_MIN) -> Dist:
    """Join the job torchrun started (no-op for one process) and pick this process's device:
    with CUDA, each process of a node takes the GPU numbered by its LOCAL_RANK."""
    rank, world, local_rank = from_env()
    dev = _local_device(resolve_device(device), local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not torch_dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        torch_dist.init_process_group(
            backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=timeout_min),
            device_id=dev if dev.type == "cuda" else None,
        )
    return Dist(rank, world, local_rank, dev)


def current(device: torch.device) -> Dist:
    """This process's place in an already-initialised process group (a single process without one)."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return Dist(device=device)
    local_rank = from_env()[2]
    return Dist(torch_dist.get_rank(), torch_dist.get_world_size(), local_rank, _local_device(device, local_rank))


def _local_device(device: torch.device, local_rank: int) -> torch.device:
    """'cuda' without a number -> this process's GPU on its node (cuda:LOCAL_RANK)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def shutdown() -> None:
    """Leave the process group (after a clean finish; a failing process just exits)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
