"""The triton `mla_decode` matches the reference on the CPU under the triton interpreter:
folded (query token, head) rows, split-KV with its merge, paged caches with awkward page
sizes and shuffled pages, DeepSeek widths, fp8 caches; and the registry picks it on CUDA
only."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

# Before triton is imported: it wraps its own `@jit` helpers for the interpreter or the GPU
# at import (agentspeed registers the backend without importing triton, so nothing has yet).
os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Iterator

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from triton.runtime import interpreter

import agentspeed.kernels  # noqa: F401  (registers backends)
from agentspeed.kernels import reference
from agentspeed.kernels.api import AttentionMetadata, KernelSet
from agentspeed.kernels.registry import select_kernel

try:
    from agentspeed.kernels.triton import mla_decode as mla
except ImportError as e:  # triton was imported earlier in this process without the interpreter
    pytest.skip(f"triton interpreter unavailable here: {e}", allow_module_level=True)
if not mla.INTERPRETED:
    pytest.skip("TRITON_INTERPRET is off: these tests run the kernels on CPU tensors",
                allow_module_level=True)


def _numpy_refuses_size1_to_int() -> bool:
    try:
        int(np.zeros(1))  # type: ignore[call-overload]
    except TypeError:
        return True
    return False


def _patch_lang_tensor_numpy24(tensor: type, *args: object) -> None:
    """triton 3.5's interpreter turns a scalar (a shape-(1,) array there) into a loop bound
    with int(array), which NumPy >= 2.4 refuses (triton issue #9171, fixed upstream by
    PR #9172): redo its tensor patching, then take the one element explicitly."""
    _ORIGINAL_PATCH(tensor, *args)
    tensor.__index__ = lambda self: int(self.handle.data.reshape(-1)[0])  # type: ignore[attr-defined]


def _interpreter_needs_numpy24_fix() -> bool:
    """Only for NumPy >= 2.4 with a triton whose interpreter still calls int() on the
    array (newer triton squeezes it first and needs nothing)."""
    if not _numpy_refuses_size1_to_int():
        return False
    try:
        return "squeeze()" not in inspect.getsource(interpreter._patch_lang_tensor)
    except (OSError, TypeError):
        return True


_ORIGINAL_PATCH = interpreter._patch_lang_tensor


@pytest.fixture(scope="module", autouse=True)
def _numpy24_loop_bounds() -> Iterator[None]:
    """Runtime loop bounds (`range(start, end, BLOCK_N)`) in the interpreter under NumPy >= 2.4."""
    with pytest.MonkeyPatch.context() as mp:
        if _interpreter_needs_numpy24_fix():
            mp.setattr(interpreter, "_patch_lang_tensor", _patch_lang_tensor_numpy24)
        yield


def make_mla_paged(
    ctx_lens: list[int], query_lens: list[int], page_size: int, heads: int, lora: int, rope: int,
    dtype: torch.dtype = torch.float32, fp8: bool = False, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, AttentionMetadata]:
    """Random latent rows for each sequence stored (through the reference store, quantized
    when fp8) in a cache whose pages are handed out shuffled; page 0 stays unused (null).
    Returns q [T, H, lora + rope], the cache, its per-token scales (fp8) and the metadata."""
    g = torch.Generator().manual_seed(seed)
    dk = lora + rope
    n_pages = 1 + sum(-(-c // page_size) for c in ctx_lens)
    cache = torch.zeros(n_pages, page_size, dk, dtype=reference.FP8 if fp8 else dtype)
    kv_scale = torch.zeros(n_pages, page_size) if fp8 else None
    free = (torch.randperm(n_pages - 1, generator=g) + 1).tolist()
    tables = []
    for c in ctx_lens:
        pages = [free.pop() for _ in range(-(-c // page_size))]
        slots = torch.tensor([pages[t // page_size] * page_size + t % page_size for t in range(c)])
        rows = torch.randn(c, dk, generator=g) * torch.rand(c, 1, generator=g).add(0.25)
        reference.store_mla_kv(rows.to(dtype), cache, slots, kv_scale)
        tables.append(pages)
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(sum(query_lens), dtype=torch.int64),  # unused by decode
        query_start_loc=torch.tensor([0, *np.cumsum(query_lens).tolist()], dtype=torch.int32),
        seq_lens=torch.tensor(ctx_lens, dtype=torch.int32),
        page_table=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        query_lens_cpu=tuple(query_lens),
        seq_lens_cpu=tuple(ctx_lens),
        page_size=page_size,
        pages_cpu=tuple(tuple(t) for t in tables),
    )
    q = torch.randn(sum(query_lens), heads, dk, generator=g).to(dtype)
    return q, cache, kv_scale, meta


CASES = [
    # id, lora, rope, heads, context lens, query lens, page size, num_splits, block_n
    ("one-token", 32, 16, 1, [1], [1], 1, None, None),
    ("page1-splits-without-visible-keys", 32, 16, 2, [65], [4], 1, 33, 16),
    ("page5-mixed-batch", 32, 16, 4, [7, 65, 300], [2, 1, 4], 5, 3, 16),
    ("page5-empty-splits", 32, 16, 4, [7, 4], [4, 1], 5, 4, 16),
    ("page16-tile-in-page", 32, 16, 16, [64, 65, 300], [1, 2, 4], 16, 2, 16),
    ("page16-tile-spans-pages", 32, 16, 16, [64, 65], [4, 2], 16, 1, 64),
    ("page64-h128", 32, 16, 128, [65, 7], [1, 2], 64, 2, 32),
    ("page64-default-plan", 32, 16, 4, [1100, 64, 1], [4, 1, 1], 64, None, None),
    ("h1-qlen4", 32, 16, 1, [300], [4], 16, 4, None),
    ("odd-widths", 40, 24, 4, [65, 7], [3, 1], 5, 2, 16),
    ("no-rope", 32, 0, 4, [65], [2], 16, 2, 16),
    ("deepseek-h16", 512, 64, 16, [70, 33], [2, 1], 64, 2, None),
    ("deepseek-h128", 512, 64, 128, [40], [1], 16, 1, None),
]


@pytest.mark.parametrize(("lora", "rope", "heads", "ctx", "qlens", "ps", "splits", "block_n"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_matches_reference(lora: int, rope: int, heads: int, ctx: list[int], qlens: list[int],
                           ps: int, splits: int | None, block_n: int | None) -> None:
    q, cache, _, meta = make_mla_paged(ctx, qlens, ps, heads, lora, rope)
    scale = (lora + rope) ** -0.5
    want = reference.mla_decode(q, cache, meta, scale, lora)
    got = mla.mla_decode_triton(q, cache, meta, scale, lora, num_splits=splits, block_n=block_n)
    assert got.shape == (sum(qlens), heads, lora) and got.dtype == q.dtype
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ps", [1, 5, 16, 64])
@pytest.mark.parametrize("qlen", [1, 2, 4])
@pytest.mark.parametrize("heads", [1, 4, 16, 128])
def test_grid_heads_qlen_pages(heads: int, qlen: int, ps: int) -> None:
    """Every (heads, query length, page size) on a batch whose contexts end before, on and
    after page boundaries, with three splits (some empty for the short sequences)."""
    ctx = [qlen, 7, 64, 65, 300]
    q, cache, _, meta = make_mla_paged(ctx, [qlen] * len(ctx), ps, heads, 32, 16, seed=heads + ps)
    want = reference.mla_decode(q, cache, meta, 0.125, 32)
    got = mla.mla_decode_triton(q, cache, meta, 0.125, 32, num_splits=3)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype: torch.dtype) -> None:
    q, cache, _, meta = make_mla_paged([65, 20], [2, 1], 16, 16, 64, 32, dtype=dtype)
    want = reference.mla_decode(q, cache, meta, 0.1, 64)
    got = mla.mla_decode_triton(q, cache, meta, 0.1, 64, num_splits=2, block_n=16)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(("dtype", "splits"), [(torch.float32, 3), (torch.bfloat16, 1)])
def test_fp8_cache(dtype: torch.dtype, splits: int) -> None:
    """e4m3 rows with per-token scales: scores and P scaled per token, as the reference's
    dequantized rows."""
    q, cache, kv_scale, meta = make_mla_paged([7, 130], [1, 3], 5, 4, 64, 32, dtype=dtype, fp8=True)
    assert kv_scale is not None and cache.dtype == reference.FP8
    want = reference.mla_decode(q, cache, meta, 0.1, 64, kv_scale)
    got = mla.mla_decode_triton(q, cache, meta, 0.1, 64, kv_scale, num_splits=splits, block_n=16)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_strided_query() -> None:
    """q as a view with a wider head stride (e.g. sliced from a fused projection)."""
    q, cache, _, meta = make_mla_paged([33, 9], [2, 1], 5, 4, 32, 16)
    wide = torch.zeros(q.shape[0], q.shape[1], q.shape[2] + 8)
    wide[..., : q.shape[2]] = q
    view = wide[..., : q.shape[2]]
    want = reference.mla_decode(q, cache, meta, 0.2, 32)
    got = mla.mla_decode_triton(view, cache, meta, 0.2, 32, num_splits=2, block_n=16)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_registered_op_runs_the_kernel() -> None:
    """The registry's entry (registered without importing triton) forwards to the kernel."""
    fn = select_kernel("mla_decode", "cuda", torch.float32).fn
    q, cache, _, meta = make_mla_paged([40, 3], [2, 1], 16, 4, 32, 16)
    assert isinstance(mla._mla_split_kernel, interpreter.InterpretedFunction)
    torch.testing.assert_close(fn(q, cache, meta, 0.1, 32), reference.mla_decode(q, cache, meta, 0.1, 32),
                               rtol=1e-4, atol=1e-4)


def test_refuses_cpu_tensors_without_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    q, cache, _, meta = make_mla_paged([5], [1], 4, 1, 32, 16)
    monkeypatch.setattr(mla, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        mla.mla_decode_triton(q, cache, meta, 0.1, 32)


def test_split_heuristic() -> None:
    sms = 132
    assert mla.default_num_splits(1, 1, 100, 16, sms) == 1  # short context: one split
    assert mla.default_num_splits(8, 1, 300, 64, sms) == 1
    long_single = mla.default_num_splits(1, 1, 65536, 64, sms)
    assert 32 <= long_single <= mla.MAX_SPLITS  # one long sequence spreads over the GPU
    assert mla.default_num_splits(512, 4, 65536, 64, sms) == 1  # the batch fills the GPU
    assert mla.default_num_splits(1, 1, 4096, 4096, sms) == 1  # never more splits than pages
    assert mla.default_block_h(16, 512) == 16 and mla.default_block_h(2, 32) == 16
    assert mla.default_block_h(128, 512) == 32 and mla.default_block_h(128, 64) == 64


def test_registry_selects_triton_on_cuda_only() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert select_kernel("mla_decode", "cuda", dtype).backend == "triton"
        assert select_kernel("mla_decode", "cpu", dtype).backend != "triton"
    deepseek = {"kv_lora_rank": 512, "qk_rope_head_dim": 64, "page_size": 64}
    assert select_kernel("mla_decode", "cuda", torch.bfloat16, deepseek).backend == "triton"
    too_wide = {"kv_lora_rank": 4096}
    assert select_kernel("mla_decode", "cuda", torch.bfloat16, too_wide).backend != "triton"
    assert KernelSet("cuda", torch.bfloat16).backends["mla_decode"] == "triton"
    assert KernelSet("cpu", torch.float32).backends["mla_decode"] != "triton"


def test_without_triton_the_package_imports_and_registers_nothing() -> None:
    code = ("import sys; sys.modules['triton'] = None  # import triton now fails\n"
            "import agentspeed.kernels\n"
            "from agentspeed.kernels.registry import backends_for, select_kernel\n"
            "import torch\n"
            "assert 'triton' not in [k.backend for k in backends_for('mla_decode')]\n"
            "assert select_kernel('mla_decode', 'cuda', torch.bfloat16).backend == 'reference'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
