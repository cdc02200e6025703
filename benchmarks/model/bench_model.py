"""Throughput of the default model (SmolLM2-135M-Instruct GGUF): agentspeed vs Hugging Face
transformers on the same weights, in the same process, fp32 on CPU.

Rows: single-sequence decode, prefill of a long prompt (one forward), batched decode.
Decode tok/s = tokens made by decode steps / time of those steps; the prefill step and the
token it yields are excluded for both engines. Each number is the median of --reps runs after
a warm-up; the engines alternate within each repetition so background load hits both, and
"busy" reports how much CPU other processes used meanwhile (the box may be shared).

    python benchmarks/model/bench_model.py            # full run, ~5 min on 2 cores
    python benchmarks/model/bench_model.py --quick    # smoke run, ~30 s
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from agentspeed.config import CacheConfig, EngineConfig
from agentspeed.control.plan import ExecutionPlan, NewRequest, ScheduledChunk
from agentspeed.execution.model_runner import ModelRunner
from agentspeed.model_source import resolve_model
from agentspeed.sampling_params import SamplingParams
from agentspeed.tokenizer import Tokenizer

TOPICS = ["a lighthouse", "a lost robot", "the sea", "a village", "a dragon", "winter", "a train", "a library"]


@dataclass
class Run:
    decode_s: float  # every step after the prefill step
    decode_tokens: int  # tokens those steps produced, summed over the batch
    outputs: list[list[int]]


@dataclass
class Row:
    metric: str
    ours: float  # tok/s
    hf: float  # tok/s
    note: str
    busy: float  # other processes' CPU use meanwhile, in cores


class CpuMonitor:
    """CPU used by *other* processes since construction, in cores (Linux /proc/stat)."""

    def __init__(self) -> None:
        self.busy0, self.own0, self.wall0 = self._busy(), time.process_time(), time.perf_counter()

    @staticmethod
    def _busy() -> float:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return float("nan")
        return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait

    def other_cores(self) -> float:
        own = time.process_time() - self.own0
        return max(0.0, (self._busy() - self.busy0 - own) / (time.perf_counter() - self.wall0))


def ours_generate(runner: ModelRunner, prompts: Sequence[list[int]], n: int) -> Run:
    """Greedy, ignore_eos: one prefill step for the whole batch, then n-1 batched decode steps
    through runner.execute_plan, as engine/simple_generate.py drives it (input building included)."""
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    pages, nxt = [], 1
    for p in prompts:
        k = -(-(len(p) + n) // runner.page_size)
        pages.append(list(range(nxt, nxt + k)))
        nxt += k
    rids = [f"b{i}" for i in range(len(prompts))]
    new = tuple(NewRequest(r, tuple(p), params) for r, p in zip(rids, prompts))
    first = ExecutionPlan(0, tuple(ScheduledChunk(r, p, 0, pg) for r, p, pg in zip(rids, prompts, pages)), (), new)
    res = runner.execute_plan(first)
    outs = [[res.sampled[r]] for r in rids]
    t0 = time.perf_counter()
    for step in range(n - 1):
        chunks = tuple(ScheduledChunk(r, o[-1:], len(p) + step, page_offset=len(pg))
                       for r, p, pg, o in zip(rids, prompts, pages, outs))
        res = runner.execute_plan(ExecutionPlan(step + 1, chunks))
        for r, o in zip(rids, outs):
            o.append(res.sampled[r])
    runner.execute_plan(ExecutionPlan(n, (), tuple(rids)))
    return Run(time.perf_counter() - t0, len(prompts) * (n - 1), outs)


def ours_prefill(runner: ModelRunner, ids: list[int]) -> float:
    pages = list(range(1, 1 + -(-len(ids) // runner.page_size)))
    t0 = time.perf_counter()
    runner.forward([ScheduledChunk("prefill", ids, 0, pages)])  # last-token logits only
    return time.perf_counter() - t0


class _Clock:
    """A generate() streamer: put() gets the prompt, then each step's tokens; keep the times."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_generate(model: Any, prompts: Sequence[list[int]], n: int, pad: int) -> Run:
    width = max(len(p) for p in prompts)  # left padding + attention mask
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    clock = _Clock()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                             pad_token_id=pad, streamer=clock)
    assert out.shape[1] == width + n and len(clock.times) == n + 1, "generate stopped early"
    t = clock.times  # t[0]: before prefill, t[1]: first token out, t[n]: last token out
    return Run(t[n] - t[1], len(prompts) * (n - 1), out[:, width:].tolist())


def hf_prefill(model: Any, ids: list[int]) -> float:
    x = torch.tensor([ids])
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(input_ids=x, use_cache=True, logits_to_keep=1)  # last-token logits, as generate()
        return time.perf_counter() - t0


def median_of(reps: int, warm: Callable[[], object], *fns: Callable[[], float]) -> list[float]:
    """Warm up once, then run the fns interleaved reps times; the median of each."""
    warm()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for s, fn in zip(samples, fns):
            s.append(fn())
    return [statistics.median(s) for s in samples]


def bench_decode(runner: ModelRunner, hf: Any, batch: list[list[int]], n: int, reps: int, pad: int) -> Row:
    monitor, last = CpuMonitor(), dict[str, Run]()

    def timed(name: str, fn: Callable[[], Run]) -> Callable[[], float]:
        def go() -> float:
            last[name] = run = fn()
            return run.decode_tokens / run.decode_s
        return go

    w = min(n, 8)
    ours, hf_tps = median_of(reps, lambda: (ours_generate(runner, batch, w), hf_generate(hf, batch, w, pad)),
                             timed("ours", lambda: ours_generate(runner, batch, n)),
                             timed("hf", lambda: hf_generate(hf, batch, n, pad)))
    same = sum(x == y for x, y in zip(last["ours"].outputs, last["hf"].outputs))
    lens = sorted(len(p) for p in batch)
    note = (f"prompts {lens[0]}-{lens[-1]} tok, {n} new tok/seq; greedy tokens identical to HF for "
            f"{same}/{len(batch)} seqs")
    return Row(f"decode, batch {len(batch)}", ours, hf_tps, note, monitor.other_cores())


def bench_prefill(runner: ModelRunner, hf: Any, n: int, reps: int) -> Row:
    monitor = CpuMonitor()
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(100, runner.model_config.vocab_size, (n,), generator=gen).tolist()
    ours_s, hf_s = median_of(reps, lambda: (ours_prefill(runner, x), hf_prefill(hf, x)),
                             lambda: ours_prefill(runner, x), lambda: hf_prefill(hf, x))
    note = f"one forward, last-token logits: {ours_s * 1e3:.0f} ms vs {hf_s * 1e3:.0f} ms"
    return Row(f"prefill, {n}-token prompt", n / ours_s, n / hf_s, note, monitor.other_cores())


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = "unknown"
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        git = ["git", "-C", root]
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        if subprocess.run([*git, "status", "--porcelain", "agentspeed"], capture_output=True, text=True,
                          check=True).stdout.strip():
            commit += "-dirty"
    return {"commit": commit, "cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count(), "torch": torch.__version__}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run defaults: batch 4, 16 new tokens, 256-token prefill, 1 rep")
    ap.add_argument("--batch-sizes", help="comma-separated decode batch sizes; batch 1 always runs (8,32)")
    ap.add_argument("--new-tokens", type=int, help="tokens generated per sequence (128)")
    ap.add_argument("--prefill-tokens", type=int, help="long-prompt length (2000)")
    ap.add_argument("--reps", type=int, help="timed repetitions, median reported (3)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (2)")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    a = ap.parse_args(argv)
    defaults = ("4", 16, 256, 1) if a.quick else ("8,32", 128, 2000, 3)  # flags given win
    for k, v in zip(("batch_sizes", "new_tokens", "prefill_tokens", "reps"), defaults):
        setattr(a, k, v if getattr(a, k) is None else getattr(a, k))
    n, batch_sizes = a.new_tokens, [int(b) for b in a.batch_sizes.split(",") if b]
    if n < 2:
        ap.error("--new-tokens must be >= 2 (the prefill step's token is not counted)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(a.threads)
    command, monitor, host = "python " + shlex.join(sys.argv), CpuMonitor(), machine()  # commit at start

    from transformers import AutoModelForCausalLM, __version__
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    source = resolve_model(None)  # the default model
    tok = Tokenizer.load(source)

    def chat(i: int) -> list[int]:
        very = "very " * (i % 5)  # varied lengths, so HF's batches need left padding
        msg = f"Write a {very}short story about {TOPICS[i % len(TOPICS)]}."
        return tok.apply_chat_template([{"role": "user", "content": msg}])

    prompts = {bs: [chat(i) for i in range(bs)] for bs in dict.fromkeys([1, *batch_sizes])}
    # KV pages (16 tokens each) for the biggest step: the long prompt or a whole batch.
    need = max([-(-a.prefill_tokens // 16)] + [sum(-(-(len(p) + n) // 16) for p in b) for b in prompts.values()])
    runner = ModelRunner(EngineConfig(dtype="float32", cache=CacheConfig(page_size=16, num_pages=need + 1)))
    with contextlib.redirect_stderr(io.StringIO()):  # transformers' GGUF de-quantization bar
        hf = AutoModelForCausalLM.from_pretrained(str(source.path.parent), gguf_file=source.path.name,
                                                  dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # = ignore_eos: n tokens, argmax untouched
    pad = tok.hf.pad_token_id if tok.hf.pad_token_id is not None else 0

    rows = [bench_decode(runner, hf, b, n, a.reps, pad) for b in prompts.values()]
    rows.insert(1, bench_prefill(runner, hf, a.prefill_tokens, a.reps))

    meta = {"command": command, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "model": source.name, "file": source.path.name, "dtype": "float32", "threads": a.threads,
            "transformers": __version__, "reps": a.reps, **host,
            "other_processes_cpu_cores": round(monitor.other_cores(), 2)}
    print(f"\nagentspeed {meta['commit']} vs transformers {__version__}: {source.name} ({source.path.name}), "
          f"fp32, torch {meta['torch']}, {a.threads} threads, {meta['cpu']} ({meta['cpu_capability']}, "
          f"{meta['cores']} cores), {meta['date']}")
    print(f"median of {a.reps} after a warm-up; decode rows exclude the prefill step; "
          "busy = other processes' CPU use meanwhile, in cores\n")
    print(f"| {'tok/s':<26} | {'agentspeed':>10} | {'transformers':>12} | {'ratio':>6} | {'busy':>4} | notes")
    print(f"|{'-' * 28}|{'-' * 11}:|{'-' * 13}:|{'-' * 7}:|{'-' * 5}:|{'-' * 7}")
    for r in rows:
        print(f"| {r.metric:<26} | {r.ours:>10.1f} | {r.hf:>12.1f} | {r.ours / r.hf:>5.2f}x | {r.busy:>4.2f} "
              f"| {r.note}")
    if max(r.busy for r in rows) > 0.2:
        print("\nWARNING: other processes used the CPU during the run; these numbers are low and noisy")
    print(f"\ncommand: {command}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "results": [asdict(r) for r in rows]}, f, indent=2)


if __name__ == "__main__":
    main()
