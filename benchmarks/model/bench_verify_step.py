"""What a speculative verification step costs: one ModelRunner.forward of B sequences at a
long context, each with Q query tokens (Q = 1: a plain decode step; Q = 1 + drafts), on the
default model. A draft pays off when the tokens it yields per step grow faster than this
time; the ratio to Q = 1 is the break-even tokens per step.

    python benchmarks/model/bench_verify_step.py [--batch 8] [--context 6000] [--queries 1,2,4,6]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from agentspeed.config import CacheConfig, EngineConfig
from agentspeed.control.plan import ScheduledChunk
from agentspeed.execution.model_runner import ModelRunner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=6000)
    ap.add_argument("--queries", default="1,2,4,6")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--kv-cache-dtype", default="auto")
    a = ap.parse_args()
    ps = 16
    per_seq = -(-(a.context + 8) // ps)
    runner = ModelRunner(EngineConfig(cache=CacheConfig(page_size=ps, num_pages=a.batch * per_seq + 1,
                                                        kv_cache_dtype=a.kv_cache_dtype)))
    pages = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(a.batch)]
    rng = random.Random(0)
    for i in range(a.batch):  # fill each context's KV
        toks = [rng.randrange(1000, 20000) for _ in range(a.context)]
        for s in range(0, a.context, 2048):
            runner.forward([ScheduledChunk(str(i), toks[s : s + 2048], s, pages[i])])

    def step(q: int) -> float:
        chunks = [ScheduledChunk(str(i), [rng.randrange(1000, 20000) for _ in range(q)], a.context, pages[i],
                                True, q - 1) for i in range(a.batch)]
        t = time.perf_counter()
        runner.forward(chunks)
        return time.perf_counter() - t

    qs = [int(x) for x in a.queries.split(",")]
    times: dict[int, list[float]] = {q: [] for q in qs}
    for _ in range(a.reps):  # alternate so background load hits every Q alike
        for q in qs:
            times[q].append(step(q))
    print(f"command: python benchmarks/model/bench_verify_step.py --batch {a.batch} --context {a.context} "
          f"--queries {a.queries} --kv-cache-dtype {a.kv_cache_dtype}")
    base = statistics.median(times[qs[0]])
    for q in qs:
        med = statistics.median(times[q])
        print(f"Q={q}: {med * 1e3:7.1f} ms per step ({med / base:.2f}x Q={qs[0]}), "
              f"{a.batch * q / med:7.0f} query tokens/s")


if __name__ == "__main__":
    main()
