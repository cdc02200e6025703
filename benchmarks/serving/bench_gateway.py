"""Scale-out behind SMG: the agentic replay through the gateway, and the gateway's overhead.

    .venv/bin/python benchmarks/serving/bench_gateway.py replay [--concurrency 8] [--output F.json]
    .venv/bin/python benchmarks/serving/bench_gateway.py overhead [--requests 40] [--tokens 256]

`replay` runs the same sweep (`agentspeed bench`, text prompts, the reference level of
docs/benchmarks.md) against, one after another on this machine:
  single      one `agentspeed serve` with every core, straight over HTTP;
  cache_aware `agentspeed launch --replicas 2` (one core each) behind SMG over gRPC, routing
              by cached prefix from the replicas' KV events;
  round_robin the same two replicas, SMG's round_robin policy;
and prints eligible hit rate, useful tok/s and per-replica hit rates for each.

`overhead` starts one replica with every core and SMG in front of it (gRPC), and times, with
both up and taking turns: a 1-token non-streamed chat request (per-request latency), and a
streamed `--tokens`-token completion (time per streamed token after the first), direct vs
through the gateway. It prints medians and the difference.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
TRIE = ROOT.parent / "shared" / "workloads" / "trie" / "agentic_coding_8k.jsonl"
PY = sys.executable
ENGINE = ["--max-num-seqs", "8", "--kv-cache-memory", "2GiB"]


def _wait(url: str, proc: subprocess.Popen[bytes], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not up after {timeout}s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _start(cmd: list[str], health: str, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    _wait(health, proc)
    return proc


def _bench(url: str, label: str, args: argparse.Namespace, out: Path) -> dict[str, object]:
    cmd = [PY, "-m", "agentspeed.cli", "bench", "--endpoint", f"{label}={url}", "--workload", str(args.workload),
           "--scale", "4", "--max-context", "8192", "--max-turns", "10", "--num-sessions", str(args.num_sessions),
           "--concurrency", str(args.concurrency), "--prompt-format", "text", "--output", str(out)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    row: dict[str, object] = json.loads(out.read_text())["results"][0]
    return row


def replay(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    rows = []
    port = 8640
    configs = [("single", [PY, "-m", "agentspeed.cli", "serve", "--port", str(port), *ENGINE],
                f"http://127.0.0.1:{port}/health")]
    for policy in ("cache_aware", "round_robin"):
        configs.append((policy, [PY, "-m", "agentspeed.cli", "launch", "--replicas", "2", "--policy", policy,
                                 "--port", str(port), *ENGINE], f"http://127.0.0.1:{port}/readiness"))
    for label, cmd, health in configs:
        print("$", " ".join(cmd), flush=True)
        proc = _start(cmd, health, tmp / f"{label}.log")
        if label != "single":  # the gateway is up; wait for its workers too
            while "[launch] ready" not in (tmp / f"{label}.log").read_text():
                time.sleep(0.5)
        try:
            rows.append(_bench(f"http://127.0.0.1:{port}", label, args, tmp / f"{label}.json"))
        finally:
            _stop(proc)
    print(f"\nworkload {args.workload.name}, scale 4, 10 turns, {args.num_sessions} sessions, C={args.concurrency}, "
          f"text prompts; machine: {os.cpu_count()} cores")
    print(f"{'config':<12} {'hit rate':>9} {'useful tok/s':>13} {'per-user p50':>13}  per replica")
    for r in rows:
        per = "; ".join(f"{w.rsplit(':', 1)[-1]}: {x['requests']} req, "
                        f"{(x['eligible_hit_rate'] or 0) * 100:.1f}%" for w, x in r["per_replica"].items())  # type: ignore[attr-defined]
        print(f"{r['endpoint']:<12} {r['eligible_hit_rate'] * 100:>8.1f}% {r['useful_tok_s']:>13.1f} "  # type: ignore[operator]
              f"{r['per_user_decode_tok_s_p50']:>13.1f}  {per}")
    if args.output:
        Path(args.output).write_text(json.dumps({"command": " ".join(sys.argv), "results": rows}, indent=2))


def _chat_latency(url: str, n: int) -> list[float]:
    body = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 1, "temperature": 0}
    out = []
    with httpx.Client(timeout=60) as h:
        for _ in range(n):
            t = time.perf_counter()
            h.post(f"{url}/v1/chat/completions", json=body).raise_for_status()
            out.append(time.perf_counter() - t)
    return out


def _stream_per_token(url: str, tokens: int) -> float:
    body = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Tell a story."}],
            "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    times = []
    with httpx.Client(timeout=300) as h, h.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and '"content"' in line:
                times.append(time.perf_counter())
    return (times[-1] - times[0]) / max(1, len(times) - 1)


def overhead(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    direct = [PY, "-m", "agentspeed.cli", "launch", "--replicas", "1", "--port", "8650", "--replica-port-base",
              "8660", *ENGINE, "--num-speculative-tokens", "0"]
    print("$", " ".join(direct), flush=True)
    proc = _start(direct, "http://127.0.0.1:8650/readiness", tmp / "launch.log")
    while "[launch] ready" not in (tmp / "launch.log").read_text():
        time.sleep(0.5)
    urls = {"direct": "http://127.0.0.1:8660", "gateway": "http://127.0.0.1:8650"}
    try:
        for u in urls.values():
            _chat_latency(u, 3)  # warm both paths
        lat: dict[str, list[float]] = {k: [] for k in urls}
        tok: dict[str, list[float]] = {k: [] for k in urls}
        for _ in range(args.rounds):  # taking turns
            for k, u in urls.items():
                lat[k] += _chat_latency(u, args.requests // args.rounds)
                tok[k].append(_stream_per_token(u, args.tokens))
    finally:
        _stop(proc)
    print(f"\nper request (1-token chat, {args.requests} each, median): direct "
          f"{statistics.median(lat['direct']) * 1000:.2f} ms, gateway {statistics.median(lat['gateway']) * 1000:.2f} ms, "
          f"overhead {(statistics.median(lat['gateway']) - statistics.median(lat['direct'])) * 1000:.2f} ms")
    d, g = statistics.median(tok["direct"]), statistics.median(tok["gateway"])
    print(f"per streamed token ({args.tokens}-token streams, {args.rounds} each, median): direct {d * 1000:.2f} ms, "
          f"gateway {g * 1000:.2f} ms, overhead {(g - d) * 1000:.3f} ms")
    print("runs:", json.dumps({"latency_ms": {k: [round(x * 1000, 2) for x in v] for k, v in lat.items()},
                                "per_token_ms": {k: [round(x * 1000, 3) for x in v] for k, v in tok.items()}}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("replay")
    r.add_argument("--workload", type=Path, default=TRIE)
    r.add_argument("--concurrency", type=int, default=8)
    r.add_argument("--num-sessions", type=int, default=8)
    r.add_argument("--output", default=None)
    o = sub.add_parser("overhead")
    o.add_argument("--requests", type=int, default=40)
    o.add_argument("--tokens", type=int, default=256)
    o.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    replay(args) if args.cmd == "replay" else overhead(args)


if __name__ == "__main__":
    main()
