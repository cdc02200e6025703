"""MLA kernels: every backend that runs here matches the reference on shuffled paged latent
caches (several sequences, cached prefixes, several query tokens per sequence, fp8), and
the CPU prefill's two forms (absorbed, expanded) agree with each other."""

from __future__ import annotations

import pytest
import torch
from test_kernels import paged_meta

from agentspeed.kernels import cpu_mla, reference
from agentspeed.kernels.api import AttentionMetadata
from agentspeed.kernels.reference import quantize_fp8
from agentspeed.kernels.registry import backends_for

H, NOPE, ROPE, LORA, V = 4, 24, 16, 32, 20


def make_latent(ctx_lens: list[int], query_lens: list[int], page_size: int, seed: int = 0,
                fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, AttentionMetadata]:
    """A shuffled paged latent cache [pages, page_size, LORA + ROPE] holding each sequence's
    context, with its metadata (query rows are the last query_lens[b] tokens)."""
    g = torch.Generator().manual_seed(seed)
    n_pages = 1 + sum(-(-c // page_size) for c in ctx_lens)
    cache = torch.randn(n_pages, page_size, LORA + ROPE, generator=g)
    scale = None
    if fp8:
        cache, scale = quantize_fp8(cache, 1)
    free = (torch.randperm(n_pages - 1, generator=g) + 1).tolist()
    tables = [[free.pop() for _ in range(-(-c // page_size))] for c in ctx_lens]
    meta = paged_meta(tables, ctx_lens, query_lens, page_size, [0] * sum(query_lens))
    return cache, scale, meta


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("query_lens", [[1, 1, 1], [2, 4, 1]])
def test_cpu_mla_decode_matches_reference(query_lens: list[int], fp8: bool) -> None:
    cache, scale, meta = make_latent([9, 1101, 17], query_lens, page_size=5, fp8=fp8)  # 1101: split-KV
    q = torch.randn(sum(query_lens), H, LORA + ROPE)
    ref = reference.mla_decode(q, cache, meta, 0.2, LORA, scale)
    torch.testing.assert_close(cpu_mla.mla_decode(q, cache, meta, 0.2, LORA, scale), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("force", ["absorbed", "expanded", "auto"])
def test_cpu_mla_prefill_matches_reference(force: str, fp8: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if force != "auto":
        monkeypatch.setattr(cpu_mla, "prefer_absorbed", lambda *a: force == "absorbed")
    # a fresh prompt, a continuation over a cached prefix, one token, a long cached prefix
    ctx, qlens = [23, 40, 7, 300], [23, 9, 1, 3]
    cache, scale, meta = make_latent(ctx, qlens, page_size=16, fp8=fp8, seed=1)
    T = sum(qlens)
    q_nope, q_pe = torch.randn(T, H, NOPE), torch.randn(T, H, ROPE)
    w = torch.randn(H, NOPE + V, LORA) * 0.2
    ref = reference.mla_prefill(q_nope, q_pe, cache, w, meta, 0.2, scale)
    got = cpu_mla.mla_prefill(q_nope, q_pe, cache, w, meta, 0.2, scale)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op", ["mla_decode", "mla_prefill"])
def test_every_cpu_backend_is_tested_here(op: str) -> None:
    # the tests above cover exactly these; a new CPU backend needs its own case here
    runnable = {k.backend for k in backends_for(op) if not k.why_not("cpu", torch.float32, {})}
    assert runnable == {"reference", "cpu"}


def test_absorbed_form_is_chosen_for_short_turns_over_long_prefixes() -> None:
    dims = dict(heads=16, nope=128, rope=64, lora=512, v_dim=128)  # DeepSeek-V3 under TP=8
    assert not cpu_mla.prefer_absorbed(4096, 4096, **dims)  # fresh prompt: expand
    assert cpu_mla.prefer_absorbed(1, 4096, **dims)
    assert cpu_mla.prefer_absorbed(100, 30000, **dims)  # a tool result over a long session
    assert not cpu_mla.prefer_absorbed(1000, 30000, **dims)
