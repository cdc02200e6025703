"""Overhead of the HTTP + IPC path, and server throughput under concurrent streams.

1. In-process `LLM` on one prompt: TTFT (generate with max_tokens=1) and inter-token latency
   ((time for N tokens - time for 1) / (N - 1)), greedy, EOS ignored.
2. `agentspeed serve` (started here, same model and engine options) on the same prompt,
   streaming: TTFT and mean inter-token latency measured at the client.
3. The server with C concurrent streaming clients (default 1, 8, 32), each asking for
   --tokens tokens (EOS ignored) on distinct prompts: total output tok/s, per-stream tok/s
   (median over streams of tokens / (last token - first token)), TTFT p50.

Phases run one after another (never two engines at once: 2 cores).

    python benchmarks/serving/bench_serving.py [--concurrency 1 8 32] [--tokens 64] [--reps 5]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from server_util import ServerProcess

PROMPT = "Explain, step by step, how a hash map handles collisions."


def in_process(tokens: int, reps: int) -> tuple[float, float]:
    from agentspeed import LLM, SamplingParams

    llm = LLM(kv_cache_memory=256 << 20)
    msgs = [{"role": "user", "content": PROMPT}]

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        llm.chat(msgs, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        return time.perf_counter() - t0

    timed(4)  # warm-up
    ttft = statistics.median(timed(1) for _ in range(reps))
    full = statistics.median(timed(tokens) for _ in range(reps))
    llm.shutdown()

    gc.collect()
    return ttft, (full - ttft) / (tokens - 1)


async def stream_one(h: httpx.AsyncClient, url: str, content: str, tokens: int) -> tuple[float, list[float]]:
    """(TTFT, arrival time of every content chunk) for one streaming chat request."""
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    times: list[float] = []
    async with h.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
    return times[0] - t0, times


async def server_latency(url: str, tokens: int, reps: int) -> tuple[float, float]:
    async with httpx.AsyncClient(timeout=600) as h:
        await stream_one(h, url, PROMPT, 4)
        ttfts, itls = [], []
        for _ in range(reps):
            ttft, times = await stream_one(h, url, PROMPT, tokens)
            ttfts.append(ttft)
            itls.append((times[-1] - times[0]) / max(1, len(times) - 1))
    return statistics.median(ttfts), statistics.median(itls)


async def concurrent(url: str, c: int, tokens: int) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=c + 4)) as h:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(stream_one(h, url, f"Request {i}: {PROMPT}", tokens) for i in range(c)))
        wall = time.perf_counter() - t0
    total_chunks = sum(len(t) for _, t in res)
    per_stream = [(len(t) - 1) / (t[-1] - t[0]) for _, t in res if len(t) > 1 and t[-1] > t[0]]
    return {"concurrency": c, "wall_s": wall, "output_tok_s": total_chunks / wall,
            "per_stream_tok_s_p50": statistics.median(per_stream),
            "ttft_p50_s": statistics.median(x for x, _ in res)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", metavar="OUT")
    a = ap.parse_args()
    print(f"command: python {' '.join(sys.argv)}")
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()

    ttft_llm, itl_llm = in_process(a.tokens, a.reps)
    srv = ServerProcess(["--max-queue", "256"])
    try:
        ttft_srv, itl_srv = asyncio.run(server_latency(srv.url, a.tokens, a.reps))
        rows = [asyncio.run(concurrent(srv.url, c, a.tokens)) for c in a.concurrency]
    finally:
        srv.stop()

    print(f"\nagentspeed {commit}, default model, fp32 CPU, greedy, {a.tokens} tokens, EOS ignored\n")
    print("| path | TTFT ms | inter-token ms |")
    print("|---|---:|---:|")
    print(f"| in-process LLM | {ttft_llm * 1000:.1f} | {itl_llm * 1000:.2f} |")
    print(f"| HTTP server (stream) | {ttft_srv * 1000:.1f} | {itl_srv * 1000:.2f} |")
    print(f"| overhead | {(ttft_srv - ttft_llm) * 1000:+.1f} | {(itl_srv - itl_llm) * 1000:+.2f} |\n")
    print("| concurrent streams | output tok/s | per-stream tok/s (p50) | TTFT p50 ms | wall s |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['output_tok_s']:.1f} | {r['per_stream_tok_s_p50']:.1f} | "
              f"{r['ttft_p50_s'] * 1000:.0f} | {r['wall_s']:.1f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "commit": commit,
                       "latency": {"llm": [ttft_llm, itl_llm], "server": [ttft_srv, itl_srv]},
                       "concurrency": rows}, f, indent=2)


if __name__ == "__main__":
    main()
