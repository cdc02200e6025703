"""Vocab-parallel embedding (Replicate ids -> Partial hidden) and LM head
(Replicate hidden -> Shard(-1) logits). Each rank holds rows [rank*Vp, (rank+1)*Vp) of the
vocabulary, Vp = ceil(V / tp); rows past V are zero padding."""

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


def _vocab_shard(vocab_size: int, comm: Communicator) -> tuple[int, int]:
    per_rank = -(-vocab_size // comm.world_size)
    return per_rank, comm.rank * per_rank


def _load_rows(weight: torch.Tensor, t: LazyTensor, start: int, vocab_size: int) -> GgmlWeight | None:
    """This rank's vocabulary rows: returned as they are if they came packed (rows past the
    vocabulary are then implicit zeros), else copied into `weight`."""
    end = min(start + weight.shape[0], vocab_size)
    src = t.read(slice(start, end)) if end > start else None
    if isinstance(src, GgmlWeight):
        if src.shape[1] != weight.shape[1]:
            raise ValueError(f"vocab rows: checkpoint shape {src.shape} does not fit {tuple(weight.shape)}")
        return src
    with torch.no_grad():
        weight.zero_()
        if src is not None:
            copy_into(weight[: end - start], src, "vocab rows")
    return None


class VocabParallelEmbedding(SpmdModule):
    in_placement = Replicate()
    out_placement = Partial()

    def __init__(self, vocab_size: int, hidden: int, comm: Communicator, dtype: torch.dtype, device: str) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.per_rank, self.start = _vocab_shard(vocab_size, comm)
        self.sharded = comm.world_size > 1
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden, dtype=dtype, device=device), requires_grad=False)
        # Packed rows (GGUF), looked up by the kernel set's packed_rows; `weight` then unused.
        self.packed: GgmlWeight | None = None
        self._rows: Any = None

    def load(self, param: str, t: LazyTensor, part: str | None = None) -> None:
        self.packed = _load_rows(self.weight, t, self.start, self.vocab_size)

    def prepare_weights(self, kernels: KernelSet) -> None:
        """Keep packed rows packed where the kernel set reads them; else dequantize them once."""
        if self.packed is None:
            return
        if kernels.packed_rows is not None:
            self._rows = kernels.packed_rows
            return
        dense = kernels.widen(GgmlLinear(self.per_rank, ((0, self.packed),)))
        with torch.no_grad():
            self.weight.copy_(dense)
        self.packed = None

    def forward(self, ids: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        if self._rows is not None:
            assert self.packed is not None
            return self._rows(self.packed, ids - self.start if self.sharded else ids)
        if not self.sharded:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        inside = (local >= 0) & (local < self.per_rank)
        out = F.embedding(local.clamp(0, self.per_rank - 1), self.weight)
        return out * inside.unsqueeze(-1).to(out.dtype)


class ParallelLMHead(SpmdModule):
    in_placement = Replicate()
    out_placement = Shard(-1)

    def __init__(
        self,
        vocab_size: int,
        hidden: int,
        comm: Communicator,
        dtype: torch.dtype,
        device: str,
        tied_to: VocabParallelEmbedding | None = None,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.per_rank, self.start = _vocab_shard(vocab_size, comm)
        self.tied = tied_to is not None
        self.weight = (
            tied_to.weight
            if tied_to is not None
            else nn.Parameter(torch.empty(self.per_rank, hidden, dtype=dtype, device=device), requires_grad=False)
        )
        self._linear: Any = F.linear
        self._w: torch.Tensor = self.weight.data
        # A tuple, so the embedding is not registered a second time as this module's child.
        self._tied: tuple[VocabParallelEmbedding, ...] = () if tied_to is None else (tied_to,)
        self.packed: GgmlWeight | None = None

    def load(self, param: str, t: LazyTensor, part: str | None = None) -> None:
        self.packed = _load_rows(self.weight, t, self.start, self.vocab_size)

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        return self._linear(x, self._w, None)

    def prepare_weights(self, kernels: KernelSet) -> None:
        """Use the kernel set's linear. Packed rows (its own, or a tied embedding's) are shared
        as they are where the kernel reads them packed, so a tied head costs nothing more;
        dense ones are repacked beside `weight` (which a tied embedding still reads)."""
        packed = self._tied[0].packed if self._tied else self.packed
        if packed is not None:
            self._w = kernels.linear_prepare(GgmlLinear(self.per_rank, ((0, packed),)))
            self._linear = kernels.linear
            self.packed = None
            return
        self._linear, self._w = kernels.linear, kernels.linear_prepare(self.weight)
