"""MLA prefill on the CPU: absorbed vs expanded form, q new tokens over a context of L.

Backs the per-sequence choice in agentspeed/kernels/cpu_mla.py: prints the time of each
form and what `prefer_absorbed` picks, at DeepSeek-V3 dims with the heads one rank holds
under TP=8 (16 heads, lora 512, rope 64, nope 128, v 128), fp32. Then times SDPA with values
narrower than keys against values as wide as keys (why the backend widens them).

    python benchmarks/kernels/bench_mla_cpu.py [--heads 16] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from agentspeed.kernels import cpu_mla
from agentspeed.kernels.api import AttentionMetadata

NOPE, ROPE, LORA, V = 128, 64, 512, 128


def case(qlen: int, ctx: int, heads: int, page_size: int = 64) -> tuple[tuple[torch.Tensor, ...], AttentionMetadata]:
    n_pages = -(-ctx // page_size)
    cache = torch.randn(n_pages + 1, page_size, LORA + ROPE)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(qlen, dtype=torch.int64),
        query_start_loc=torch.tensor([0, qlen], dtype=torch.int32),
        seq_lens=torch.tensor([ctx], dtype=torch.int32),
        page_table=torch.arange(1, n_pages + 1, dtype=torch.int32)[None],
        query_lens_cpu=(qlen,),
        seq_lens_cpu=(ctx,),
        page_size=page_size,
    )
    w = torch.randn(heads, NOPE + V, LORA) * 0.05
    return (torch.randn(qlen, heads, NOPE), torch.randn(qlen, heads, ROPE), cache, w), meta


def timed(fn: object, args: tuple[torch.Tensor, ...], meta: AttentionMetadata, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args[:3], args[3], meta, 0.07)  # type: ignore[operator]
        best = min(best, time.perf_counter() - t0)
    return best


def best_ms(fn: object, repeat: int) -> float:
    fn()  # type: ignore[operator]
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def sdpa_value_width(heads: int, repeat: int) -> None:
    """SDPA with narrow values vs values padded/widened to the key width, same result."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    L = 4096
    ctx = torch.randn(L, LORA + ROPE)
    q = torch.randn(1, heads, 1, LORA + ROPE)
    kv = ctx[None, None]
    narrow = best_ms(lambda: sdpa(q, kv, kv[..., :LORA], enable_gqa=True), repeat)
    wide = best_ms(lambda: sdpa(q, kv, kv, enable_gqa=True)[..., :LORA], repeat)
    print(f"absorbed decode, 1 token over {L}: values {LORA} wide {narrow:.1f} ms, {LORA + ROPE} wide {wide:.1f} ms")
    L = 2048
    qe, ke = torch.randn(1, heads, L, NOPE + ROPE), torch.randn(1, heads, L, NOPE + ROPE)
    ve = torch.randn(1, heads, L, V)
    narrow = best_ms(lambda: sdpa(qe, ke, ve, is_causal=True), repeat)
    wide = best_ms(lambda: sdpa(qe, ke, torch.nn.functional.pad(ve, (0, NOPE + ROPE - V)), is_causal=True), repeat)
    print(f"expanded prefill, fresh {L}: values {V} wide {narrow:.1f} ms, padded to {NOPE + ROPE} {wide:.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    original = cpu_mla.prefer_absorbed
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, heads={args.heads}")
    print(f"{'new':>6} {'context':>8} {'absorbed ms':>12} {'expanded ms':>12} {'picks':>9} {'right':>6}")
    for qlen, ctx in [(1, 4096), (32, 4096), (128, 4096), (512, 4096), (4096, 4096),
                      (64, 16384), (256, 16384), (1024, 16384)]:
        inputs, meta = case(qlen, ctx, args.heads)
        times = {}
        for form in ("absorbed", "expanded"):
            cpu_mla.prefer_absorbed = lambda *a, f=form: f == "absorbed"  # type: ignore[misc]
            timed(cpu_mla.mla_prefill, inputs, meta, 1)  # warm-up
            times[form] = timed(cpu_mla.mla_prefill, inputs, meta, args.repeat)
        cpu_mla.prefer_absorbed = original
        pick = "absorbed" if original(qlen, ctx, args.heads, NOPE, ROPE, LORA, V) else "expanded"
        right = pick == min(times, key=lambda k: times[k])
        print(f"{qlen:>6} {ctx:>8} {times['absorbed'] * 1e3:>12.1f} {times['expanded'] * 1e3:>12.1f} "
              f"{pick:>9} {'yes' if right else 'NO':>6}")
    sdpa_value_width(args.heads, args.repeat)


if __name__ == "__main__":
    main()
