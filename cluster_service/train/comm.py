"""The reducer the engine is given: identity in one process, torch.distributed under Ray Train.

This is the only seam between the math and distribution (DESIGN §4): the engine sums
statistics with `all_reduce_sum`, takes rank 0's decisions with `broadcast_object`, and wraps
nets with `wrap`; the Ray Train worker gathers its outputs on rank 0 with `gather_object`.
Nothing else in the engine knows about ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


class LocalComm:
    """Single process: every collective is the identity."""

    rank = 0
    world_size = 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
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

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if dist.get_backend() == "nccl" and t.device.type != "cuda":
            t = t.to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def gather_object(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj`, in rank order, on rank 0; None on the other ranks."""
        box = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, box, dst=0)
        return box

    def wrap(self, module: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        if self.device.type == "cuda":
            return DistributedDataParallel(module, device_ids=[self.device.index])
        return DistributedDataParallel(module)



def unwrap(module: nn.Module) -> nn.Module:
    """The underlying module of a DDP wrapper (or the module itself)."""
    return getattr(module, "module", module)
