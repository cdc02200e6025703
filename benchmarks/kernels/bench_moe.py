"""Routed experts of one MoE layer in a step of --tokens tokens (decode steps to prefill
chunks): the fused native call over the packed experts (kernels/native/ggml_moe.cpp) against
the per-expert loop it replaced (two linear calls and a SiLU per expert with tokens), on a
real-shape GGUF (make one with
benchmarks/peers/make_gguf.py --shape qwen3-moe-8l). Random top-k routing, the router's
own top_k; the fastest of --reps after a warm-up, both paths taking turns. Then whole
decode steps of one sequence (ModelRunner.forward after a 300-token prompt, no server), with
every layer's experts fused and looped, --steps each, alternating in rounds of 10; and
with --prefill N, whole N-token prefill steps (one chunk, fresh pages), fused and looped in
turns, --prefill-reps each.

    python benchmarks/kernels/bench_moe.py --model .cache/gguf/qwen3-moe-8l-Q4_K_M.gguf --tokens 1,8,64,256,1024
"""

from __future__ import annotations

import argparse
import time

import torch

from agentspeed.config import CacheConfig, EngineConfig
from agentspeed.control.plan import ScheduledChunk
from agentspeed.execution.model_runner import ModelRunner
from agentspeed.modeling.layers.moe import SparseMoE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", default="1,4,8")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--steps", type=int, default=40, help="decode steps per path (0: skip)")
    ap.add_argument("--prefill", type=int, default=0, help="tokens of a whole prefill step (0: skip)")
    ap.add_argument("--prefill-reps", type=int, default=3)
    a = ap.parse_args()
    pages = max(64, -(-a.prefill // 16) + 1)
    runner = ModelRunner(EngineConfig(model=a.model, cache=CacheConfig(num_pages=pages)))
    moe = next(m for m in runner.model.modules() if isinstance(m, SparseMoE))
    if moe._fused is None:
        raise SystemExit("this model's experts do not take the fused call (not packed int16 types?)")
    E, k, hidden = moe.cfg.num_experts, moe.cfg.top_k, moe.gate.shape[1]
    print(f"{a.model}: {E} experts, top {k}, hidden {hidden}, expert size {moe.local}; "
          f"{torch.get_num_threads()} threads; ms per layer call, fastest of {a.reps}")
    g = torch.Generator().manual_seed(0)
    fused = moe._fused
    for T in (int(t) for t in a.tokens.split(",")):
        x = torch.randn(T, hidden, generator=g)
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        w = torch.rand(T, k, generator=g).softmax(-1)
        best = {"fused": float("inf"), "loop": float("inf")}
        for _ in range(a.reps + 1):
            for name in best:
                moe._fused = fused if name == "fused" else None
                t0 = time.perf_counter()
                moe._experts(x, w, ids)
                best[name] = min(best[name], time.perf_counter() - t0)
        moe._fused = fused
        print(f"tokens {T}: fused {best['fused'] * 1e3:.2f} ms, loop {best['loop'] * 1e3:.2f} ms "
              f"({best['loop'] / best['fused']:.2f}x)")
    if a.steps:
        decode_steps(runner, a.steps)
    if a.prefill:
        prefill_steps(runner, a.prefill, a.prefill_reps)


def _use_fused(moes: list[SparseMoE], fused: list[object], on: bool) -> None:
    for m, f in zip(moes, fused):
        m._fused = f if on else None


def prefill_steps(runner: ModelRunner, tokens: int, reps: int) -> None:
    moes = [m for m in runner.model.modules() if isinstance(m, SparseMoE)]
    fused = [m._fused for m in moes]
    page = runner.page_size
    pages = list(range(1, -(-tokens // page) + 1))
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(100, 40000, (tokens,), generator=g).tolist()
    times: dict[str, list[float]] = {"fused": [], "loop": []}
    for r in range(reps + 1):  # the first round warms up
        for name in times:
            _use_fused(moes, fused, name == "fused")
            t0 = time.perf_counter()
            runner.forward([ScheduledChunk("x", prompt, 0, pages)])
            if r:
                times[name].append(time.perf_counter() - t0)
    _use_fused(moes, fused, True)
    f, lp = min(times["fused"]), min(times["loop"])
    print(f"prefill step of {tokens} tokens, {len(moes)} MoE layers (fastest of {reps}): fused {f:.2f} s "
          f"({tokens / f:.1f} tok/s), loop {lp:.2f} s ({tokens / lp:.1f} tok/s): {lp / f:.2f}x")


def decode_steps(runner: ModelRunner, steps: int) -> None:
    moes = [m for m in runner.model.modules() if isinstance(m, SparseMoE)]
    fused = [m._fused for m in moes]
    pages = list(range(1, 64))
    prompt = list(range(100, 400))
    runner.forward([ScheduledChunk("x", prompt, 0, pages)])
    pos = len(prompt)
    total = {"fused": 0.0, "loop": 0.0}
    for r in range(-(-steps // 10) + 1):  # the first round warms up
        for name in total:
            _use_fused(moes, fused, name == "fused")
            t0 = time.perf_counter()
            for _ in range(10):
                runner.forward([ScheduledChunk("x", (5,), pos, pages)])
                pos += 1
            if r:
                total[name] += time.perf_counter() - t0
    _use_fused(moes, fused, True)
    n = 10 * (-(-steps // 10))
    print(f"decode step, 1 sequence, {len(moes)} MoE layers: fused {total['fused'] / n * 1e3:.1f} ms, "
          f"loop {total['loop'] / n * 1e3:.1f} ms per token")


if __name__ == "__main__":
    main()
