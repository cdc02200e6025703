"""`cpu_native` backend: C++ kernels (kernels/native/) for what torch ops do poorly on CPU.

paged_attention_decode reads K/V pages in their storage type (fp32, bf16, fp16, fp8 with
per-token scales) and converts rows in registers while streaming them, once per KV head for
its whole GQA group; the torch backend converts each sequence's context to fp32 first, so
a 16-bit cache halves memory but not time there. Measured in docs/benchmarks.md
(`benchmarks/bench_long_decode.py`).

Registered (above the `cpu` backend) only when the library builds here; otherwise the reason
is recorded, logged once, and reported if someone forces the backend. Set
AGENTSPEED_NATIVE=0 to not build or use it.
"""

from __future__ import annotations

import ctypes
import logging
import os

import torch

from agentspeed.kernels.api import AttentionMetadata
from agentspeed.kernels.native import NativeBuildError, load
from agentspeed.kernels.registry import register_kernel, register_unavailable

log = logging.getLogger(__name__)

BACKEND = "cpu_native"
_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float8_e4m3fn: 3}
# Tokens per work item. Smaller spans make more items for the threads to share (one
# sequence x 3 KV heads at 8K context is 48 items at 512) at the cost of one merge each.
SPLIT_TOKENS = 512
MAX_GROUP, MAX_DIM = 32, 256  # the C++ kernel's stack buffers

_P = ctypes.c_void_p
_I = ctypes.c_int
_ARGTYPES = (_P, _P, _P, _P, _P, _I, _P, ctypes.c_int64, _P, _I, _I, _I, _I, _I,
             ctypes.c_float, _P, _I, _I)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    if _fn is None:
        raise RuntimeError(f"{BACKEND} is unavailable here: {_UNAVAILABLE}")
    B, H, D = q.shape
    kvh = k_cache.shape[2]
    code = _CODES.get(k_cache.dtype)
    if (code is None or v_cache.dtype != k_cache.dtype or q.dtype != torch.float32
            or H % kvh or H // kvh > MAX_GROUP or D > MAX_DIM or k_cache.shape != v_cache.shape
            or (code == 3) != (k_scale is not None and v_scale is not None)):
        raise ValueError(f"{BACKEND} decode cannot take q {tuple(q.shape)} {q.dtype}, cache "
                         f"{tuple(k_cache.shape)} {k_cache.dtype} (scales: {k_scale is not None})")
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    q = q.contiguous()
    table = meta.page_table if meta.page_table.is_contiguous() else meta.page_table.contiguous()
    lens = meta.seq_lens.to(torch.int32).contiguous()
    out = torch.empty_like(q)
    rc = _fn(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), _ptr(k_scale), _ptr(v_scale),
             code, table.data_ptr(), table.stride(0), lens.data_ptr(), B, H, kvh, D,
             k_cache.shape[1], scale, out.data_ptr(), SPLIT_TOKENS, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"{BACKEND} paged_decode_attention returned {rc}")
    return out


_fn = None
_UNAVAILABLE = ""
if os.environ.get("AGENTSPEED_NATIVE", "1") == "0":
    _UNAVAILABLE = "disabled by AGENTSPEED_NATIVE=0"
    register_unavailable("paged_attention_decode", BACKEND, _UNAVAILABLE)
else:
    try:
        _fn = load().paged_decode_attention
        _fn.argtypes = _ARGTYPES
        _fn.restype = _I
    except NativeBuildError as e:
        log.warning("native CPU kernels unavailable, using the torch CPU backend: %s", e)
        _UNAVAILABLE = str(e)
        register_unavailable("paged_attention_decode", BACKEND, _UNAVAILABLE)
    else:
        register_kernel("paged_attention_decode", BACKEND, ("cpu",), (torch.float32,),
                        priority=20)(paged_attention_decode)
