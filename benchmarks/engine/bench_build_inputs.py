"""Host time to build one step's model inputs: B running requests decoding at a long
context, each with its whole page table (context / page_size pages). The execution plane
keeps every request's page-table row across steps (execution/request_state.py), so a decode
step that adds no page sends no page ids and gathers the batch's rows in one tensor op; one
in page_size steps adds a page per request. Before that redesign (at 5461ae9) build_inputs
re-flattened every page id of every request each step: 16.5 ms median at 64 x 32K here.

    python benchmarks/engine/bench_build_inputs.py [--batch 64] [--context 32768] [--page-size 16]
"""

from __future__ import annotations

import argparse
import statistics
import time

from agentspeed.control.plan import NewRequest, ScheduledChunk
from agentspeed.execution.inputs import build_inputs
from agentspeed.execution.request_state import RequestTable
from agentspeed.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=200)
    a = ap.parse_args()
    B, ps = a.batch, a.page_size
    npg = a.context // ps
    table = RequestTable("cpu")
    for i in range(B):  # admission: each request's first chunk carries all its pages
        table.add(NewRequest(str(i), (), SamplingParams(temperature=0)))
        table.apply(ScheduledChunk(str(i), [1], 0, tuple(range(1 + i * (npg + 8), 1 + i * (npg + 8) + npg - 1))))
    times, n_pages = [], npg - 1
    for step in range(a.steps):
        pos = a.context - ps + step
        grow = pos // ps >= n_pages  # this step crosses into a new page for every request
        t0 = time.perf_counter()
        chunks = [ScheduledChunk(str(i), [5], pos, (1 + i * (npg + 8) + n_pages,) if grow else (),
                                 page_offset=n_pages) for i in range(B)]
        states = [table.apply(c) for c in chunks]
        build_inputs(chunks, states, table, ps)
        times.append(time.perf_counter() - t0)
        n_pages += grow
    print(f"command: python benchmarks/engine/bench_build_inputs.py --batch {B} --context {a.context} "
          f"--page-size {ps} --steps {a.steps}")
    print(f"host time per decode step to build inputs, {B} requests x {a.context} context: "
          f"median {statistics.median(times) * 1e3:.3f} ms, mean {statistics.mean(times) * 1e3:.3f} ms, "
          f"max {max(times) * 1e3:.3f} ms (before the persistent page table: 16.5 ms median)")


if __name__ == "__main__":
    main()
