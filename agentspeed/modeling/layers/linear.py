"""Column- and row-parallel linear layers. Each loads only its slice of every weight.

ColumnParallelLinear: Replicate in, Shard(-1) out. Its output is a concatenation of logical
parts (q|k|v, gate|up); each part is split across ranks independently, so every rank holds
[part0_local | part1_local | ...].
RowParallelLinear: Shard(-1) in, Partial out (bias added on rank 0 only).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from agentspeed.kernels.api import KernelSet
from agentspeed.kernels.ggml import GgmlLinear, GgmlWeight
from agentspeed.modeling.comm import Communicator
from agentspeed.modeling.compiler import SpmdModule
from agentspeed.modeling.layers.weights import LazyTensor, copy_into
from agentspeed.modeling.placement import Partial, Replicate, Shard


def _load_part(layer: Any, off: int, src: torch.Tensor | GgmlWeight, what: str) -> None:
    """Rows [off, off + len(src)) of the layer's weight: packed sources are kept as they are
    (the dense `weight` is never touched, so it costs no memory), dense ones copied in."""
    if isinstance(src, GgmlWeight):
        if src.shape[1] != layer.weight.shape[1] or off + src.shape[0] > layer.weight.shape[0]:
            raise ValueError(f"{what}: checkpoint shape {src.shape} does not fit {tuple(layer.weight.shape)}")
        layer._packed.append((off, src))
    else:
        copy_into(layer.weight[off: off + src.shape[0]], src, what)


def _prepare(layer: ColumnParallelLinear | RowParallelLinear | ReplicatedLinear, kernels: KernelSet) -> None:
    """Switch the layer to the kernel set's linear with its weight in that kernel's layout.
    Once prepared, the dense `weight` is dropped when the kernel repacked it (no 2x memory)."""
    src: torch.Tensor | GgmlLinear = layer.weight
    if layer._packed:
        lin = GgmlLinear(layer.weight.shape[0], tuple(sorted(layer._packed, key=lambda p: p[0])))
        if lin.covered:
            src = lin
        else:  # packed parts beside float ones (an F32 tensor in a quantized file): all dense
            with torch.no_grad():
                for off, part in lin.parts:
                    layer.weight[off: off + part.shape[0]] = kernels.widen(GgmlLinear(part.shape[0], ((0, part),)))
            src = layer.weight
        layer._packed = []
    prepared = kernels.linear_prepare(src)
    layer._linear, layer._w = kernels.linear, prepared
    if prepared is not layer.weight:
        layer.weight = None  # type: ignore[assignment]


def even_split(size: int, comm: Communicator, what: str) -> tuple[int, int]:
    """(local size, start) of this rank's slice of a dimension split evenly across ranks."""
    if size % comm.world_size:
        raise ValueError(f"{what}={size} is not divisible by tensor parallel size {comm.world_size}")
    local = size // comm.world_size
    return local, comm.rank * local


class ColumnParallelLinear(SpmdModule):
    in_placement = Replicate()
    out_placement = Shard(-1)

    def __init__(
        self,
        input_size: int,
        parts: dict[str, tuple[int, int]],
        bias: bool,
        dtype: torch.dtype,
        device: str,
    ) -> None:
        """parts: name -> (local rows on this rank, first row of this rank's slice in the
        checkpoint tensor for that part). Local parts are stacked in the given order."""
        super().__init__()
        self.parts = parts
        self.offsets: dict[str, int] = {}
        off = 0
        for name, (local, _) in parts.items():
            self.offsets[name] = off
            off += local
        self.weight = nn.Parameter(torch.empty(off, input_size, dtype=dtype, device=device), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.zeros(off, dtype=dtype, device=device), requires_grad=False) if bias else None
        )
        # Until prepare_weights(): plain F.linear on the (in-place loaded) weight.
        self._linear: Any = F.linear
        self._w: torch.Tensor = self.weight.data
        self._packed: list[tuple[int, GgmlWeight]] = []

    def load(self, param: str, t: LazyTensor, part: str) -> None:
        local, start = self.parts[part]
        off = self.offsets[part]
        src = t.read(slice(start, start + local))
        if param == "weight":
            _load_part(self, off, src, f"{part}.weight")
            return
        assert self.bias is not None, f"no {param} in this layer"
        copy_into(self.bias[off : off + local], src, f"{part}.{param}")

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        return self._linear(x, self._w, self.bias)

    def prepare_weights(self, kernels: KernelSet) -> None:
        _prepare(self, kernels)


def merged_column(
    input_size: int, output_sizes: dict[str, int], bias: bool, comm: Communicator, dtype: torch.dtype, device: str
) -> ColumnParallelLinear:
    parts = {name: even_split(size, comm, name) for name, size in output_sizes.items()}
    return ColumnParallelLinear(input_size, parts, bias, dtype, device)


def qkv_column(
    hidden: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    bias: bool,
    comm: Communicator,
    dtype: torch.dtype,
    device: str,
) -> ColumnParallelLinear:
    """q/k/v split by heads. With fewer KV heads than ranks, each KV head is replicated on
    tp/num_kv_heads ranks (every rank still holds exactly one)."""
    tp, r = comm.world_size, comm.rank
    if num_heads % tp:
        raise ValueError(f"num_attention_heads={num_heads} is not divisible by tensor parallel size {tp}")
    if num_kv_heads % tp and tp % num_kv_heads:
        raise ValueError(f"num_key_value_heads={num_kv_heads} and tensor parallel size {tp} do not divide")
    q_local = num_heads // tp
    kv_local = max(1, num_kv_heads // tp)
    kv_start = (r * num_kv_heads) // tp
    parts = {
        "q": (q_local * head_dim, r * q_local * head_dim),
        "k": (kv_local * head_dim, kv_start * head_dim),
        "v": (kv_local * head_dim, kv_start * head_dim),
    }
    return ColumnParallelLinear(hidden, parts, bias, dtype, device)


class RowParallelLinear(SpmdModule):
    in_placement = Shard(-1)
    out_placement = Partial()

    def __init__(
        self, input_size: int, output_size: int, bias: bool, comm: Communicator, dtype: torch.dtype, device: str
    ) -> None:
        super().__init__()
        self.local_in, self.start = even_split(input_size, comm, "row-parallel input")
        self.weight = nn.Parameter(torch.empty(output_size, self.local_in, dtype=dtype, device=device), requires_grad=False)
        # The bias must be counted once in the sum over ranks.
        self.bias = (
            nn.Parameter(torch.zeros(output_size, dtype=dtype, device=device), requires_grad=False)
            if bias and comm.rank == 0
            else None
        )
        self._linear: Any = F.linear
        self._w: torch.Tensor = self.weight.data
        self._packed: list[tuple[int, GgmlWeight]] = []

    def load(self, param: str, t: LazyTensor, part: str | None = None) -> None:
        if param == "bias":
            if self.bias is not None:
                copy_into(self.bias, t.read(), "bias")
            return
        _load_part(self, 0, t.read(None, slice(self.start, self.start + self.local_in)), "weight")

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        return self._linear(x, self._w, self.bias)

    def prepare_weights(self, kernels: KernelSet) -> None:
        _prepare(self, kernels)


class ReplicatedLinear(SpmdModule):
    """The whole weight on every rank: Replicate in, Replicate out (e.g. MLA's latent
    down-projections, which every rank needs in full)."""

    in_placement = Replicate()
    out_placement = Replicate()

    def __init__(self, input_size: int, output_size: int, dtype: torch.dtype, device: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=dtype, device=device), requires_grad=False)
        self.bias = None
        self._linear: Any = F.linear
        self._w: torch.Tensor = self.weight.data
        self._packed: list[tuple[int, GgmlWeight]] = []

    def load(self, param: str, t: LazyTensor, part: str | None = None) -> None:
        _load_part(self, 0, t.read(), "weight")

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        return self._linear(x, self._w, None)

    def prepare_weights(self, kernels: KernelSet) -> None:
        _prepare(self, kernels)
