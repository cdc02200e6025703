"""Lazy checkpoint tensors: loaders hand out handles that read only the slice a rank needs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class LazyTensor:
    """A checkpoint tensor not yet read. `read(rows, cols)` returns only that slice
    (None = all) of a 1-D or 2-D tensor, as a torch tensor of the file's dtype."""

    shape: tuple[int, ...]
    reader: Callable[[slice | None, slice | None], torch.Tensor]

    def read(self, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        return self.reader(rows, cols)

    @staticmethod
    def of(t: torch.Tensor) -> LazyTensor:
        def reader(rows: slice | None, cols: slice | None) -> torch.Tensor:
            out = t
            if rows is not None:
                out = out[rows]
            if cols is not None:
                out = out[:, cols]
            return out

        return LazyTensor(tuple(t.shape), reader)


def copy_into(param: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if tuple(src.shape) != tuple(param.shape):
        raise ValueError(f"{what}: checkpoint shape {tuple(src.shape)} != expected {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(src.to(param.dtype))
