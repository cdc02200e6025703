"""Products and lookups on packed ggml weights (kernels/native/ggml_linear.cpp), for the
`cpu_native` backend.

linear: one or two rows of x (a sequence's decode step) stream each weight once in its
stored form, decoded in registers (ggml_gemv); more rows (batched decodes, drafts, prefill)
decode each weight row once per call into an L2-sized fp32 buffer and multiply it in
register tiles (ggml_gemm). Both are fp32 products of the stored weights at every row count
(no activation rounding), and no dense copy of a weight outlives the call.
"""

from __future__ import annotations

import ctypes

import torch

from agentspeed.kernels.ggml import GgmlLinear, GgmlWeight
from agentspeed.kernels.native import load

GEMV_ROWS = 2  # above this ggml_gemm is as fast or faster (benchmarks/kernels/bench_ggml_linear.py)

_P, _I, _L = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
_lib = load()
_gemv = _lib.ggml_gemv
_gemv.argtypes = (_I, _P, _I, _L, _I, _P, _L, _I, _P, _P, _L, _I)
_gemv.restype = _I
_gemm = _lib.ggml_gemm
_gemm.argtypes = (_I, _P, _I, _L, _I, _P, _L, _I, _P, _P, _L, _I)
_gemm.restype = _I
_dequant = _lib.ggml_dequant
_dequant.argtypes = (_I, _P, _L, _I, _I, _P, _L, _I)
_dequant.restype = _I
_rows = _lib.ggml_get_rows
_rows.argtypes = (_I, _P, _L, _I, _I, _P, _I, _P, _I)
_rows.restype = _I


def _check(rc: int, what: str, w: GgmlWeight) -> None:
    if rc != 0:
        raise RuntimeError(f"ggml {what} returned {rc} for a {w.name} weight {w.shape}")


def dequantize(w: GgmlWeight, out: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 weight [N, K] (into `out`, which may be a row-strided view)."""
    n, k = w.shape
    out = torch.empty(n, k) if out is None else out
    assert out.shape == (n, k) and out.stride(1) == 1 and out.dtype == torch.float32
    _check(_dequant(w.qtype, w.data.data_ptr(), w.data.stride(0), n, k, out.data_ptr(), out.stride(0),
                    torch.get_num_threads()), "dequant", w)
    return out


def get_rows(w: GgmlWeight, ids: torch.Tensor) -> torch.Tensor:
    """Embedding rows [*ids.shape, K] fp32; ids outside [0, N) give zero rows."""
    flat = ids.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty(flat.numel(), w.shape[1])
    _check(_rows(w.qtype, w.data.data_ptr(), w.data.stride(0), w.shape[0], w.shape[1], flat.data_ptr(),
                 flat.numel(), out.data_ptr(), torch.get_num_threads()), "get_rows", w)
    return out.view(*ids.shape, w.shape[1])


def linear(x: torch.Tensor, lin: GgmlLinear, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T + bias, W packed (see the module docstring for which path a row count takes)."""
    k = x.shape[-1]
    rows = x.numel() // k
    n = lin.out_features
    x2 = x.reshape(rows, k)
    if x2.stride(1) != 1 or x.dtype != torch.float32:
        x2 = x2.float().contiguous()
    y = torch.empty(rows, n) if lin.covered else torch.zeros(rows, n)
    threads = torch.get_num_threads()
    if rows == 0:
        return y.view(*x.shape[:-1], n)
    fn, what = (_gemv, "gemv") if rows <= GEMV_ROWS else (_gemm, "gemm")
    for off, w in lin.parts:
        b = None if bias is None else bias[off:]
        _check(fn(w.qtype, x2.data_ptr(), rows, x2.stride(0), k, w.data.data_ptr(), w.data.stride(0), w.shape[0],
                     None if b is None else b.data_ptr(), y[:, off:].data_ptr(), n, threads), what, w)
    return y.view(*x.shape[:-1], n)
