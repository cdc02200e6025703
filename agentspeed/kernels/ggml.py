"""Weights in ggml's storage types (GGUF tensor types), kept as stored.

A `GgmlWeight` is a 2-D weight [N, K] whose rows are runs of packed blocks, viewed straight
from the memory-mapped file: nothing is copied at load, and pages are read in as the kernels
first touch them. Row slices (column-parallel shards, vocabulary shards) and block-aligned
column slices (row-parallel shards) are views too.

`GgmlLinear` is what a linear layer hands the kernel set when its weight came packed: the
parts of a merged projection (q|k|v, gate|up) may be stored in different types (a Q4_K_M
file keeps some V projections in Q6_K), so each part keeps its own. Backends that read
packed weights say so when they register (`packed=True`); for any other backend the
kernel set dequantizes them once to dense, and says what that cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# GGMLQuantizationType -> (name, weights per block, bytes per block) for the types the native
# kernels read (kernels/native/ggml_blocks.h). F16/BF16 are taken 32 weights at a time.
NATIVE_TYPES: dict[int, tuple[str, int, int]] = {
    1: ("F16", 32, 64), 30: ("BF16", 32, 64),
    2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 39: ("MXFP4", 32, 17),
}


def type_name(qtype: int) -> str:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType(qtype).name


@dataclass(frozen=True, slots=True)
class GgmlWeight:
    """Rows [N, K] of a ggml-typed tensor. `data` is uint8 [N, row_bytes]; its row stride may
    exceed row_bytes (a column slice of a wider tensor)."""

    qtype: int
    shape: tuple[int, int]
    data: torch.Tensor

    def __post_init__(self) -> None:
        n, k = self.shape
        _, qk, nbytes = NATIVE_TYPES[self.qtype]
        assert k % qk == 0 and self.data.shape == (n, k // qk * nbytes) and self.data.dtype == torch.uint8
        assert self.data.stride(1) == 1

    @property
    def name(self) -> str:
        return NATIVE_TYPES[self.qtype][0]

    @property
    def block(self) -> int:
        return NATIVE_TYPES[self.qtype][1]

    @property
    def nbytes(self) -> int:
        return self.data.shape[0] * self.data.shape[1]

    @staticmethod
    def of(qtype: int, shape: tuple[int, int], raw: np.ndarray) -> GgmlWeight:
        """From the file's bytes for this tensor (any shape; viewed, not copied)."""
        arr = raw.reshape(shape[0], -1).view(np.uint8)
        return GgmlWeight(qtype, shape, torch.from_numpy(arr))

    def rows(self, start: int, stop: int) -> GgmlWeight:
        return GgmlWeight(self.qtype, (stop - start, self.shape[1]), self.data[start:stop])

    def cols(self, start: int, stop: int) -> GgmlWeight:
        """Columns [start, stop): ValueError unless both fall on block boundaries."""
        _, qk, nbytes = NATIVE_TYPES[self.qtype]
        if start % qk or stop % qk:
            raise ValueError(f"a {self.name} weight can only be split at multiples of {qk} columns "
                             f"(asked for [{start}, {stop}))")
        return GgmlWeight(self.qtype, (self.shape[0], stop - start),
                          self.data[:, start // qk * nbytes: stop // qk * nbytes])

    def take_rows(self, index: torch.Tensor) -> GgmlWeight:
        """Rows in the given order (a copy: e.g. llama.cpp's rotary row permutation undone)."""
        return GgmlWeight(self.qtype, (len(index), self.shape[1]), self.data.index_select(0, index))

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight, by the `gguf` package's numpy decoders (the reference the native
        kernels are tested against; slow, for tests and backends that cannot read packed)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        if self.qtype == 1:  # gguf keeps F16 as numpy float16, not bytes
            arr = self.data.contiguous().numpy().view(np.float16).astype(np.float32)
        else:
            arr = dequantize(self.data.contiguous().numpy(), GGMLQuantizationType(self.qtype))
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).reshape(self.shape)


@dataclass(frozen=True, slots=True)
class GgmlLinear:
    """A linear weight [out_features, K] as packed parts: (first output row, weight). Rows no
    part covers (vocabulary padding) produce zeros."""

    out_features: int
    parts: tuple[tuple[int, GgmlWeight], ...]
    covered: bool = field(init=False)  # every output row has a part
    # Per part (first row, type, data address, row stride in bytes, rows): what the native
    # kernels take, made once (a decode step makes ~100 calls; see kernels/cpu_ggml.py).
    native: tuple[tuple[int, int, int, int, int], ...] = field(init=False, repr=False, compare=False)
    # A backend's prepared call arguments for this weight (kernels/cpu_ggml.py), made on first use.
    call_cache: dict[str, Any] = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        end = 0
        for off, w in self.parts:
            assert off >= end and w.shape[1] == self.in_features, "parts overlap or disagree on K"
            end = off + w.shape[0]
        assert end <= self.out_features
        object.__setattr__(self, "covered", sum(w.shape[0] for _, w in self.parts) == self.out_features)
        object.__setattr__(self, "native", tuple(
            (off, w.qtype, w.data.data_ptr(), w.data.stride(0), w.shape[0]) for off, w in self.parts))

    @property
    def in_features(self) -> int:
        return self.parts[0][1].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for _, w in self.parts)

    def dequantize(self) -> torch.Tensor:
        out = torch.zeros(self.out_features, self.in_features)
        for off, w in self.parts:
            out[off: off + w.shape[0]] = w.dequantize()
        return out

    def describe(self) -> str:
        return "+".join(sorted({w.name for _, w in self.parts}))
