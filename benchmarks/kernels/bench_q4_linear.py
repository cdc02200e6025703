"""Decode-sized linear on 4-bit weights vs fp32: the `cpu_native` linear's Q4 path against
oneDNN on the same weights' fp32 form, per row count, on a weight matrix larger than the
caches (a GGUF Q4_1 tensor of the default model, repeated).

    python benchmarks/kernels/bench_q4_linear.py [--repeat-rows 64]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from agentspeed.kernels import cpu, cpu_native


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat-rows", type=int, default=64, help="stack the 1536x576 tensor this many times")
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from agentspeed.model_source import default_model_path

    t = next(t for t in GGUFReader(str(default_model_path())).tensors if t.name == "blk.0.ffn_up.weight")
    w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
    w = w.reshape(tuple(int(d) for d in reversed(t.shape))).repeat(a.repeat_rows, 1)
    p = cpu_native._prepare_linear_fp32(w)  # keeps the dense fp32 form for the oneDNN side
    assert p.codes is not None, "weight not recognised as 4-bit blocks"
    print(f"command: python benchmarks/kernels/bench_q4_linear.py --repeat-rows {a.repeat_rows} --iters {a.iters}")
    print(f"weight {tuple(w.shape)}: fp32 {w.numel() * 4 / 1e6:.0f} MB, 4-bit blocks "
          f"{(p.codes.numel() + 8 * p.codes.shape[0] * p.codes.shape[1]) / 1e6:.0f} MB, "
          f"{torch.get_num_threads()} threads")
    for rows in (1, 2, 4, 8):
        x = torch.randn(rows, w.shape[1])
        err = (cpu_native.linear(x, p, None) - x @ w.T).abs().max().item()
        res = {}
        for name, fn, wt in (("q4", cpu_native.linear, p), ("fp32 oneDNN", cpu._linear, p.dense)):
            fn(x, wt, None)
            t0 = time.perf_counter()
            for _ in range(a.iters):
                fn(x, wt, None)
            res[name] = (time.perf_counter() - t0) / a.iters * 1e3
        print(f"rows {rows}: q4 {res['q4']:.2f} ms, fp32 oneDNN {res['fp32 oneDNN']:.2f} ms "
              f"({res['fp32 oneDNN'] / res['q4']:.2f}x), max |diff| {err:.1e}")


if __name__ == "__main__":
    main()
