"""Linear layers on packed GGUF weights (kernels/cpu_ggml.py) against oneDNN on the same
weights dequantized to fp32 and prepacked, per storage type and row count: ms per call (the
fastest of --reps, the paths taking turns so this machine's drift hits all alike) of the
default path (up to 8 rows int8 activations for K-quants, int16 for the others; above 8 rows
the int8 GEMM where this build has AVX-512 VNNI, else fp32 tiles to 128 rows and dequantized
panels through sgemm above; kernels/cpu_ggml.py), of mode exact (fp32 activations:
`cpu_native_exact`), of mode int16 (int16 activations at every row count:
`cpu_native_int16`) and of oneDNN, and the default path's rate: for decode-sized calls the
stored bytes it streams (GB/s), above 8 rows its multiply-adds (GFLOP/s, 2 per weight and row).

    python benchmarks/kernels/bench_ggml_linear.py [--n 8960 --k 1536] [--types Q4_K,Q6_K,Q8_0]
        [--rows 1,4,8,16,32,128,512]

The default shape is a Qwen2.5-1.5B MLP projection (gate or up).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from ggml_quant import quantize

from agentspeed.kernels import cpu, cpu_native
from agentspeed.kernels.ggml import GgmlLinear, GgmlWeight


def timed(fns, reps: int) -> list[float]:  # type: ignore[no-untyped-def]
    """The fastest of reps calls of each fn in ms, the fns taking turns."""
    best = [float("inf")] * len(fns)
    for f in fns:
        f()
    for _ in range(reps):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            f()
            best[i] = min(best[i], time.perf_counter() - t)
    return [b * 1e3 for b in best]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8960)
    ap.add_argument("--k", type=int, default=1536)
    ap.add_argument("--types", default="Q4_K,Q5_K,Q6_K,Q8_0,Q4_0,Q4_1,F16")
    ap.add_argument("--rows", default="1,4,8,16,32,128,512")
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    print(f"command: python benchmarks/kernels/bench_ggml_linear.py --n {a.n} --k {a.k} --types {a.types} "
          f"--rows {a.rows} --reps {a.reps}  (threads: {torch.get_num_threads()})")
    from gguf import GGMLQuantizationType as T

    w = np.random.default_rng(0).standard_normal((a.n, a.k)).astype(np.float32) * 0.05
    rows = [int(r) for r in a.rows.split(",")]
    print(f"{'type':6} {'MB':>7} " + " ".join(f"{'rows=' + str(r):>30}" for r in rows))
    for name in a.types.split(","):
        gw = GgmlWeight.of(T[name].value, (a.n, a.k), quantize(w, name))
        lin = GgmlLinear(a.n, ((0, gw),))
        dense = cpu._prepack(gw.dequantize())
        cells = []
        for r in rows:
            x = torch.randn(r, a.k)
            ours, exact, int16, onednn = timed(
                [lambda x=x, lin=lin, m=m: cpu_native.linear(x, lin, None, mode=m) for m in ("auto", "exact", "int16")]
                + [lambda x=x, dense=dense: cpu._linear(x, dense, None)], a.reps)
            rate = f" {gw.nbytes / ours / 1e6:4.1f}GB/s" if r <= 8 else f" {2 * r * a.n * a.k / ours / 1e6:4.0f}GF/s"
            cells.append(f"{ours:.2f}/{exact:.2f}/{int16:.2f}/{onednn:.2f}{rate}")
        print(f"{name:6} {gw.nbytes / 1e6:7.1f} " + " ".join(f"{c:>30}" for c in cells))
    print("cells: default / exact / int16 / oneDNN-on-fp32 ms (fastest of --reps); GB/s = stored bytes streamed "
          "per second by the default path, GF/s = its GFLOP/s")


if __name__ == "__main__":
    main()
