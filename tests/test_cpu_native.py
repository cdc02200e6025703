"""The native CPU kernels (kernels/native/*.cpp via kernels/cpu_native.py): paged decode and
prefill attention and the block-form linears. They build wherever a C++ compiler exists,
match the reference on every storage type, head size and group size they take, refuse what
they cannot take, and a failed build is reported, never silently swapped."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_kernels import paged_meta

import agentspeed.kernels  # noqa: F401  (registers backends)
from agentspeed.config import KernelConfig
from agentspeed.errors import KernelUnavailableError
from agentspeed.kernels import cpu_native, native, reference
from agentspeed.kernels.api import AttentionMetadata, KernelSet
from agentspeed.kernels.reference import quantize_fp8
from agentspeed.kernels.registry import backends_for

HAS_CXX = shutil.which("g++") is not None or shutil.which("c++") is not None
needs_native = pytest.mark.skipif(
    not any(k.backend == "cpu_native" for k in backends_for("paged_attention_decode")),
    reason="native kernels did not build here (see test_builds_where_a_compiler_exists)",
)


def test_builds_where_a_compiler_exists() -> None:
    """With a compiler on the machine the backend must be registered and be the default:
    a broken build must fail here, not quietly leave decode on the torch path."""
    if not HAS_CXX:
        pytest.skip("no C++ compiler on this machine")
    ks = KernelSet("cpu", torch.float32)
    assert ks.backends["paged_attention_decode"] == "cpu_native"
    assert ks.backends["paged_attention_prefill"] == "cpu_native"


@needs_native
def test_loading_keeps_the_process_float_state() -> None:
    """-ffast-math at link time would pull in crtfastmath.o, which flushes subnormals to zero
    for the whole process (torch's maths and everyone else's) when the library loads."""
    import sys

    native.load()
    assert sys.float_info.min / 4 != 0.0
    tiny = torch.tensor([sys.float_info.min], dtype=torch.float64)
    assert (tiny / 4).item() != 0.0


def _prefill_case(ctx: list[int], qlens: list[int], heads: int, kvh: int, d: int, ps: int, seed: int = 0):
    """Random K/V in shuffled pages; the last qlens[b] of sequence b's ctx[b] tokens query."""
    g = torch.Generator().manual_seed(seed)
    n_pages = 1 + sum(-(-c // ps) for c in ctx)
    free = (torch.randperm(n_pages - 1, generator=g) + 1).tolist()
    tables = [[free.pop() for _ in range(-(-c // ps))] for c in ctx]
    k = torch.randn(n_pages, ps, kvh, d, generator=g)
    v = torch.randn(n_pages, ps, kvh, d, generator=g)
    q = torch.randn(sum(qlens), heads, d, generator=g) * 2
    return q, k, v, paged_meta(tables, ctx, qlens, ps, [0] * sum(qlens))


def _case(ctx: list[int], heads: int, kvh: int, d: int, ps: int, seed: int = 0):
    """Random K/V in shuffled pages, one query token per sequence: (q, k_cache, v_cache, meta)."""
    return _prefill_case(ctx, [1] * len(ctx), heads, kvh, d, ps, seed)


def _poison_before_windows(k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, window: int | None) -> None:
    """NaN in every page wholly before each sequence's first query's window: a kernel that
    reads one shows it in its output."""
    if window is None:
        return
    ps = k.shape[1]
    for L, n, pages in zip(meta.seq_lens_cpu, meta.query_lens_cpu, meta.pages_cpu):
        for p in pages[: max(0, L - n - window + 1) // ps]:
            k[p] = v[p] = float("nan")


SPLIT = cpu_native.SPLIT_TOKENS
SHAPES = [
    # (heads, kv heads, head dim): SmolLM2 (9/3/64), MHA, a large group, 128, and head
    # sizes that take the scalar path (not a multiple of 8, or not 64/128)
    (9, 3, 64), (4, 4, 64), (32, 1, 64), (8, 2, 128), (6, 2, 80), (4, 2, 20),
]


@needs_native
@pytest.mark.parametrize("heads,kvh,d", SHAPES)
@pytest.mark.parametrize("window", [None, 1, 7, SPLIT + 3])
@pytest.mark.parametrize("sinks", [False, True])
def test_windows_and_sinks_match_reference(heads: int, kvh: int, d: int, window: int | None, sinks: bool) -> None:
    """Sliding windows (the pages before a sequence's window are never read: they hold NaN
    here) and sink logits (GPT-OSS), on the vectorised (64, 128) and scalar head sizes; a
    windowed step verifying drafts takes the native prefill kernel."""
    ctx = [1, 13, SPLIT, SPLIT + 1, 3 * SPLIT + 77]
    q, k, v, meta = _case(ctx, heads, kvh, d, ps=16, seed=3)
    sink = torch.linspace(-2.0, 3.0, heads) if sinks else None
    want = reference._paged_attention(q, k, v, meta, d**-0.5, None, None, window, sink)
    _poison_before_windows(k, v, meta, window)
    got = cpu_native.paged_attention_decode(q, k, v, meta, d**-0.5, None, None, window, sink)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # Three query tokens per sequence (verifying drafts): the native prefill kernel's masks.
    q, k, v, meta = _prefill_case(ctx, [1, 3, 3, 2, 3], heads, kvh, d, ps=16, seed=4)
    want = reference._paged_attention(q, k, v, meta, d**-0.5, None, None, window, sink)
    _poison_before_windows(k, v, meta, window)
    got = cpu_native.paged_attention_decode(q, k, v, meta, d**-0.5, None, None, window, sink)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_native
@pytest.mark.parametrize("heads,kvh,d", SHAPES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "fp8"])
def test_matches_reference(heads: int, kvh: int, d: int, dtype: str) -> None:
    # 1 token, a partial block, exactly one span, one past it, several spans + remainder
    ctx = [1, 13, SPLIT, SPLIT + 1, 3 * SPLIT + 77]
    q, k, v, meta = _case(ctx, heads, kvh, d, ps=16)
    ks = vs = None
    if dtype == "fp8":
        (k, ks), (v, vs) = quantize_fp8(k, 2), quantize_fp8(v, 2)
    else:
        k, v = k.to(getattr(torch, dtype)), v.to(getattr(torch, dtype))
    scale = d**-0.5
    want = reference._paged_attention(q, k, v, meta, scale, ks, vs)
    got = cpu_native.paged_attention_decode(q, k, v, meta, scale, ks, vs)
    assert got.dtype == torch.float32 and got.shape == q.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# (contexts, query tokens): verifying speculative drafts. Query tokens within the last block
# (short contexts), across a block boundary (64-token blocks: 66 keys), across a span
# boundary (SPLIT + 2, so the last span holds only keys some rows must not see), every
# sequence a different count, a context no longer than its queries, one past MAX_QUERY's
# vectorised limit for 9 heads (8 tokens x 9 heads > 64: the scalar path).
MULTI_QUERY_CASES = [
    ([5, 13], [4, 2]), ([66, 130], [4, 4]), ([SPLIT + 2, 3 * SPLIT + 1], [4, 3]),
    ([40, 700, 9, 1030], [1, 8, 2, 5]), ([3, 8], [3, 8]),
]


@needs_native
@pytest.mark.parametrize("heads,kvh,d", SHAPES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "fp8"])
def test_decode_with_several_query_tokens_matches_reference(heads: int, kvh: int, d: int, dtype: str) -> None:
    """Each query token of a sequence attends causally: token i of Q sees the context up to
    its own position, so a draft never sees the drafts after it."""
    for i, (ctx, ql) in enumerate(MULTI_QUERY_CASES):
        q, k, v, meta = _prefill_case(ctx, ql, heads, kvh, d, ps=16, seed=i)
        k, v, ks, vs = _stored(k, v, dtype)
        want = reference._paged_attention(q, k, v, meta, d**-0.5, ks, vs)
        got = cpu_native.paged_attention_decode(q, k, v, meta, d**-0.5, ks, vs)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"contexts {ctx}, queries {ql}")


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_few_sequences_split_into_equal_spans_per_thread(threads: int) -> None:
    """With fewer spans than a few per thread the kernel evens them out over the threads
    (spans then start off multiples of SPLIT and of the page size): one long sequence, one
    just past a span, a short one; alone, with several query tokens, and two together."""
    cases = [([1800], [1]), ([SPLIT + 1], [1]), ([19], [1]), ([1800], [5]), ([SPLIT + 1, 1800], [1, 1]),
             ([700], [8])]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for i, (ctx, ql) in enumerate(cases):
            for dtype in ("float32", "float16"):
                q, k, v, meta = _prefill_case(ctx, ql, 9, 3, 64, ps=16, seed=i)
                k, v, ks, vs = _stored(k, v, dtype)
                want = reference._paged_attention(q, k, v, meta, 0.125, ks, vs)
                got = cpu_native.paged_attention_decode(q, k, v, meta, 0.125, ks, vs)
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"{ctx} {ql} {dtype}")
    finally:
        torch.set_num_threads(before)


@needs_native
def test_decode_refuses_more_query_tokens_than_it_takes() -> None:
    q, k, v, meta = _prefill_case([20], [9], 9, 3, 64, 16)
    with pytest.raises(RuntimeError, match="returned -2"):
        cpu_native.paged_attention_decode(q, k, v, meta, 0.1)


@needs_native
@pytest.mark.parametrize("ps", [1, 5, 16, 64])
@pytest.mark.parametrize("op", ["decode", "prefill"])
def test_page_sizes_and_padded_page_table(ps: int, op: str) -> None:
    """Page boundaries inside spans and blocks; a page table wider than any sequence needs."""
    qlens = [1, 1, 1] if op == "decode" else [64, 33, 9]
    q, k, v, meta = _prefill_case([700, 33, 1030], qlens, 9, 3, 64, ps, seed=ps)
    wide = torch.nn.functional.pad(meta.page_table, (0, 7))
    meta = type(meta)(**{f: getattr(meta, f) for f in meta.__slots__} | {"page_table": wide})
    want = reference._paged_attention(q, k, v, meta, 0.125)
    fn = cpu_native.paged_attention_decode if op == "decode" else cpu_native.paged_attention_prefill
    torch.testing.assert_close(fn(q, k, v, meta, 0.125), want, rtol=1e-4, atol=1e-4)


@needs_native
def test_refuses_what_it_cannot_take() -> None:
    q, k, v, meta = _case([10], 9, 3, 64, 4)
    with pytest.raises(ValueError, match="cannot take"):
        cpu_native.paged_attention_decode(q.double(), k, v, meta, 0.1)
    with pytest.raises(ValueError, match="cannot take"):  # fp8 without scales
        cpu_native.paged_attention_decode(q, k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn), meta, 0.1)
    q2, k2, v2, meta2 = _case([10], 66, 2, 64, 4)  # group of 33 > the kernel's 32
    with pytest.raises(ValueError, match="cannot take"):
        cpu_native.paged_attention_decode(q2, k2, v2, meta2, 0.1)


def _stored(k: torch.Tensor, v: torch.Tensor, dtype: str):
    """(k, v, k_scale, v_scale) as a cache of `dtype` stores them."""
    if dtype == "fp8":
        (k, ks), (v, vs) = quantize_fp8(k, 2), quantize_fp8(v, 2)
        return k, v, ks, vs
    return k.to(getattr(torch, dtype)), v.to(getattr(torch, dtype)), None, None


PREFILL_CASES = [
    # (contexts, new tokens): a fresh prompt shorter than one 32-row block, fresh prompts
    # across several blocks and key blocks, a tool output over a cached prefix, a mixed
    # batch with a 1-token row, few rows over a long prefix (the kernel then cuts key spans
    # and merges them; with 2 threads 1026 x 3 cuts spans of 256 keys, so the last span,
    # [1024, 1026), has nothing the first row may see), no new tokens
    ([5], [5]), ([300], [300]), ([1000, 40, 77], [37, 40, 1]), ([2000], [3]),
    ([1025], [1]), ([1026], [3]), ([3000, 700], [300, 0]),
]


@pytest.fixture
def two_threads():
    """The kernel's work split depends on the thread count; the cases above assume 2."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@needs_native
@pytest.mark.parametrize("heads,kvh,d", [(9, 3, 64), (4, 4, 64), (32, 1, 64), (8, 2, 128)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "fp8"])
@pytest.mark.usefixtures("two_threads")
def test_prefill_matches_reference(heads: int, kvh: int, d: int, dtype: str) -> None:
    for i, (ctx, ql) in enumerate(PREFILL_CASES):
        q, k, v, meta = _prefill_case(ctx, ql, heads, kvh, d, ps=16, seed=i)
        k, v, ks, vs = _stored(k, v, dtype)
        want = reference._paged_attention(q, k, v, meta, d**-0.5, ks, vs)
        got = cpu_native.paged_attention_prefill(q, k, v, meta, d**-0.5, ks, vs)
        assert got.dtype == torch.float32 and got.shape == q.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"contexts {ctx}, new {ql}")


@needs_native
@pytest.mark.parametrize("heads,kvh,d", [(9, 3, 64), (8, 2, 128), (32, 1, 64)])
@pytest.mark.parametrize("window,sinks", [(7, False), (100, True), (None, True), (300, False)])
@pytest.mark.usefixtures("two_threads")
def test_prefill_windows_and_sinks_match_reference(heads: int, kvh: int, d: int, window: int | None,
                                                   sinks: bool) -> None:
    """Windows shorter than a block of rows, than the new tokens and than a cached prefix
    (the pages before every row's window hold NaN, so reading one shows), and sink logits."""
    sink = torch.linspace(-2.0, 3.0, heads) if sinks else None
    for i, (ctx, ql) in enumerate(PREFILL_CASES):
        q, k, v, meta = _prefill_case(ctx, ql, heads, kvh, d, ps=16, seed=i)
        want = reference._paged_attention(q, k, v, meta, d**-0.5, None, None, window, sink)
        _poison_before_windows(k, v, meta, window)
        got = cpu_native.paged_attention_prefill(q, k, v, meta, d**-0.5, None, None, window, sink)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"contexts {ctx}, new {ql}")


@needs_native
def test_prefill_head_sizes_without_a_tile_take_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Head size 80 has no native tile: the op must still be right (the `cpu` torch path)."""
    q, k, v, meta = _prefill_case([300], [40], 6, 2, 80, 16)
    calls = []
    real = cpu_native.cpu.paged_attention_prefill
    monkeypatch.setattr(cpu_native.cpu, "paged_attention_prefill", lambda *a: calls.append(1) or real(*a))
    want = reference._paged_attention(q, k, v, meta, 0.1)
    torch.testing.assert_close(cpu_native.paged_attention_prefill(q, k, v, meta, 0.1), want,
                               rtol=1e-4, atol=1e-4)
    assert calls == [1]
    with pytest.raises(ValueError, match="cannot take"):  # fp8 without scales is refused
        cpu_native.paged_attention_prefill(q, k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn), meta, 0.1)


@needs_native
@pytest.mark.parametrize("rows,d", [(1, 8), (7, 48), (300, 1536), (40, 13)])
def test_silu_and_mul_matches_reference(rows: int, d: int) -> None:
    """Every row count/width takes the one-thread or threaded path and the vector tail;
    inputs reach +-90 so exp(-|x|) underflows without overflow or NaN."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 2 * d, generator=g) * 30
    x[0, :2] = torch.tensor([90.0, -90.0])
    want = reference.silu_and_mul(x)
    torch.testing.assert_close(cpu_native.silu_and_mul(x), want, rtol=1e-5, atol=1e-6)
    wide = torch.randn(rows, 2 * d + 5, generator=g)  # a strided view, as a column slice is
    torch.testing.assert_close(cpu_native.silu_and_mul(wide[:, : 2 * d]), reference.silu_and_mul(wide[:, : 2 * d]),
                               rtol=1e-5, atol=1e-6)
    inplace = x.clone()  # written over its own gate half, as the MLP's SiluAndMul(in_place=True) does
    got = cpu_native.silu_and_mul(inplace, inplace[:, :d])
    assert got.data_ptr() == inplace.data_ptr() and got.stride() == (2 * d, 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(inplace[:, d:], x[:, d:])  # the up half is left as it was
    ref_inplace = x.clone()
    torch.testing.assert_close(reference.silu_and_mul(ref_inplace, ref_inplace[:, :d]), want, rtol=1e-5, atol=1e-6)


@needs_native
@pytest.mark.parametrize("rows,heads,kvh,d,rot", [(5, 9, 3, 64, 64), (2000, 9, 3, 64, 64), (3, 4, 2, 128, 32),
                                                   (6, 2, 1, 20, 12)])
def test_rotary_embedding_matches_reference(rows: int, heads: int, kvh: int, d: int, rot: int) -> None:
    """q and k as column slices of one fused qkv row (the layout attention passes), full and
    partial rotary, head sizes whose half is not a multiple of the vector width."""
    g = torch.Generator().manual_seed(rows)
    qkv = torch.randn(rows, (heads + 2 * kvh) * d, generator=g)
    q = qkv[:, : heads * d].view(rows, heads, d)
    k = qkv[:, heads * d : (heads + kvh) * d].view(rows, kvh, d)
    cos_sin = torch.randn(rows, rot, generator=g)
    want_q, want_k = reference.rotary_embedding(q, k, cos_sin)
    got_q, got_k = cpu_native.rotary_embedding(q, k, cos_sin)
    torch.testing.assert_close(got_q, want_q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_k, want_k, rtol=1e-5, atol=1e-6)


@needs_native
@pytest.mark.parametrize("rows", [1, 9, 2000])
def test_rms_norm_matches_reference(rows: int) -> None:
    """Hidden states (one row stride; 2,000 rows takes the threaded path) and per-head q of
    a fused qkv row, as qk-norm models pass it (rows at two strides: taken via a copy)."""
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 576, generator=g) * 3, torch.randn(576, generator=g)
    torch.testing.assert_close(cpu_native.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5), rtol=1e-5, atol=1e-5)
    qkv = torch.randn(rows, 15 * 64, generator=g)
    q, wq = qkv[:, :576].view(rows, 9, 64), torch.randn(64, generator=g)
    torch.testing.assert_close(cpu_native.rms_norm(q, wq, 1e-6), reference.rms_norm(q, wq, 1e-6), rtol=1e-5, atol=1e-5)


def test_failed_build_is_an_error_not_a_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTSPEED_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")
    with pytest.raises(native.NativeBuildError, match=r"does not run|failed"):
        native.load.__wrapped__()
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(native.NativeBuildError):
        native.load.__wrapped__()


def test_forcing_an_unavailable_backend_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    from agentspeed.kernels import registry

    monkeypatch.setitem(registry._UNAVAILABLE, ("paged_attention_decode", "test-native"), "no compiler")
    with pytest.raises(KernelUnavailableError, match="unavailable here: no compiler"):
        KernelSet("cpu", torch.float32, config=KernelConfig.parse("paged_attention_decode=test-native"))


@pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler on this machine")
def test_builds_into_its_cache_and_reuses_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTSPEED_CACHE_DIR", str(tmp_path))
    lib = native.load.__wrapped__()
    assert lib.agentspeed_abi_version() == native.ABI_VERSION
    built = list(tmp_path.glob("native/*/libagentspeed_native.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    native.load.__wrapped__()  # cached: no rebuild
    assert built[0].stat().st_mtime_ns == mtime
    assert len(list(tmp_path.glob("native/*/*"))) == 1  # no temporary files left behind


@needs_native
@pytest.mark.skipif("avx512f" not in Path("/proc/cpuinfo").read_text(), reason="already the AVX2 build")
def test_avx2_build_matches_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel has AVX-512 and AVX2 conversions; on an AVX-512 machine build the AVX2 one
    too (CI machines may be AVX2-only) and check it."""
    monkeypatch.setenv("AGENTSPEED_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("AGENTSPEED_NATIVE_FLAGS", "-mno-avx512f")
    lib = native.load.__wrapped__()
    fn = lib.paged_decode_attention
    fn.argtypes, fn.restype = cpu_native._ARGTYPES, cpu_native._I
    monkeypatch.setattr(cpu_native, "_fn", fn)
    pf = lib.paged_prefill_attention
    pf.argtypes, pf.restype = cpu_native._PREFILL_ARGTYPES, cpu_native._I
    monkeypatch.setattr(cpu_native, "_prefill", pf)
    sup = lib.paged_prefill_supports
    sup.argtypes, sup.restype = (cpu_native._I,) * 3, cpu_native._I
    monkeypatch.setattr(cpu_native, "_prefill_supports", sup)
    for name, attr in (("silu_and_mul", "_silu"), ("rope_neox", "_rope"), ("rms_norm", "_rms")):
        f = getattr(lib, name)
        f.argtypes, f.restype = getattr(cpu_native, attr).argtypes, cpu_native._I
        monkeypatch.setattr(cpu_native, attr, f)
    x = torch.randn(300, 2 * 40) * 20
    torch.testing.assert_close(cpu_native.silu_and_mul(x), reference.silu_and_mul(x), rtol=1e-5, atol=1e-6)
    w = torch.randn(2 * 40 - 3)
    torch.testing.assert_close(cpu_native.rms_norm(x[:, 3:], w, 1e-5), reference.rms_norm(x[:, 3:], w, 1e-5),
                               rtol=1e-5, atol=1e-5)
    qkv = torch.randn(700, 15 * 64)
    q, k, cs = qkv[:, :576].view(700, 9, 64), qkv[:, 576:768].view(700, 3, 64), torch.randn(700, 64)
    for got, want in zip(cpu_native.rotary_embedding(q, k, cs), reference.rotary_embedding(q, k, cs)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for d in (64, 128):
        q, k, v, meta = _case([5, 300, SPLIT + 9], 8, 2, d, ps=16, seed=d)
        (k8, ks), (v8, vs) = quantize_fp8(k, 2), quantize_fp8(v, 2)
        cases = [(k.to(dt), v.to(dt), None, None) for dt in (torch.float32, torch.bfloat16, torch.float16)]
        for kc, vc, kss, vss in [*cases, (k8, v8, ks, vs)]:
            want = reference._paged_attention(q, kc, vc, meta, 0.1, kss, vss)
            got = cpu_native.paged_attention_decode(q, kc, vc, meta, 0.1, kss, vss)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"d={d} {kc.dtype}")
        for op, cases in (("prefill", PREFILL_CASES), ("decode", MULTI_QUERY_CASES)):
            fn = getattr(cpu_native, f"paged_attention_{op}")
            for ctx, ql in cases:
                q, k, v, meta = _prefill_case(ctx, ql, 8, 2, d, ps=16, seed=d)
                for dtype in ("float32", "bfloat16", "float16", "fp8"):
                    kc, vc, kss, vss = _stored(k, v, dtype)
                    want = reference._paged_attention(q, kc, vc, meta, 0.1, kss, vss)
                    got = fn(q, kc, vc, meta, 0.1, kss, vss)
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"{op} d={d} {dtype} {ctx} {ql}")


@needs_native
def test_smollm2_gguf_weights_stay_packed_in_the_file_mapping(smollm2_path: Path) -> None:
    """Every linear of the default model reads its GGUF bytes in place: Q4_1 projections, and
    the Q8_0 embedding shared by the tied LM head; no dense copy, nothing widened."""
    from agentspeed.config import EngineConfig
    from agentspeed.execution.model_runner import ModelRunner
    from agentspeed.kernels.ggml import GgmlLinear
    from agentspeed.modeling.layers.embedding import VocabParallelEmbedding

    runner = ModelRunner(EngineConfig(model=str(smollm2_path)))
    mods = list(runner.model.modules())
    packed = [m._w for m in mods if isinstance(getattr(m, "_w", None), GgmlLinear)]
    assert len(packed) == 30 * 4 + 1  # fused qkv, o, fused gate/up, down per layer; the LM head
    assert {p.describe() for p in packed[:-1]} == {"Q4_1"} and packed[-1].describe() == "Q8_0"
    assert all(getattr(m, "weight", 0) is None for m in mods if hasattr(m, "_packed"))
    embed = next(m for m in mods if isinstance(m, VocabParallelEmbedding))
    assert embed.packed is not None and embed._rows is not None
    assert packed[-1].parts[0][1].data.data_ptr() == embed.packed.data.data_ptr()  # tied: one copy
    assert runner.kernels.widened == {} and runner.kernels.numerics_notes() == []
    size = smollm2_path.stat().st_size
    maps = [line.split()[0] for line in Path("/proc/self/maps").read_text().splitlines() if str(smollm2_path) in line]
    spans = [tuple(int(v, 16) for v in m.split("-")) for m in maps]
    for p in packed:
        # llama.cpp stores q and k rows permuted for its rotary layout: those two are the only
        # copies (their rows put back in order, ~3% of this model's bytes)
        for _, w in p.parts[2:] if len(p.parts) == 3 else p.parts:
            ptr = w.data.data_ptr()
            assert any(lo <= ptr < hi for lo, hi in spans), "weight bytes are not the file's mapping"
    assert sum(p.nbytes for p in packed) < size
