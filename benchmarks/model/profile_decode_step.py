"""Where a single-stream decode step goes: ModelRunner.forward on one sequence after a prompt,
timed plain (mean ms per step), then under cProfile, printing the functions that take most of
the step in ms per step (native kernels are the ctypes wrappers that call them: cpu_ggml.linear
for packed projections and the LM head, moe for routed experts, paged_attention_decode).
cProfile adds overhead to every Python call, so its total exceeds the plain time; the gap
between the named kernels and the plain step is the per-layer Python and small torch ops.
Then, without cProfile, each packed linear's wall time per step by shape and storage type with
the rate it streams the stored bytes (GB/s, against the machine's DRAM read rate), and the step
with every packed linear replaced by a cached result (what the rest of the step costs).

    python benchmarks/model/profile_decode_step.py --model .cache/gguf/qwen3-moe-8l-Q4_K_M.gguf
    python benchmarks/model/profile_decode_step.py --model .cache/gguf/qwen2.5-1.5b-Q4_K_M.gguf \
        --prompt 1750 --kv-cache-dtype float16    # the peer benchmark's prefill length
    python benchmarks/model/profile_decode_step.py --model .cache/gguf/qwen2.5-1.5b-Q4_K_M.gguf \
        --prompt 10 --kv-cache-dtype float16      # its decode stream's (a 10-token prompt)
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections import defaultdict
from typing import Any

import torch

from agentspeed.config import CacheConfig, EngineConfig
from agentspeed.control.plan import ScheduledChunk
from agentspeed.execution.model_runner import ModelRunner
from agentspeed.kernels import cpu_ggml
from agentspeed.kernels.ggml import GgmlLinear


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt", type=int, default=300, help="prompt tokens before the decode steps")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--top", type=int, default=12, help="functions to print")
    ap.add_argument("--kv-cache-dtype", default="auto", help="as the server's flag (the peer benchmarks use float16)")
    a = ap.parse_args()
    page = 16
    pages = list(range(1, (a.prompt + 4 * a.steps + 20) // page + 2))
    cache = CacheConfig(page_size=page, num_pages=len(pages) + 1, kv_cache_dtype=a.kv_cache_dtype)
    runner = ModelRunner(EngineConfig(model=a.model, cache=cache))
    runner.forward([ScheduledChunk("x", list(range(100, 100 + a.prompt)), 0, pages)])
    pos = a.prompt

    def steps(n: int) -> None:
        nonlocal pos
        for _ in range(n):
            runner.forward([ScheduledChunk("x", (5,), pos, pages)])
            pos += 1

    steps(10)  # warm-up
    t0 = time.perf_counter()
    steps(a.steps)
    plain = (time.perf_counter() - t0) / a.steps * 1e3
    prof = cProfile.Profile()
    prof.enable()
    steps(a.steps)
    prof.disable()
    stats = pstats.Stats(prof)
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])  # type: ignore[attr-defined]
    total = sum(v[2] for _, v in rows)
    print(f"{a.model}: {plain:.1f} ms per decode step (mean of {a.steps}, {a.prompt}-token prompt); "
          f"under cProfile {total / a.steps * 1e3:.1f} ms, of which (self time, ms per step):")
    for (file, line, fn), (_, calls, tottime, _, _) in rows[: a.top]:
        where = file.rsplit("/agentspeed/", 1)[-1] if "/agentspeed/" in file else file
        print(f"  {tottime / a.steps * 1e3:6.2f}  {calls // a.steps:4d} calls  {where}:{line}({fn})")

    real = cpu_ggml.linear
    spent: defaultdict[tuple[int, int, str], float] = defaultdict(float)
    streamed: defaultdict[tuple[int, int, str], int] = defaultdict(int)

    def timed(x: torch.Tensor, lin: GgmlLinear, bias: torch.Tensor | None, mode: str = "auto") -> torch.Tensor:
        t = time.perf_counter()
        y = real(x, lin, bias, mode)
        key = (lin.out_features, lin.in_features, lin.describe())
        spent[key] += time.perf_counter() - t
        streamed[key] += lin.nbytes
        return y

    cached: dict[tuple[Any, ...], torch.Tensor] = {}

    def memo(x: torch.Tensor, lin: GgmlLinear, bias: torch.Tensor | None, mode: str = "auto") -> torch.Tensor:
        key = (tuple(x.shape), id(lin))
        if key not in cached:
            cached[key] = real(x, lin, bias, mode)
        return cached[key].clone()  # (the residual adds into it in place)

    try:
        cpu_ggml.linear = timed  # type: ignore[assignment]
        steps(a.steps)
        cpu_ggml.linear = memo  # type: ignore[assignment]
        steps(2)
        t0 = time.perf_counter()
        steps(a.steps)
        rest = (time.perf_counter() - t0) / a.steps * 1e3
    finally:
        cpu_ggml.linear = real  # type: ignore[assignment]
    total = sum(spent.values())
    print(f"packed linears, wall time (ms per step; {total / a.steps * 1e3:.1f} in all, "
          f"{sum(streamed.values()) / total / 1e9:.1f} GB/s):")
    for key in sorted(spent, key=lambda k: -spent[k]):
        n, k, what = key
        print(f"  {spent[key] / a.steps * 1e3:6.2f}  {n} x {k} {what}: {streamed[key] / spent[key] / 1e9:.1f} GB/s")
    print(f"the step with every packed linear's result cached: {rest:.1f} ms")


if __name__ == "__main__":
    main()
