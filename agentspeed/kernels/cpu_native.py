"""`cpu_native` backend: C++ kernels (kernels/native/) for what torch ops do poorly on CPU.

linear: for decode-sized batches (at most Q4_MAX_ROWS rows), weights that are exactly 4-bit
codes times a per-32 scale plus a minimum (what a GGUF Q4_1 tensor dequantizes to) are read
in that form: 0.75 bytes per weight instead of 4; likewise 8-bit codes times a per-32 scale
(GGUF Q8_0, e.g. SmolLM2's embedding used as its LM head), 1.125 bytes per weight. `prepare` checks the representation bit
for bit, so these results are the fp32 product up to summation order. Larger batches on those
weights run, where the CPU has AVX512-VNNI, the integer kernel (native/i16_gemm.cpp: the same
codes times activations rounded per 32 to 16 bits, ~5e-5 of the output scale; 1.2-1.7x
oneDNN, benchmarks/kernels/bench_i16_gemm.py); elsewhere, and for weights with no exact block form,
oneDNN on the fp32 weight. Backend `cpu_native_fp32` is the same without the integer kernel.

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
from agentspeed.kernels.native import NativeBuildError, load
from agentspeed.kernels.registry import register_kernel, register_unavailable

log = logging.getLogger(__name__)

BACKEND = "cpu_native"
BACKEND_FP32 = "cpu_native_fp32"
_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float8_e4m3fn: 3}
# Tokens per work item. Smaller spans make more items for the threads to share (one
# sequence x 3 KV heads at 8K context is 48 items at 512) at the cost of one merge each.
SPLIT_TOKENS = 512
MAX_GROUP, MAX_DIM = 32, 256  # the C++ kernel's stack buffers

_P = ctypes.c_void_p
_I = ctypes.c_int
_ARGTYPES = (_P, _P, _P, _P, _P, _P, _I, _P, ctypes.c_int64, _P, _I, _I, _I, _I, _I,
             ctypes.c_float, _P, _I, _I)
_I16_ARGTYPES = (_P, _I, _I, _P, _P, _P, _P, _P, _I, _I)  # i16_gemm(x, M, K, codes, scales, mins, bias, y, N, threads)
_PREFILL_ARGTYPES = (_P, _P, _P, _P, _P, _I, _P, ctypes.c_int64, _P, _P, _I, _I, _I, _I, _I,
                     ctypes.c_float, _P, _I)


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
) -> torch.Tensor:
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
    out = torch.empty_like(q)
    rc = _fn(q.data_ptr(), _ptr(starts), k_cache.data_ptr(), v_cache.data_ptr(), _ptr(k_scale), _ptr(v_scale),
             code, table.data_ptr(), table.stride(0), lens.data_ptr(), B, H, k_cache.shape[2], D,
             k_cache.shape[1], scale, out.data_ptr(), SPLIT_TOKENS, torch.get_num_threads())
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
) -> torch.Tensor:
    """Head sizes the kernel has no tile for (it takes 64 and 128) run the `cpu` backend's
    torch path, which computes the same attention."""
    if _prefill is None or _prefill_supports is None:
        raise RuntimeError(f"{BACKEND} is unavailable here: {_UNAVAILABLE}")
    code = _cache_code(q, k_cache, v_cache, k_scale, v_scale, "prefill")
    H, D = q.shape[1:]
    if not _prefill_supports(H, k_cache.shape[2], D):
        return cpu.paged_attention_prefill(q, k_cache, v_cache, meta, scale, k_scale, v_scale)
    q = q.contiguous()
    table = _contiguous(meta.page_table)
    starts = meta.query_start_loc.to(torch.int32).contiguous()
    lens = meta.seq_lens.to(torch.int32).contiguous()
    out = torch.empty_like(q)
    rc = _prefill(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), _ptr(k_scale), _ptr(v_scale),
                  code, table.data_ptr(), table.stride(0), starts.data_ptr(), lens.data_ptr(),
                  len(meta.seq_lens_cpu), H, k_cache.shape[2], D, k_cache.shape[1], scale,
                  out.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"{BACKEND} paged_prefill_attention returned {rc}")
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    assert _silu is not None
    if x.dtype != torch.float32 or x.stride(-1) != 1:
        x = x.float().contiguous() if x.dtype != torch.float32 else x.contiguous()
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty(*x.shape[:-1], d, dtype=torch.float32)
    rc = _silu(x2.data_ptr(), x2.stride(0), x2.shape[0], d, out.data_ptr(), torch.get_num_threads())
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


Q4_MAX_ROWS = 8


class PackedLinear:
    """A prepared linear weight: the dense fp32 form (as the `cpu` backend takes it) and, when
    the weight is exactly representable, its 4-bit blocks (codes, scales, mins) or its 8-bit
    blocks (codes8, scales); with those, where the CPU has AVX512-VNNI, the same codes as
    16-bit integers laid out for the many-row kernel (wide: codes, scales, mins)."""

    __slots__ = ("codes", "codes8", "dense", "mins", "out_features", "scales", "wide")

    def __init__(self, out_features: int, dense: torch.Tensor, q4: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
                 q8: tuple[torch.Tensor, torch.Tensor] | None = None,
                 wide: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None) -> None:
        self.out_features = out_features
        self.dense = dense
        self.codes: torch.Tensor | None = None if q4 is None else q4[0]
        self.mins: torch.Tensor | None = None if q4 is None else q4[2]
        self.codes8: torch.Tensor | None = None if q8 is None else q8[0]
        self.scales: torch.Tensor | None = q4[1] if q4 is not None else None if q8 is None else q8[1]
        self.wide = wide

    @property
    def numerics_note(self) -> str | None:
        """Read by KernelSet.linear_prepare: how this weight's products depart from fp32."""
        if self.wide is None:
            return None
        return (f"take 16-bit activations above {Q4_MAX_ROWS} rows (exact fp32: "
                f"--kernel-backend linear={BACKEND_FP32})")


def to_wide(codes: torch.Tensor, scales: torch.Tensor,
            mins: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """i16_gemm's layout of integer codes [N, K] with per-32 scales (and mins) [N, K/32]:
    codes [N/16, K/2, 16, 2] int16, scales and mins [N/16, K/32, 16], N padded to 16 with
    zero columns (kernels/native/i16_gemm.cpp)."""
    n, k = codes.shape
    n16, nb = -(-n // 16) * 16, k // 32
    c = torch.zeros(n16, k, dtype=torch.int16)
    c[:n] = codes
    packed = c.reshape(n16 // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()

    def per_block(t: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(n16, nb)
        out[:n] = t
        return out.reshape(n16 // 16, 16, nb).permute(0, 2, 1).contiguous()

    return packed, per_block(scales), None if mins is None else per_block(mins)


def to_q4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(codes [N, K/32, 16] uint8, scales [N, K/32], mins [N, K/32]) with
    fma(scale, code, min) == w for every element, or None if w is not exactly that."""
    if w.dim() != 2 or w.dtype != torch.float32 or w.shape[1] % 32:
        return None
    n, k = w.shape
    if n > 64 and to_q4(w[:64]) is None:  # cheap early answer for the usual dense weight
        return None
    blocks = w.detach().reshape(n, k // 32, 32).double()
    mins = blocks.amin(-1)
    # GGUF stores the scale as fp16 and its quantizer maps the block's max to code 15.
    scales = ((blocks.amax(-1) - mins) / 15).to(torch.float16).double()
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = ((blocks - mins[..., None]) / safe[..., None]).round().clamp(0, 15)
    prod = scales[..., None] * codes  # exact in float64 (an 11-bit scale times 4 bits)
    total = prod + mins[..., None]
    # exact float64 sum (so rounding it once to fp32 is what the kernel's FMA gives) that
    # lands on the weight
    if not (torch.equal(total - mins[..., None], prod) and torch.equal(total.float(), w.reshape(n, k // 32, 32))):
        return None
    c = codes.to(torch.uint8)
    packed = (c[..., :16] | (c[..., 16:] << 4)).contiguous()
    return packed, scales.float().contiguous(), mins.float().contiguous()


def to_q8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(codes [N, K] int8, scales [N, K/32]) with scale * code == w exactly (an fp16 scale
    times an 8-bit code is exact in fp32), or None."""
    if w.dim() != 2 or w.dtype != torch.float32 or w.shape[1] % 32:
        return None
    n, k = w.shape
    if n > 64 and to_q8(w[:64]) is None:
        return None
    blocks = w.detach().reshape(n, k // 32, 32)
    # GGUF's Q8_0 quantizer: scale = absmax / 127 stored as fp16
    scales = (blocks.abs().amax(-1) / 127).to(torch.float16).float()
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = (blocks / safe[..., None]).round().clamp(-127, 127)
    if not torch.equal(codes * scales[..., None], blocks):
        return None
    return codes.to(torch.int8).reshape(n, k).contiguous(), scales.contiguous()


def _unpack_q4(packed: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] from to_q4's [N, K/32, 16] nibble pairs."""
    n = packed.shape[0]
    return torch.cat((packed & 15, packed >> 4), dim=-1).reshape(n, -1)


def _prepare(w: torch.Tensor, wide: bool) -> PackedLinear:
    wc = w.detach().contiguous()
    q4 = to_q4(wc)
    q8 = None if q4 is not None else to_q8(wc)
    packed = None
    if wide and _i16 is not None:
        if q4 is not None:
            packed = to_wide(_unpack_q4(q4[0]), q4[1], q4[2])
        elif q8 is not None:
            packed = to_wide(q8[0].view(wc.shape[0], -1), q8[1], None)
    # The dense form serves rows the integer kernels do not take; with the wide codes there
    # are none, so it is not kept (it would be the largest copy of the weight).
    dense = torch.empty(0) if packed is not None else (
        cpu._prepack(w) if torch.backends.mkldnn.is_available() else wc)
    return PackedLinear(wc.shape[0], dense, q4, q8, packed)


def _prepare_linear(w: torch.Tensor) -> PackedLinear:
    return _prepare(w, wide=True)


def _prepare_linear_fp32(w: torch.Tensor) -> PackedLinear:
    return _prepare(w, wide=False)


def linear(x: torch.Tensor, w: PackedLinear, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T + bias. At most Q4_MAX_ROWS rows on exactly-quantized weights: the fp32
    product through the block codes. More rows: with `w.wide`, the 16-bit-activation integer
    product (i16_gemm.cpp: the weights exact, errors ~5e-5 of the output scale), else oneDNN
    fp32. No rows: an empty result."""
    rows = x.numel() // x.shape[-1]
    n = w.out_features
    if rows == 0:  # a step whose chunks all stop short of their prompt's end wants no logits
        return x.new_empty(*x.shape[:-1], n)
    if rows > Q4_MAX_ROWS and w.wide is not None:
        assert _i16 is not None
        codes, scales, mins = w.wide
        xc = x.reshape(rows, x.shape[-1]).contiguous()
        y = torch.empty(rows, n, dtype=x.dtype)
        rc = _i16(xc.data_ptr(), rows, xc.shape[1], codes.data_ptr(), scales.data_ptr(), _ptr(mins), _ptr(bias),
                  y.data_ptr(), n, torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"{BACKEND} i16_gemm returned {rc}")
        return y.view(*x.shape[:-1], n)
    if (w.codes is None and w.codes8 is None) or rows > Q4_MAX_ROWS or _q4 is None or _q8 is None:
        if torch.backends.mkldnn.is_available():
            return cpu._linear(x, w.dense, bias)
        return torch.nn.functional.linear(x, w.dense, bias)
    assert w.scales is not None
    xc = x.reshape(rows, x.shape[-1]).contiguous()
    if w.codes is not None:
        assert w.mins is not None
        y = torch.empty(rows, n, dtype=x.dtype)
        rc = _q4(xc.data_ptr(), rows, xc.shape[1], w.codes.data_ptr(), w.scales.data_ptr(), w.mins.data_ptr(),
                 _ptr(bias), y.data_ptr(), n, torch.get_num_threads())
    else:
        assert w.codes8 is not None
        y = torch.empty(rows, n, dtype=x.dtype)
        rc = _q8(xc.data_ptr(), rows, xc.shape[1], w.codes8.data_ptr(), w.scales.data_ptr(),
                 _ptr(bias), y.data_ptr(), n, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"{BACKEND} q4_linear returned {rc}")
    return y.view(*x.shape[:-1], n)


# Ops this backend registers where the library builds (and records as unavailable where not).
NATIVE_OPS = ("paged_attention_decode", "paged_attention_prefill", "linear", "silu_and_mul", "rotary_embedding",
              "rms_norm")
_fn = None
_prefill = None
_prefill_supports = None
_q4 = None
_q8 = None
_i16 = None
_silu = None
_rope = None
_rms = None
_UNAVAILABLE = ""
if os.environ.get("AGENTSPEED_NATIVE", "1") == "0":
    _UNAVAILABLE = "disabled by AGENTSPEED_NATIVE=0"
    for _op in NATIVE_OPS:
        register_unavailable(_op, BACKEND, _UNAVAILABLE)
    register_unavailable("linear", BACKEND_FP32, _UNAVAILABLE)
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
        register_unavailable("linear", BACKEND_FP32, _UNAVAILABLE)
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
        _q4 = load().q4_linear
        _q4.argtypes = (_P, _I, _I, _P, _P, _P, _P, _P, _I, _I)
        _q4.restype = _I
        _q8 = load().q8_linear
        _q8.argtypes = (_P, _I, _I, _P, _P, _P, _P, _I, _I)
        _q8.restype = _I
        if load().i16_gemm_fast():
            _i16 = load().i16_gemm
            _i16.argtypes = _I16_ARGTYPES
            _i16.restype = _I
        register_kernel("linear", BACKEND, ("cpu",), (torch.float32,), priority=20,
                        prepare=_prepare_linear)(linear)
        # The fp32 product at every row count (`--kernel-backend linear=cpu_native_fp32`).
        register_kernel("linear", BACKEND_FP32, ("cpu",), (torch.float32,), priority=15,
                        prepare=_prepare_linear_fp32)(linear)
        _silu = load().silu_and_mul
        _silu.argtypes = (_P, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, _P, _I)
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
