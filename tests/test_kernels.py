"""Every kernel backend matches `reference`; paged attention with a shared cached prefix
and awkward page boundaries matches dense attention; the registry selects and overrides."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import agentspeed.kernels  # noqa: F401  (registers backends)
from agentspeed.config import KernelConfig
from agentspeed.errors import KernelUnavailableError
from agentspeed.kernels.api import OPS, AttentionMetadata, KernelSet, SamplingTensors
from agentspeed.kernels.registry import backends_for, register_kernel, select_kernel

H, KVH, D = 4, 2, 16
BF16_MATH = {"cpu_bf16"}  # opt-in backends that compute with bf16 operands


def assert_bf16_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """bf16 operands keep 8 bits of mantissa: every error within 2% of the output's spread."""
    assert got.dtype == want.dtype
    err = (got.float() - want.float()).abs().max() / want.float().std()
    assert err < 2e-2, err


def paged_meta(
    tables: list[list[int]], ctx_lens: list[int], query_lens: list[int], page_size: int, slots: list[int]
) -> AttentionMetadata:
    """Metadata for sequences whose context ctx_lens[b] lives in pages tables[b] and whose
    last query_lens[b] tokens are the queries (written to `slots`)."""
    width = max(len(t) for t in tables)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32),
        seq_lens=torch.tensor(ctx_lens, dtype=torch.int32),
        page_table=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        query_lens_cpu=tuple(query_lens),
        seq_lens_cpu=tuple(ctx_lens),
        page_size=page_size,
        pages_cpu=tuple(tuple(t) for t in tables),
    )


def make_paged(
    ctx_lens: list[int], query_lens: list[int], page_size: int, shared_prefix: int = 0, seed: int = 0,
    shuffle: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, list[torch.Tensor], list[torch.Tensor]]:
    """Random K/V for each sequence written into a shuffled paged cache. Sequences share the
    pages of their first `shared_prefix` tokens (a cached prefix). Returns q, caches, meta,
    and each sequence's dense K and V."""
    g = torch.Generator().manual_seed(seed)
    n_pages_total = 1 + sum(-(-c // page_size) for c in ctx_lens)
    k_cache = torch.zeros(n_pages_total, page_size, KVH, D)
    v_cache = torch.zeros_like(k_cache)
    order = torch.randperm(n_pages_total - 1, generator=g) if shuffle else torch.arange(n_pages_total - 2, -1, -1)
    free = (order + 1).tolist()  # page 0 = null; unshuffled: pop() hands out ascending runs
    shared_pages = shared_prefix // page_size
    prefix_k = torch.randn(shared_pages * page_size, KVH, D, generator=g)
    prefix_v = torch.randn(shared_pages * page_size, KVH, D, generator=g)
    prefix_page_ids = [free.pop() for _ in range(shared_pages)]
    dense_k, dense_v, tables, slots = [], [], [], []
    for b, (c, q) in enumerate(zip(ctx_lens, query_lens)):
        k = torch.randn(c, KVH, D, generator=g)
        v = torch.randn(c, KVH, D, generator=g)
        n_shared = min(shared_pages, c // page_size) if b > 0 else shared_pages
        pages = prefix_page_ids[:n_shared] + [free.pop() for _ in range(-(-c // page_size) - n_shared)]
        k[: n_shared * page_size] = prefix_k[: n_shared * page_size]
        v[: n_shared * page_size] = prefix_v[: n_shared * page_size]
        for t in range(c):
            k_cache[pages[t // page_size], t % page_size] = k[t]
            v_cache[pages[t // page_size], t % page_size] = v[t]
        slots += [pages[t // page_size] * page_size + t % page_size for t in range(c - q, c)]
        dense_k.append(k)
        dense_v.append(v)
        tables.append(pages)
    meta = paged_meta(tables, ctx_lens, query_lens, page_size, slots)
    q = torch.randn(sum(query_lens), H, D, generator=g)
    return q, k_cache, v_cache, meta, dense_k, dense_v


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [n, H, D] as the last n positions of a causal sequence with keys k/v [L, KVH, D]."""
    n, L = q.shape[0], k.shape[0]
    k = k.repeat_interleave(H // KVH, 1).transpose(0, 1)
    v = v.repeat_interleave(H // KVH, 1).transpose(0, 1)
    mask = torch.ones(L, L, dtype=torch.bool).tril()[L - n :]
    return F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask).transpose(0, 1)


PREFILL_CASES = [
    # (context lens, query lens, page size, shared prefix tokens)
    ([7], [7], 4, 0),
    ([23, 9, 40], [23, 9, 40], 5, 0),
    ([37, 41, 19], [5, 41, 1], 3, 12),  # cached prefix, mixed prefill + decode rows
    ([64, 65, 33], [1, 17, 33], 16, 32),
    # prefixes past the CPU backend's PREFIX_SPLIT (split prefix / causal path), a decode row
    # and a fresh prompt beside them
    ([700, 600, 520, 300], [40, 300, 1, 300], 16, 256),
]


@pytest.mark.parametrize("ctx,qlens,ps,shared", PREFILL_CASES)
@pytest.mark.parametrize("op", ["paged_attention_prefill", "paged_attention_decode"])
def test_paged_attention_matches_dense(ctx: list[int], qlens: list[int], ps: int, shared: int, op: str) -> None:
    if op == "paged_attention_decode" and max(qlens) > 1:
        qlens = [1] * len(ctx)
    q, kc, vc, meta, dk, dv = make_paged(ctx, qlens, ps, shared)
    scale = D**-0.5
    expected = torch.cat(
        [dense_attention(qb, k, v) for qb, k, v in zip(q.split(qlens), dk, dv)]
    )
    for impl in backends_for(op):
        if impl.why_not("cpu", torch.float32, {"head_dim": D, "page_size": ps}):
            continue
        out = impl.fn(q, kc, vc, meta, scale)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=f"{impl.backend}")


@pytest.mark.parametrize("ctx,qlens,ps,shared", PREFILL_CASES)
@pytest.mark.parametrize("op", ["paged_attention_prefill", "paged_attention_decode"])
@pytest.mark.parametrize("window", [1, 6, 29])
def test_sliding_window_attention_matches_dense(
        ctx: list[int], qlens: list[int], ps: int, shared: int, op: str, window: int) -> None:
    """A token at position p sees keys (p - window, p]: windows start mid-page, inside a
    shared prefix, and longer than some contexts. Backends without windows decline the trait."""
    if op == "paged_attention_decode" and max(qlens) > 1:
        qlens = [1] * len(ctx)
    q, kc, vc, meta, dk, dv = make_paged(ctx, qlens, ps, shared)
    expected = []
    for qb, k, v in zip(q.split(qlens), dk, dv):
        n, L = qb.shape[0], k.shape[0]
        pos = torch.arange(L - n, L)[:, None]
        keys = torch.arange(L)[None, :]
        mask = (keys <= pos) & (keys > pos - window)
        kk = k.repeat_interleave(H // KVH, 1).transpose(0, 1)
        vv = v.repeat_interleave(H // KVH, 1).transpose(0, 1)
        expected.append(F.scaled_dot_product_attention(qb.transpose(0, 1), kk, vv, attn_mask=mask).transpose(0, 1))
    tested = []
    for impl in backends_for(op):
        if impl.why_not("cpu", torch.float32, {"head_dim": D, "page_size": ps, "sliding_window": True}):
            continue
        out = impl.fn(q, kc, vc, meta, D**-0.5, window=window)
        torch.testing.assert_close(out, torch.cat(expected), rtol=1e-5, atol=1e-5, msg=f"{impl.backend}")
        tested.append(impl.backend)
    assert {"reference", "cpu"} <= set(tested)


@pytest.mark.parametrize("ctx,qlens,ps,shared", PREFILL_CASES[:4])
@pytest.mark.parametrize("op", ["paged_attention_prefill", "paged_attention_decode"])
@pytest.mark.parametrize("window", [None, 6])
def test_attention_sinks_match_dense(
        ctx: list[int], qlens: list[int], ps: int, shared: int, op: str, window: int | None) -> None:
    """A sink logit per head joins each softmax's denominator and contributes no value
    (GPT-OSS): out = softmax([scores, sink])[:-1] @ v, alone and with a window."""
    if op == "paged_attention_decode" and max(qlens) > 1:
        qlens = [1] * len(ctx)
    q, kc, vc, meta, dk, dv = make_paged(ctx, qlens, ps, shared)
    sinks = torch.linspace(-1.5, 2.5, H)
    expected = []
    for qb, k, v in zip(q.split(qlens), dk, dv):
        n, L = qb.shape[0], k.shape[0]
        pos = torch.arange(L - n, L)[:, None]
        keys = torch.arange(L)[None, :]
        mask = (keys <= pos) & ((keys > pos - window) if window else True)
        kk = k.repeat_interleave(H // KVH, 1).transpose(0, 1)
        vv = v.repeat_interleave(H // KVH, 1).transpose(0, 1)
        scores = (qb.transpose(0, 1) @ kk.transpose(1, 2) * D**-0.5).masked_fill(~mask, float("-inf"))
        full = torch.cat([scores, sinks[:, None, None].expand(H, n, 1)], -1).softmax(-1)[..., :-1]
        expected.append((full @ vv).transpose(0, 1))
    tested = []
    traits = {"head_dim": D, "page_size": ps, "attention_sinks": True, "sliding_window": window is not None}
    for impl in backends_for(op):
        if impl.why_not("cpu", torch.float32, traits):
            continue
        out = impl.fn(q, kc, vc, meta, D**-0.5, window=window, sinks=sinks)
        torch.testing.assert_close(out, torch.cat(expected), rtol=1e-5, atol=1e-5, msg=f"{impl.backend}")
        tested.append(impl.backend)
    assert {"reference", "cpu"} <= set(tested)


@pytest.mark.parametrize("shuffle", [True, False])
def test_long_context_decode_matches_dense(shuffle: bool) -> None:
    """Past LONG_CONTEXT the CPU decode attends over views of page runs: one run, several runs
    (a shared prefix, then own pages), single pages, and a short sequence in the batch. The
    contexts also split into 2 parts + a 1-token remainder, 4 parts, and 8 parts + 7."""
    from agentspeed.kernels.cpu import LONG_CONTEXT, _page_runs

    ctx = [LONG_CONTEXT + 77, LONG_CONTEXT * 2, 40, 4999]
    q, kc, vc, meta, dk, dv = make_paged(ctx, [1, 1, 1, 1], 16, shared_prefix=512, shuffle=shuffle)
    expected = torch.cat([dense_attention(qb, k, v) for qb, k, v in zip(q.split(1), dk, dv)])
    impl = select_kernel("paged_attention_decode", "cpu", torch.float32, {"head_dim": D, "page_size": 16},
                         force="cpu")
    torch.testing.assert_close(impl.fn(q, kc, vc, meta, D**-0.5), expected, rtol=1e-5, atol=1e-5)
    runs = [len(_page_runs(p)) for p in meta.pages_cpu]
    assert (max(runs) > 50) if shuffle else (runs[0] == 1 and runs[1] == 2)


def _sample_inputs(op: str, dtype: torch.dtype) -> tuple[object, ...]:
    g = torch.Generator().manual_seed(1)
    if op == "linear":
        return (torch.randn(9, 64, generator=g).to(dtype), torch.randn(48, 64, generator=g).to(dtype),
                torch.randn(48, generator=g).to(dtype))
    if op == "rms_norm":
        return (torch.randn(9, 64, generator=g).to(dtype), torch.randn(64, generator=g).to(dtype), 1e-6)
    if op == "silu_and_mul":
        return (torch.randn(9, 2 * 48, generator=g).to(dtype),)
    if op == "rotary_embedding":
        from agentspeed.modeling.layers.rotary import cos_sin_table

        table = cos_sin_table(D, 128, 10000.0, None, "cpu")
        return (torch.randn(4, H, D, generator=g).to(dtype), torch.randn(4, KVH, D, generator=g).to(dtype),
                table[torch.tensor([0, 5, 77, 3])])
    if op == "store_kv":
        return (torch.randn(3, KVH, D, generator=g).to(dtype), torch.randn(3, KVH, D, generator=g).to(dtype),
                torch.zeros(4, 4, KVH, D, dtype=dtype), torch.zeros(4, 4, KVH, D, dtype=dtype),
                torch.tensor([5, 6, 13]))
    if op == "sample":
        logits = torch.randn(6, 50, generator=g)
        return (logits, SamplingTensors(
            temperature=torch.tensor([0.0, 0.7, 1.0, 1.3, 0.0, 0.9]),
            top_p=torch.tensor([1.0, 0.9, 1.0, 0.5, 1.0, 1.0]),
            top_k=torch.tensor([0, 0, 5, 0, 3, 1]),
            min_p=torch.tensor([0.0, 0.1, 0.0, 0.0, 0.0, 0.05]),
            generators=tuple(torch.Generator().manual_seed(i) for i in range(6)),
            all_greedy=False, use_top_p=True, use_top_k=True, use_min_p=True))
    raise AssertionError(op)


# attention ops have their own tests (paged: below; MLA: tests/test_mla_kernels.py)
@pytest.mark.parametrize("op", [o for o in OPS if not o.startswith(("paged_", "mla_"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_backend_matches_reference(op: str, dtype: torch.dtype) -> None:
    if op == "sample":
        dtype = torch.float32
    ref = select_kernel(op, "cpu", dtype, force="reference")

    for impl in backends_for(op):
        if impl.backend == "reference" or impl.why_not("cpu", dtype, {}):
            continue
        args_ref, args = _sample_inputs(op, dtype), _sample_inputs(op, dtype)
        if impl.prepare is not None:  # weight-taking ops: the weight is the second argument
            args = (args[0], impl.prepare(args[1]), *args[2:])  # type: ignore[arg-type]
        want, got = ref.fn(*args_ref), impl.fn(*args)
        if op == "store_kv":
            want, got = args_ref[2:4], args[2:4]
        if impl.backend in BF16_MATH:
            assert_bf16_close(got, want)
            continue
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)



@pytest.mark.parametrize("rows", [1, 7, 300])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_backends_any_batch_size(rows: int, bias: bool) -> None:
    """A prepacked weight serves every batch size (decode M=1 to long prefill chunks)."""
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 96, generator=g), torch.randn(160, 96, generator=g)
    b = torch.randn(160, generator=g) if bias else None
    want = F.linear(x, w, b)
    for impl in backends_for("linear"):
        if impl.why_not("cpu", torch.float32, {}):
            continue
        wp = impl.prepare(w) if impl.prepare else w
        if impl.backend in BF16_MATH:
            assert_bf16_close(impl.fn(x, wp, b), want)
        else:
            torch.testing.assert_close(impl.fn(x, wp, b), want, rtol=1e-4, atol=1e-4, msg=impl.backend)
        assert impl.fn(x[None], wp, b).shape == (1, rows, 160)


def test_every_op_has_a_reference_that_runs_everywhere() -> None:
    for op in OPS:
        assert any(k.backend == "reference" for k in backends_for(op)), op
        assert select_kernel(op, "cpu", torch.float32, force="reference").backend == "reference"


def test_selection_prefers_priority_and_override_forces_or_fails() -> None:
    ks = KernelSet("cpu", torch.float32, {"head_dim": D, "page_size": 16})
    native = any(k.backend == "cpu_native" for k in backends_for("paged_attention_prefill"))
    best = "cpu_native" if native else "cpu"  # priority 20 where it built, else the torch one
    assert ks.backends["paged_attention_prefill"] == best
    forced = KernelSet("cpu", torch.float32, config=KernelConfig.parse("reference"))
    assert set(forced.backends.values()) == {"reference"}
    per_op = KernelSet("cpu", torch.float32, config=KernelConfig.parse("paged_attention_decode=reference"))
    assert per_op.backends["paged_attention_decode"] == "reference"
    assert per_op.backends["paged_attention_prefill"] == best
    with pytest.raises(KernelUnavailableError, match="cannot run"):
        KernelSet("cuda", torch.float32, config=KernelConfig.parse("paged_attention_decode=cpu"))
    with pytest.raises(KernelUnavailableError, match="does not implement"):
        KernelSet("cpu", torch.float32, config=KernelConfig.parse("sample=cpu"))
    with pytest.raises(KernelUnavailableError):
        KernelSet("cpu", torch.float32, config=KernelConfig.parse("nosuch"))


def test_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTSPEED_KERNEL_BACKEND", "rms_norm=reference")
    # read where the config is built (CLI, LLM), not inside the kernel layer
    assert KernelSet("cpu", torch.float32, config=KernelConfig.from_spec(None)).backends["rms_norm"] == "reference"
    assert KernelSet("cpu", torch.float32).backends["rms_norm"] != "reference"


def test_traits_filter_selection() -> None:
    calls = []

    @register_kernel("silu_and_mul", "test-big-only", ["cpu"], [torch.float32], priority=99,
                     supports=lambda t: t.get("head_dim", 0) >= 256)
    def _fake(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return x

    try:
        assert select_kernel("silu_and_mul", "cpu", torch.float32, {"head_dim": 64}).backend != "test-big-only"
        assert select_kernel("silu_and_mul", "cpu", torch.float32, {"head_dim": 256}).backend == "test-big-only"
    finally:
        from agentspeed.kernels import registry

        del registry._REGISTRY["silu_and_mul"]["test-big-only"]


def test_sampling_semantics() -> None:
    ref = select_kernel("sample", "cpu", torch.float32).fn
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9], [3.0, 0.0, 0.0, 0.0]])

    def st(temp: list[float], top_p: list[float], top_k: list[int], seed: int) -> SamplingTensors:
        return SamplingTensors(torch.tensor(temp), torch.tensor(top_p), torch.tensor(top_k), torch.zeros(2),
                               tuple(torch.Generator().manual_seed(seed + i) for i in range(2)),
                               all_greedy=False, use_top_p=True, use_top_k=True)

    # top_k=1 is greedy whatever the temperature
    for seed in range(20):
        assert ref(logits, st([5.0, 5.0], [1.0, 1.0], [1, 1], seed)).tolist() == [1, 0]
    # top_p small keeps only the most likely token
    for seed in range(20):
        assert ref(logits, st([1.0, 1.0], [0.01, 0.01], [0, 0], seed)).tolist() == [1, 0]
    # top_k=2 never leaves the two best; both appear over many seeds
    seen = {ref(logits, st([1.0, 1.0], [1.0, 1.0], [2, 0], s)).tolist()[0] for s in range(200)}
    assert seen == {1, 3}
    # same seed -> same sample
    a = ref(logits, st([1.0, 1.0], [1.0, 1.0], [0, 0], 7))
    b = ref(logits, st([1.0, 1.0], [1.0, 1.0], [0, 0], 7))
    assert a.tolist() == b.tolist()


def test_decode_split_of_a_mixed_batch_matches_one_prefill_call() -> None:
    """The attention layer runs a mixed batch's leading decode-like sequences (a decode, one
    verifying 3 drafts) through the decode op and the rest through prefill; that must equal
    one prefill call on the batch."""
    ctx, qlens = [1500, 40, 700, 64], [1, 4, 30, 64]
    q, kc, vc, meta, _, _ = make_paged(ctx, qlens, 16, shared_prefix=32)
    assert meta.decode_split is None and meta.with_decode_split().decode_split is not None
    nd, dmeta, pmeta = meta.with_decode_split().decode_split  # type: ignore[misc]
    assert nd == 5 and dmeta.query_lens_cpu == (1, 4) and pmeta.query_lens_cpu == (30, 64)
    assert pmeta.query_start_loc.tolist() == [0, 30, 94] and pmeta.slot_mapping.shape[0] == 94
    whole = select_kernel("paged_attention_prefill", "cpu", torch.float32, force="reference").fn(q, kc, vc, meta, 0.1)
    dec = select_kernel("paged_attention_decode", "cpu", torch.float32).fn(q[:nd], kc, vc, dmeta, 0.1)
    pre = select_kernel("paged_attention_prefill", "cpu", torch.float32).fn(q[nd:], kc, vc, pmeta, 0.1)
    torch.testing.assert_close(torch.cat([dec, pre]), whole, rtol=1e-5, atol=1e-5)
    # no split when nothing leads with decodes, or everything is a decode
    assert make_paged([9, 5], [9, 1], 4)[3].with_decode_split().decode_split is None
    assert make_paged([9, 5], [1, 1], 4)[3].with_decode_split().decode_split is None
