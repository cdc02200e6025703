"""Peak resident memory of one prefill step: ModelRunner alone (no server), the process's
VmRSS after load and a 2-token step, then VmHWM and the wall time after one --tokens-token
prefill step, with dense MLPs run --mlp-rows token rows at a time (0: the whole step at once,
as before RowBlocks). One process per setting, since VmHWM only grows.

    python benchmarks/model/prefill_peak_memory.py --model .cache/gguf/qwen2.5-1.5b-Q6_K.gguf --mlp-rows 0
    python benchmarks/model/prefill_peak_memory.py --model .cache/gguf/qwen2.5-1.5b-Q6_K.gguf --mlp-rows 512
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from agentspeed.config import CacheConfig, EngineConfig
from agentspeed.control.plan import ScheduledChunk
from agentspeed.execution.model_runner import ModelRunner
from agentspeed.modeling.compiler import RowBlocks


def status_mib(field: str) -> float:
    m = re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())
    assert m is not None
    return int(m.group(1)) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=2000, help="prompt tokens of the prefill step")
    ap.add_argument("--mlp-rows", type=int, default=512, help="RowBlocks size; 0 runs every MLP on the whole step")
    a = ap.parse_args()
    pages = list(range(1, a.tokens // 16 + 3))
    runner = ModelRunner(EngineConfig(model=a.model, cache=CacheConfig(page_size=16, num_pages=len(pages) + 1)))
    blocks = [m for m in runner.model.modules() if isinstance(m, RowBlocks)]
    for m in blocks:
        m.rows = a.mlp_rows or a.tokens
    runner.forward([ScheduledChunk("x", [5, 6], 0, pages)])
    base = status_mib("VmRSS")
    t0 = time.perf_counter()
    runner.forward([ScheduledChunk("x", list(range(100, 100 + a.tokens)), 0, pages)])
    dt = time.perf_counter() - t0
    peak = status_mib("VmHWM")
    print(f"{Path(a.model).name}: {len(blocks)} MLPs in {a.mlp_rows or 'whole-step'}-row blocks; RSS after load "
          f"{base:.0f} MiB, peak after a {a.tokens}-token prefill {peak:.0f} MiB (+{peak - base:.0f}), "
          f"{dt:.1f} s ({a.tokens / dt:.1f} tok/s)")


if __name__ == "__main__":
    main()
