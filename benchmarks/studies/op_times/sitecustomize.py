"""Where an engine's time goes, by kernel op: put this folder first on PYTHONPATH and every
process that builds a KernelSet (the engine core, or an offline script) times each op call
and ModelRunner.execute_plan/forward with perf_counter, writing the totals to
/tmp/optimes.<pid>.txt every 50 steps (the engine process is killed, not exited, when a
server stops). Linear calls are also split by batch rows (<= 8: decode-sized, the 4-bit
path; > 8: prefill and decodes with drafts, the 16-bit integer kernel or oneDNN) with their
GFLOP/s. Timers add ~1 us per call.

    PYTHONPATH=benchmarks/studies/op_times agentspeed serve --max-num-seqs 8 --kv-cache-memory 4GiB &
    agentspeed bench --endpoint E=http://127.0.0.1:8000 ... ; cat /tmp/optimes.*.txt

CPU ops run synchronously, so host time is op time; on a GPU it would measure launches.
Not part of the package: a measuring tool for docs/benchmarks.md.
"""

import collections
import importlib.abc
import importlib.machinery
import os
import sys
import time

T: collections.defaultdict[str, float] = collections.defaultdict(float)
N: collections.Counter[str] = collections.Counter()
F: collections.Counter[str] = collections.Counter()
OPS = ("rms_norm", "rotary_embedding", "silu_and_mul", "store_kv", "paged_attention_prefill",
       "paged_attention_decode", "sample")


def dump() -> None:
    with open(f"/tmp/optimes.{os.getpid()}.txt", "w") as f:
        for k, v in sorted(T.items(), key=lambda x: -x[1]):
            rate = f"  {F[k] / v / 1e9:.0f} GFLOP/s" if F[k] and v else ""
            f.write(f"{k:32s} {v:9.3f} s {N[k]:8d}{rate}\n")


def _timed(name, fn):
    def w(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            T[name] += time.perf_counter() - t
            N[name] += 1
            if name == "ModelRunner.execute_plan":
                T["wall since the first step"] = time.perf_counter() - first.setdefault("t", t)
                if N[name] % 50 == 0:
                    dump()
    return w


first: dict[str, float] = {}


def _timed_linear(fn):
    def w(x, wt, b):
        t = time.perf_counter()
        try:
            return fn(x, wt, b)
        finally:
            rows = x.numel() // x.shape[-1]
            codes = getattr(wt, "codes", None)
            codes = codes if codes is not None else getattr(wt, "codes8", None)
            n = (codes if codes is not None else getattr(wt, "dense", wt)).shape[0]
            key = "linear rows<=8" if rows <= 8 else "linear rows>8"
            T[key] += time.perf_counter() - t
            N[key] += 1
            F[key] += 2 * rows * x.shape[-1] * n
    return w


def _patch() -> None:
    from agentspeed.execution import model_runner
    from agentspeed.kernels import api

    init = api.KernelSet.__init__

    def patched(self, *a, **k):
        init(self, *a, **k)
        self.linear = _timed_linear(self.linear)
        for op in OPS:
            setattr(self, op, _timed(op, getattr(self, op)))

    api.KernelSet.__init__ = patched
    for m in ("forward", "execute_plan"):
        setattr(model_runner.ModelRunner, m, _timed("ModelRunner." + m, getattr(model_runner.ModelRunner, m)))


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches once agentspeed.execution.model_runner is imported (it imports the kernels)."""

    done = False

    def find_spec(self, name, path, target=None):
        if name != "agentspeed.execution.model_runner" or _PatchOnImport.done:
            return None
        _PatchOnImport.done = True
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            sys.modules[name] = module
            _patch()

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _PatchOnImport())
