"""The reducer the engine is given: identity in one process, torch.distributed under Ray Train.

This is the only seam between the math and distribution (DESIGN §4): the engine sums
statistics with `all_reduce_sum` (bounds with `all_reduce_max`), takes rank 0's decisions with
`broadcast_object`, gathers bounded samples on rank 0 with `gather_object`, and wraps nets with
`wrap`. Nothing else in the engine knows about ranks.

Every collective adds the bytes this rank sent and received to a counter the engine reads per
epoch: `bytes_moved` (EpochRecord.comm_bytes: statistics, samples, decisions; must not grow with
N) and, for the nets' DDP gradient all-reduce, `grad_bytes` (EpochRecord.grad_bytes: a fixed size
per optimizer step, so per epoch it follows the number of steps). An all-reduce counts its tensor
twice (out and back: the logical payload, not the ring's 2 (W - 1) / W); a broadcast or gather the
pickled objects this rank sent or received. In one process (LocalComm, or a group of one) nothing
crosses: 0.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


class LocalComm:
    """Single process: every collective is the identity."""

    rank = 0
    world_size = 1
    bytes_moved = 0
    grad_bytes = 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def broadcast_object(self, obj: Any) -> Any:
        return obj

    def gather_object(self, obj: Any) -> list[Any] | None:
        return [obj]

    def wrap(self, module: nn.Module) -> nn.Module:
        return module



class TorchDistComm:
    """torch.distributed (gloo on CPU, NCCL on GPU); the process group must already exist."""

    def __init__(self, device: torch.device):
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = device
        self.bytes_moved = 0
        self.grad_bytes = 0

    def _all_reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        if dist.get_backend() == "nccl" and t.device.type != "cuda":
            t = t.to(self.device)
        dist.all_reduce(t, op=op)
        self.bytes_moved += 2 * t.numel() * t.element_size() * (self.world_size > 1)
        return t

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t, dist.ReduceOp.SUM)

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t, dist.ReduceOp.MAX)

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        size = len(pickle.dumps(box[0])) if self.world_size > 1 else 0
        self.bytes_moved += size * (self.world_size - 1) if self.rank == 0 else size
        return box[0]

    def gather_object(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj`, in rank order, on rank 0; None on the other ranks."""
        box = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, box, dst=0)
        if self.rank == 0:
            self.bytes_moved += sum(len(pickle.dumps(o)) for o in box[1:])
        else:
            self.bytes_moved += len(pickle.dumps(obj))
        return box

    def wrap(self, module: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        if self.device.type == "cuda":
            ddp = DistributedDataParallel(module, device_ids=[self.device.index])
        else:
            ddp = DistributedDataParallel(module)
        ddp.register_comm_hook(self, _counted_allreduce)
        return ddp


def _counted_allreduce(comm: TorchDistComm, bucket):
    """DDP's gradient all-reduce (the mean over ranks, as DDP's default hook), counted in
    comm.grad_bytes."""
    t = bucket.buffer()
    comm.grad_bytes += 2 * t.numel() * t.element_size() * (comm.world_size > 1)
    t.div_(comm.world_size)
    return dist.all_reduce(t, async_op=True).get_future().then(lambda fut: fut.value()[0])


def unwrap(module: nn.Module) -> nn.Module:
    """The underlying module of a DDP wrapper (or the module itself)."""
    return getattr(module, "module", module)
