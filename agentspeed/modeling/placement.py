"""Placements: how a logical tensor is laid out across tensor-parallel ranks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Replicate:
    """Every rank holds the full tensor."""

    def __str__(self) -> str:
        return "Replicate()"


@dataclass(frozen=True, slots=True)
class Shard:
    """Each rank holds an equal slice along `dim` (negative dims count from the end)."""

    dim: int

    def __str__(self) -> str:
        return f"Shard({self.dim})"


@dataclass(frozen=True, slots=True)
class Partial:
    """Each rank holds a summand; the logical tensor is the sum over ranks."""

    def __str__(self) -> str:
        return "Partial()"


Placement = Replicate | Shard | Partial
