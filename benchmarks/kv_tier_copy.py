"""What the KV tiers' copies cost per page against recomputing a page, on this machine.

    .venv/bin/python benchmarks/kv_tier_copy.py [--model PATH] [--pages 64] [--dir /tmp/kv-bench]

Builds the engine (the default SmolLM2 GGUF unless --model) with a host tier, prefills a
2,000-token prompt and reads the prefill cost per token the engine measured (TierCost), then
times, on the engine's own KV layers: host-tier STORE and LOAD of --pages pages in each form
(int8, exact), and disk SPILL (until written) and FETCH (read, checked, into the host tier).
"""

from __future__ import annotations

import argparse
import random
import shutil
import time

from agentspeed.engine.llm import LLM
from agentspeed.execution.kv_disk import DiskKVTier
from agentspeed.execution.kv_tier import HostKVTier
from agentspeed.sampling_params import SamplingParams


def _per_page(fn, n: int, reps: int = 5) -> float:
    fn()  # warm
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--pages", type=int, default=64)
    ap.add_argument("--dir", default="/tmp/agentspeed-kv-bench")
    args = ap.parse_args()
    llm = LLM(args.model, kv_cache_memory=256 << 20, kv_offload_memory=64 << 20)
    rng = random.Random(0)
    prompt = [rng.randrange(1000, 20000) for _ in range(2000)]
    llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1, temperature=0.0))
    cost = llm.engine.scheduler.tier_cost
    layers = llm.runner.kv.layers
    ps = llm.runner.page_size
    n = args.pages
    pages, slots = list(range(1, n + 1)), list(range(n))
    assert cost.prefill_s is not None
    recompute = cost.prefill_s * ps
    print(f"model {llm.runner.source.name}; page = {ps} tokens, {llm.runner.kv.bytes_per_token * ps} bytes in the pool")
    print(f"recompute: {cost.prefill_s * 1e3:.3f} ms/token prefill = {recompute * 1e3:.2f} ms/page")
    for mode in ("int8", "exact"):
        tier = HostKVTier(layers, n, mode)
        store = _per_page(lambda t=tier: t.store(pages, slots), n)
        load = _per_page(lambda t=tier: t.load(slots, pages), n)
        print(f"host {mode:>5}: {HostKVTier.slot_bytes(layers, mode)} bytes/page, store {store * 1e3:.3f} ms/page, "
              f"load {load * 1e3:.3f} ms/page ({recompute / load:.0f}x cheaper than recomputing)")
        if mode == "int8":
            shutil.rmtree(args.dir, ignore_errors=True)
            disk = DiskKVTier(tier, args.dir, n)
            ops = [(s, s, bytes([s % 256]) * 32) for s in slots]  # (slot, file, key): both ways

            def spill(d: DiskKVTier = disk, ops: list[tuple[int, int, bytes]] = ops) -> None:
                d.spill(ops)
                d._writer.submit(lambda: None).result()

            spill_s = _per_page(spill, n)
            fetch = _per_page(lambda d=disk, ops=ops: d.fetch(ops), n)
            print(f"disk  int8: spill {spill_s * 1e3:.3f} ms/page (written, off the step), fetch {fetch * 1e3:.3f} "
                  f"ms/page ({recompute / (fetch + load):.0f}x cheaper than recomputing, with the load)")
            disk.shutdown()
            shutil.rmtree(args.dir, ignore_errors=True)
    llm.shutdown()


if __name__ == "__main__":
    main()
