"""Decode step time at long context on the default model through ModelRunner.execute_plan, for
each CPU decode-attention backend: the native kernel (`cpu_native`, reads the cache in its
storage type) and the torch backend's per-sequence page-run path (`cpu`); --with-gather
adds the padded gather the page-run path replaced. KV stored as --kv-cache-dtype (auto = fp32).

    python benchmarks/model/bench_long_decode.py --batch 8 --context 6000 [--kv-cache-dtype bfloat16]
    python benchmarks/model/bench_long_decode.py --profile   # torch.profiler table of the decode steps
"""

from __future__ import annotations

import argparse
import time

import agentspeed.kernels.cpu as cpu
from agentspeed.config import CacheConfig, EngineConfig, KernelConfig
from agentspeed.control.plan import ExecutionPlan, NewRequest, ScheduledChunk
from agentspeed.execution.model_runner import ModelRunner
from agentspeed.kernels.registry import backends_for
from agentspeed.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=6000)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bfloat16", "float16", "fp8"])
    ap.add_argument("--with-gather", action="store_true", help="also time the padded-gather path")
    ap.add_argument("--profile", action="store_true", help="print where the default path's step time goes")
    a = ap.parse_args()
    B, L, ps = a.batch, a.context, 16
    npg = -(-(L + a.steps + 8) // ps)
    have = [k.backend for k in backends_for("paged_attention_decode")]
    paths = [(b, b) for b in ("cpu_native", "cpu") if b in have]
    if a.with_gather:
        paths.append(("cpu padded gather", "cpu"))
    params = [SamplingParams(temperature=0, max_tokens=a.steps + 8)] * B
    pages = [list(range(1 + b * npg, 1 + (b + 1) * npg)) for b in range(B)]  # one run per sequence
    results = {}
    for name, backend in paths:
        r = ModelRunner(EngineConfig(
            cache=CacheConfig(page_size=ps, num_pages=1 + B * npg, kv_cache_dtype=a.kv_cache_dtype),
            kernels=KernelConfig.parse(f"paged_attention_decode={backend}")))
        r.execute_plan(ExecutionPlan(0, (), new_requests=tuple(NewRequest(str(b), (), params[b]) for b in range(B))))
        for b in range(B):
            for s in range(0, L, 2048):  # fill the KV (values do not matter for timing)
                n = min(2048, L - s)
                r.forward([ScheduledChunk(str(b), list(range(100, 100 + n)), s, pages[b])])

        def steps(r: ModelRunner = r) -> float:
            t0 = time.perf_counter()
            for i in range(a.steps):
                r.execute_plan(ExecutionPlan(i + 1, tuple(
                    ScheduledChunk(str(b), [200], L + i, page_offset=len(pages[b])) for b in range(B))))
            return (time.perf_counter() - t0) / a.steps * 1000

        cpu.LONG_CONTEXT = 1 << 30 if name == "cpu padded gather" else 1024
        steps()  # warm-up
        if a.profile and name == paths[0][0]:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                steps()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        results[name] = steps()
        del r
    print(f"command: python benchmarks/model/bench_long_decode.py --batch {B} --context {L} --steps {a.steps} "
          f"--kv-cache-dtype {a.kv_cache_dtype}" + (" --with-gather" if a.with_gather else ""))
    print(f"batch {B} x context {L}, KV {a.kv_cache_dtype}: " + ", ".join(
        f"{name} {ms:.1f} ms/step" for name, ms in results.items()))


if __name__ == "__main__":
    main()
