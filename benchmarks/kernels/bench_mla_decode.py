"""MLA decode on a GPU: the triton `mla_decode` kernel against the torch reference, at
DeepSeek-V3 widths (latent 512 + rope 64, page size 64, bf16 by default).

For each (heads, batch, context, q_len) it times the triton kernel (CUDA events, after warm-up,
with L2 flushed before every timed call unless --no-flush-l2), times the reference where the
case is small enough (--ref-max-tokens), reports the max abs error against the reference
(or against the reference on the first sequence alone when the whole batch is too big for it),
and the achieved bandwidth: bytes of latent cache read (every sequence's context once, plus the
fp8 scales) / kernel time, next to the roofline --peak-tbps (H100 SXM HBM3: 3.35 TB/s).

    python benchmarks/kernels/bench_mla_decode.py                          # full grid, table
    python benchmarks/kernels/bench_mla_decode.py --output mla.json        # also JSON
    python benchmarks/kernels/bench_mla_decode.py --heads 16 --batch 1 --context 65536 --qlen 1
    python benchmarks/kernels/bench_mla_decode.py --check-only             # correctness only, exit 1 on a failure
    python benchmarks/kernels/bench_mla_decode.py --block-h 64 --num-warps 8   # tuning knobs

H=128 is DeepSeek-V3's head count on one GPU, H=16 its share per GPU under TP=8.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

LORA, ROPE, PAGE = 512, 64, 64
DK = LORA + ROPE
SCALE = (128 + ROPE) ** -0.5  # DeepSeek-V3's softmax scale: qk_nope_head_dim 128 + rope 64
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEVICE = "cuda"
# --check-only: one batch mixing lengths on, just past and far from page boundaries.
CHECK_LENS = [4096, 4097, 64, 1, 1000, 65, 3000, 16384]


@dataclass
class Case:
    heads: int
    batch: int
    context: int
    qlen: int


@dataclass
class Row:
    heads: int
    batch: int
    context: int
    qlen: int
    num_splits: int
    triton_us: float
    reference_us: float | None
    max_abs_err: float | None
    err_scope: str  # "batch", "first sequence" or "" (not checked)
    cache_mb: float  # latent cache bytes read per call, 1e6
    achieved_tbps: float
    roofline_frac: float


def build_cache(
    batch: int, context: int, dtype: torch.dtype, fp8: bool, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """A paged cache holding `batch` sequences of `context` tokens in shuffled pages (page 0
    left unused), its fp8 scales when fp8, and the page table [batch, pages_per_seq]."""
    from agentspeed.kernels.reference import quantize_fp8

    g = torch.Generator(device=DEVICE).manual_seed(seed)
    per_seq = -(-context // PAGE)
    n_pages = 1 + batch * per_seq
    order = torch.randperm(n_pages - 1, device=DEVICE, generator=g) + 1
    table = order.view(batch, per_seq).to(torch.int32)
    rows = torch.randn(n_pages, PAGE, DK, device=DEVICE, dtype=dtype, generator=g)
    if not fp8:
        return rows, None, table
    cache, scale = quantize_fp8(rows, 1)
    return cache, scale, table


def make_meta(table: torch.Tensor, seq_lens: Sequence[int], qlen: int) -> Any:
    from agentspeed.kernels.api import AttentionMetadata

    b = len(seq_lens)
    dev = table.device
    return AttentionMetadata(
        slot_mapping=torch.zeros(b * qlen, dtype=torch.int64, device=dev),  # unused by decode
        query_start_loc=torch.arange(0, b * qlen + 1, qlen, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(list(seq_lens), dtype=torch.int32, device=dev),
        page_table=table[:b],
        query_lens_cpu=(qlen,) * b,
        seq_lens_cpu=tuple(seq_lens),
        page_size=PAGE,
    )


def time_us(fn: Callable[[], Any], warmup: int, iters: int, flush_l2: bool) -> float:
    """Median wall time of one call in microseconds, from CUDA events around each call (the L2
    flush, when on, happens between calls and outside the events)."""
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=DEVICE) if flush_l2 else None
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        if flush is not None:
            flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3


def kernel_knobs(a: argparse.Namespace) -> dict[str, int]:
    knobs = {"num_splits": a.num_splits, "block_h": a.block_h, "block_n": a.block_n,
             "num_warps": a.num_warps, "num_stages": a.num_stages}
    return {k: v for k, v in knobs.items() if v is not None}


def run_case(
    case: Case, cache: torch.Tensor, scale: torch.Tensor | None, table: torch.Tensor,
    a: argparse.Namespace, dtype: torch.dtype,
) -> Row:
    from agentspeed.kernels import reference
    from agentspeed.kernels.triton import mla_decode as mla

    g = torch.Generator(device=DEVICE).manual_seed(case.heads * 1000 + case.qlen)
    q = torch.randn(case.batch * case.qlen, case.heads, DK, device=DEVICE, dtype=dtype, generator=g)
    meta = make_meta(table, [case.context] * case.batch, case.qlen)
    knobs = kernel_knobs(a)

    def triton_call() -> torch.Tensor:
        return mla.mla_decode_triton(q, cache, meta, SCALE, LORA, scale, **knobs)

    out = triton_call()
    t_us = time_us(triton_call, a.warmup, a.iters, not a.no_flush_l2)

    ref_us = err = None
    scope = ""
    tokens = case.batch * case.context
    if tokens <= a.ref_max_tokens:
        want = reference.mla_decode(q, cache, meta, SCALE, LORA, scale)
        err = (out.float() - want.float()).abs().max().item()
        scope = "batch"
        ref_us = time_us(lambda: reference.mla_decode(q, cache, meta, SCALE, LORA, scale),
                         1, max(1, a.iters // 4), not a.no_flush_l2)
    elif case.context <= a.ref_max_tokens:
        # The whole batch is too big for the reference: check the first sequence alone.
        one = make_meta(table, [case.context], case.qlen)
        want = reference.mla_decode(q[: case.qlen], cache, one, SCALE, LORA, scale)
        err = (out[: case.qlen].float() - want.float()).abs().max().item()
        scope = "first sequence"

    cache_bytes = tokens * DK * cache.element_size() + (tokens * 4 if scale is not None else 0)
    tbps = cache_bytes / (t_us * 1e-6) / 1e12
    plan = mla.plan_launch(case.heads, LORA, ROPE, meta, q.device, **knobs)
    return Row(case.heads, case.batch, case.context, case.qlen, plan.num_splits, t_us, ref_us, err,
               scope, cache_bytes / 1e6, tbps, tbps / a.peak_tbps)


def print_table(rows: list[Row]) -> None:
    head = (f"{'H':>4} {'B':>3} {'ctx':>6} {'qlen':>4} {'splits':>6} {'triton us':>10} "
            f"{'ref us':>10} {'speedup':>8} {'max err':>9} {'MB read':>9} {'TB/s':>6} {'roofline':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ref = f"{r.reference_us:10.1f}" if r.reference_us is not None else f"{'-':>10}"
        speed = f"{r.reference_us / r.triton_us:7.1f}x" if r.reference_us is not None else f"{'-':>8}"
        err = f"{r.max_abs_err:9.2e}" if r.max_abs_err is not None else f"{'-':>9}"
        print(f"{r.heads:>4} {r.batch:>3} {r.context:>6} {r.qlen:>4} {r.num_splits:>6} "
              f"{r.triton_us:10.1f} {ref} {speed} {err}{'*' if r.err_scope == 'first sequence' else ' '}"
              f"{r.cache_mb:9.1f} {r.achieved_tbps:6.2f} {r.roofline_frac:7.0%}")
    print("(* error checked on the first sequence only; the batch is past --ref-max-tokens)")


def bench(a: argparse.Namespace, dtype: torch.dtype) -> list[Row]:
    rows: list[Row] = []
    for batch in a.batch:
        for context in a.context:
            cache, scale, table = build_cache(batch, context, dtype, a.fp8)
            for heads in a.heads:
                for qlen in a.qlen:
                    row = run_case(Case(heads, batch, context, qlen), cache, scale, table, a, dtype)
                    rows.append(row)
                    print(f"  H={heads} B={batch} ctx={context} qlen={qlen}: {row.triton_us:.1f} us, "
                          f"{row.achieved_tbps:.2f} TB/s", file=sys.stderr, flush=True)
            del cache, scale, table
            torch.cuda.empty_cache()
    return rows


def check(a: argparse.Namespace, dtype: torch.dtype) -> bool:
    """Correctness against the reference on DeepSeek widths: mixed lengths (page boundaries
    included) in one batch, forced split counts, and an fp8 cache. True if every case passes."""
    from agentspeed.kernels import reference
    from agentspeed.kernels.triton import mla_decode as mla

    tol = 1e-3 if dtype == torch.float32 else 2e-2
    lens = CHECK_LENS
    ok = True
    print(f"{'fp8':>4} {'H':>4} {'qlen':>4} {'splits':>7} {'max err':>9}  result")
    for fp8 in (False, True):
        cache, scale, table = build_cache(len(lens), max(lens), dtype, fp8, seed=1)
        for heads in a.heads:
            for qlen in a.qlen:
                g = torch.Generator(device=DEVICE).manual_seed(heads + qlen)
                q = torch.randn(len(lens) * qlen, heads, DK, device=DEVICE, dtype=dtype, generator=g)
                meta = make_meta(table, [max(n, qlen) for n in lens], qlen)
                want = reference.mla_decode(q, cache, meta, SCALE, LORA, scale).float()
                for splits in (None, 1, 7, 64):
                    got = mla.mla_decode_triton(q, cache, meta, SCALE, LORA, scale, num_splits=splits,
                                                **{k: v for k, v in kernel_knobs(a).items()
                                                   if k != "num_splits"})
                    err = (got.float() - want).abs().max().item()
                    passed = err <= tol and bool(torch.isfinite(got).all())
                    ok &= passed
                    print(f"{fp8!s:>4} {heads:>4} {qlen:>4} {splits or 'auto'!s:>7} {err:9.2e}  "
                          f"{'ok' if passed else 'FAIL'}")
        del cache, scale, table
    print("all passed" if ok else f"FAILURES (tolerance {tol:.0e})")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, nargs="+", default=[128, 16])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--context", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--qlen", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--fp8", action="store_true", help="fp8 (e4m3) cache with per-token scales")
    ap.add_argument("--peak-tbps", type=float, default=3.35, help="memory roofline, TB/s (H100 SXM: 3.35)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-flush-l2", action="store_true", help="keep L2 warm between timed calls")
    ap.add_argument("--ref-max-tokens", type=int, default=8 * 16384,
                    help="time and check the reference only when batch * context <= this")
    ap.add_argument("--num-splits", type=int, default=None)
    ap.add_argument("--block-h", type=int, default=None)
    ap.add_argument("--block-n", type=int, default=None)
    ap.add_argument("--num-warps", type=int, default=None)
    ap.add_argument("--num-stages", type=int, default=None)
    ap.add_argument("--check-only", action="store_true", help="correctness checks only; exit 1 on a failure")
    ap.add_argument("--output", metavar="JSON", help="also write the results here")
    a = ap.parse_args()

    if not torch.cuda.is_available():
        sys.exit("bench_mla_decode: CUDA is not available; this benchmark needs an NVIDIA GPU "
                 "(the kernel's CPU tests run under TRITON_INTERPRET=1: tests/test_mla_triton.py)")
    from agentspeed.kernels.triton import HAVE_TRITON

    if not HAVE_TRITON:
        sys.exit("bench_mla_decode: triton is not installed")
    dtype = DTYPES[a.dtype]
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference stays exact

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  dtype {a.dtype}"
          f"{'  fp8 cache' if a.fp8 else ''}  peak {a.peak_tbps} TB/s")
    if a.check_only:
        sys.exit(0 if check(a, dtype) else 1)

    rows = bench(a, dtype)
    print_table(rows)
    if a.output:
        import triton

        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "triton": triton.__version__, "python": platform.python_version(),
                "dtype": a.dtype, "fp8_cache": a.fp8, "lora_rank": LORA, "rope_dim": ROPE,
                "page_size": PAGE, "peak_tbps": a.peak_tbps, "flush_l2": not a.no_flush_l2,
                "knobs": kernel_knobs(a), "argv": sys.argv}
        with open(a.output, "w") as f:
            json.dump({"meta": meta, "results": [asdict(r) for r in rows]}, f, indent=2)
        print(f"wrote {a.output}")


if __name__ == "__main__":
    main()
