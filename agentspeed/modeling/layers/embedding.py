"""Vocab-parallel embedding (Replicate ids -> Partial hidden) and LM head
(Replicate hidden -> Shard(-1) logits). Each rank holds rows [rank*Vp, (rank+1)*Vp) of the
vocabulary, Vp = ceil(V / tp); rows past V are zero padding."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from agentspeed.kernels.api import KernelSet
from agentspeed.modeling.comm import Communicator
from agentspeed.modeling.compiler import SpmdModule
from agentspeed.modeling.layers.weights import LazyTensor, copy_into
from agentspeed.modeling.placement import Partial, Replicate, Shard


def _vocab_shard(vocab_size: int, comm: Communicator) -> tuple[int, int]:
    per_rank = -(-vocab_size // comm.world_size)
    return per_rank, comm.rank * per_rank


def _load_rows(weight: torch.Tensor, t: LazyTensor, start: int, vocab_size: int) -> None:
    end = min(start + weight.shape[0], vocab_size)
    with torch.no_grad():
        weight.zero_()
        if end > start:
            copy_into(weight[: end - start], t.read(slice(start, end)), "vocab rows")


class VocabParallelEmbedding(SpmdModule):
    in_placement = Replicate()
    out_placement = Partial()

    def __init__(self, vocab_size: int, hidden: int, comm: Communicator, dtype: torch.dtype, device: str) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.per_rank, self.start = _vocab_shard(vocab_size, comm)
        self.sharded = comm.world_size > 1
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden, dtype=dtype, device=device), requires_grad=False)

    def load(self, param: str, t: LazyTensor, part: str | None = None) -> None:
        _load_rows(self.weight, t, self.start, self.vocab_size)

    def forward(self, ids: torch.Tensor, ctx: Any = None) -> torch.Tensor:
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

    def load(self, param: str, t: LazyTensor, part: str | None = None) -> None:
        _load_rows(self.weight, t, self.start, self.vocab_size)

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        return self._linear(x, self._w, None)

    def prepare_weights(self, kernels: KernelSet) -> None:
        """Use the kernel set's linear. A repacked copy is kept beside `weight` (which a tied
        embedding still reads), so a tied head costs one more vocab x hidden matrix."""
        self._linear, self._w = kernels.linear, kernels.linear_prepare(self.weight)
