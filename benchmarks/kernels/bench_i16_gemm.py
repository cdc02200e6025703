"""Many-row linears on the default model's weights: the 16-bit-activation integer kernel
(kernels/native/i16_gemm.cpp, what the `cpu_native` linear runs above 8 rows on AVX512-VNNI
CPUs) against oneDNN fp32 on the same weights (`--kernel-backend linear=cpu_native_fp32`).

Per layer shape of SmolLM2 (fused qkv, o, fused gate/up, down, and the Q8_0 LM head) and row
count: ms, GFLOP/s (2 x rows x in x out), the speed-up, and the largest error of each against
a float64 product relative to the output's largest magnitude.

    python benchmarks/kernels/bench_i16_gemm.py [--rows 16,32,64,256,2048] [--iters 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from agentspeed.kernels import cpu, cpu_native


def _weights() -> dict[str, torch.Tensor]:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from agentspeed.model_source import default_model_path

    def load(t: object) -> torch.Tensor:
        a = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)  # type: ignore[attr-defined]
        return torch.from_numpy(a).reshape(tuple(int(d) for d in reversed(t.shape)))  # type: ignore[attr-defined]

    ts = {t.name: t for t in GGUFReader(str(default_model_path())).tensors}
    b = "blk.0."
    return {
        "qkv 576->960": torch.cat([load(ts[b + n]) for n in ("attn_q.weight", "attn_k.weight", "attn_v.weight")]),
        "o 576->576": load(ts[b + "attn_output.weight"]),
        "gate_up 576->3072": torch.cat([load(ts[b + n]) for n in ("ffn_gate.weight", "ffn_up.weight")]),
        "down 1536->576": load(ts[b + "ffn_down.weight"]),
        "lm_head 576->49152": load(ts["token_embd.weight"]),
    }


def _time(fn: Callable[..., torch.Tensor], iters: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, (time.perf_counter() - t0) / iters)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="16,32,64,256,2048")
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    if cpu_native._i16 is None:
        sys.exit("no AVX512-VNNI here (or the native kernels did not build): the default linear is oneDNN fp32")
    rows = [int(r) for r in a.rows.split(",")]
    print(f"command: python benchmarks/kernels/bench_i16_gemm.py --rows {a.rows} --iters {a.iters}; "
          f"{torch.get_num_threads()} threads; best of 3 x {a.iters}")
    print(f"{'weight':>20} {'rows':>5} {'i16 ms':>8} {'GFLOP/s':>8} {'fp32 ms':>8} {'GFLOP/s':>8} {'speed-up':>8}"
          f" {'i16 err':>8} {'fp32 err':>8}")
    for name, w in _weights().items():
        wide = cpu_native._prepare_linear(w)
        dense = cpu._prepack(w)
        assert wide.wide is not None, f"{name}: not recognised as Q4_1/Q8_0 blocks"
        n, k = w.shape
        for r in rows if n < 10_000 else [x for x in rows if x <= 64]:  # the LM head sees decode rows only
            x = torch.randn(r, k)
            want = x.double() @ w.double().T
            scale = want.abs().max().item()
            e16 = (cpu_native.linear(x, wide, None).double() - want).abs().max().item() / scale
            e32 = (cpu._linear(x, dense, None).double() - want).abs().max().item() / scale
            t16 = _time(lambda x=x, p=wide: cpu_native.linear(x, p, None), a.iters)
            t32 = _time(lambda x=x, p=dense: cpu._linear(x, p, None), a.iters)
            gf = 2 * r * n * k / 1e9
            print(f"{name:>20} {r:>5} {t16 * 1e3:>8.3f} {gf / t16:>8.0f} {t32 * 1e3:>8.3f} {gf / t32:>8.0f}"
                  f" {t32 / t16:>7.2f}x {e16:>8.1e} {e32:>8.1e}")


if __name__ == "__main__":
    main()
