"""Data parallelism inside one machine: the processes of one node train one model together.

Torch's own launcher (``torch.distributed.run``, or its ``elastic_launch`` API) starts the
processes and sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT;
``process_group`` joins them into a group (NCCL on CUDA, rank r on cuda:r; gloo on the CPU)
and hands the training loop a ``World``.

How the loop (``train.fit``) uses it, so that N processes make the update one process makes:

- every process draws the whole global batch from the same seeded generator (indices, label
  dropout, times, noise: ``flow.noised``) and computes the loss on its own rows only, a
  contiguous 1/N of the batch (``World.rows``);
- DDP averages the gradients, and the mean of N equal parts' mean losses is the whole batch's
  mean loss, so the step equals the single-process step up to the order of floating-point sums;
- each step's loss is averaged over the processes (``World.mean``), so what is logged,
  checked for finiteness and reported is the global batch's loss, the same on every process;
- a request to stop is agreed on at the end of a log window (``World.any``), so every process
  stops at the same step;
- the weights, and so the EMA and the optimizer state, stay identical on every process: the
  main process (rank 0) alone writes resume files, and every process reads the same one.

Nothing is pickled between processes: only tensors travel through the group.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .errors import DDMError


class DistributedError(DDMError, RuntimeError):
    """Data-parallel training that cannot run as asked."""


def per_process(batch_size: int, size: int) -> int:
    """The rows of a global batch of ``batch_size`` that each of ``size`` processes computes."""
    if batch_size % size:
        raise DistributedError(f"a batch of {batch_size} does not split evenly over {size} processes")
    return batch_size // size


@dataclass(frozen=True)
class World:
    """This process's place among the ``size`` processes that train one model."""

    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        """The process that writes files and reports progress."""
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This process's rows of a global batch."""
        n = per_process(batch_size, self.size)
        return slice(self.rank * n, (self.rank + 1) * n)

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` under DDP: backward averages the gradients over the processes. Its buffers
        are constants, identical everywhere, so they are not broadcast at every step (the flag
        that says so was renamed in torch 2.13)."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        renamed = "forward_sync_buffers" in inspect.signature(DDP).parameters
        return DDP(model, device_ids=ids, **{"forward_sync_buffers" if renamed else "broadcast_buffers": False})

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over the processes (a new tensor, the same on every one)."""
        total = value.detach().clone()
        torch.distributed.all_reduce(total)
        return total / self.size

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any process (a collective: every process must call it)."""
        value = torch.tensor([float(flag)], device=self.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())


@contextlib.contextmanager
def process_group(device: str) -> Iterator[World]:
    """Join the group torch's launcher set up (from its environment variables) and leave it at
    the end. ``device`` is "cpu" (gloo) or "cuda" (NCCL; this process takes cuda:LOCAL_RANK)."""
    if not torch.distributed.is_available():
        raise DistributedError("this PyTorch build has no torch.distributed; train on one process")
    try:
        rank, size, local = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except (KeyError, ValueError):
        raise DistributedError("not started by torch's launcher: RANK, WORLD_SIZE or LOCAL_RANK is unset") from None
    kind = torch.device(device).type
    if kind == "cuda":
        where = torch.device("cuda", local)
        torch.cuda.set_device(where)
        torch.distributed.init_process_group("nccl", device_id=where)
    elif kind == "cpu":
        where = torch.device("cpu")
        torch.distributed.init_process_group("gloo")
    else:
        raise DistributedError(f"data-parallel training runs on cpu or cuda, not {device!r}")
    try:
        yield World(rank, size, where)
        torch.distributed.barrier()  # done: every rank is past its last collective before any leaves
    finally:
        torch.distributed.destroy_process_group()
