"""Decoder layers of a decode step in one native call (kernels/native/decode_layers.cpp), for
the `cpu_native` backend with packed GGUF projections at tensor-parallel size 1.

A decode step of a small model on CPU is dozens of layers of a dozen native calls each, and
every call from Python costs more than its kernel (rms_norm over 1,536 floats: 10.6 us
through its wrapper, the kernel well under 1 us). `DecodeLayers` holds, per layer, the
pointers and sizes its modules would pass to those same kernels, and `run` executes a run of
layers with one ctypes call, so the step computes the same values bit for bit (tested in
tests/test_cpu_decode.py against the modules' own path).

It is the execution plane's business which steps take it (modeling/fused_decode.py decides
from the model's modules); this file only mirrors the C structs and checks a step's inputs.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from agentspeed.kernels import cpu_ggml
from agentspeed.kernels.ggml import GgmlLinear
from agentspeed.kernels.native import load

_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
CACHE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # decode_layers.cpp's Store
MAX_ROWS = cpu_ggml.I16_ROWS  # the decode kernels' most token rows (more take the GEMM paths)


class _Lin(ctypes.Structure):
    _fields_ = [("types", _P), ("ws", _P), ("strides", _P), ("rows", _P), ("offs", _P), ("bias", _P),
                ("nparts", _I), ("n", _I), ("k", _I), ("q8", _I)]


class _Moe(ctypes.Structure):
    _fields_ = [("router", _P), ("types13", _P), ("types2", _P), ("ws13", _P), ("ws2", _P), ("strides13", _P),
                ("strides2", _P), ("out_bytes", _L), ("route_scale", _F), ("E", _I), ("topk", _I), ("renorm", _I),
                ("F", _I), ("mode", _I), ("q8_rows", _I)]


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _Lin), ("o", _Lin), ("gate_up", _Lin), ("down", _Lin), ("moe", _Moe),
                ("attn_norm", _P), ("mlp_norm", _P), ("q_norm", _P), ("k_norm", _P),
                ("k_cache", _P), ("v_cache", _P), ("eps", _F), ("qk_eps", _F), ("scale", _F),
                ("cache_code", _I), ("H", _I), ("KVH", _I), ("D", _I)]


class _Step(ctypes.Structure):
    _fields_ = [("cos_sin", _P), ("slots", _P), ("table", _P), ("lens", _P), ("query_start", _P),
                ("table_stride", _L), ("nslots", _L), ("R", _I), ("B", _I), ("rot", _I), ("page_size", _I),
                ("split", _I), ("threads", _I)]


_lib = load()
_run = _lib.decode_layers
_run.argtypes = (_P, _I, _P, _P, _I, _P)
_run.restype = _I
_workspace = _lib.decode_layers_workspace
_workspace.argtypes = (_P, _I, _I, _I, _I)
_workspace.restype = _L
_route = _lib.moe_route
_route.argtypes = (_P, _I, _I, _P, _I, _I, _I, _F, _P, _P, _P, _I)
_route.restype = _I
_store = _lib.store_kv_rows
_store.argtypes = (_P, _L, _P, _L, _I, _I, _P, _L, _P, _P, _I)
_store.restype = _I


def packed_args(w: object) -> tuple[int, ...] | None:
    """(nparts, types, ptrs, strides, rows, offs) of a packed projection the decode kernels
    read as cpu_ggml.linear() does, or None where it is not one (dense, partly covered, or a
    part type without an integer decoder)."""
    if not isinstance(w, GgmlLinear) or not w.covered:
        return None
    return cpu_ggml._i16_args(w)


def _lin(w: GgmlLinear, bias: torch.Tensor | None) -> _Lin:
    args = packed_args(w)
    assert args is not None
    n, types, ptrs, strides, rows, offs = args
    k = w.in_features
    return _Lin(types, ptrs, strides, rows, offs, None if bias is None else bias.data_ptr(), n,
                w.out_features, k, int(cpu_ggml._takes_q8(w, k)))


@dataclass(slots=True)
class RoutedExperts:
    """A layer's routed experts (SparseMoE's fused call) and its Qwen3-MoE routing: softmax
    of router @ x, the top k, renormalised if asked, times scale."""

    router: torch.Tensor  # [E, hidden] fp32
    experts: cpu_ggml.FusedMoE
    top_k: int
    renorm: bool
    scale: float


@dataclass(slots=True)
class LayerWeights:
    """One layer's tensors as its modules hold them (fp32 norms and biases, packed
    projections); gate_up/down None and moe None: the caller runs the layer's MLP."""

    attn_norm: torch.Tensor
    qkv: GgmlLinear
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: GgmlLinear
    o_bias: torch.Tensor | None
    mlp_norm: torch.Tensor | None
    gate_up: GgmlLinear | None
    down: GgmlLinear | None
    moe: RoutedExperts | None
    eps: float
    qk_eps: float
    scale: float
    heads: int
    kv_heads: int
    head_dim: int


class DecodeLayers:
    """A run of layers as decode_layers() takes them. The caches' addresses are set by
    `bind_caches` (the execution plane may allocate them after the model is built)."""

    def __init__(self, layers: list[LayerWeights], hidden: int) -> None:
        self.hidden = hidden
        self.weights = layers  # the tensors the struct's addresses point into stay alive
        self.array = (_Layer * len(layers))()
        for a, w in zip(self.array, layers):
            a.qkv, a.o = _lin(w.qkv, w.qkv_bias), _lin(w.o, w.o_bias)
            if w.gate_up is not None and w.down is not None:
                a.gate_up, a.down = _lin(w.gate_up, None), _lin(w.down, None)
            elif w.moe is not None:
                m, plan = w.moe, w.moe.experts.plan
                t13, p13, s13, t2, p2, s2 = plan.args
                a.moe = _Moe(m.router.data_ptr(), t13, t2, p13, p2, s13, s2, cpu_ggml.MOE_OUT_BYTES, m.scale,
                             plan.E, m.top_k, int(m.renorm), plan.F,
                             cpu_ggml._MOE_MODE if m.experts.int8 else 0, cpu_ggml.GEMM_Q8_ROWS)
            a.attn_norm = w.attn_norm.data_ptr()
            a.mlp_norm = None if w.mlp_norm is None else w.mlp_norm.data_ptr()
            a.q_norm = None if w.q_norm is None else w.q_norm.data_ptr()
            a.k_norm = None if w.k_norm is None else w.k_norm.data_ptr()
            a.eps, a.qk_eps, a.scale = w.eps, w.qk_eps, w.scale
            a.H, a.KVH, a.D = w.heads, w.kv_heads, w.head_dim
        self._caches: tuple[torch.Tensor, ...] = ()
        self._floats: dict[tuple[int, int], int] = {}  # workspace floats by (rows, threads)

    def bind_caches(self, caches: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """Point the layers at their K/V caches ([pages, page_size, kv_heads, head_dim] each);
        False where one is stored in a type decode_layers does not store (fp8)."""
        flat = tuple(t for kv in caches for t in kv)
        if len(flat) == len(self._caches) and all(a is b for a, b in zip(flat, self._caches)):
            return True
        for a, (k, v) in zip(self.array, caches):
            code = CACHE_CODES.get(k.dtype)
            if code is None or v.dtype != k.dtype or not (k.is_contiguous() and v.is_contiguous()):
                return False
            a.k_cache, a.v_cache, a.cache_code = k.data_ptr(), v.data_ptr(), code
        self._caches = flat
        return True

    def run(self, x: torch.Tensor, step: Step) -> None:
        """x [R, hidden] fp32 contiguous through the layers, in place."""
        s = step.struct
        n = len(self.array)
        key = (s.R, s.threads)
        floats = self._floats.get(key)
        if floats is None:
            floats = self._floats[key] = _workspace(self.array, n, s.R, self.hidden, s.threads)
        ws = torch.empty(floats)
        rc = _run(self.array, n, ctypes.byref(s), x.data_ptr(), self.hidden, ws.data_ptr())
        if rc != 0:
            raise RuntimeError(f"decode_layers returned {rc}")


class Step:
    """The inputs every layer of a decode step shares: token rows of sequences each adding one
    token or a few (drafts being verified; query_start [B + 1] their first rows, else None)."""

    __slots__ = ("_keep", "struct")

    def __init__(self, cos_sin: torch.Tensor, slots: torch.Tensor, table: torch.Tensor, lens: torch.Tensor,
                 query_start: torch.Tensor | None, page_size: int, nslots: int, split: int) -> None:
        """split: tokens per decode-attention work item (cpu_native.SPLIT_TOKENS)."""
        cs = cos_sin if cos_sin.dtype == torch.float32 and cos_sin.is_contiguous() else cos_sin.float().contiguous()
        sl = slots.to(torch.int64).contiguous()
        tb = table if table.dtype == torch.int32 and table.is_contiguous() else table.to(torch.int32).contiguous()
        ln = lens.to(torch.int32).contiguous()
        qs = None if query_start is None else query_start.to(torch.int32).contiguous()
        self._keep = (cs, sl, tb, ln, qs)
        self.struct = _Step(cs.data_ptr(), sl.data_ptr(), tb.data_ptr(), ln.data_ptr(),
                            None if qs is None else qs.data_ptr(), tb.stride(0), nslots, sl.shape[0], ln.shape[0],
                            cs.shape[-1], page_size, split, torch.get_num_threads())


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> bool:
    """k, v [T, kv_heads, D] fp32 into fp32/bf16/fp16 caches at slot_mapping (torch's
    rounding); False (nothing stored) where the inputs are not ones it takes."""
    code = CACHE_CODES.get(k_cache.dtype)
    if (code is None or v_cache.dtype != k_cache.dtype or k.dtype != torch.float32 or v.dtype != torch.float32
            or k.dim() != 3 or v.shape != k.shape or not (k_cache.is_contiguous() and v_cache.is_contiguous())
            or k_cache.shape != v_cache.shape or k_cache.shape[-2:] != k.shape[1:]):
        return False
    T, n = k.shape[0], k.shape[1] * k.shape[2]

    def rows(x: torch.Tensor) -> torch.Tensor:
        return x if x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] else x.contiguous()

    k, v = rows(k), rows(v)
    slots = slot_mapping if slot_mapping.dtype == torch.int64 and slot_mapping.is_contiguous() \
        else slot_mapping.to(torch.int64).contiguous()
    nslots = k_cache.numel() // n
    rc = _store(k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), T, n, slots.data_ptr(), nslots,
                k_cache.data_ptr(), v_cache.data_ptr(), code)
    if rc == -2:
        raise IndexError(f"store_kv: a slot of {slot_mapping.tolist()} is outside the cache's {nslots} rows")
    if rc != 0:
        raise RuntimeError(f"store_kv_rows returned {rc}")
    return True


def route(router: torch.Tensor, h: torch.Tensor, top_k: int, renorm: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [R, k] fp32, ids [R, k] int32) as decode_layers routes h [R, hidden] (Qwen3-MoE:
    softmax of router @ h, the top k largest first, renormalised if asked, times scale)."""
    E, hidden = router.shape
    r = router.float().contiguous()
    x = h.float().contiguous()
    R = x.shape[0]
    logits, ids, w = torch.empty(R, E), torch.empty(R, top_k, dtype=torch.int32), torch.empty(R, top_k)
    rc = _route(r.data_ptr(), E, hidden, x.data_ptr(), R, top_k, int(renorm), scale, logits.data_ptr(),
                ids.data_ptr(), w.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"moe_route: {top_k} of {E} experts, h {tuple(h.shape)}")
    return w, ids
