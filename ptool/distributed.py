"""Data-parallel training across processes: what ptool's training loops need from torch.distributed.

Launched under ``torchrun --nproc-per-node N`` (or inside a process group the caller initialized),
the passes that train split each step's items across the processes and average the gradients, so
all processes end with the parameters one process gets on the whole batch:

- :func:`world` finds the process group: an initialized default group, else one it initializes
  from torchrun's environment (``WORLD_SIZE > 1``; gloo on CPU, NCCL for CUDA tensors), with a
  timeout so a dead peer is an error, not a hang; else a world of one process.
- :meth:`World.part` gives this process its contiguous share of a step's ``count`` items and the
  weight ``share / count``. A step's loss is a mean over its items; each process returns the
  mean over its own items times that weight, i.e. the sum of its per-item losses over the global
  count, so the shares add up to the one-process loss even when ``count`` does not divide evenly.
- :meth:`World.reduce` sums the shares' gradients (and the loss) across processes before the
  optimizer step; :meth:`World.broadcast` gives every process rank 0's parameters.

Only rank 0 writes (:attr:`World.writes`): outputs, checkpoints, progress bars, notices.
"""

from __future__ import annotations

import datetime
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ptool.errors import PtoolError, UsageError, first_line

TIMEOUT_SECONDS = 300
"""How long a collective waits for the other processes before failing (a peer that died)."""


class DataParallelError(PtoolError):
    """A collective failed: another process of the data-parallel run died or stopped answering."""


@dataclass(frozen=True)
class World:
    """This process's place among the processes training together.

    Attributes:
        rank: this process (0 writes).
        size: the number of processes (1: no process group, nothing is communicated).
    """

    rank: int = 0
    size: int = 1

    @property
    def parallel(self) -> bool:
        return self.size > 1

    @property
    def writes(self) -> bool:
        """This process writes files and shows progress (rank 0)."""
        return self.rank == 0

    def part(self, count: int) -> tuple[slice, float]:
        """This process's contiguous share of ``count`` items, and its weight ``share / count``.

        Shares differ by at most one item (the first ``count % size`` ranks take one more); a
        share may be empty when ``count < size`` (weight 0).
        """
        base, extra = divmod(count, self.size)
        start = self.rank * base + min(self.rank, extra)
        stop = start + base + (self.rank < extra)
        return slice(start, stop), (stop - start) / count if count else 0.0

    def reduce(self, params: Sequence[torch.nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
        """Sum ``params``' gradients over the processes, in place, and return ``loss`` summed over
        them (detached). A gradient missing in some processes counts as zeros there; one missing in
        all stays ``None``, as in one process (Adam skips such a parameter)."""
        if not self.parallel:
            return loss.detach()
        present = torch.tensor([float(p.grad is not None) for p in params] + [float(loss.detach())],
                               dtype=torch.float64)
        self._collective(torch.distributed.all_reduce, present)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for p in params:  # one collective per device and dtype, on the gradients packed flat
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        for grads in groups.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            self._collective(torch.distributed.all_reduce, flat)
            for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(part.view_as(g))
        for p, seen in zip(params, present.tolist()):
            if not seen:
                p.grad = None
        return present[-1].to(loss.dtype)

    def broadcast(self, params: Sequence[torch.Tensor]) -> None:
        """Give every process rank 0's values of ``params`` (in place)."""
        if not self.parallel:
            return
        with torch.no_grad():
            for p in params:
                self._collective(torch.distributed.broadcast, p.data, src=0)

    def total(self, values: Sequence[float]) -> list[float]:
        """``values`` summed over the processes (each process passes its own)."""
        if not self.parallel:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64)
        self._collective(torch.distributed.all_reduce, t)
        return t.tolist()

    def _collective(self, op, *args, **kwargs) -> None:
        """Run one collective; a peer that died or hung is one line, not a backend traceback."""
        try:
            op(*args, **kwargs)
        except (RuntimeError, torch.distributed.DistError) as e:
            raise DataParallelError(f"data-parallel training over {self.describe()}: rank {self.rank} lost its peers "
                                    f"(another process failed or did not answer within {TIMEOUT_SECONDS} s): "
                                    f"{first_line(e)}") from e

    def describe(self) -> str:
        """``"2 processes"``: what a report says of the run."""
        return f"{self.size} process{'es' if self.size != 1 else ''}"


@functools.cache
def _from_environment() -> World:
    """A process group initialized from torchrun's environment, once per process."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return World()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise UsageError(f"WORLD_SIZE={size} but {', '.join(missing)} is not set: launch with torchrun "
                         "(torchrun --nproc-per-node N ...), which sets them")
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available() and os.environ.get("LOCAL_RANK"):
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=TIMEOUT_SECONDS))
    return World(torch.distributed.get_rank(), torch.distributed.get_world_size())


def world() -> World:
    """The processes this one trains with: the initialized default process group; else one
    initialized from torchrun's environment when ``WORLD_SIZE > 1``; else a world of one.

    Raises:
        UsageError: ``WORLD_SIZE > 1`` without the rest of torchrun's environment.
    """
    if not torch.distributed.is_available():
        return World()
    if torch.distributed.is_initialized():
        return World(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return _from_environment()


def rows(t: torch.Tensor | None, part: slice, count: int) -> torch.Tensor | None:
    """The rows ``part`` of a batch of ``count`` rows; a tensor that broadcasts over the batch
    (leading dim 1 while ``count > 1``) and ``None`` pass unchanged."""
    if t is None or t.dim() == 0 or (t.shape[0] == 1 and count > 1):
        return t
    return t[part]
