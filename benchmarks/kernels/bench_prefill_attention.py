"""Prefill attention on CPU, for each backend that has it: the native kernel (`cpu_native`,
kernels/native/paged_prefill.cpp) and the torch backend (`cpu`: SDPA's flash kernel, with
the cached prefix attended unmasked and merged by log-sum-exp).

Part 1, the op alone on SmolLM2 shapes (9 heads, 3 KV heads, dim 64, fp32 pages of 16 in
shuffled order): ms and GFLOP/s (2 x 2 x heads x dim per query-key pair under the causal
mask) for agentic shapes, a tool output over a long cached conversation, and a fresh prompt.
Part 2, the default model: one chunk of new tokens over a cached prefix through
`ModelRunner.forward` (whole model: linears, norms, attention), per backend.

    python benchmarks/kernels/bench_prefill_attention.py            # both parts, ~1 min
    python benchmarks/kernels/bench_prefill_attention.py --op-only
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from test_kernels import paged_meta

from agentspeed.config import CacheConfig, EngineConfig, KernelConfig
from agentspeed.control.plan import ScheduledChunk
from agentspeed.execution.model_runner import ModelRunner
from agentspeed.kernels.registry import backends_for

H, KVH, D, PS = 9, 3, 64, 16
# (context lengths, new tokens) per sequence of one call
OP_CASES = [
    ([6300], [300]), ([8000], [300]), ([2300], [50]), ([6000], [8]),
    ([4000] * 4, [100] * 4), ([2000], [2000]),
]
MODEL_CASES = [(6000, 300), (3000, 300), (0, 2000)]  # (cached prefix, new tokens)


def best_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def op_case(ctx: list[int], qlens: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, object]:
    g = torch.Generator().manual_seed(0)
    n_pages = 1 + sum(-(-c // PS) for c in ctx)
    free = (torch.randperm(n_pages - 1, generator=g) + 1).tolist()
    tables = [[free.pop() for _ in range(-(-c // PS))] for c in ctx]
    k = torch.randn(n_pages, PS, KVH, D, generator=g)
    v = torch.randn(n_pages, PS, KVH, D, generator=g)
    q = torch.randn(sum(qlens), H, D, generator=g)
    return q, k, v, paged_meta(tables, ctx, qlens, PS, [0] * sum(qlens))


def op_part(backends: list[str], reps: int) -> None:
    fns = {k.backend: k.fn for k in backends_for("paged_attention_prefill") if k.backend in backends}
    print(f"{'contexts':>22} {'new':>12} " + " ".join(f"{b + ' ms':>12} {'GFLOP/s':>8}" for b in backends))
    for ctx, ql in OP_CASES:
        q, k, v, meta = op_case(ctx, ql)
        flops = sum(2 * 2 * H * D * (c - n + i + 1) for c, n in zip(ctx, ql) for i in range(n))
        row = []
        for b in backends:
            ms = best_ms(lambda b=b, q=q, k=k, v=v, m=meta: fns[b](q, k, v, m, D**-0.5), reps)
            row.append(f"{ms:12.2f} {flops / ms / 1e6:8.0f}")
        print(f"{'x'.join(map(str, ctx)):>22} {'x'.join(map(str, ql)):>12} " + " ".join(row))


def model_part(backends: list[str], reps: int) -> None:
    for prefix, new in MODEL_CASES:
        row = []
        for b in backends:
            npg = -(-(prefix + new) // PS)
            r = ModelRunner(EngineConfig(
                cache=CacheConfig(page_size=PS, num_pages=1 + npg),
                kernels=KernelConfig.parse(f"paged_attention_prefill={b}")))
            pages = list(range(1, 1 + npg))
            for s in range(0, prefix, 2048):  # fill the cached prefix (values do not matter)
                n = min(2048, prefix - s)
                r.forward([ScheduledChunk("s", list(range(100, 100 + n)), s, pages)])
            chunk = [ScheduledChunk("s", list(range(300, 300 + new)), prefix, pages)]
            row.append(f"{b} {best_ms(lambda r=r, c=chunk: r.forward(c), reps):.0f} ms")
            del r
        print(f"model forward, {new} new tokens over {prefix} cached: " + ", ".join(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op-only", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(2)
    have = [k.backend for k in backends_for("paged_attention_prefill")]
    backends = [b for b in ("cpu_native", "cpu") if b in have]
    print("command: python benchmarks/kernels/bench_prefill_attention.py" + (" --op-only" if a.op_only else "")
          + f" --reps {a.reps}; threads 2; best of reps")
    op_part(backends, a.reps)
    if not a.op_only:
        model_part(backends, max(2, a.reps // 2))


if __name__ == "__main__":
    main()
