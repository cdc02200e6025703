"""One layer's paged decode attention, kernel alone: every CPU backend that can run it, per
KV storage type, in ms per call and in GB/s of K/V read (the bound at long context).

    python benchmarks/kernels/bench_decode_kernel.py                       # SmolLM2 shapes, 8 x 6,000
    python benchmarks/kernels/bench_decode_kernel.py --batch 1 --context 8000 --threads 1

The pages of each sequence are one run, as a fresh KV pool hands them out; K/V are random.
"""

from __future__ import annotations

import argparse
import time

import torch

import agentspeed.kernels  # noqa: F401  (registers backends)
from agentspeed.kernels import cpu_native
from agentspeed.kernels.api import AttentionMetadata
from agentspeed.kernels.reference import quantize_fp8
from agentspeed.kernels.registry import backends_for

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "fp8": None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=6000)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--dtypes", default="float32,bfloat16,fp8")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--split", type=int, default=None,
                    help="cpu_native's tokens per work item (default: its SPLIT_TOKENS)")
    a = ap.parse_args()
    if a.split:
        cpu_native.SPLIT_TOKENS = a.split
    if a.threads:
        torch.set_num_threads(a.threads)
    B, L, ps = a.batch, a.context, a.page_size
    npg = -(-L // ps)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1 + B * npg, ps, a.kv_heads, a.head_dim, generator=g)
    v = torch.randn_like(k)
    q = torch.randn(B, a.heads, a.head_dim, generator=g)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(B, dtype=torch.int64),
        query_start_loc=torch.arange(B + 1, dtype=torch.int32),
        seq_lens=torch.full((B,), L, dtype=torch.int32),
        page_table=torch.arange(1, 1 + B * npg, dtype=torch.int32).view(B, npg),
        query_lens_cpu=(1,) * B, seq_lens_cpu=(L,) * B, page_size=ps,
        pages_cpu=tuple(tuple(range(1 + b * npg, 1 + (b + 1) * npg)) for b in range(B)))
    print(f"command: python benchmarks/kernels/bench_decode_kernel.py --batch {B} --context {L} --heads {a.heads} "
          f"--kv-heads {a.kv_heads} --head-dim {a.head_dim} --page-size {ps} --dtypes {a.dtypes} "
          f"--threads {torch.get_num_threads()} --split {cpu_native.SPLIT_TOKENS}")
    for name in a.dtypes.split(","):
        dt = DTYPES[name]
        if dt is None:
            (kc, ks), (vc, vs) = quantize_fp8(k, 2), quantize_fp8(v, 2)
        else:
            kc, vc, ks, vs = k.to(dt), v.to(dt), None, None
        nbytes = 2 * B * L * a.kv_heads * a.head_dim * kc.element_size() + (0 if ks is None else 2 * B * L * 4)
        for impl in backends_for("paged_attention_decode"):
            if impl.backend == "reference" or impl.why_not("cpu", torch.float32, {}):
                continue
            impl.fn(q, kc, vc, meta, 0.125, ks, vs)  # warm-up
            ts = []
            for _ in range(a.repeat):
                t0 = time.perf_counter()
                impl.fn(q, kc, vc, meta, 0.125, ks, vs)
                ts.append(time.perf_counter() - t0)
            ms = sorted(ts)[len(ts) // 2] * 1000
            print(f"{name:9s} {impl.backend:11s} {ms:7.2f} ms/layer  {nbytes / ms / 1e6:5.1f} GB/s of K/V "
                  f"({nbytes / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
