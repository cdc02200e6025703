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
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


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


@_reg("store_kv")
def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    kvh, d = k_cache.shape[-2:]
    k_cache.view(-1, kvh, d)[slot_mapping] = k
    v_cache.view(-1, kvh, d)[slot_mapping] = v


def gather_context(
    cache: torch.Tensor, page_table_row: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """The first seq_len tokens of one sequence's cache, [seq_len, KVH, D]."""
    page_size = cache.shape[1]
    n_pages = -(-seq_len // page_size)
    return cache[page_table_row[:n_pages].long()].flatten(0, 1)[:seq_len]


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [n, H, D], k/v [L, KVH, D]; row i sits at position L - n + i and sees keys <= it."""
    n, h, _ = q.shape
    L, kvh, _ = k.shape
    rep = h // kvh
    k = k.repeat_interleave(rep, dim=1).float()
    v = v.repeat_interleave(rep, dim=1).float()
    scores = torch.einsum("nhd,lhd->hnl", q.float(), k) * scale
    pos = torch.arange(L - n, L, device=q.device)[:, None]
    mask = torch.arange(L, device=q.device)[None, :] <= pos
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1)
    return torch.einsum("hnl,lhd->nhd", probs, v).to(q.dtype)


def _paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    out = torch.empty_like(q)
    start = 0
    for b, (qlen, slen) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        k = gather_context(k_cache, meta.page_table[b], slen)
        v = gather_context(v_cache, meta.page_table[b], slen)
        out[start : start + qlen] = _attend(q[start : start + qlen], k, v, scale)
        start += qlen
    return out


register_kernel("paged_attention_prefill", "reference", _ALL_DEVICES, _FLOATS)(_paged_attention)
register_kernel("paged_attention_decode", "reference", _ALL_DEVICES, _FLOATS)(_paged_attention)


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
