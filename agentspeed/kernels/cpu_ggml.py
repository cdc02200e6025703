"""Products and lookups on packed ggml weights (kernels/native/ggml_linear.cpp, ggml_i16.cpp,
ggml_q8.cpp, ggml_gemm_i16.cpp and ggml_gemm_q8.cpp), for the `cpu_native`, `cpu_native_exact` and `cpu_native_int16` backends.

linear, by rows of x, for integer types (all parts of a merged projection in one call):
- 1-8 rows (decode steps): x rounded once per call to integers per 256 columns, each weight
  streamed once in its stored form into integer multiply-adds: to int8 (max|x| / 127, as
  llama.cpp's Q8_K) where every part is Q4_K, Q5_K or Q6_K and K is whole 256-column blocks
  (ggml_linear_q8, native/ggml_q8.cpp), else to int16 (2^-15 of their largest |x|;
  ggml_linear_i16, native/ggml_i16.cpp); error bounds in those files.
- more than 8 rows (prefill, big batches) where the decode steps round to int8 (the K-quants
  above) and this build has AVX-512 VNNI (GEMM_Q8_FAST) or else AVX2 (GEMM_K8_FAST): x
  rounded the same way, each weight unpacked once per call (per 256 rows of x on AVX2) into
  u8 code panels multiplied by vpdpbusd (ggml_gemm_q8, native/ggml_gemm_q8.cpp, which reads
  the legacy 4-8 bit types too; llama.cpp's prefill scheme; 2.5-3x sgemm's rate at 512 rows)
  or by vpmaddubsw with the integer sub-block scales applied by vpmaddwd (ggml_gemm_k8,
  native/ggml_gemm_k8.cpp; Q4_K 2.0-2.3x, Q6_K 1.5-1.7x sgemm's rate at 512 rows on an AVX2 EPYC;
  docs/benchmarks.md).
- otherwise more than 128 rows: fp32 products of the stored weights, decoded PANEL_ROWS rows at a
  time into a transient fp32 panel multiplied by torch's sgemm.
Otherwise 9-128 rows, mode "exact" (the `cpu_native_exact` backend), and F16/BF16 weights or
projections with such a part keep fp32 activations: 1-2 rows decode in registers
(ggml_gemv), up to 128 rows decode each weight row once per call into an L2-sized fp32
buffer multiplied in register tiles (ggml_gemm), more rows as above. Mode "int16" (the
`cpu_native_int16` backend) rounds x to int16 at every row count (decode steps included): above 8 rows decoded int16 panels in
register tiles (ggml_gemm_i16; vpmaddwd, or VNNI's fused vpdpwssd where the CPU has it). No
dense copy of a weight outlives the call.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from agentspeed.kernels.ggml import NATIVE_TYPES, GgmlLinear, GgmlWeight
from agentspeed.kernels.native import load

GEMV_ROWS = 2  # above this ggml_gemm is as fast or faster (benchmarks/kernels/bench_ggml_linear.py)
I16_ROWS = 8  # the most rows ggml_linear_i16 takes
# Below this many rows 8-row calls of the decode kernel beat ggml_gemm_q8, whose unpacking
# of each weight into panels is then most of its time (8960 x 1536, 16 rows: Q4_K 1.66 against
# 2.03 ms, Q6_K 1.62 against 3.66; 32 rows: Q4_K 3.32 against 2.80; bench_ggml_linear.py).
# ggml_gemm_k8 on AVX2 crosses over near the same count (Q4_K from 16 rows, Q6_K from 24).
GEMM_Q8_ROWS = 24
SGEMM_ROWS = 128  # above this, dequantized panels and sgemm beat both packed kernels (same benchmark)
MODES = ("auto", "exact", "int16")  # activations: see the module docstring
PANEL_ROWS = 512  # weight rows per sgemm call (256-512 measured best; 1,365 rows: 0.75x)

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
_quantize = _lib.ggml_quantize_x
_quantize.argtypes = (_P, _I, _L, _I, _P, _P, _P, _P)
_quantize.restype = _I
_linear_i16 = _lib.ggml_linear_i16
_linear_i16.argtypes = (_P, _I, _L, _I, _I, _P, _P, _P, _P, _P, _P, _P, _L, _I)
_linear_i16.restype = _I
_gemm_i16 = _lib.ggml_gemm_i16
_gemm_i16.argtypes = _linear_i16.argtypes
_gemm_i16.restype = _I
_has_i16 = _lib.ggml_has_i16
_has_i16.argtypes = (_I,)
_has_i16.restype = _I
I16_TYPES = frozenset(t for t in NATIVE_TYPES if _has_i16(t))  # every type but F16 and BF16
_linear_q8 = _lib.ggml_linear_q8
_linear_q8.argtypes = _linear_i16.argtypes
_linear_q8.restype = _I
_quantize_q8 = _lib.ggml_quantize_q8
_quantize_q8.argtypes = (_P, _I, _L, _I, _P, _P, _P, _P)
_quantize_q8.restype = _I
_has_q8 = _lib.ggml_has_q8
_has_q8.argtypes = (_I,)
_has_q8.restype = _I
Q8_TYPES = frozenset(t for t in NATIVE_TYPES if _has_q8(t))  # Q4_K, Q5_K, Q6_K
_gemm_q8 = _lib.ggml_gemm_q8
_gemm_q8.argtypes = _linear_i16.argtypes
_gemm_q8.restype = _I
_has_gemm_q8 = _lib.ggml_has_gemm_q8
_has_gemm_q8.argtypes = (_I,)
_has_gemm_q8.restype = _I
GEMM_Q8_TYPES = frozenset(t for t in NATIVE_TYPES if _has_gemm_q8(t))  # the 4-8 bit types but Q2_K, Q3_K
# Whether this build has the VNNI loop of ggml_gemm_q8; elsewhere its portable loop is for tests only.
GEMM_Q8_FAST = bool(_lib.ggml_gemm_q8_fast())
_gemm_k8 = _lib.ggml_gemm_k8
_gemm_k8.argtypes = _linear_i16.argtypes
_gemm_k8.restype = _I
# Whether this build has the AVX2 loop of ggml_gemm_k8 (K-quants, integer sub-block scales): the
# many-row int8 kernel where ggml_gemm_q8 has no VNNI loop.
GEMM_K8_FAST = bool(_lib.ggml_gemm_k8_fast())
# The many-row int8 kernel linear() takes in mode auto on this build: "q8", "k8" or None.
MANY_INT8 = "q8" if GEMM_Q8_FAST else "k8" if GEMM_K8_FAST else None
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


def quantize_x(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] (unit column stride) as ggml_linear_i16 quantizes it: int16 codes [R, K], and one fp32
    buffer of the scales [R, ceil(K / 256)], then each 16 and 32 columns' sums [R, K / 16],
    [R, K / 32]."""
    r, k = x.shape
    xq = torch.empty(r, k, dtype=torch.int16)
    f = torch.empty(r * (-(-k // 256) + k // 16 + k // 32))
    dx = f.data_ptr()
    xg = dx + 4 * r * -(-k // 256)
    if _quantize(x.data_ptr(), r, x.stride(0), k, xq.data_ptr(), dx, xg, xg + 4 * r * (k // 16)) != 0:
        raise RuntimeError(f"ggml_quantize_x: {k} columns are not a multiple of 32")
    return xq, f


def _i16_args(lin: GgmlLinear) -> tuple[int, ...] | None:
    """ggml_linear_i16's per-weight arguments (part count, then arrays of types, data
    addresses, row strides, rows, first output rows), or None where a part has no int16
    decoder; made once per weight, the arrays kept alive in its call cache."""
    args = lin.call_cache.get("i16", False)
    if args is False:
        if all(qtype in I16_TYPES for _, qtype, _, _, _ in lin.native):
            n = len(lin.native)
            arrays = [(t * n)(*col) for t, col in zip((_I, _P, _L, _I, _I), zip(*(
                (qtype, ptr, stride, rows, off) for off, qtype, ptr, stride, rows in lin.native)))]
            args = (n, *(ctypes.addressof(a) for a in arrays))
            lin.call_cache["i16_arrays"] = arrays
        else:
            args = None
        lin.call_cache["i16"] = args
    return args


def _takes_q8(lin: GgmlLinear, k: int) -> bool:
    """Whether decode steps round x to int8 for this weight (every part a type of
    ggml_linear_q8, K whole 256-column blocks); cached per weight."""
    q8 = lin.call_cache.get("q8")
    if q8 is None:
        q8 = lin.call_cache["q8"] = k % 256 == 0 and all(qtype in Q8_TYPES for _, qtype, *_ in lin.native)
    return bool(q8)


def _takes_gemm_q8(lin: GgmlLinear, k: int) -> bool:
    """Whether steps of more than 8 rows round x to int8 for this weight in mode auto
    (ggml_gemm_q8's VNNI loop or else ggml_gemm_k8's AVX2 loop built here, K whole 256-column
    blocks, and every part a K-quant, whose decode steps round to int8 too). The legacy types keep fp32 products:
    one int8 scale per 256 columns is coarser than llama.cpp's per 32 for them (Q8_0), and on
    SmolLM2's Q4_1/Q8_0 file it moved the logits by 20% of their spread (measured), where
    int16 decode moves them by under 1%."""
    q8 = lin.call_cache.get("gemm_q8")
    if q8 is None:
        q8 = lin.call_cache["gemm_q8"] = MANY_INT8 is not None and _takes_q8(lin, k)
    return bool(q8)


def quantize_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] (unit column stride, K a multiple of 256) as ggml_linear_q8 quantizes it: int8
    codes [R, K] and one fp32 scale per 256 columns [R, K / 256]."""
    r, k = x.shape
    xq = torch.empty(r, k, dtype=torch.int8)
    dx = torch.empty(r, k // 256)
    bs = torch.empty(r, k // 16, dtype=torch.int16)
    xs = torch.empty(r, k // 32)
    if _quantize_q8(x.data_ptr(), r, x.stride(0), k, xq.data_ptr(), dx.data_ptr(), bs.data_ptr(), xs.data_ptr()) != 0:
        raise RuntimeError(f"ggml_quantize_q8: {k} columns are not a multiple of 256")
    return xq, dx


def gemm_q8(x: torch.Tensor, lin: GgmlLinear, bias: torch.Tensor | None = None, kernel: str = "q8") -> torch.Tensor:
    """x [R, K] @ W.T + bias by ggml_gemm_q8 (kernel "q8"; every type of GEMM_Q8_TYPES) or
    ggml_gemm_k8 ("k8"; the K-quants) at any row count on any build (their portable loops
    where GEMM_Q8_FAST / GEMM_K8_FAST is false): what linear() computes above 8 rows in mode
    auto where it takes one of them; for tests and benchmarks of the kernels themselves."""
    if kernel not in ("q8", "k8"):
        raise ValueError(f"gemm kernel {kernel!r}: expected 'q8' or 'k8'")
    r, k = x.shape
    args = _i16_args(lin)
    types = GEMM_Q8_TYPES if kernel == "q8" else Q8_TYPES
    if args is None or not all(qtype in types for _, qtype, *_ in lin.native):
        raise ValueError(f"gemm_{kernel} has no kernel for {lin.describe()} weights")
    x = x.float().contiguous()
    y = torch.empty(r, lin.out_features) if lin.covered else torch.zeros(r, lin.out_features)
    fn = _gemm_q8 if kernel == "q8" else _gemm_k8
    rc = fn(x.data_ptr(), r, k, k, *args, None if bias is None else bias.data_ptr(), y.data_ptr(),
            lin.out_features, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"ggml gemm_{kernel} returned {rc} for {lin.describe()} weights ({lin.out_features}, {k})")
    return y


def _linear_sgemm(x: torch.Tensor, lin: GgmlLinear, y: torch.Tensor) -> None:
    """y = x @ W.T, W decoded PANEL_ROWS rows at a time to fp32 and multiplied by torch's
    sgemm (MKL/oneDNN): exact fp32 products of the stored weights, and on this AVX2 box the
    fastest many-row path (512-row products: 60-73 GMAC/s against 45-70 for the int16 kernel
    and 36-55 for the fp32 tiles; docs/benchmarks.md). The panel lives for the call only."""
    k = x.shape[1]
    step = PANEL_ROWS
    panel = torch.empty(min(step, max(r for *_, r in lin.native)), k)
    threads = torch.get_num_threads()
    for off, qtype, wp, ws, wn in lin.native:
        for n0 in range(0, wn, step):
            nc = min(step, wn - n0)
            part = panel[:nc]
            rc = _dequant(qtype, wp + n0 * ws, ws, nc, k, part.data_ptr(), k, threads)
            if rc != 0:
                raise RuntimeError(f"ggml dequant returned {rc} for a {NATIVE_TYPES[qtype][0]} weight ({wn}, {k})")
            y[:, off + n0:off + n0 + nc].copy_(x @ part.T)


def linear(x: torch.Tensor, lin: GgmlLinear, bias: torch.Tensor | None, mode: str = "auto") -> torch.Tensor:
    """x @ W.T + bias, W packed (see the module docstring for which path a row count and
    mode take)."""
    if mode not in MODES:
        raise ValueError(f"linear mode {mode!r}: expected one of {MODES}")
    k = x.shape[-1]
    rows = x.numel() // k
    n = lin.out_features
    x2 = x.reshape(rows, k)
    if x2.stride(1) != 1 or x.dtype != torch.float32:
        x2 = x2.float().contiguous()
    y = torch.empty(rows, n) if lin.covered else torch.zeros(rows, n)
    if rows == 0:
        return y.view(*x.shape[:-1], n)
    args = _i16_args(lin) if mode != "exact" else None
    gemm_q8 = rows > I16_ROWS and mode == "auto" and _takes_gemm_q8(lin, k)
    if rows > SGEMM_ROWS and not gemm_q8 and (mode != "int16" or args is None):
        _linear_sgemm(x2, lin, y)
        if bias is not None:
            y += bias
        return y.view(*x.shape[:-1], n)
    threads = torch.get_num_threads()
    yp, bp = y.data_ptr(), None if bias is None else bias.data_ptr()
    if args is not None and (rows <= I16_ROWS or mode == "int16" or gemm_q8):
        if gemm_q8 and rows < GEMM_Q8_ROWS:  # the decode kernel, 8 rows at a time (same rounding)
            for r0 in range(0, rows, I16_ROWS):
                r = min(I16_ROWS, rows - r0)
                rc = _linear_q8(x2[r0].data_ptr(), r, x2.stride(0), k, *args, bp, yp + 4 * r0 * n, n, threads)
                if rc != 0:
                    raise RuntimeError(f"ggml linear_q8 returned {rc} for {lin.describe()} weights ({n}, {k})")
            return y.view(*x.shape[:-1], n)
        if gemm_q8:
            fn, what = (_gemm_q8, "gemm_q8") if MANY_INT8 == "q8" else (_gemm_k8, "gemm_k8")
        elif rows > I16_ROWS:
            fn, what = _gemm_i16, "gemm_i16"
        elif mode == "auto" and _takes_q8(lin, k):
            fn, what = _linear_q8, "linear_q8"
        else:
            fn, what = _linear_i16, "linear_i16"
        rc = fn(x2.data_ptr(), rows, x2.stride(0), k, *args, bp, yp, n, threads)
        if rc != 0:
            raise RuntimeError(f"ggml {what} returned {rc} for {lin.describe()} weights ({n}, {k})")
        return y.view(*x.shape[:-1], n)
    for off, qtype, wp, ws, wn in lin.native:
        b = None if bp is None else bp + 4 * off
        fn, what = (_gemv, "gemv") if rows <= GEMV_ROWS else (_gemm, "gemm")
        rc = fn(qtype, x2.data_ptr(), rows, x2.stride(0), k, wp, ws, wn, b, yp + 4 * off, n, threads)
        if rc != 0:
            raise RuntimeError(f"ggml {what} returned {rc} for a {NATIVE_TYPES[qtype][0]} weight ({wn}, {k})")
    return y.view(*x.shape[:-1], n)


_moe = _lib.ggml_moe
_moe.argtypes = (_P, _I, _L, _I, _I, _P, _P, _I, _P, _P, _P, _I, _P, _P, _P, _I, _P, _I, _I, _L, _P, _P, _P,
                 ctypes.c_float, ctypes.c_float, _I)
_moe.restype = _I
_moe_workspace = _lib.ggml_moe_workspace
_moe_workspace.argtypes = (_I, _I, _I, _I, _I, _L, _I)
_moe_workspace.restype = _L
# ggml_moe's products round x as linear() does in mode auto (1: ggml_gemm_q8's loop above
# GEMM_Q8_ROWS rows, 2: ggml_gemm_k8's, 3: neither; exact fp32 above 8 rows) or int16 (0).
_MOE_MODE = {"q8": 1, "k8": 2, None: 3}[MANY_INT8]
# The most bytes of per-(token, choice) outputs ggml_moe holds: a step's tokens run in blocks
# of this / (top_k * hidden * 4); Qwen3-30B-A3B's layer: 1,024 tokens, its 128 experts 64 rows
# each on average. (The per-expert loop held its gathered x and outputs whole: 268 MB at 2,048.)
MOE_OUT_BYTES = 64 << 20


class MoEPlan:
    """A layer's packed experts as ggml_moe takes them: per expert its gate|up weight
    (2 parts of F rows) and down weight (1 part of N rows), the arrays made once."""

    def __init__(self, w13: list[GgmlLinear], w2: list[GgmlLinear], b13: torch.Tensor | None = None,
                 b2: torch.Tensor | None = None, swiglu: tuple[float, float] | None = None) -> None:
        self.E, self.F, self.N = len(w13), w13[0].native[0][4], w2[0].out_features
        # GPT-OSS: expert biases [E, 2F] and [E, N], and the clamped SwiGLU's (limit, alpha)
        self.b13 = None if b13 is None else b13.float().contiguous()
        self.b2 = None if b2 is None else b2.float().contiguous()
        self.swiglu = swiglu or (0.0, 0.0)
        t13, p13, s13, t2, p2, s2 = [], [], [], [], [], []
        for a, b in zip(w13, w2):
            (o1, q1, w1, st1, n1), (o2, q2, w2_, st2, n2) = a.native
            (_, q3, w3, st3, n3), = b.native
            assert (o1, n1, o2, n2, n3) == (0, self.F, self.F, self.F, self.N)
            t13 += [q1, q2]
            p13 += [w1, w2_]
            s13 += [st1, st2]
            t2.append(q3)
            p2.append(w3)
            s2.append(st3)
        self._arrays: list[ctypes.Array[Any]] = [(_I * len(t13))(*t13), (_P * len(p13))(*p13), (_L * len(s13))(*s13),
                        (_I * len(t2))(*t2), (_P * len(p2))(*p2), (_L * len(s2))(*s2)]
        self._weights = (w13, w2)  # the packed views the addresses point into stay alive
        self.args = tuple(ctypes.addressof(a) for a in self._arrays)

    @staticmethod
    def of(w13: list[object], w2: list[object], b13: torch.Tensor | None = None, b2: torch.Tensor | None = None,
           swiglu: tuple[float, float] | None = None) -> MoEPlan | None:
        """The plan, or None where an expert is not packed in int16-decodable parts."""
        def ok(w: object, parts: int) -> bool:
            return (isinstance(w, GgmlLinear) and len(w.native) == parts and w.covered
                    and all(q in I16_TYPES for _, q, *_ in w.native))
        if not w13 or not all(ok(a, 2) for a in w13) or not all(ok(b, 1) for b in w2):
            return None
        g13 = [a for a in w13 if isinstance(a, GgmlLinear)]
        g2 = [b for b in w2 if isinstance(b, GgmlLinear)]
        if len({a.native[0][4] for a in g13} | {a.native[1][4] for a in g13}) != 1:
            return None
        return MoEPlan(g13, g2, b13, b2, swiglu)


def moe(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, plan: MoEPlan, int8: bool = True) -> torch.Tensor:
    """sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) for any number of tokens, each expert a
    SwiGLU of packed weights whose products round x as linear() does for the expert's row
    count: in mode auto (int8 as linear() takes it, exact fp32 for the other types above 8
    rows) or, with int8=False, int16 throughout (mode int16)."""
    T, K = x.shape
    x = x.float().contiguous()
    ids32 = ids.to(torch.int32).contiguous()
    w = weights.float().contiguous()
    y = torch.empty(T, plan.N)
    t13, p13, s13, t2, p2, s2 = plan.args
    threads, topk = torch.get_num_threads(), ids.shape[1]
    ws = torch.empty(_moe_workspace(T, K, topk, plan.F, plan.N, MOE_OUT_BYTES, threads))
    rc = _moe(x.data_ptr(), T, K, K, topk, ids32.data_ptr(), w.data_ptr(), plan.E, t13, p13, s13,
              plan.F, t2, p2, s2, plan.N, y.data_ptr(), _MOE_MODE if int8 else 0, GEMM_Q8_ROWS,
              MOE_OUT_BYTES, ws.data_ptr(), None if plan.b13 is None else plan.b13.data_ptr(),
              None if plan.b2 is None else plan.b2.data_ptr(), *plan.swiglu, threads)
    if rc != 0:
        raise RuntimeError(f"ggml_moe returned {rc} ({plan.E} experts, {T} tokens)")
    return y


class FusedMoE:
    """A layer's routed experts as one ggml_moe call: (x, ids, weights) -> y (see `moe`)."""

    __slots__ = ("int8", "plan")

    def __init__(self, plan: MoEPlan, int8: bool) -> None:
        self.plan, self.int8 = plan, int8

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return moe(x, ids, weights, self.plan, self.int8)


def packed_moe(w13: list[object], w2: list[object], b13: torch.Tensor | None = None, b2: torch.Tensor | None = None,
               swiglu: tuple[float, float] | None = None, int8: bool = True) -> FusedMoE | None:
    """For the linear backends reading packed weights in mode auto (int16 throughout with
    int8=False, as mode int16): a layer's fused routed-experts call (x, ids, weights) -> y for
    steps of any size, or None where its experts are not all packed integer-decodable weights.
    GPT-OSS's experts: biases b13 [E, 2F] (gate | up) and b2 [E, N], and swiglu = (limit,
    alpha) for its clamped SwiGLU."""
    plan = MoEPlan.of(w13, w2, b13, b2, swiglu)
    return None if plan is None else FusedMoE(plan, int8)


def packed_moe_int16(w13: list[object], w2: list[object], b13: torch.Tensor | None = None,
                     b2: torch.Tensor | None = None,
                     swiglu: tuple[float, float] | None = None) -> FusedMoE | None:
    """packed_moe with int16 activations throughout (the cpu_native_int16 backend)."""
    return packed_moe(w13, w2, b13, b2, swiglu, int8=False)
