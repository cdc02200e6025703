"""Lazy checkpoint tensors: loaders hand out handles that read only the slice a rank needs.
A GGUF loader's 2-D weights read as packed GgmlWeight views (kernels/ggml.py); layers that
can keep them packed do, others copy them in dequantized (logged: it costs memory)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from agentspeed.kernels.ggml import GgmlWeight

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LazyTensor:
    """A checkpoint tensor not yet read. `read(rows, cols)` returns only that slice
    (None = all) of a 1-D or 2-D tensor, as a torch tensor of the file's dtype."""

    shape: tuple[int, ...]
    reader: Callable[[slice | None, slice | None], torch.Tensor | GgmlWeight]

    def read(self, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor | GgmlWeight:
        return self.reader(rows, cols)

    def read_dense(self, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """`read`, dequantized if it came packed (for layers with no packed path; logged)."""
        return dense(self.read(rows, cols), "weight")

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


def dense(src: torch.Tensor | GgmlWeight, what: str) -> torch.Tensor:
    """src as a tensor: a packed weight dequantized, and logged (it costs memory)."""
    if isinstance(src, GgmlWeight):
        log.warning("%s: a %s weight %s dequantized at load (this layer has no packed path)",
                    what, src.name, src.shape)
        return src.dequantize()
    return src


def copy_into(param: torch.Tensor, src: torch.Tensor | GgmlWeight, what: str) -> None:
    src = dense(src, what)
    if tuple(src.shape) != tuple(param.shape):
        raise ValueError(f"{what}: checkpoint shape {tuple(src.shape)} != expected {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(src.to(param.dtype))
