"""CPU backend for multi-head latent attention, on torch's fused SDPA.

The latent cache is one shared "KV head": absorbed attention is multi-query attention with
keys = whole latent rows (lora + rope) and values = their latent part, so SDPA's GQA path
runs it without materialising per-head K/V. SDPA's fused CPU kernel needs values as wide as
keys (with narrower values it drops to a path measured 2.7-15x slower), so values are the
whole rows too and the rope columns of the output are dropped; the expanded form pads
values with zeros to the key width for the same reason.

`mla_prefill` picks the cheaper form per sequence. Expanded (up-project the context to
per-head K/V, then MHA) costs L*H*lora*(nope+v) MACs to expand plus ~q*L*H*(qk+v) to attend;
absorbed costs ~q*L*H*(2*lora+rope) plus q*H*lora*(nope+v) for the projections. Expanded
wins for fresh prompts; absorbed wins for a few new tokens over a long cached prefix, which
is what an agent's tool-result turn looks like (benchmarks/kernels/bench_mla_cpu.py measures the
crossover).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from agentspeed.kernels.api import AttentionMetadata
from agentspeed.kernels.cpu import attend_one_token
from agentspeed.kernels.reference import gather_context
from agentspeed.kernels.registry import register_kernel

_CPU = ("cpu",)
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _mask(qlen: int, slen: int) -> torch.Tensor | None:
    """Causal mask for qlen queries at the end of slen keys (None when no key is hidden)."""
    if qlen == 1:
        return None
    rows = torch.arange(slen - qlen, slen)[:, None]
    return torch.arange(slen)[None, :] <= rows


def _absorbed(q: torch.Tensor, ctx: torch.Tensor, lora: int, scale: float) -> torch.Tensor:
    """q [n, H, lora + rope] over latent rows ctx [L, lora + rope] -> [n, H, lora]."""
    n, L = q.shape[0], ctx.shape[0]
    if n == 1:  # decode: all heads as one group over the one latent "KV head", split-KV
        return attend_one_token(q[0], ctx[None], ctx[None], scale)[None, :, :lora]
    kv = ctx[None, None]  # [1, 1, L, Dk]: one KV head shared by all query heads
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], kv, kv, attn_mask=_mask(n, L), scale=scale, enable_gqa=True
    )
    return o[0, :, :, :lora].transpose(0, 1)


@register_kernel("mla_decode", "cpu", _CPU, _FLOATS, priority=10)
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
        ctx = gather_context(kv_cache, meta.page_table[b], slen, kv_scale, q.dtype)
        out[start : start + qlen] = _absorbed(q[start : start + qlen], ctx, lora_rank, scale)
        start += qlen
    return out


def prefer_absorbed(qlen: int, slen: int, heads: int, nope: int, rope: int, lora: int, v_dim: int) -> bool:
    """True when the absorbed form takes fewer multiply-adds for this sequence."""
    attend = qlen * slen if qlen < slen else slen * (slen + 1) // 2
    expanded = slen * heads * lora * (nope + v_dim) + attend * heads * (nope + rope + v_dim)
    absorbed = attend * heads * (2 * lora + rope) + qlen * heads * lora * (nope + v_dim)
    return absorbed < expanded


@register_kernel("mla_prefill", "cpu", _CPU, _FLOATS, priority=10)
def mla_prefill(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    w_kv_b: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    H, nope, rope = q_nope.shape[1], q_nope.shape[2], q_pe.shape[2]
    lora = w_kv_b.shape[2]
    v_dim = w_kv_b.shape[1] - nope
    w_uk, w_uv = w_kv_b[:, :nope], w_kv_b[:, nope:]
    out = q_nope.new_empty(q_nope.shape[0], H, v_dim)
    start = 0
    for b, (qlen, slen) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        ctx = gather_context(kv_cache, meta.page_table[b], slen, kv_scale, q_nope.dtype)
        qn, qp = q_nope[start : start + qlen], q_pe[start : start + qlen]
        if prefer_absorbed(qlen, slen, H, nope, rope, lora, v_dim):
            q_lat = torch.bmm(qn.transpose(0, 1), w_uk).transpose(0, 1)  # [n, H, lora]
            o = _absorbed(torch.cat((q_lat, qp), -1), ctx, lora, scale)
            o = torch.bmm(o.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)
        else:
            kv = torch.matmul(ctx[:, :lora], w_kv_b.flatten(0, 1).T).view(slen, H, nope + v_dim)
            k = torch.cat((kv[..., :nope], ctx[:, None, lora:].expand(-1, H, -1)), -1)
            v = F.pad(kv[..., nope:], (0, max(0, nope + rope - v_dim)))
            q = torch.cat((qn, qp), -1)
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                attn_mask=_mask(qlen, slen) if qlen < slen else None, is_causal=qlen == slen, scale=scale,
            )[0, :, :, :v_dim].transpose(0, 1)
        out[start : start + qlen] = o
        start += qlen
    return out
