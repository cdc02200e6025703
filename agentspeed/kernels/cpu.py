"""CPU backend: where it pays over the reference. Attention uses torch's fused SDPA
(flash-style CPU kernel with GQA) instead of materialising repeated K/V and the score matrix
in fp32 math by hand; decode gathers all sequences' pages into one padded batch.

Linear layers go through oneDNN with weights prepacked once into its blocked layout: on this
class of CPU (AVX2, fp32) F.linear's MKL path streams weights at ~15 GB/s while oneDNN gets
close to memory bandwidth; measured 1.6-2.2x faster decode and 1.4x faster prefill for
SmolLM2 (docs/benchmarks.md). Registered only when torch was built with oneDNN."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from agentspeed.kernels.api import AttentionMetadata
from agentspeed.kernels.reference import dequantize, gather_context
from agentspeed.kernels.registry import register_kernel

_CPU = ("cpu",)
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _prepack(w: torch.Tensor) -> torch.Tensor:
    # The batch-size hint only picks a blocking; any batch size runs on the result.
    return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), 32)


def _linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


if torch.backends.mkldnn.is_available():
    register_kernel("linear", "cpu", _CPU, (torch.float32,), priority=10, prepare=_prepack)(_linear)


def _prepack_bf16(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w.detach().to(torch.bfloat16).contiguous(), 32)


def _linear_bf16(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    b = None if bias is None else bias.to(torch.bfloat16)
    return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), w, b, "none", [], "").to(x.dtype)


def _has_bf16_dot() -> bool:
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


# Opt-in (`--kernel-backend linear=cpu_bf16`): weights stored in bf16 and multiplied with the
# CPU's bf16 dot-product instructions (AVX512-BF16/AMX), activations rounded to bf16 on the
# way in and results returned in fp32. Half the weight bytes per decoded token and ~2x the
# GEMM rate for prefill, at bf16 weight precision (so not bit-faithful to an fp32 reference,
# hence never picked by default). Registered only where the hardware has bf16 dot products:
# elsewhere bf16 math is emulated and slower than fp32.
if _has_bf16_dot():
    register_kernel("linear", "cpu_bf16", _CPU, (torch.float32,), priority=0, prepare=_prepack_bf16)(_linear_bf16)


@register_kernel("paged_attention_prefill", "cpu", _CPU, _FLOATS, priority=10)
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
    """window: a sliding window (a token at position p sees keys in (p - window, p]).
    sinks (GPT-OSS): the reference's explicit softmax (SDPA has no sink logit)."""
    if sinks is not None:
        return _sink_prefill(q, k_cache, v_cache, meta, scale, k_scale, v_scale, window, sinks)
    if window is not None:
        return _windowed_prefill(q, k_cache, v_cache, meta, scale, k_scale, v_scale, window)
    out = torch.empty_like(q)
    start = 0
    ps = k_cache.shape[1]
    for b, (qlen, slen) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        if meta.pages_cpu and _flash is not None and slen - qlen >= PREFIX_SPLIT and qlen > 1:
            runs = _page_runs(meta.pages_cpu[b][: -(-slen // ps)])
            k = _context(k_cache, runs, slen, k_scale, q.dtype)
            v = _context(v_cache, runs, slen, v_scale, q.dtype)
            out[start : start + qlen] = _attend_after_prefix(q[start : start + qlen], k, v, scale)
            start += qlen
            continue
        # 4-D inputs: with 3-D ones SDPA leaves its fused CPU kernel for the math path (6x
        # slower on a 2,000-token prompt).
        k = gather_context(k_cache, meta.page_table[b], slen, k_scale, q.dtype).transpose(0, 1)[None]
        v = gather_context(v_cache, meta.page_table[b], slen, v_scale, q.dtype).transpose(0, 1)[None]
        qb = q[start : start + qlen].transpose(0, 1)[None]
        if qlen == slen:
            o = F.scaled_dot_product_attention(qb, k, v, is_causal=True, scale=scale, enable_gqa=True)
        elif qlen == 1:
            o = F.scaled_dot_product_attention(qb, k, v, scale=scale, enable_gqa=True)
        else:
            # Causal with a cached prefix: row i sees keys up to slen - qlen + i.
            rows = torch.arange(slen - qlen, slen)[:, None]
            mask = torch.arange(slen)[None, :] <= rows
            o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start : start + qlen] = o[0].transpose(0, 1)
        start += qlen
    return out


def _sink_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                  scale: float, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                  window: int | None, sinks: torch.Tensor) -> torch.Tensor:
    # The reference's explicit softmax over the keys some row can see (masks are relative, so
    # a context gathered from the first window's page on gives the same result).
    from agentspeed.kernels.reference import _attend

    out = torch.empty_like(q)
    start = 0
    ps = k_cache.shape[1]
    for b, (qlen, slen) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        lo = max(0, slen - qlen - window + 1) // ps * ps if window is not None else 0
        table = meta.page_table[b, lo // ps:]
        k = gather_context(k_cache, table, slen - lo, k_scale, q.dtype)
        v = gather_context(v_cache, table, slen - lo, v_scale, q.dtype)
        out[start : start + qlen] = _attend(q[start : start + qlen], k, v, scale, window, sinks)
        start += qlen
    return out


def _windowed_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                      scale: float, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                      window: int) -> torch.Tensor:
    # Only the keys some row can see are gathered: from the first row's window start on.
    out = torch.empty_like(q)
    start = 0
    ps = k_cache.shape[1]
    for b, (qlen, slen) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        lo = max(0, slen - qlen - window + 1) // ps * ps  # whole pages: page-table columns
        table = meta.page_table[b, lo // ps:]
        k = gather_context(k_cache, table, slen - lo, k_scale, q.dtype).transpose(0, 1)[None]
        v = gather_context(v_cache, table, slen - lo, v_scale, q.dtype).transpose(0, 1)[None]
        rows = torch.arange(slen - qlen, slen)[:, None]
        keys = torch.arange(lo, slen)[None, :]
        mask = (keys <= rows) & (keys > rows - window)
        qb = q[start : start + qlen].transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start : start + qlen] = o[0].transpose(0, 1)
        start += qlen
    return out


# From this context length on, decode attends each sequence over views of its page runs
# instead of one padded gather: the gather copies every sequence's whole K/V per layer
# (50 MB per layer for 8 sequences at 8K tokens), which dominated long-context decode.
LONG_CONTEXT = 1024


def _page_runs(pages: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive page ids, as (first page, count)."""
    runs: list[tuple[int, int]] = []
    start = prev = pages[0]
    for p in pages[1:]:
        if p != prev + 1:
            runs.append((start, prev - start + 1))
            start = p
        prev = p
    runs.append((start, prev - start + 1))
    return runs


def _rows(cache: torch.Tensor, runs: list[tuple[int, int]], length: int) -> torch.Tensor:
    """[length, ...]: a view when the pages are one run, else one copy of this sequence."""
    parts = [cache[p : p + n] for p, n in runs]
    whole = parts[0] if len(parts) == 1 else torch.cat(parts)
    return whole.flatten(0, 1)[:length]


def _context(cache: torch.Tensor, runs: list[tuple[int, int]], length: int,
             scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """[KVH, length, D] in `dtype`: converted (16-bit) or dequantized (fp8) when the cache
    stores something else. Converting a 16-bit cache per sequence is what makes it pay: bf16
    -> fp32 is a vectorised shift, so decode reads half the bytes of an fp32 cache."""
    rows = _rows(cache, runs, length)
    return dequantize(rows, None if scale is None else _rows(scale, runs, length), dtype).transpose(0, 1)


# Decode over a long context attends with the GQA group folded into the query axis (each KV
# head's keys are streamed once for all its query heads, not once per query head as SDPA's
# enable_gqa does) and the context split into up to _MAX_SPLITS parts of at least
# _SPLIT_TOKENS, run as one batched flash call (enough independent work for every thread)
# and merged by log-sum-exp. Measured on SmolLM2 shapes at 6K context: 1.4 ms -> 0.8 ms per
# sequence and layer (docs/benchmarks.md).
_SPLIT_TOKENS = 512
_MAX_SPLITS = 8
_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attend_one_token(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token over its whole context: q [H, D], k [KVH, L, D], v [KVH, L, Dv]
    -> [H, Dv]. Query head i attends with KV head i // (H // KVH)."""
    kvh, L, d = k.shape
    qg = q.view(1, kvh, -1, d)  # query head i uses KV head i // group
    n = max(1, min(_MAX_SPLITS, L // _SPLIT_TOKENS))
    if _flash is None or n == 1:
        return F.scaled_dot_product_attention(qg, k[None], v[None], scale=scale).view(q.shape[0], -1)
    h = L // n
    parts = [_flash(qg.expand(n, -1, -1, -1), k[:, : n * h].unflatten(1, (n, h)).transpose(0, 1),
                    v[:, : n * h].unflatten(1, (n, h)).transpose(0, 1), scale=scale)[:2]]
    if n * h < L:  # the remainder (fewer than n tokens)
        parts.append(_flash(qg, k[None, :, n * h :], v[None, :, n * h :], scale=scale)[:2])
    out = torch.cat([o for o, _ in parts])  # [splits, KVH, group, D]
    lse = torch.cat([x for _, x in parts])  # [splits, KVH, group]
    return (out * torch.softmax(lse, 0)[..., None]).sum(0).view(q.shape[0], -1)


# New tokens over a cached prefix of at least PREFIX_SPLIT tokens (a tool output appended to
# a long conversation): the prefix part runs unmasked with the GQA group folded into the
# query rows, the new tokens' own part causally, merged by log-sum-exp. Against one SDPA
# call with a causal-with-offset mask: 32.0 -> 28.1 ms per layer for 300 tokens over 6,300
# (SmolLM2 shapes), and the page-run views skip the gather copy of an fp32 cache.
PREFIX_SPLIT = 256


def _attend_after_prefix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [n, H, D] at the last n positions of k/v [KVH, L, D] -> [n, H, D], causal."""
    n, H, d = q.shape
    kvh, L, _ = k.shape
    g = H // kvh
    P = L - n
    assert _flash is not None
    qt = q.transpose(0, 1)  # [H, n, D]
    o1, l1 = _flash(qt.reshape(1, kvh, g * n, d), k[None, :, :P], v[None, :, :P], scale=scale)[:2]
    kn = k[:, P:].repeat_interleave(g, 0)[None]
    vn = v[:, P:].repeat_interleave(g, 0)[None]
    o2, l2 = _flash(qt[None], kn, vn, is_causal=True, scale=scale)[:2]
    o1, l1 = o1.reshape(H, n, -1), l1.reshape(H, n)
    o2, l2 = o2.reshape(H, n, -1), l2.reshape(H, n)
    w = torch.sigmoid(l1 - l2)[..., None]  # share of the prefix part: e^l1 / (e^l1 + e^l2)
    return (o2 + w * (o1 - o2)).transpose(0, 1)


def _decode_per_sequence(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         meta: AttentionMetadata, scale: float,
                         k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> torch.Tensor:
    out = torch.empty_like(q)
    ps = k_cache.shape[1]
    for b, (L, pages) in enumerate(zip(meta.seq_lens_cpu, meta.pages_cpu)):
        runs = _page_runs(pages[: -(-L // ps)])
        k = _context(k_cache, runs, L, k_scale, q.dtype)
        v = _context(v_cache, runs, L, v_scale, q.dtype)
        out[b] = attend_one_token(q[b], k, v, scale)
    return out


@register_kernel("paged_attention_decode", "cpu", _CPU, _FLOATS, priority=10)
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
    # Several query tokens, a sliding window or sinks: the general masked path.
    if q.shape[0] != len(meta.seq_lens_cpu) or window is not None or sinks is not None:
        return paged_attention_prefill(q, k_cache, v_cache, meta, scale, k_scale, v_scale, window, sinks)
    if meta.pages_cpu and meta.max_seq_len >= LONG_CONTEXT:
        return _decode_per_sequence(q, k_cache, v_cache, meta, scale, k_scale, v_scale)
    page_size = k_cache.shape[1]
    n_pages = -(-meta.max_seq_len // page_size)
    pages = meta.page_table[:, :n_pages].long()
    B = pages.shape[0]
    # [B, n_pages, page_size, KVH, D] -> [B, KVH, L, D]
    k = dequantize(k_cache[pages], None if k_scale is None else k_scale[pages], q.dtype)
    v = dequantize(v_cache[pages], None if v_scale is None else v_scale[pages], q.dtype)
    k = k.flatten(1, 2).transpose(1, 2)
    v = v.flatten(1, 2).transpose(1, 2)
    if B == 1:  # one sequence: trim to its length instead of masking
        L = meta.seq_lens_cpu[0]
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2), k[:, :, :L], v[:, :, :L], scale=scale, enable_gqa=True
        )
        return o.squeeze(2)
    L = k.shape[2]
    mask = (torch.arange(L)[None, :] < meta.seq_lens[:, None]).view(B, 1, 1, L)
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=mask, scale=scale, enable_gqa=True
    )
    return o.squeeze(2)


@register_kernel("rms_norm", "cpu", _CPU, (torch.float32,), priority=10)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)
