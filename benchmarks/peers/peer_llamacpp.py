"""A peer in the same run: llama.cpp's own HTTP server (`llama-server`, parallel slots and
continuous batching) against `agentspeed serve`, on the same GGUF, with the same
`agentspeed bench` sweep; both curves land in one table, one JSON and one plot.

llama-server is built here from the llama.cpp sources bundled in the `llama-cpp-python`
source distribution (PyPI; pinned below), with cmake, for this CPU. The Python package's own
server is not used: it serializes requests, which would be an unfair peer.

    python benchmarks/peers/peer_llamacpp.py build                  # once: ~10 min on 2 cores
    python benchmarks/peers/peer_llamacpp.py run --workload ../shared/workloads/trie/agentic_coding_8k.jsonl \\
        --scale 16 --concurrency 1,2,4,8 --num-sessions 8 --output peer.json --plot peer.png

Both servers get the same context per session (--max-context) and the same threads (2).

    python benchmarks/peers/peer_llamacpp.py decode --model .cache/gguf/qwen2.5-1.5b-Q4_K_M.gguf

measures one stream without speculation on each server: load time (start to healthy),
decode tokens/s of a streamed 128-token completion (median of --runs, time between the first
and last token; both servers up, runs alternating), prefill tokens/s of a fresh prompt
(--prefill-words, one output token, the wall time of the request), and peak resident memory of the server's
processes (VmHWM, summed over the process tree: agentspeed's frontend and engine core).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "llamacpp"
VERSION = "0.3.36"  # llama-cpp-python sdist that carries vendor/llama.cpp
sys.path.insert(0, str(ROOT / "tests"))
from server_util import ServerProcess, wait_healthy  # noqa: E402

TOOLS = ("llama-server", "llama-quantize")  # the peer, and the quantizer for real-shape test GGUFs


def server_binary() -> Path:
    return CACHE / "build" / "bin" / "llama-server"


def tool(name: str) -> Path:
    """A built llama.cpp tool (see TOOLS)."""
    return CACHE / "build" / "bin" / name


def build(jobs: int) -> Path:
    if all(tool(t).exists() for t in TOOLS):
        print(f"already built: {', '.join(str(tool(t)) for t in TOOLS)}")
        return server_binary()
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={VERSION}", "-d", str(CACHE)], check=True)
    src = CACHE / f"llama_cpp_python-{VERSION}"
    if not src.exists():
        with tarfile.open(sdist) as tf:
            tf.extractall(CACHE, filter="data")
    cpp = src / "vendor" / "llama.cpp"
    flags = []
    if "amx_tile" in Path("/proc/cpuinfo").read_text():
        # On an AMX VM here (2026-12-05) a -march=native build died at startup with SIGILL on
        # `tilezero` in ggml_backend_amx_mul_mat; without AMX it runs (AVX-512 VNNI kernels).
        print("AMX advertised: building llama.cpp without it (its AMX path faults on these VMs)")
        flags = ["-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
                 "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"]
    subprocess.run(["cmake", "-S", str(cpp), "-B", str(CACHE / "build"), "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", *flags], check=True)
    subprocess.run(["cmake", "--build", str(CACHE / "build"), "--target", *TOOLS, "-j", str(jobs)],
                   check=True)
    return server_binary()


class LlamaServer:
    def __init__(self, gguf: Path, slots: int, ctx_per_slot: int, threads: int, extra: Sequence[str] = ()) -> None:
        from agentspeed.launch import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(f"/tmp/llama-server-{self.port}.log", "w")  # noqa: SIM115
        cmd = [str(server_binary()), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port),
               "--parallel", str(slots), "--cont-batching", "--ctx-size", str(slots * ctx_per_slot),
               "--threads", str(threads), "--threads-batch", str(threads), "--cache-reuse", "256", *extra]
        print("starting: " + " ".join(cmd), file=sys.stderr)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(self.url, self.proc, 300)
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"llama-server: {e} (log: {self.log.name})") from None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (agentspeed: the frontend and its engine core)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def peak_rss_mib(pid: int) -> float:
    """VmHWM of pid and its descendants, summed (MiB)."""
    total = 0.0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def stream_decode(url: str, model: str, tokens: int) -> tuple[float, float]:
    """(seconds to the first token, decode tokens/s after it) of one streamed completion."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="none")
    t0 = time.perf_counter()
    stamps = []
    stream = client.completions.create(model=model, prompt="Write a story about a lighthouse keeper.",
                                       max_tokens=tokens, temperature=0.0, stream=True,
                                       extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
    return stamps[0] - t0, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def prefill(url: str, model: str, words: int, nonce: int) -> tuple[int, float]:
    """(prompt tokens, prompt tokens/s) of one completion of a fresh ~`words`-word prompt and one
    output token: its wall time is the prompt's prefill (the leading nonce keeps either server's
    prefix cache from serving it) and one decode step."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="none")
    text = f"{nonce} " + " ".join(f"item{i % 97} is {i * 7919 % 1000}," for i in range(words // 3))
    t0 = time.perf_counter()
    r = client.completions.create(model=model, prompt=text, max_tokens=1, temperature=0.0)
    dt = time.perf_counter() - t0
    assert r.usage is not None
    return r.usage.prompt_tokens, r.usage.prompt_tokens / dt


def kv_memory(gguf: Path, context: int) -> str:
    """The bytes of an f16 KV cache for `context` tokens of this model: llama-server's at
    --ctx-size context, so both hold the same context."""
    from agentspeed.modeling.loaders.gguf_loader import gguf_model_config, open_gguf

    cfg = gguf_model_config(open_gguf(gguf))
    return str(context * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2 + (1 << 20))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children (the idle check)."""
    out = 0.0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def decode(a: argparse.Namespace) -> None:
    import statistics

    gguf = Path(a.model)
    servers: dict[str, LlamaServer | ServerProcess] = {}
    load: dict[str, float] = {}
    runs: dict[str, list[tuple[float, float]]] = {"llama-server": [], "agentspeed": []}
    fills: dict[str, list[tuple[int, float]]] = {name: [] for name in runs}
    models = {"llama-server": "default", "agentspeed": gguf.stem}
    try:
        for name in runs:
            t0 = time.perf_counter()
            if name == "llama-server":
                servers[name] = LlamaServer(gguf, 1, a.max_context, a.threads)
            else:
                servers[name] = ServerProcess([str(gguf), "--max-num-seqs", "1", "--num-speculative-tokens", "0",
                                               "--kv-cache-memory", kv_memory(gguf, a.max_context),
                                               *shlex.split(a.agentspeed_args)])
            load[name] = time.perf_counter() - t0
            stream_decode(servers[name].url, models[name], 16)  # warm-up: weights paged in
        # Both stay up and take turns, so drift in this machine's speed (shared cores: +-15%
        # within minutes) hits both alike; the idle one must not take CPU meanwhile.
        for i in range(a.runs):
            for name in runs:
                other = next(n for n in runs if n != name)
                idle0 = cpu_seconds(servers[other].proc.pid)
                runs[name].append(stream_decode(servers[name].url, models[name], a.tokens))
                idle = cpu_seconds(servers[other].proc.pid) - idle0
                if idle > 0.05 * (a.tokens / runs[name][-1][1]):
                    print(f"warning: idle {other} used {idle:.2f} CPU s during a {name} run", flush=True)
            for name in runs:
                fills[name].append(prefill(servers[name].url, models[name], a.prefill_words, i))
            print(f"run {i + 1}/{a.runs}: " + ", ".join(f"{n} {r[-1][1]:.2f} tok/s" for n, r in runs.items())
                  + "; prefill " + ", ".join(f"{n} {f[-1][0]} tokens at {f[-1][1]:.1f} tok/s"
                                             for n, f in fills.items()), flush=True)
        rss = {name: peak_rss_mib(s.proc.pid) for name, s in servers.items()}
    finally:
        for s in servers.values():
            s.stop()
    rows: list[dict[str, object]] = []
    for name, rs in runs.items():
        rows.append({"server": name, "load_s": round(load[name], 1),
                     "ttft_s": round(statistics.median(r[0] for r in rs), 3),
                     "decode_tok_s": round(statistics.median(r[1] for r in rs), 2),
                     "runs_tok_s": [round(r[1], 2) for r in rs], "peak_rss_mib": round(rss[name]),
                     "prefill_tokens": fills[name][0][0],
                     "prefill_tok_s": round(statistics.median(f[1] for f in fills[name]), 1)})
        print(rows[-1], flush=True)
    ratio = rows[1]["decode_tok_s"] / rows[0]["decode_tok_s"]  # type: ignore[operator]
    rss_ratio = rows[1]["peak_rss_mib"] / rows[0]["peak_rss_mib"]  # type: ignore[operator]
    fill_ratio = rows[1]["prefill_tok_s"] / rows[0]["prefill_tok_s"]  # type: ignore[operator]
    print(f"{gguf.name}: agentspeed/llama-server decode {ratio:.2f}x, prefill {fill_ratio:.2f}x (medians of "
          f"{a.runs} alternating runs), peak RSS {rss_ratio:.2f}x, file {gguf.stat().st_size / 2**20:.0f} MiB")
    meta = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "gguf": str(gguf), "file_mib": round(gguf.stat().st_size / 2**20), "threads": a.threads,
            "decode_ratio": round(ratio, 3), "prefill_ratio": round(fill_ratio, 3), "rss_ratio": round(rss_ratio, 3)}
    Path(a.output).write_text(json.dumps({"meta": meta, "results": rows}, indent=2))


def bench(label: str, url: str, a: argparse.Namespace, out: Path) -> list[dict[str, object]]:
    cmd = [sys.executable, "-m", "agentspeed.cli", "bench", "--endpoint", f"{label}={url}", "--workload", a.workload,
           "--scale", str(a.scale), "--max-context", str(a.max_context), "--concurrency", a.concurrency,
           "--num-sessions", str(a.num_sessions), "--delay-scale", str(a.delay_scale), "--output", str(out)]
    if a.max_turns:
        cmd += ["--max-turns", str(a.max_turns)]
    print("running: " + " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=False)
    return list(json.loads(out.read_text())["results"])


def run(a: argparse.Namespace) -> None:
    from agentspeed.bench.report import plot_pareto, print_table
    from agentspeed.model_source import default_model_path

    gguf = Path(a.model) if a.model else default_model_path()
    slots = max(int(c) for c in a.concurrency.split(","))
    tmp = Path(a.output).with_suffix("")
    rows: list[dict[str, object]] = []
    rss = {}
    peer = LlamaServer(gguf, slots, a.max_context, a.threads, shlex.split(a.llama_args))
    try:
        rows += bench("llama-server", peer.url, a, Path(f"{tmp}.llamacpp.json"))
        rss["llama-server"] = round(peak_rss_mib(peer.proc.pid))
    finally:
        peer.stop()
    ours = ServerProcess([str(gguf), "--max-num-seqs", str(max(slots, 8)), "--kv-cache-memory", a.kv_cache_memory,
                          *shlex.split(a.agentspeed_args)])
    try:
        rows += bench("agentspeed", ours.url, a, Path(f"{tmp}.agentspeed.json"))
        rss["agentspeed"] = round(peak_rss_mib(ours.proc.pid))
    finally:
        ours.stop()
    print(f"peak RSS (MiB): {rss}")
    print_table(rows)  # type: ignore[arg-type]
    meta = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "llama_cpp_python_sdist": VERSION, "gguf": str(gguf), "threads": a.threads, "peak_rss_mib": rss,
            "commit": subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                     cwd=ROOT).stdout.strip()}
    Path(a.output).write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    if a.plot:
        plot_pareto(rows, a.plot, f"{Path(a.workload).name}, scale 1/{a.scale:g}: agentspeed vs llama-server")  # type: ignore[arg-type]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build llama-server and llama-quantize from the llama-cpp-python sdist")
    b.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    r = sub.add_parser("run", help="run the same sweep against llama-server and agentspeed")
    r.add_argument("--workload", required=True)
    r.add_argument("--scale", type=float, default=16)
    r.add_argument("--max-context", type=int, default=8192)
    r.add_argument("--concurrency", default="1,2,4,8")
    r.add_argument("--num-sessions", type=int, default=8)
    r.add_argument("--max-turns", type=int, default=None)
    r.add_argument("--delay-scale", type=float, default=0.0)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2)")
    r.add_argument("--kv-cache-memory", default="4GiB")
    r.add_argument("--agentspeed-args", default="",
                   help="extra `agentspeed serve` flags, e.g. '--kv-cache-dtype bfloat16' (llama-server's "
                        "KV cache is f16 by default)")
    r.add_argument("--llama-args", default="",
                   help="extra llama-server flags, e.g. '--spec-type ngram-simple --spec-draft-n-max 3' "
                        "(its own n-gram speculative decoding, against agentspeed's --num-speculative-tokens)")
    r.add_argument("--output", default="peer_results.json")
    r.add_argument("--plot", default=None, help="also plot useful tok/s against TTFT to this PNG file")
    d = sub.add_parser("decode", help="one stream, no speculation: load time, decode tok/s, peak RSS")
    d.add_argument("--model", required=True, help="GGUF file")
    d.add_argument("--tokens", type=int, default=128)
    d.add_argument("--runs", type=int, default=5, help="streamed completions per server, alternating")
    d.add_argument("--prefill-words", type=int, default=600,
                   help="length of the fresh prompt each run also prefills (about 2.5 tokens a word here)")
    d.add_argument("--max-context", type=int, default=4096)
    d.add_argument("--threads", type=int, default=2)
    d.add_argument("--agentspeed-args", default="--kv-cache-dtype float16",
                   help="extra `agentspeed serve` flags (default: an f16 KV cache, as llama-server's; "
                        "its size is llama-server's for --max-context tokens)")
    d.add_argument("--output", default="peer_decode.json")
    a = ap.parse_args()
    if a.cmd == "build":
        if not shutil.which("cmake"):
            sys.exit("cmake is needed to build llama-server")
        print(build(a.jobs))
    else:
        if not server_binary().exists():
            sys.exit("llama-server is not built: run `python benchmarks/peers/peer_llamacpp.py build` first")
        decode(a) if a.cmd == "decode" else run(a)


if __name__ == "__main__":
    main()
