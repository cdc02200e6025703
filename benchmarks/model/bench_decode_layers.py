"""Decode steps with the decoder layers in one native call (modeling/fused_decode.py) against
the same steps layer by layer through the modules, alternating in one process (this VM's
speed drifts within minutes, so only paired rounds compare). Prints each path's ms per step
(median of the rounds), the per-round ratios, and how far apart the two paths' logits are.

    python benchmarks/model/bench_decode_layers.py --model .cache/gguf/qwen2.5-1.5b-Q4_K_M.gguf
    python benchmarks/model/bench_decode_layers.py --model .cache/gguf/qwen2.5-1.5b-Q4_K_M.gguf --batch 8
    python benchmarks/model/bench_decode_layers.py --model .cache/gguf/qwen3-moe-8l-Q4_K_M.gguf
    python benchmarks/model/bench_decode_layers.py --model .cache/gguf/qwen2.5-1.5b-Q4_K_M.gguf --tokens 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from agentspeed.config import CacheConfig, EngineConfig
from agentspeed.control.plan import ScheduledChunk
from agentspeed.execution.model_runner import ModelRunner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a GGUF whose layers take the native path")
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    ap.add_argument("--tokens", type=int, default=1,
                    help="tokens each sequence adds a step (above 1: drafts being verified; batch x tokens <= 8)")
    ap.add_argument("--prompt", type=int, default=10, help="prompt tokens of each sequence before the steps")
    ap.add_argument("--steps", type=int, default=20, help="decode steps per path per round")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--kv-cache-dtype", default="float16", help="as the server's flag (the peer benchmarks use float16)")
    a = ap.parse_args()
    page = 16
    per_seq = -(-(a.prompt + a.tokens * (2 * a.rounds * a.steps + 10) + 40) // page)
    cache = CacheConfig(page_size=page, num_pages=a.batch * per_seq + 1, kv_cache_dtype=a.kv_cache_dtype)
    runner = ModelRunner(EngineConfig(model=a.model, cache=cache))
    model = runner.model
    fused = model.fused_decode
    if fused is None:
        raise SystemExit(f"{a.model}: its layers do not take the native path (see the build log)")
    rids = [f"s{i}" for i in range(a.batch)]
    pages = {rid: list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i, rid in enumerate(rids)}
    runner.forward([ScheduledChunk(rid, tuple(range(100 + i, 100 + i + a.prompt)), 0, pages[rid])
                    for i, rid in enumerate(rids)])
    pos = a.prompt

    def steps(n: int) -> torch.Tensor:
        nonlocal pos
        out = torch.empty(0)
        for _ in range(n):
            out = runner.forward([ScheduledChunk(rid, (5,) * a.tokens, pos, pages[rid]) for rid in rids])
            pos += a.tokens
        return out

    steps(3)
    # the same step both ways (the second rewrites the same K/V rows): equal logits
    pos0 = pos
    want = steps(1)
    model.fused_decode, pos = None, pos0
    got = steps(1)
    model.fused_decode = fused
    # (bit for bit for dense layers; routed experts: torch's router rounds differently)
    print(f"logits of the two paths equal: {torch.equal(want, got)} (max |difference| "
          f"{float((want - got).abs().max()):.2e}, their spread {float(want.std()):.2f})")
    times: dict[str, list[float]] = {"native layers": [], "modules": []}
    for _ in range(a.rounds):
        for name, f in (("native layers", fused), ("modules", None)):
            model.fused_decode = f
            t0 = time.perf_counter()
            steps(a.steps)
            times[name].append((time.perf_counter() - t0) / a.steps * 1e3)
    model.fused_decode = fused
    print(f"{a.model}: batch {a.batch} x {a.tokens} token(s), {a.prompt}-token prompts, {a.steps} steps x {a.rounds} rounds, "
          f"{torch.get_num_threads()} threads, KV {a.kv_cache_dtype}")
    for name, ts in times.items():
        print(f"  {name:14s} {statistics.median(ts):7.2f} ms per step (median; rounds {', '.join(f'{t:.1f}' for t in ts)})")
    ratios = [m / n for m, n in zip(times["modules"], times["native layers"])]
    print(f"  modules / native layers per round: median {statistics.median(ratios):.3f}x "
          f"({', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
