"""The decode GEMV (up to 8 rows) reading its weights from DRAM as a decode step does, on the
engine's path for each type: int8 activations for Q4_K..Q6_K (kernels/native/ggml_q8.cpp),
int16 for the others (Q8_0, Q4_0, ...: kernels/native/ggml_i16.cpp). --copies copies of one
packed matrix are cycled so no call finds its weights in the last-level cache. Prints ms per
call and the stored bytes streamed per second, the median of --reps passes over all copies.

    python benchmarks/kernels/bench_gemv_dram.py [--n 17920 --k 1536] [--types Q4_K,Q5_K,Q6_K,Q8_0]
        [--threads 2] [--copies 40]

The default shape is Qwen2.5-1.5B's fused gate|up. To compare a build without the software
prefetch, set AGENTSPEED_NATIVE_FLAGS=-DAGENTSPEED_Q8_PF=0 (a separate cached build).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from ggml_quant import quantize

from agentspeed.kernels import native
from agentspeed.kernels.ggml import NATIVE_TYPES

# name: (ggml type id, weights per block, bytes per block), the integer types
TYPES = {name: (typ, qk, bpb) for typ, (name, qk, bpb) in NATIVE_TYPES.items() if name.startswith("Q")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=17920)
    ap.add_argument("--k", type=int, default=1536)
    ap.add_argument("--types", default="Q4_K,Q5_K,Q6_K,Q8_0", help=f"comma-separated, of {','.join(TYPES)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--copies", type=int, default=40, help="copies cycled (their total must exceed the LLC)")
    ap.add_argument("--reps", type=int, default=6)
    a = ap.parse_args()
    lib = native.load()
    print(f"# {' '.join(sys.argv)}\n# library {lib._name}")
    P = ctypes.c_void_p
    x = np.random.default_rng(1).standard_normal((1, a.k)).astype(np.float32)
    y = np.zeros((a.n,), np.float32)
    w = np.random.default_rng(0).standard_normal((a.n, a.k)).astype(np.float32) * 0.1
    for name in a.types.split(","):
        typ, qk, bpb = TYPES[name]
        q8 = bool(lib.ggml_has_q8(typ))
        linear = lib.ggml_linear_q8 if q8 else lib.ggml_linear_i16
        raw = np.ascontiguousarray(quantize(w, name)).view(np.uint8).reshape(-1)
        big = np.tile(raw, a.copies)
        stride = a.k // qk * bpb

        times = []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            for c in range(a.copies):
                rc = linear(
                    P(x.ctypes.data), 1, ctypes.c_int64(a.k), a.k, 1, (ctypes.c_int * 1)(typ),
                    (P * 1)(big.ctypes.data + c * raw.size), (ctypes.c_int64 * 1)(stride),
                    (ctypes.c_int * 1)(a.n), (ctypes.c_int * 1)(0), None, P(y.ctypes.data),
                    ctypes.c_int64(a.n), a.threads)
                assert rc == 0, rc
            times.append((time.perf_counter() - t0) / a.copies)
        t = statistics.median(times)
        path = "int8" if q8 else "int16"
        print(f"{name} ({path} x) {a.n}x{a.k} threads={a.threads}: {t * 1e3:.3f} ms, {raw.size / t / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
