"""Everything streamtotal does with torch.distributed lives here (and nowhere else).

Under torchrun (``WORLD_SIZE`` > 1 in the environment) it joins the process group (NCCL on CUDA, gloo on
CPU); in a plain process it is a world of one and every collective is the identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    """This process's place in the job.

    Attributes:
        rank: global rank (0 in a single process).
        world_size: number of processes.
        local_rank: rank on this node (picks the CUDA device).
        collective_device: where collectives run: NCCL reduces only CUDA tensors, so under NCCL the CPU tensors
            the trainer sums (loss windows, validation sums, stop flags) travel through this process's GPU.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    collective_device: str = "cpu"

    @property
    def is_main(self) -> bool:
        """True on the process that writes checkpoints, logs and results."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when collectives actually communicate."""
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    @classmethod
    def from_environment(cls, device: torch.device) -> "DistContext":
        """Joins the torchrun process group if this process was started by torchrun with several ranks.

        Args:
            device: the device this process trains on (selects NCCL for CUDA, gloo otherwise).
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            # NCCL builds its communicators on the current device: without this every rank of a node would use GPU 0.
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            # Each torchrun attempt gets its own key prefix in the rendezvous store: with the agent's store shared
            # across restarts, a restarted gloo group read its dead predecessors' addresses and never connected.
            store, rank, size = next(dist.rendezvous("env://"))
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                    store=dist.PrefixStore(f"streamtotal/attempt-{attempt}", store),
                                    rank=rank, world_size=size)
        nccl = dist.get_backend() == "nccl"
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                   collective_device=f"cuda:{local_rank}" if nccl else "cpu")

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sums ``values`` over all ranks (returns a new tensor on ``values``' device; identity in a single
        process)."""
        if not self.is_distributed:
            return values.detach().clone()
        out = values.detach().to(self.collective_device, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(values.device)

    def barrier(self) -> None:
        """Waits for every rank (no-op in a single process)."""
        if self.is_distributed:
            dist.barrier()

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """Wraps a module in DistributedDataParallel when distributed, else returns it unchanged."""
        if not self.is_distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.local_rank] if next(module.parameters()).is_cuda else None
        return DistributedDataParallel(module, device_ids=device_ids)

    def close(self) -> None:
        """Leaves the process group (if this context joined one)."""
        if self.is_distributed:
            dist.destroy_process_group()
