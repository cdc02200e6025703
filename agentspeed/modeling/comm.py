"""The communicator: the only place that calls torch.distributed collectives. Only the
placement compiler's Redistribute modules (and the execution plane, for control data) use it;
model code never does. With world_size 1 every collective is the identity."""

from __future__ import annotations

import datetime
import logging

import torch
import torch.distributed as dist

from agentspeed.config import ParallelConfig

log = logging.getLogger(__name__)


class Communicator:
    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        self.rank = rank
        self.world_size = world_size

    @staticmethod
    def init(parallel: ParallelConfig, device: str) -> Communicator:
        """Join the process group (gloo on CPU, NCCL on CUDA) when tp > 1."""
        if parallel.tp == 1:
            return Communicator()
        if not dist.is_initialized():
            backend = "nccl" if device == "cuda" else "gloo"
            dist.init_process_group(
                backend,
                init_method=f"tcp://{parallel.master_addr}:{parallel.master_port}",
                rank=parallel.rank,
                world_size=parallel.tp,
                timeout=datetime.timedelta(seconds=120),
            )
            log.info("rank %d/%d joined %s process group", parallel.rank, parallel.tp, backend)
        return Communicator(parallel.rank, parallel.tp)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return x
        x = x.contiguous()
        dist.all_reduce(x)
        return x

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=dim)

    def reduce_scatter(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if self.world_size == 1:
            return x
        # gloo has no reduce_scatter: all-reduce then keep this rank's slice.
        return self.slice(self.all_reduce(x), dim)

    def slice(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if self.world_size == 1:
            return x
        return x.chunk(self.world_size, dim=dim)[self.rank].contiguous()

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.world_size == 1:
            return x
        dist.broadcast(x, src)
        return x

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def shutdown(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
