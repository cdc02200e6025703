"""Session-aware KV under memory pressure: more agent sessions in flight than the KV pool holds.

    .venv/bin/python benchmarks/serving/bench_sessions.py [--concurrency 24] [--pool-memory 400MiB]
        [--delay-scale 1] [--output docs/results/sessions.json]

Replays the trie workload (`agentspeed bench`, token ids, tool latencies honoured times
`--delay-scale`) against one `agentspeed serve` of the default model, restarted per config,
one config after another on this machine:
  unlimited      a pool that holds every session (the reference hit rate);
  lru            `--pool-memory`, plain LRU, whole pages only;
  retention      the same pool, session retention;
  retention+partial  the same, and partial last pages reused (the default engine);
  lru+host / retention+host  that engine (LRU or retention) with a host tier of `--tier-memory`
                 (int8 copies on CPU): evicted pages are copied there and loaded back on a hit;
  retention+host-no-writeback  the same, pages copied to the tier only when evicted;
  retention+small-host+disk  a host tier of `--small-tier-memory` above a disk tier of `--disk`;
  lru-same-memory  plain LRU with the pool and the tier's bytes together as one pool;
  llama-server   llama.cpp's server (built by benchmarks/peers/peer_llamacpp.py build), one
                 slot per session in flight of --max-context tokens: with --max-context 1516
                 its f16 KV is the pool's and the tier's 800 MiB.
Prints eligible hit rate (and as a share of unlimited's), completion, useful (computed) and
served tok/s (agentspeed/bench/report.py; "x lru" is served tok/s as a multiple of lru's: the
workload is the same, so it is the inverse ratio of wall times), evictions, and partial-page
and tier hit tokens from /metrics.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "peers"))
from bench_gateway import PY, TRIE, _start, _stop

from agentspeed.cli import _parse_bytes

CONFIGS = {
    "unlimited": ["--kv-cache-memory", "{big}", "--no-session-retention", "--no-partial-page-reuse"],
    "lru": ["--kv-cache-memory", "{pool}", "--no-session-retention", "--no-partial-page-reuse"],
    "retention": ["--kv-cache-memory", "{pool}", "--no-partial-page-reuse"],
    "retention+partial": ["--kv-cache-memory", "{pool}"],
    "lru+host": ["--kv-cache-memory", "{pool}", "--no-session-retention", "--kv-offload-memory", "{tier}"],
    "retention+host": ["--kv-cache-memory", "{pool}", "--kv-offload-memory", "{tier}"],
    "retention+host-no-writeback": ["--kv-cache-memory", "{pool}", "--kv-offload-memory", "{tier}",
                                    "--no-kv-offload-writeback"],
    "retention+small-host+disk": ["--kv-cache-memory", "{pool}", "--kv-offload-memory", "{small_tier}",
                                  "--kv-offload-dir", "{disk_dir}", "--kv-offload-disk", "{disk}"],
    "lru-same-memory": ["--kv-cache-memory", "{pool_plus_tier}", "--no-session-retention", "--no-partial-page-reuse"],
}


def _metric(text: str, name: str, label: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(f"agentspeed:{name}") and label in line:
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


def _bench(name: str, url: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    out = tmp / f"{name}.json"
    bench = [PY, "-m", "agentspeed.cli", "bench", "--endpoint", f"{name}={url}", "--workload",
             args.workload, "--scale", str(args.scale), "--max-context", str(args.max_context), "--max-turns",
             str(args.max_turns), "--num-sessions", str(args.num_sessions), "--concurrency",
             str(args.concurrency), "--delay-scale", str(args.delay_scale), "--output", str(out)]
    print("$", " ".join(bench), flush=True)
    subprocess.run(bench, check=True)
    row: dict[str, Any] = json.loads(out.read_text())["results"][0]
    row["config"] = name
    return row


def _ours(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    url = f"http://127.0.0.1:{args.port}"
    both = _parse_bytes(args.pool_memory) + _parse_bytes(args.tier_memory)
    flags = [f.format(pool=args.pool_memory, big=args.big_memory, tier=args.tier_memory,
                      pool_plus_tier=str(both), small_tier=args.small_tier_memory, disk=args.disk,
                      disk_dir=str(tmp / "kv-disk")) for f in CONFIGS[name]]
    cmd = [PY, "-m", "agentspeed.cli", "serve", "--port", str(args.port), "--max-num-seqs",
           str(args.concurrency), *flags]
    print("$", " ".join(cmd), flush=True)
    proc = _start(cmd, f"{url}/health", tmp / f"{name}.log")
    try:
        row = _bench(name, url, args, tmp)
        m = httpx.get(f"{url}/metrics").text
        row.update(kv_pages_total=_metric(m, "kv_pages_total"),
                   evictions=_metric(m, "kv_cache_evictions_total"),
                   partial_hit_tokens=_metric(m, "prefix_cache_partial_page_hit_tokens_total"),
                   preemptions=_metric(m, "num_preemptions_total"),
                   tier_hit_tokens=_metric(m, "prefix_cache_tier_hit_tokens_total", 'tier="host"'),
                   tier_stores=_metric(m, "kv_tier_stores_total"),
                   tier_writebacks=_metric(m, "kv_tier_writebacks_total"),
                   disk_hit_tokens=_metric(m, "prefix_cache_tier_hit_tokens_total", 'tier="disk"'),
                   disk_failures=_metric(m, "kv_disk_read_failures_total"))
        return row
    finally:
        _stop(proc)


def _llama_server(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """llama-server (benchmarks/peers/peer_llamacpp.py builds it), one slot per session in
    flight of --max-context tokens each: the memory it needs to serve the replay at all (a
    slot's context is fixed), printed beside the pool's and the tier's."""
    from peer_llamacpp import LlamaServer, kv_memory

    from agentspeed.model_source import default_model_path

    gguf = default_model_path()
    kv = int(kv_memory(gguf, args.concurrency * args.max_context)) - (1 << 20)
    print(f"llama-server: {args.concurrency} slots x {args.max_context} tokens, f16 KV {kv / 2**20:.0f} MiB "
          f"(pool + tier: {(_parse_bytes(args.pool_memory) + _parse_bytes(args.tier_memory)) / 2**20:.0f} MiB)",
          flush=True)
    peer = LlamaServer(gguf, args.concurrency, args.max_context, 2)
    try:
        row = _bench("llama-server", peer.url, args, tmp)
    finally:
        peer.stop()
    nan = float("nan")
    row.update(kv_pages_total=nan, kv_bytes=kv, evictions=nan, partial_hit_tokens=nan, preemptions=nan,
               tier_hit_tokens=nan, tier_stores=nan, tier_writebacks=nan, disk_hit_tokens=nan, disk_failures=nan)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default=str(TRIE))
    ap.add_argument("--concurrency", type=int, default=24)
    ap.add_argument("--num-sessions", type=int, default=24)
    ap.add_argument("--max-turns", type=int, default=6)
    ap.add_argument("--scale", type=float, default=8.0)
    ap.add_argument("--delay-scale", type=float, default=1.0)
    ap.add_argument("--pool-memory", default="400MiB", help="the constrained pool (--kv-cache-memory)")
    ap.add_argument("--tier-memory", default="400MiB", help="the host tier's bytes (--kv-offload-memory)")
    ap.add_argument("--small-tier-memory", default="100MiB", help="the host tier above the disk tier")
    ap.add_argument("--disk", default="2GiB", help="the disk tier's bytes (--kv-offload-disk)")
    ap.add_argument("--big-memory", default="6GiB", help="the unlimited run's pool")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--max-context", type=int, default=8192,
                    help="turns past this context are dropped (llama-server: each slot's context)")
    ap.add_argument("--port", type=int, default=18431)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            rows.append(_llama_server(args, Path(tmp)) if name == "llama-server" else _ours(name, args, Path(tmp)))
    ref = next((r for r in rows if r["config"] == "unlimited"), None)
    lru = next((r for r in rows if r["config"] == "lru"), None)
    print(f"\n{'config':<28} {'pages':>6} {'hit rate':>9} {'of unl.':>8} {'compl tok/s':>12} {'useful tok/s':>13} "
          f"{'served tok/s':>13} {'x lru':>6} {'wall s':>7} {'evictions':>9} {'partial tok':>11} {'host tok':>9} "
          f"{'disk tok':>9}")
    for r in rows:
        share = r["eligible_hit_rate"] / ref["eligible_hit_rate"] if ref else float("nan")
        gain = r["served_tok_s"] / lru["served_tok_s"] if lru else float("nan")
        print(f"{r['config']:<28} {r['kv_pages_total']:>6.0f} {r['eligible_hit_rate'] * 100:>8.1f}% "
              f"{share * 100:>7.1f}% {r['completion_tok_s']:>12.2f} {r['useful_tok_s']:>13.1f} "
              f"{r['served_tok_s']:>13.1f} {gain:>6.2f} "
              f"{r['wall_s']:>7.0f} {r['evictions']:>9.0f} {r['partial_hit_tokens']:>11.0f} "
              f"{r['tier_hit_tokens']:>9.0f} {r['disk_hit_tokens']:>9.0f}")
    if args.output:
        Path(args.output).write_text(json.dumps({"command": " ".join(sys.argv), "results": rows}, indent=1))


if __name__ == "__main__":
    main()
