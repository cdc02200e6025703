"""Scheduler overhead: microseconds per next_plan() + advance() with N running decode
requests and no model (the control plane alone).

    python benchmarks/engine/bench_scheduler.py [--running 1 64 256] [--steps 2000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from agentspeed.control.plan import RequestSpec, StepResult
from agentspeed.control.scheduler import Scheduler, SchedulerConfig


def measure(n_running: int, steps: int, prompt_len: int = 512, overlap: bool = False) -> tuple[float, float]:
    """(median, p99) microseconds per plan+advance, all requests decoding."""
    sched = Scheduler(SchedulerConfig(num_pages=1 + n_running * (prompt_len + steps + 64) // 16 + 16,
                                      page_size=16, max_num_batched_tokens=max(8192, n_running),
                                      max_num_seqs=max(256, n_running), max_model_len=1 << 20))
    for i in range(n_running):
        sched.submit(RequestSpec(f"r{i}", tuple(range(i, i + prompt_len)), steps + 32))
    while sched.num_waiting or any(True for _ in ()):  # prefill everyone first
        plan = sched.next_plan()
        sched.advance(StepResult(plan.step_id, {c.request_id: 1 for c in plan.chunks if c.sample}))
    times = []
    in_flight = None
    for _ in range(steps):
        t0 = time.perf_counter_ns()
        plan = sched.next_plan()
        if overlap:
            prev, in_flight = in_flight, plan
            if prev is not None:
                sched.advance(StepResult(prev.step_id, {c.request_id: 7 for c in prev.chunks if c.sample}))
        else:
            sched.advance(StepResult(plan.step_id, {c.request_id: 7 for c in plan.chunks if c.sample}))
        times.append((time.perf_counter_ns() - t0) / 1000)
        assert len(plan.chunks) == n_running
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--running", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--steps", type=int, default=2000)
    args = ap.parse_args()
    print(f"command: python {' '.join(sys.argv)}")
    print(f"{'running':>8} {'mode':>10} {'median us':>10} {'p99 us':>10} {'us/request':>11}")
    for n in args.running:
        for overlap in (False, True):
            med, p99 = measure(n, args.steps, overlap=overlap)
            mode = "overlap" if overlap else "plain"
            print(f"{n:>8} {mode:>10} {med:>10.1f} {p99:>10.1f} {med / n:>11.2f}")


if __name__ == "__main__":
    main()
