"""`cpu_native` backend: C++ kernels (kernels/native/) for what torch ops do poorly on CPU.

linear reads GGUF weights as they are stored (kernels/ggml.py, kernels/cpu_ggml.py): every
common ggml type (Q4_0 ... Q8_0, Q2_K ... Q6_K, MXFP4, F16, BF16) is decoded block by block in the
kernel, so a decode step streams the file's bytes (0.56 per weight for Q4_K); activations are
rounded to integers where the kernels multiply integer codes (int8 for K-quants, as
llama.cpp; int16 in decode steps for the other integer types; cpu_ggml's docstring has the
table) and `cpu_native_exact` keeps them fp32. Dense weights (safetensors) go to oneDNN as in
the `cpu` backend.

paged_attention_decode reads K/V pages in their storage type (fp32, bf16, fp16, fp8 with
per-token scales) and converts rows in registers while streaming them, once per KV head for
its whole GQA group; the torch backend converts each sequence's context to fp32 first, so
a 16-bit cache halves memory but not time there. Measured in docs/benchmarks.md
(`benchmarks/model/bench_long_decode.py`).

paged_attention_prefill (new tokens over their paged context, causal) folds each KV head's
query group into 32-row tiles held transposed, rows along the vector lanes, so scores and
values are register-tiled outer products at GEMM speed (~350 GFLOP/s here against ~150 for
torch's flash kernel; `benchmarks/kernels/bench_prefill_attention.py`).

silu_and_mul, rotary_embedding and rms_norm are one pass each over their rows (torch's versions are
several ops with temporaries, and its silu of a strided half is slow: 7.4 ms at 2,000 rows).

Registered (above the `cpu` backend) only when the library builds here; otherwise the reason
is recorded, logged once, and reported if someone forces the backend. Set
AGENTSPEED_NATIVE=0 to not build or use it.
"""

from __future__ import annotations

import ctypes
import logging
import os

import torch

from agentspeed.kernels import cpu
from agentspeed.kernels.api import AttentionMetadata
from agentspeed.kernels.ggml import GgmlLinear
from agentspeed.kernels.native import NativeBuildError, load
from agentspeed.kernels.reference import silu_and_mul as _reference_silu_and_mul
from agentspeed.kernels.reference import store_kv as _reference_store_kv
from agentspeed.kernels.registry import register_kernel, register_unavailable

log = logging.getLogger(__name__)

BACKEND = "cpu_native"
EXACT_BACKEND = "cpu_native_exact"  # its linear without activation rounding
INT16_BACKEND = "cpu_native_int16"  # its linear with int16 activations at every row count
_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float8_e4m3fn: 3}
# Tokens per work item. Smaller spans make more items for the threads to share (one
# sequence x 3 KV heads at 8K context is 48 items at 512) at the cost of one merge each.
SPLIT_TOKENS = 512
MAX_GROUP, MAX_DIM = 32, 256  # the C++ kernel's stack buffers

_P = ctypes.c_void_p
_I = ctypes.c_int
_ARGTYPES = (_P, _P, _P, _P, _P, _P, _I, _P, ctypes.c_int64, _P, _I, _I, _I, _I, _I,
             ctypes.c_float, _P, _I, _I, _I, _P)
_PREFILL_ARGTYPES = (_P, _P, _P, _P, _P, _I, _P, ctypes.c_int64, _P, _P, _I, _I, _I, _I, _I,
                     ctypes.c_float, _P, _I, _I, _P)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _cache_code(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, what: str) -> int:
    """The kernels' storage code for this cache, or ValueError for what they cannot take."""
    H, D = q.shape[1:]
    kvh = k_cache.shape[2]
    code = _CODES.get(k_cache.dtype)
    if (code is None or v_cache.dtype != k_cache.dtype or q.dtype != torch.float32
            or H % kvh or H // kvh > MAX_GROUP or D > MAX_DIM or k_cache.shape != v_cache.shape
            or (code == 3) != (k_scale is not None and v_scale is not None)):
        raise ValueError(f"{BACKEND} {what} cannot take q {tuple(q.shape)} {q.dtype}, cache "
                         f"{tuple(k_cache.shape)} {k_cache.dtype} (scales: {k_scale is not None})")
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    return code


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """window and sinks as the op API says; a windowed step with several query tokens per
    sequence (verifying drafts) takes the native prefill kernel, which masks windows per row."""
    if _fn is None:
        raise RuntimeError(f"{BACKEND} is unavailable here: {_UNAVAILABLE}")
    code = _cache_code(q, k_cache, v_cache, k_scale, v_scale, "decode")
    _, H, D = q.shape
    B = len(meta.seq_lens_cpu)
    q = q.contiguous()
    table = _contiguous(meta.page_table)
    lens = meta.seq_lens.to(torch.int32).contiguous()
    # One query token per sequence needs no offsets (the common decode step).
    starts = None if q.shape[0] == B else meta.query_start_loc.to(torch.int32).contiguous()
    if window is not None and starts is not None:
        return paged_attention_prefill(q, k_cache, v_cache, meta, scale, k_scale, v_scale, window, sinks)
    sinks32 = None if sinks is None else sinks.float().contiguous()
    out = torch.empty_like(q)
    rc = _fn(q.data_ptr(), _ptr(starts), k_cache.data_ptr(), v_cache.data_ptr(), _ptr(k_scale), _ptr(v_scale),
             code, table.data_ptr(), table.stride(0), lens.data_ptr(), B, H, k_cache.shape[2], D,
             k_cache.shape[1], scale, out.data_ptr(), SPLIT_TOKENS, torch.get_num_threads(), window or 0,
             _ptr(sinks32))
    if rc != 0:
        raise RuntimeError(f"{BACKEND} paged_decode_attention returned {rc}")
    return out


def paged_attention_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head sizes the kernel has no tile for (it takes 64 and 128) run the `cpu` backend's
    torch path, which computes the same attention. window and sinks as the op API says: a
    row block reads keys from its first row's window on."""
    if _prefill is None or _prefill_supports is None:
        raise RuntimeError(f"{BACKEND} is unavailable here: {_UNAVAILABLE}")
    code = _cache_code(q, k_cache, v_cache, k_scale, v_scale, "prefill")
    H, D = q.shape[1:]
    if not _prefill_supports(H, k_cache.shape[2], D):
        return cpu.paged_attention_prefill(q, k_cache, v_cache, meta, scale, k_scale, v_scale, window, sinks)
    sk = None if sinks is None else sinks.float().contiguous()
    q = q.contiguous()
    table = _contiguous(meta.page_table)
    starts = meta.query_start_loc.to(torch.int32).contiguous()
    lens = meta.seq_lens.to(torch.int32).contiguous()
    out = torch.empty_like(q)
    rc = _prefill(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), _ptr(k_scale), _ptr(v_scale),
                  code, table.data_ptr(), table.stride(0), starts.data_ptr(), lens.data_ptr(),
                  len(meta.seq_lens_cpu), H, k_cache.shape[2], D, k_cache.shape[1], scale,
                  out.data_ptr(), torch.get_num_threads(), window or 0, _ptr(sk))
    if rc != 0:
        raise RuntimeError(f"{BACKEND} paged_prefill_attention returned {rc}")
    return out


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    assert _silu is not None
    d = x.shape[-1] // 2
    if out is not None and (x.dtype != torch.float32 or x.dim() != 2 or out.dtype != torch.float32
                            or out.stride(-1) != 1 or out.shape != (x.shape[0], d)):
        return _reference_silu_and_mul(x, out)
    if x.dtype != torch.float32 or x.stride(-1) != 1:
        x = x.float().contiguous() if x.dtype != torch.float32 else x.contiguous()
    x2 = x.reshape(-1, x.shape[-1])
    if out is None:
        out = torch.empty(*x.shape[:-1], d, dtype=torch.float32)
    o2 = out.reshape(-1, d)  # a view: [T, d] at one row stride (checked above, or new)
    rc = _silu(x2.data_ptr(), x2.stride(0), x2.shape[0], d, o2.data_ptr(), o2.stride(0), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"{BACKEND} silu_and_mul returned {rc}")
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    assert _rms is not None
    n = x.shape[-1]
    x2 = x.reshape(-1, n)  # a view for rows at one stride (hidden states), else a copy
    if x2.stride(-1) != 1 or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return cpu.rms_norm(x, weight, eps)
    w = weight if weight.is_contiguous() else weight.contiguous()
    out = torch.empty(x.shape, dtype=torch.float32)
    rc = _rms(x2.data_ptr(), x2.stride(0), x2.shape[0], n, w.data_ptr(), eps, out.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"{BACKEND} rms_norm returned {rc}")
    return out


def _heads(x: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] with unit element and D head strides (a column slice of qkv is)."""
    return x if x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] else x.contiguous()


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    assert _rope is not None
    if q.dtype != torch.float32 or k.dtype != torch.float32 or q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"{BACKEND} rotary_embedding takes fp32 [T, heads, D], got q {tuple(q.shape)} "
                         f"{q.dtype}, k {tuple(k.shape)} {k.dtype}")
    q, k = _heads(q), _heads(k)
    cs = cos_sin if cos_sin.dtype == torch.float32 and cos_sin.is_contiguous() else cos_sin.float().contiguous()
    T, H, D = q.shape
    q_out = torch.empty(T, H, D)
    k_out = torch.empty(k.shape)
    rc = _rope(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), cs.data_ptr(), T, H, k.shape[1], D,
               cs.shape[-1], q_out.data_ptr(), k_out.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"{BACKEND} rope_neox returned {rc} (q {tuple(q.shape)}, rot {cs.shape[-1]})")
    return q_out, k_out


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    """fp32 rows into fp32/bf16/fp16 caches in one native call (torch's rounding; the
    reference's indexing and conversion were ~40 us a layer in a decode step); fp8 caches,
    whose rows are scaled per token, take the reference's quantizer."""
    assert _store is not None
    if k_scale is None and v_scale is None and _store(k, v, k_cache, v_cache, slot_mapping):
        return
    _reference_store_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def _prepare_linear(w: torch.Tensor | GgmlLinear) -> torch.Tensor | GgmlLinear:
    if isinstance(w, GgmlLinear):
        return w  # read as stored
    return cpu._prepack(w) if torch.backends.mkldnn.is_available() else w.detach().contiguous()


def linear(x: torch.Tensor, w: torch.Tensor | GgmlLinear, bias: torch.Tensor | None,
           mode: str = "auto") -> torch.Tensor:
    """x @ w.T + bias: packed ggml weights by kernels/cpu_ggml.py (in mode auto int8
    activations for K-quants, in prefill too where the CPU has AVX-512 VNNI, and int16 in
    decode steps for the other integer types), dense ones by oneDNN."""
    if isinstance(w, GgmlLinear):
        return cpu_ggml.linear(x, w, bias, mode)
    if x.numel() == 0:  # a step whose chunks all stop short of their prompt's end wants no logits
        return x.new_empty(*x.shape[:-1], w.shape[0])
    if torch.backends.mkldnn.is_available():
        return cpu._linear(x, w, bias)
    return torch.nn.functional.linear(x, w, bias)


def linear_exact(x: torch.Tensor, w: torch.Tensor | GgmlLinear, bias: torch.Tensor | None) -> torch.Tensor:
    """`linear` with fp32 activations at every row count (backend cpu_native_exact, chosen
    with --kernel-backend linear=cpu_native_exact): the stored model's product up to fp32
    summation, at the fp32 decode kernel's speed."""
    return linear(x, w, bias, mode="exact")


def linear_int16(x: torch.Tensor, w: torch.Tensor | GgmlLinear, bias: torch.Tensor | None) -> torch.Tensor:
    """`linear` with int16 activations at every row count (backend cpu_native_int16): integer
    multiply-adds of the stored codes for prefill too, llama.cpp's approach. On this AVX2 box
    it trails the default above 8 rows (docs/benchmarks.md); VNNI's fused multiply-add halves
    its instructions, which this box cannot measure."""
    return linear(x, w, bias, mode="int16")


# Ops this backend registers where the library builds (and records as unavailable where not).
NATIVE_OPS = ("paged_attention_decode", "paged_attention_prefill", "linear", "silu_and_mul", "rotary_embedding",
              "rms_norm", "store_kv")
_fn = None
_prefill = None
_prefill_supports = None
_silu = None
_rope = None
_rms = None
_store = None
_UNAVAILABLE = ""
if os.environ.get("AGENTSPEED_NATIVE", "1") == "0":
    _UNAVAILABLE = "disabled by AGENTSPEED_NATIVE=0"
    for _op in NATIVE_OPS:
        register_unavailable(_op, BACKEND, _UNAVAILABLE)
    register_unavailable("linear", EXACT_BACKEND, _UNAVAILABLE)
    register_unavailable("linear", INT16_BACKEND, _UNAVAILABLE)
else:
    try:
        _fn = load().paged_decode_attention
        _fn.argtypes = _ARGTYPES
        _fn.restype = _I
    except NativeBuildError as e:
        log.warning("native CPU kernels unavailable, using the torch CPU backend: %s", e)
        _UNAVAILABLE = str(e)
        for _op in NATIVE_OPS:
            register_unavailable(_op, BACKEND, _UNAVAILABLE)
        register_unavailable("linear", EXACT_BACKEND, _UNAVAILABLE)
        register_unavailable("linear", INT16_BACKEND, _UNAVAILABLE)
    else:
        register_kernel("paged_attention_decode", BACKEND, ("cpu",), (torch.float32,),
                        priority=20)(paged_attention_decode)
        _prefill = load().paged_prefill_attention
        _prefill.argtypes = _PREFILL_ARGTYPES
        _prefill.restype = _I
        _prefill_supports = load().paged_prefill_supports
        _prefill_supports.argtypes = (_I, _I, _I)
        _prefill_supports.restype = _I
        register_kernel("paged_attention_prefill", BACKEND, ("cpu",), (torch.float32,),
                        priority=20)(paged_attention_prefill)
        from agentspeed.kernels import cpu_ggml

        register_kernel("linear", BACKEND, ("cpu",), (torch.float32,), priority=20,
                        prepare=_prepare_linear, packed_rows=cpu_ggml.get_rows,
                        packed_moe=cpu_ggml.packed_moe)(linear)
        register_kernel("linear", EXACT_BACKEND, ("cpu",), (torch.float32,), priority=10,
                        prepare=_prepare_linear, packed_rows=cpu_ggml.get_rows)(linear_exact)
        register_kernel("linear", INT16_BACKEND, ("cpu",), (torch.float32,), priority=5,
                        prepare=_prepare_linear, packed_rows=cpu_ggml.get_rows,
                        packed_moe=cpu_ggml.packed_moe_int16)(linear_int16)
        _silu = load().silu_and_mul
        _silu.argtypes = (_P, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, _P, ctypes.c_int64, _I)
        _silu.restype = _I
        register_kernel("silu_and_mul", BACKEND, ("cpu",), (torch.float32,), priority=20)(silu_and_mul)
        _rope = load().rope_neox
        _rope.argtypes = (_P, ctypes.c_int64, _P, ctypes.c_int64, _P, ctypes.c_int64, _I, _I, _I, _I, _P, _P, _I)
        _rope.restype = _I
        register_kernel("rotary_embedding", BACKEND, ("cpu",), (torch.float32,), priority=20)(rotary_embedding)
        _rms = load().rms_norm
        _rms.argtypes = (_P, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, _P, ctypes.c_float, _P, _I)
        _rms.restype = _I
        register_kernel("rms_norm", BACKEND, ("cpu",), (torch.float32,), priority=20)(rms_norm)
        from agentspeed.kernels import cpu_decode

        _store = cpu_decode.store_kv
        register_kernel("store_kv", BACKEND, ("cpu",), (torch.float32,), priority=20)(store_kv)
