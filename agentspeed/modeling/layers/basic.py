"""Small SPMD layers: RMSNorm and Scale (Replicate -> Replicate), the gated activations
SiLU-and-mul and GELU(tanh)-and-mul (Shard -> Shard)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from agentspeed.kernels.api import KernelSet
from agentspeed.modeling.compiler import SpmdModule
from agentspeed.modeling.layers.weights import LazyTensor, copy_into
from agentspeed.modeling.placement import Replicate, Shard


class RMSNorm(SpmdModule):
    in_placement = Replicate()
    out_placement = Replicate()

    def __init__(self, size: int, eps: float, kernels: KernelSet, dtype: torch.dtype, device: str,
                 offset: float = 0.0) -> None:
        """offset: added to the checkpoint's weight at load (Gemma stores w for a scale of 1 + w)."""
        super().__init__()
        self.eps = eps
        self.kernels = kernels
        self.offset = offset
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device), requires_grad=False)

    def load(self, param: str, t: LazyTensor, part: str | None = None) -> None:
        w = t.read_dense()
        copy_into(self.weight, w.float() + self.offset if self.offset else w, "norm weight")

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        return self.kernels.rms_norm(x, self.weight, self.eps)


class SiluAndMul(SpmdModule):
    """Input is this rank's [gate_local | up_local], so the op is purely local.

    in_place: the input is a temporary no one reads after this op (the gate|up projection's
    output inside an MLP chain): the result is written over its gate half and returned as a
    strided view, one [T, F] activation fewer at the MLP's peak (the down projection reads
    rows at a stride)."""

    in_placement = Shard(-1)
    out_placement = Shard(-1)

    def __init__(self, kernels: KernelSet, in_place: bool = False) -> None:
        super().__init__()
        self.kernels = kernels
        self.in_place = in_place

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        if self.in_place and x.dim() == 2 and x.stride(-1) == 1:
            return self.kernels.silu_and_mul(x, x[:, :x.shape[-1] // 2])
        return self.kernels.silu_and_mul(x)


class GeluTanhAndMul(SpmdModule):
    """gelu_tanh(gate) * up over this rank's [gate_local | up_local] (Gemma's GeGLU)."""

    in_placement = Shard(-1)
    out_placement = Shard(-1)

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up


class Scale(SpmdModule):
    """x * factor, the factor rounded to x's dtype first (as Gemma scales its embeddings)."""

    in_placement = Replicate()
    out_placement = Replicate()

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        return x * torch.tensor(self.factor, dtype=x.dtype)
