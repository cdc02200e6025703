"""Reference backend: plain torch, written for clarity, runs on every device and dtype.
Every other backend is tested against these."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from agentspeed.kernels.api import AttentionMetadata, SamplingTensors
from agentspeed.kernels.registry import register_kernel

_ALL_DEVICES = ("cpu", "cuda", "mps", "xpu")
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _reg(op: str):  # type: ignore[no-untyped-def]
    return register_kernel(op, "reference", _ALL_DEVICES, _FLOATS, priority=0)


@_reg("linear")
def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, w, bias)


@_reg("rms_norm")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same order of operations as Hugging Face: normalise in fp32, cast back, then scale.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@_reg("silu_and_mul")
def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    d = x.shape[-1] // 2
    if out is None:
        return F.silu(x[..., :d]) * x[..., d:]
    return torch.mul(F.silu(x[..., :d]), x[..., d:], out=out)


def _rotate_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = cos.shape[-1] * 2
    xr, xpass = x[..., :rot], x[..., rot:]
    x1, x2 = xr[..., : rot // 2], xr[..., rot // 2 :]
    c = cos.unsqueeze(-2).to(x.dtype)
    s = sin.unsqueeze(-2).to(x.dtype)
    out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)
    return torch.cat((out, xpass), -1) if xpass.numel() else out


@_reg("rotary_embedding")
def rotary_embedding(
    q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos_sin.chunk(2, dim=-1)
    return _rotate_neox(q, cos, sin), _rotate_neox(k, cos, sin)


FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value


def quantize_fp8(x: torch.Tensor, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp8: x [..., *last `dims` dims] -> (e4m3 values, float32 scale per row) with
    values * scale ~= x. The row maximum maps to the top of e4m3's range."""
    amax = x.float().abs().flatten(-dims).amax(-1)
    scale = (amax / FP8_MAX).clamp(min=1e-12)
    view = scale.view(*scale.shape, *([1] * dims))
    return (x.float() / view).to(FP8), scale


def dequantize(cache: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """cache rows back in `dtype` (identity when not quantized); scale has cache's leading dims."""
    if scale is None:
        return cache if cache.dtype == dtype else cache.to(dtype)
    view = scale.view(*scale.shape, *([1] * (cache.dim() - scale.dim())))
    return (cache.float() * view).to(dtype)


def _store_rows(x: torch.Tensor, cache: torch.Tensor, scale: torch.Tensor | None,
                slot_mapping: torch.Tensor) -> None:
    rows = cache.view(-1, *cache.shape[2:])
    if scale is None:
        rows[slot_mapping] = x.to(cache.dtype)
        return
    q, s = quantize_fp8(x, cache.dim() - 2)
    rows[slot_mapping] = q
    scale.view(-1)[slot_mapping] = s


@_reg("store_kv")
def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    _store_rows(k, k_cache, k_scale, slot_mapping)
    _store_rows(v, v_cache, v_scale, slot_mapping)


def gather_context(
    cache: torch.Tensor, page_table_row: torch.Tensor, seq_len: int,
    scale: torch.Tensor | None = None, dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The first seq_len tokens of one sequence's cache, [seq_len, ...], in `dtype` (None:
    the cache's own), dequantized when the cache is fp8 (scale given; default float32)."""
    page_size = cache.shape[1]
    n_pages = -(-seq_len // page_size)
    pages = page_table_row[:n_pages].long()
    rows = cache[pages].flatten(0, 1)[:seq_len]
    if scale is None:
        return rows if dtype is None else dequantize(rows, None, dtype)
    return dequantize(rows, scale[pages].flatten(0, 1)[:seq_len], dtype or torch.float32)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [n, H, D], k/v [L, KVH, D]; row i sits at position p = L - n + i and sees keys <= p
    (and > p - window with a sliding window). sinks [H]: one more logit per head in each
    softmax's denominator, with no value (GPT-OSS)."""
    n, h, _ = q.shape
    L, kvh, _ = k.shape
    rep = h // kvh
    k = k.repeat_interleave(rep, dim=1).float()
    v = v.repeat_interleave(rep, dim=1).float()
    scores = torch.einsum("nhd,lhd->hnl", q.float(), k) * scale
    pos = torch.arange(L - n, L, device=q.device)[:, None]
    keys = torch.arange(L, device=q.device)[None, :]
    mask = keys <= pos
    if window is not None:
        mask &= keys > pos - window
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.float()[:, None, None].expand(h, n, 1)
        probs = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]
    else:
        probs = scores.softmax(-1)
    return torch.einsum("hnl,lhd->nhd", probs, v).to(q.dtype)


def _paged_attention(
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
    out = torch.empty_like(q)
    start = 0
    for b, (qlen, slen) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        k = gather_context(k_cache, meta.page_table[b], slen, k_scale, q.dtype)
        v = gather_context(v_cache, meta.page_table[b], slen, v_scale, q.dtype)
        out[start : start + qlen] = _attend(q[start : start + qlen], k, v, scale, window, sinks)
        start += qlen
    return out


register_kernel("paged_attention_prefill", "reference", _ALL_DEVICES, _FLOATS)(_paged_attention)
register_kernel("paged_attention_decode", "reference", _ALL_DEVICES, _FLOATS)(_paged_attention)


@_reg("store_mla_kv")
def store_mla_kv(
    latent: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
    kv_scale: torch.Tensor | None = None,
) -> None:
    _store_rows(latent, kv_cache, kv_scale, slot_mapping)


def _causal_mask(n: int, L: int, device: torch.device) -> torch.Tensor:
    """[n, L]: query row i (at position L - n + i) sees keys <= its position."""
    return torch.arange(L, device=device)[None, :] <= torch.arange(L - n, L, device=device)[:, None]


@_reg("mla_decode")
def mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    lora_rank: int,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    out = q.new_empty(q.shape[0], q.shape[1], lora_rank)
    start = 0
    for b, (qlen, slen) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        kv = gather_context(kv_cache, meta.page_table[b], slen, kv_scale, torch.float32).float()
        qb = q[start : start + qlen].float()  # [n, H, Dk]
        scores = torch.einsum("nhd,ld->hnl", qb, kv) * scale
        scores = scores.masked_fill(~_causal_mask(qlen, slen, q.device), float("-inf"))
        o = torch.einsum("hnl,ld->nhd", scores.softmax(-1), kv[:, :lora_rank])
        out[start : start + qlen] = o.to(q.dtype)
        start += qlen
    return out


@_reg("mla_prefill")
def mla_prefill(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    w_kv_b: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    H, nope = q_nope.shape[1], q_nope.shape[2]
    lora = w_kv_b.shape[2]
    v_dim = w_kv_b.shape[1] - nope
    out = q_nope.new_empty(q_nope.shape[0], H, v_dim)
    start = 0
    for b, (qlen, slen) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        ctx = gather_context(kv_cache, meta.page_table[b], slen, kv_scale, q_nope.dtype)
        latent, k_pe = ctx[:, :lora], ctx[:, lora:]
        kv = torch.einsum("lr,hdr->lhd", latent, w_kv_b)  # [L, H, nope + v]
        k = torch.cat((kv[..., :nope], k_pe[:, None].expand(-1, H, -1)), -1)
        q = torch.cat((q_nope[start : start + qlen], q_pe[start : start + qlen]), -1)
        out[start : start + qlen] = _attend(q, k, kv[..., nope:], scale)
        start += qlen
    return out


@register_kernel("sample", "reference", _ALL_DEVICES, (torch.float32,))
def sample(logits: torch.Tensor, p: SamplingTensors) -> torch.Tensor:
    greedy = logits.argmax(-1)
    if p.all_greedy:
        return greedy
    is_greedy = p.temperature <= 0
    temp = torch.where(is_greedy, torch.ones_like(p.temperature), p.temperature)
    scaled = logits / temp[:, None]
    if p.use_top_k or p.use_top_p:
        sorted_logits, order = scaled.sort(-1, descending=True)
        remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
        if p.use_top_k:
            k = torch.where(p.top_k <= 0, logits.shape[-1], p.top_k).clamp(max=logits.shape[-1])
            ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
            remove |= ranks >= k[:, None]
        if p.use_top_p:
            probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            remove |= (probs.cumsum(-1) - probs) >= p.top_p[:, None]
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits)
    probs = scaled.softmax(-1)
    if p.use_min_p:
        # Drop tokens less likely than min_p times the most likely one.
        floor = p.min_p[:, None] * probs.max(-1, keepdim=True).values
        probs = probs.masked_fill(probs < floor, 0.0)
    # Exponential race (argmax p / E, E ~ Exp(1)) samples from probs; each row draws its
    # noise from its own generator so seeded rows are independent of batch composition.
    noise = torch.empty_like(probs)
    for i, g in enumerate(p.generators):
        if g is None:  # a greedy row: its sample is discarded below
            noise[i].fill_(1.0)
        else:
            noise[i].exponential_(generator=g)
    sampled = (probs / noise).argmax(-1)
    return torch.where(is_greedy, greedy, sampled)
