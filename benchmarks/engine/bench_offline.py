"""Offline throughput of the engine (LLM.generate) on agentic multi-turn workload shapes.

Workload: the first S sessions with >= T turns of the trie agentic-coding trace
(../shared/workloads/trie/agentic_coding_8k.jsonl beside the repository), lengths scaled by one factor per
session so the final context (turn-T prompt + turn-T response) fits --context tokens
(default 1024, not SmolLM2's 8192: on 2 cores prefill runs at ~250-450 tok/s, and 8 x 8
turns at 4096 took ~8 min for the cached configuration alone; the uncached ones re-prefill
~7x more).
Token ids are synthetic (seeded RNG, ids in [100, 49000)); turn k+1's prompt is turn k's
prompt + turn k's *generated* tokens + the tool output, exactly what an agent re-sends,
so the prefix cache can hit. Turns run in waves: one generate() call with every session's
turn k (they batch), then turn k+1, ... Every request is greedy with ignore_eos and
max_tokens = its scaled response length.

Configurations: prefix caching on/off x overlap on/off, one LLM (model load) each, a tiny
warm-up generate, then the timed waves. Outputs must be identical across configurations.

    python benchmarks/engine/bench_offline.py                  # 8 sessions x 8 turns (~8 min on 2 cores)
    python benchmarks/engine/bench_offline.py --quick          # 2 sessions x 3 turns, 512-token context (~1 min)
    python benchmarks/engine/bench_offline.py --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from agentspeed.engine.llm import LLM
from agentspeed.sampling_params import SamplingParams

TRACE = str(Path(__file__).resolve().parents[3] / "shared/workloads/trie/agentic_coding_8k.jsonl")
VOCAB_LO, VOCAB_HI = 100, 49000  # ordinary vocabulary of SmolLM2 (specials sit at low ids)
PAGE = 16  # the engine's default KV page size
ALL_CONFIGS = ["cache-on/overlap-on", "cache-on/overlap-off", "cache-off/overlap-on", "cache-off/overlap-off"]


@dataclass
class Session:
    line: int  # 0-based line in the trace
    scale: float
    prompt: list[int]  # first prompt
    responses: list[int]  # scaled response length per turn
    tools: list[list[int]]  # tool output tokens appended after each turn's response

    @property
    def final_context(self) -> int:
        """Tokens in the last turn's sequence: prompt + earlier responses/tools + last response."""
        return len(self.prompt) + sum(self.responses) + sum(len(t) for t in self.tools[:-1])


def scaled(n: int, f: float) -> int:
    return max(1, round(n * f))


def draw(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB_LO, VOCAB_HI) for _ in range(n)]


def load_sessions(path: str, n_sessions: int, n_turns: int, context: int, seed: int) -> list[Session]:
    """First n_sessions traces with >= n_turns turns, each scaled to fit `context` tokens."""
    out: list[Session] = []
    with open(path) as f:
        for line_no, line in enumerate(f):
            t = json.loads(line)
            if t["num_turns"] < n_turns:
                continue
            p, r, tool = t["input_prompt_length"], t["assistant_response_length"], t["tool_call_output_length"]
            raw = p + sum(r[:n_turns]) + sum(tool[: n_turns - 1])
            f_ = min(1.0, context / raw)
            while True:  # the >= 1 floor can push the total over: shrink until it fits
                resp = [scaled(x, f_) for x in r[:n_turns]]
                tools = [scaled(x, f_) for x in tool[:n_turns]]
                if scaled(p, f_) + sum(resp) + sum(tools[:-1]) <= context:
                    break
                f_ *= 0.99
            rng = random.Random(seed * 1_000_003 + line_no)
            prompt = draw(rng, scaled(p, f_))
            out.append(Session(line_no, f_, prompt, resp, [draw(rng, n) for n in tools]))
            if len(out) == n_sessions:
                return out
    raise SystemExit(f"only {len(out)} traces in {path} have >= {n_turns} turns")


@dataclass
class Result:
    caching: bool
    overlap: bool
    wall_s: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    steps: int = 0
    preemptions: int = 0
    kv_tokens: int = 0
    other_cores: float = 0.0  # CPU used by other processes during the timed waves
    wave_s: list[float] = field(default_factory=list)
    outputs: list[list[list[int]]] = field(default_factory=list)  # [turn][session] -> ids

    @property
    def name(self) -> str:
        return f"cache {'on' if self.caching else 'off'}, overlap {'on' if self.overlap else 'off'}"

    @property
    def computed_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


class CpuMonitor:
    """CPU time used by *other* processes since construction (this box is shared), in cores."""

    def __init__(self) -> None:
        self.busy0, self.own0, self.wall0 = self._busy(), time.process_time(), time.perf_counter()

    @staticmethod
    def _busy() -> float:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait

    def other_cores(self) -> float:
        own = time.process_time() - self.own0
        return max(0.0, (self._busy() - self.busy0 - own) / (time.perf_counter() - self.wall0))


def run_config(sessions: list[Session], caching: bool, overlap: bool, a: argparse.Namespace) -> Result:
    llm = LLM(enable_prefix_caching=caching, overlap=overlap, num_kv_pages=a.kv_pages,
              max_num_batched_tokens=a.max_num_batched_tokens, skip_tokenizer_init=True)
    res = Result(caching, overlap, kv_tokens=(llm.runner.kv.num_pages - 1) * llm.runner.page_size)
    try:
        warm = [{"prompt_token_ids": list(range(1000 + i, 1064 + i))} for i in range(2)]
        llm.generate(warm, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        steps0, pre0 = llm.engine.steps, llm.engine.scheduler.num_preemptions
        convs = [list(s.prompt) for s in sessions]  # what each agent sends next
        monitor = CpuMonitor()
        for k in range(a.turns):
            params = [SamplingParams(max_tokens=s.responses[k], temperature=0, ignore_eos=True) for s in sessions]
            t0 = time.perf_counter()
            outs = llm.generate([{"prompt_token_ids": c} for c in convs], params)
            res.wave_s.append(time.perf_counter() - t0)
            res.outputs.append([])
            for s, c, o in zip(sessions, convs, outs):
                ids = list(o.outputs[0].token_ids)
                assert len(ids) == s.responses[k], f"asked {s.responses[k]} tokens, got {len(ids)}"
                res.outputs[-1].append(ids)
                res.prompt_tokens += len(c)
                res.cached_tokens += o.num_cached_tokens
                res.output_tokens += len(ids)
                c.extend(ids + s.tools[k])
        res.wall_s = sum(res.wave_s)
        res.other_cores = monitor.other_cores()
        res.steps = llm.engine.steps - steps0
        res.preemptions = llm.engine.scheduler.num_preemptions - pre0
    finally:
        llm.shutdown()
    return res


def ideal_cached(sessions: list[Session], turns: int) -> int:
    """Cache hits if every full page of the previous turn's sequence survives. The last
    generated token of a turn is never fed back, so its KV does not exist; the last prompt
    token is always recomputed (its logits are needed)."""
    total = 0
    for s in sessions:
        n_prompt = len(s.prompt)
        for k in range(1, turns):
            prev_kv = n_prompt + s.responses[k - 1] - 1
            n_prompt += s.responses[k - 1] + len(s.tools[k - 1])
            total += min(prev_kv, n_prompt - 1) // PAGE * PAGE
    return total


def other_benchmarks() -> list[str]:
    """Command lines of other benchmark processes on this (shared) machine."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if int(pid) != os.getpid() and "benchmarks/bench_" in cmd and "python" in cmd:
            found.append(f"{pid}: {cmd}")
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 sessions x 3 turns, 512-token context")
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--context", type=int, default=1024, help="max final context per session (tokens)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--kv-pages", type=int, default=None, help="KV pool pages (default: 1.25x working set)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trace", default=TRACE)
    ap.add_argument("--json", metavar="OUT", help="also write results as JSON here")
    ap.add_argument("--configs", nargs="+", default=ALL_CONFIGS, choices=ALL_CONFIGS,
                    help="configurations to run (default: all four)")
    a = ap.parse_args()
    if a.quick:
        a.sessions, a.turns, a.context = 2, 3, 512
    torch.set_num_threads(a.threads)
    command = "python " + shlex.join(sys.argv)
    print(f"command: {command}")
    busy = other_benchmarks()
    if busy:
        print("WARNING: other benchmarks are running, numbers will be polluted:\n  " + "\n  ".join(busy))

    sessions = load_sessions(a.trace, a.sessions, a.turns, a.context, a.seed)
    working_set = sum(-(-s.final_context // PAGE) for s in sessions)
    if a.kv_pages is None:
        a.kv_pages = working_set * 5 // 4 + 1
    n_req = a.sessions * a.turns
    print(f"{a.sessions} sessions x {a.turns} turns = {n_req} requests; trace lines "
          f"{[s.line for s in sessions]}; scale {min(s.scale for s in sessions):.3f}-"
          f"{max(s.scale for s in sessions):.3f}; final context {[s.final_context for s in sessions]} "
          f"(<= {a.context}); KV pool {a.kv_pages} pages of {PAGE} (working set {working_set})")

    results = []
    configs = [(c, o) for c in (True, False) for o in (True, False)
               if f"cache-{'on' if c else 'off'}/overlap-{'on' if o else 'off'}" in a.configs]
    for caching, overlap in configs:
        r = run_config(sessions, caching, overlap, a)
        results.append(r)
        print(f"  {r.name}: {r.wall_s:.1f} s, waves " + " ".join(f"{w:.1f}" for w in r.wave_s)
                  + f"; other processes {r.other_cores:.2f} cores", flush=True)

    ideal = ideal_cached(sessions, a.turns)
    print(f"\n{a.sessions} sessions x {a.turns} turns, {results[0].prompt_tokens} prompt tokens "
          f"(ideal page-granular cache hits {ideal}, {ideal / results[0].prompt_tokens:.1%}), "
          f"{results[0].output_tokens} output tokens, torch {torch.__version__}, {a.threads} threads, fp32\n")
    hdr = ["config", "wall s", "out tok/s", "prompt tok/s", "computed prompt", "cached", "hit ratio", "steps"]
    print("| " + " | ".join(hdr) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(hdr) - 1)) + "|")
    for r in results:
        print(f"| {r.name} | {r.wall_s:.1f} | {r.output_tokens / r.wall_s:.1f} | "
              f"{r.prompt_tokens / r.wall_s:.0f} | {r.computed_tokens:,} | {r.cached_tokens:,} | "
              f"{r.cached_tokens / r.prompt_tokens:.1%} | {r.steps:,} |")
    pre = {r.name: r.preemptions for r in results if r.preemptions}
    if pre:
        print(f"preemptions: {pre}")
    for r in results:
        if r.caching and r.cached_tokens != ideal:
            print(f"NOTE: {r.name} cached {r.cached_tokens} tokens, page-granular ideal is {ideal}")
    if max(r.other_cores for r in results) > 0.2:
        print("WARNING: other processes used CPU during the run; numbers are pessimistic", file=sys.stderr)

    ref = results[0].outputs
    for r in results[1:]:
        for k, (want, got) in enumerate(zip(ref, r.outputs)):
            for i, (x, y) in enumerate(zip(want, got)):
                assert x == y, (f"{r.name}: turn {k + 1}, session {i} differs from {results[0].name} "
                                f"at token {next(j for j, (u, v) in enumerate(zip(x, y)) if u != v)}")
    print(f"outputs identical across all {len(results)} configurations: yes ({n_req} requests, greedy)")

    if a.json:
        meta = {"command": command, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "torch": torch.__version__, "threads": a.threads, "sessions": a.sessions, "turns": a.turns,
                "context": a.context, "kv_pages": a.kv_pages, "ideal_cached_tokens": ideal,
                "session_lines": [s.line for s in sessions], "scales": [s.scale for s in sessions],
                "other_benchmarks_at_start": busy}
        rows = [{k: v for k, v in asdict(r).items() if k != "outputs"} for r in results]
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
