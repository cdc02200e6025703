"""Small SPMD layers: RMSNorm (Replicate -> Replicate) and SiLU-and-mul (Shard -> Shard)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from agentspeed.kernels.api import KernelSet
from agentspeed.modeling.compiler import SpmdModule
from agentspeed.modeling.layers.weights import LazyTensor, copy_into
from agentspeed.modeling.placement import Replicate, Shard


class RMSNorm(SpmdModule):
    in_placement = Replicate()
    out_placement = Replicate()

    def __init__(self, size: int, eps: float, kernels: KernelSet, dtype: torch.dtype, device: str) -> None:
        super().__init__()
        self.eps = eps
        self.kernels = kernels
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device), requires_grad=False)

    def load(self, param: str, t: LazyTensor, part: str | None = None) -> None:
        copy_into(self.weight, t.read(), "norm weight")

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        return self.kernels.rms_norm(x, self.weight, self.eps)


class SiluAndMul(SpmdModule):
    """Input is this rank's [gate_local | up_local], so the op is purely local."""

    in_placement = Shard(-1)
    out_placement = Shard(-1)

    def __init__(self, kernels: KernelSet) -> None:
        super().__init__()
        self.kernels = kernels

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        return self.kernels.silu_and_mul(x)
