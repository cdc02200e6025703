"""Decode step time at long context on the default model through ModelRunner.execute: the
CPU decode kernel's per-sequence page-run path against the padded-gather path it replaced,
for a KV cache stored as --kv-cache-dtype (auto = fp32 here).

    python benchmarks/bench_long_decode.py --batch 8 --context 6000 [--kv-cache-dtype bfloat16]
    python benchmarks/bench_long_decode.py --profile   # torch.profiler table of the decode steps
"""

from __future__ import annotations

import argparse
import time

import agentspeed.kernels.cpu as cpu
from agentspeed.config import CacheConfig, EngineConfig
from agentspeed.execution.inputs import SequenceChunk
from agentspeed.execution.model_runner import ModelRunner
from agentspeed.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=6000)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bfloat16", "float16", "fp8"])
    ap.add_argument("--profile", action="store_true", help="print where the page-run steps' time goes")
    a = ap.parse_args()
    B, L, ps = a.batch, a.context, 16
    npg = -(-(L + a.steps + 8) // ps)
    r = ModelRunner(EngineConfig(cache=CacheConfig(page_size=ps, num_pages=1 + B * npg,
                                                   kv_cache_dtype=a.kv_cache_dtype)))
    params = [SamplingParams(temperature=0, max_tokens=a.steps + 8)] * B
    pages = [list(range(1 + b * npg, 1 + (b + 1) * npg)) for b in range(B)]  # one run per sequence
    for b in range(B):
        r.add_request(str(b), params[b])
        for s in range(0, L, 2048):  # fill the KV (values do not matter for timing)
            n = min(2048, L - s)
            r.forward([SequenceChunk(str(b), list(range(100, 100 + n)), s, pages[b])])

    def steps() -> float:
        t0 = time.perf_counter()
        for i in range(a.steps):
            r.execute([SequenceChunk(str(b), [200], L + i, pages[b]) for b in range(B)], params)
        return (time.perf_counter() - t0) / a.steps * 1000

    steps()  # warm-up
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            steps()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    runs = steps()
    cpu.LONG_CONTEXT = 1 << 30  # force the padded-gather path
    gather = steps()
    print(f"command: python benchmarks/bench_long_decode.py --batch {B} --context {L} --steps {a.steps} "
          f"--kv-cache-dtype {a.kv_cache_dtype}")
    print(f"batch {B} x context {L}, KV {r.kv.dtype}: page-run views {runs:.1f} ms/step, "
          f"padded gather {gather:.1f} ms/step")


if __name__ == "__main__":
    main()
