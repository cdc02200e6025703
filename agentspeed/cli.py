"""The `agentspeed` command line."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence

from agentspeed.config import (
    HOST_ALLOCATORS,
    KV_CACHE_DTYPES,
    CacheConfig,
    EngineConfig,
    KernelConfig,
    ParallelConfig,
    SchedulingConfig,
)
from agentspeed.entrypoints.parsers.select import REASONING_PARSERS, TOOL_PARSERS
from agentspeed.errors import AgentspeedError, ConfigError

log = logging.getLogger("agentspeed")


def _parse_bytes(text: str) -> int:
    """'4GiB', '512MiB', '2G', or a plain number of bytes."""
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(float(t))


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", default=None, help="local Hugging Face model directory or .gguf file "
                   "(default: the embedded SmolLM2-135M-Instruct GGUF)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype (auto: float32 on CPU, the checkpoint's 16-bit type on GPU)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--tp", type=int, default=1, help="tensor parallel size (processes; gloo on CPU, NCCL on GPU)")
    g.add_argument("--max-model-len", type=int, default=None, help="context length cap (default: the model's)")
    g.add_argument("--page-size", type=int, default=16, help="tokens per KV cache page")
    g.add_argument("--kv-cache-memory", type=_parse_bytes, default=None,
                   help="bytes of KV cache per rank, e.g. 4GiB (default on CPU: 25%% of available "
                        "memory, at most 4GiB; on GPU see --gpu-memory-utilization)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                   help="KV cache storage: auto (the compute dtype: exact), bfloat16/float16 (half "
                        "the bytes of fp32; on CPU bfloat16 decodes as fast as fp32), or fp8 (e4m3 "
                        "with one scale per token: a quarter of fp32, slower to read on CPU)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory the engine may use, KV cache included (default 0.9)")
    g.add_argument("--kernel-backend", default=None,
                   help="force kernel backends: 'reference', or 'op=backend,...' "
                        "(also AGENTSPEED_KERNEL_BACKEND); fails if the backend cannot run. "
                        "GGUF weights stay packed with the default CPU linear (cpu_native); "
                        "'linear=cpu' dequantizes them to fp32 for oneDNN (4 bytes per weight)")
    g.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most requests in one step")
    g.add_argument("--no-prefix-caching", action="store_true", help="disable the prefix cache")
    g.add_argument("--no-session-retention", dest="session_retention", action="store_false",
                   help="evict cached prefix pages in plain LRU order (default: pages of an agent session, "
                        "keyed by X-SMG-Routing-Key / X-Session-Id / the APIs' user or cache keys, are kept "
                        "through its expected pause between turns, learned from its earlier pauses, ahead "
                        "of other cached pages)")
    g.add_argument("--session-retention-cap", type=float, default=300.0, metavar="SECONDS",
                   help="longest pause a session's pages are favoured for; sessions idle longer are "
                        "evicted first (default 300)")
    g.add_argument("--no-partial-page-reuse", dest="partial_page_reuse", action="store_false",
                   help="reuse cached KV only in whole pages (default: a finished turn's last, partly "
                        "filled page is reused by the next turn, to the token)")
    g.add_argument("--kv-offload-memory", type=_parse_bytes, default=None, metavar="SIZE",
                   help="a host tier below the KV pool, SIZE bytes per rank (e.g. 8GiB): full prefix pages the "
                        "pool evicts are copied there, and a later prefix hit loads them back instead of "
                        "recomputing them (default: no tier)")
    g.add_argument("--kv-offload-dtype", default="auto", choices=["auto", "exact", "int8"],
                   help="the tier's form: exact (the cache's values, bit for bit) or int8 (one scale per "
                        "token and head: a quarter of an fp32 cache's bytes, error <= max|row|/254); "
                        "auto: int8 on CPU (where the tier shares the pool's memory), exact on GPUs")
    g.add_argument("--no-kv-offload-writeback", dest="kv_offload_writeback", action="store_false",
                   help="copy a page to the host tier only when the pool evicts it (default: the pages it "
                        "will evict next are copied ahead, beside the forward on GPUs and between steps on "
                        "CPUs, so an admission that evicts a run of pages does not wait for the copies)")
    g.add_argument("--kv-offload-dir", default=None, metavar="DIR",
                   help="a disk tier below the host tier, in DIR/rank<r>/ (files of an earlier run there are "
                        "deleted): host copies about to be reused are written there, one checksummed file per "
                        "page, and read back on a prefix hit; a missing or corrupt file is recomputed")
    g.add_argument("--kv-offload-disk", type=_parse_bytes, default=None, metavar="SIZE",
                   help="bytes of the disk tier per rank, e.g. 50GiB (with --kv-offload-dir)")
    g.add_argument("--disable-hybrid-kv-cache-manager", action="store_true",
                   help="models with sliding-window layers (Gemma 3, GPT-OSS, Mistral): keep every "
                        "layer's KV for the whole context in one pool (default: the window layers "
                        "have their own pool and give back pages that fell out of the window)")
    ov = g.add_mutually_exclusive_group()
    ov.add_argument("--overlap", dest="overlap", action="store_const", const=True, default=None,
                    help="plan step N+1 while step N runs (default on GPUs without speculative decoding; on "
                         "2-core CPUs it was slower)")
    ov.add_argument("--no-overlap", dest="overlap", action="store_const", const=False,
                    help="plan each step only after the previous one finished (default on CPU)")
    g.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                   help="speculative decoding by n-gram prompt lookup: draft up to K tokens (0-7; 0: off) "
                        "per decode step from earlier text of the same request and verify them in that "
                        "step; greedy requests without penalties or logprobs only, same tokens as "
                        "without (default: 3 on CPU, off on GPUs and with --overlap)")
    g.add_argument("--ngram-max", type=int, default=3,
                   help="drafts follow the latest earlier occurrence of the last N tokens, N from this "
                        "down to --ngram-min (default 3)")
    g.add_argument("--ngram-min", type=int, default=1, help="shortest n-gram to look up (default 1)")
    g.add_argument("--no-adaptive-drafts", dest="adaptive_drafts", action="store_false",
                   help="always draft K tokens when there is a match (default: each request drafts 0-K, "
                        "as many as its recent acceptance pays for at the current batch size)")
    g.add_argument("--structured-output-backend", default="auto", choices=["auto", "xgrammar", "guidance"],
                   help="grammar library for constrained decoding (response_format, structured_outputs, "
                        "forced tool calls): xgrammar or llguidance (auto: xgrammar)")
    g.add_argument("--host-allocator", default="caching", choices=list(HOST_ALLOCATORS),
                   help="CPU engines: where tensors of 1 MiB or more live. caching (default): blocks mapped once "
                        "and reused step after step (a prefill's activations no longer fragment glibc's heap; "
                        "reused blocks get 2 MiB pages); system: glibc's malloc, torch's default")
    g.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])


def engine_config(args: argparse.Namespace, rank: int = 0, port: int = 29517) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        seed=args.seed,
        parallel=ParallelConfig(tp=args.tp, rank=rank, master_port=port),
        cache=CacheConfig(page_size=args.page_size, kv_cache_memory=args.kv_cache_memory,
                          gpu_memory_utilization=args.gpu_memory_utilization,
                          kv_cache_dtype=args.kv_cache_dtype,
                          hybrid_kv=not args.disable_hybrid_kv_cache_manager,
                          kv_offload_memory=args.kv_offload_memory, kv_offload_dtype=args.kv_offload_dtype,
                          kv_offload_writeback=args.kv_offload_writeback,
                          kv_offload_dir=args.kv_offload_dir, kv_offload_disk=args.kv_offload_disk),
        kernels=KernelConfig.from_spec(args.kernel_backend),
        scheduling=SchedulingConfig(
            max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
            enable_prefix_caching=not args.no_prefix_caching, overlap=args.overlap,
            num_speculative_tokens=args.num_speculative_tokens, ngram_max=args.ngram_max,
            ngram_min=args.ngram_min, adaptive_drafts=args.adaptive_drafts,
            session_retention=args.session_retention, session_gap_cap_s=args.session_retention_cap,
            partial_page_reuse=args.partial_page_reuse),
        structured_output_backend=args.structured_output_backend,
        host_allocator=args.host_allocator,
    )


def add_serve_args(p: argparse.ArgumentParser, with_address: bool = True) -> None:
    """`serve`'s options (`launch` takes them too, for its replicas, with its own address)."""
    p.add_argument("model_path", nargs="?", default=None, metavar="MODEL",
                     help="local HF model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    g = p.add_argument_group("server")
    if with_address:
        g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
        g.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    g.add_argument("--grpc-port", type=int, default=None, metavar="P",
                   help="also serve the gRPC worker API a gateway drives (SMG's TokenSpeedScheduler service: "
                        "token ids in and out, loads, tokenizer, prefix-cache events) on port P, beside the "
                        "HTTP server, on the same engine")
    g.add_argument("--served-model-name", default=None, nargs="+", metavar="NAME",
                   help="model name(s) clients may send; the first is the one /v1/models lists and "
                        "responses carry (default: the model file or directory name)")
    g.add_argument("--model-alias", action="append", default=[], metavar="GLOB",
                   help="also accept model names matching this fnmatch pattern, e.g. 'claude-*' for "
                        "agents that send their own model ids (repeatable; other names get a 404)")
    g.add_argument("--api-key", default=os.environ.get("AGENTSPEED_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 and tokenizer routes "
                        "(default: $AGENTSPEED_API_KEY, else no key)")
    g.add_argument("--chat-template", default=None, help="a Jinja chat template (file path or inline text) "
                   "replacing the model's")
    g.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                   help="how tool calls are read from model output (default: the format the chat "
                        "template uses: deepseek_v3, kimi_k2, qwen3_coder, mistral or llama3_json markers, "
                        "else hermes)")
    g.add_argument("--reasoning-parser", default="auto", choices=["auto", "none", *REASONING_PARSERS],
                   help="split <think>...</think> into reasoning (reasoning_content, thinking blocks, "
                        "reasoning items); auto: qwen3 or deepseek_r1 when the chat template knows "
                        "</think>, else none")
    g.add_argument("--responses-store-size", type=int, default=1000, metavar="N",
                   help="responses kept for previous_response_id (in memory, oldest dropped; default 1000)")
    g.add_argument("--max-queue", type=int, default=1024,
                   help="most live requests; more get 503 instead of queueing without bound (default 1024)")
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds to let in-flight requests finish on shutdown (default 30)")
    g.add_argument("--enable-test-hooks", action="store_true",
                   help="accept the `agentspeed_test_output` request field (tests only: it replaces the "
                        "generated text with a given one)")
    add_engine_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentspeed",
        description="An LLM inference engine for multi-turn agentic workloads.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser(
        "generate",
        help="generate a completion for a prompt and print it",
        description="Send PROMPT as one user message through the model's chat template "
                    "(or as raw text with --raw) and print only the completion on stdout.",
    )
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--raw", action="store_true", help="send the prompt as-is, without the chat template")
    gen.add_argument("--max-tokens", type=int, default=128, help="maximum new tokens (default 128)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="0 = off")
    add_engine_args(gen)

    srv = sub.add_parser(
        "serve",
        help="serve a model over OpenAI- and Anthropic-compatible HTTP APIs",
        description="Start the HTTP server: OpenAI's /v1/chat/completions, /v1/completions and "
                    "/v1/responses, Anthropic's /v1/messages (and /v1/messages/count_tokens), plus "
                    "/v1/models, /health, /metrics, /tokenize, /detokenize. Reasoning (<think>) and tool "
                    "calls are parsed from the model's output in all of them. The engine runs in its own "
                    "process; tensor-parallel ranks in further processes. Ctrl-C or SIGTERM drains "
                    "in-flight requests (up to --drain-timeout) and stops everything.",
    )
    add_serve_args(srv)

    from agentspeed.entrypoints.replicas import add_launch_args

    launch_p = sub.add_parser(
        "launch",
        help="serve N engine replicas behind the Shepherd Model Gateway (SMG), in one command",
        description="Start N `agentspeed serve` replicas (each pinned to its share of the CPU cores, or "
                    "to its own GPUs), wait until they are healthy, and put SMG in front of them on --port: "
                    "over gRPC by default (the gateway tokenizes, applies the chat template, parses tools "
                    "and reasoning, and routes each session to the replica holding its prefix, from the "
                    "replicas' KV events). A replica that dies is restarted with a bounded backoff while "
                    "the gateway routes around it; Ctrl-C or SIGTERM stops the gateway and drains the "
                    "replicas. The session key (X-SMG-Routing-Key) keeps a session on one replica.",
    )
    add_launch_args(launch_p)
    add_serve_args(launch_p, with_address=False)

    from agentspeed.bench.main import add_bench_args

    bench = sub.add_parser(
        "bench",
        help="replay agent sessions against OpenAI-compatible endpoints (closed loop)",
        description="Closed-loop replay of multi-turn agent sessions (trie, Mooncake or real agent "
                    "trajectories) against one or more OpenAI-compatible endpoints, sweeping the number "
                    "of sessions in flight. Reports per-user decode tok/s, TTFT, prefix-cache hit rate and "
                    "tokens/min per device; writes JSON and a Pareto plot.",
    )
    add_bench_args(bench)
    return parser


def _run_generate(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from agentspeed import launch
    from agentspeed.engine.llm import LLM
    from agentspeed.sampling_params import SamplingParams

    rank = launch.worker_rank()
    port = launch.tp_port()
    workers = launch.spawn_workers(args.tp, port, ["-m", "agentspeed.cli", *argv]) if rank == 0 else []
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature,
            top_p=args.top_p, top_k=args.top_k, seed=args.seed,
        )
        # Every tensor-parallel rank runs this same program (SPMD); only rank 0 prints.
        llm = LLM(engine_config=engine_config(args, rank, port))
        if args.raw:
            [out] = llm.generate(args.prompt, params)
        else:
            [out] = llm.chat([{"role": "user", "content": args.prompt}], params)
        if rank == 0:
            print(out.outputs[0].text, flush=True)
        llm.shutdown()
    except BaseException:
        for w in workers:
            w.kill()
        raise
    launch.reap(workers)
    failed = [w.returncode for w in workers if w.returncode]
    return 1 if failed else 0


def _run_serve(args: argparse.Namespace) -> int:
    import asyncio

    from agentspeed.engine.async_llm import AsyncLLM
    from agentspeed.entrypoints.openai.api_server import build_app, serve_forever
    from agentspeed.entrypoints.openai.metrics import Metrics
    from agentspeed.entrypoints.openai.serving import ServerState
    from agentspeed.entrypoints.parsers.select import default_reasoning_parser, default_tool_parser

    names = args.served_model_name or []
    if args.model_path is None and any(os.path.exists(n) for n in names):
        raise ConfigError(f"--served-model-name took the model path as a name ({' '.join(names)}): put MODEL "
                          "before the flag, or write --served-model-name=NAME")
    if args.model_path is not None:
        if args.model is not None and args.model != args.model_path:
            raise ConfigError("give the model once: as MODEL or as --model")
        args.model = args.model_path
    template = args.chat_template
    if template is not None and os.path.isfile(template):
        with open(template) as f:
            template = f.read()
    cfg = engine_config(args)  # fails here, before any process starts, on a bad combination
    kv_events = args.grpc_port is not None and cfg.scheduling.enable_prefix_caching
    if kv_events:  # the gRPC worker streams them to the gateway's cache-aware router
        cfg = dataclasses.replace(cfg, scheduling=dataclasses.replace(cfg.scheduling, kv_events=True))

    async def run() -> None:
        engine = await AsyncLLM.start(cfg, served_model_name=names[0] if names else None,
                                      chat_template=template, max_queue=args.max_queue,
                                      log_level=args.log_level)
        grpc_worker = None
        try:
            assert engine.info is not None and engine.tokenizer is not None
            name = engine.info.model_name
            tmpl = getattr(engine.tokenizer.hf, "chat_template", None)
            tmpl = tmpl if isinstance(tmpl, str) else None
            parser = args.tool_call_parser or default_tool_parser(tmpl)
            reasoning = (default_reasoning_parser(tmpl) if args.reasoning_parser == "auto" else
                         None if args.reasoning_parser == "none" else args.reasoning_parser)
            state = ServerState(engine, name, Metrics(name, lambda: engine.stats), parser,
                                args.enable_test_hooks, args.api_key, reasoning,
                                tuple(names[1:]) + tuple(args.model_alias), args.responses_store_size,
                                kv_events)
            info = engine.info
            kv_tokens = (info.num_pages - 1) * info.page_size
            k = info.num_speculative_tokens
            spec = f"n-gram drafts up to {k}{' adaptive' if args.adaptive_drafts else ''}" if k else "no speculation"
            print(f"agentspeed: serving {name} on http://{args.host}:{args.port}/v1 (context "
                  f"{info.max_model_len}, KV cache {kv_tokens} tokens at {info.kv_bytes_per_token} "
                  f"bytes/token, {spec}, overlap {'on' if info.overlap else 'off'}, tool parser {parser}, "
                  f"reasoning parser {reasoning or 'none'})",
                  file=sys.stderr, flush=True)
            if info.linear_note:
                print(f"agentspeed: {info.linear_note}", file=sys.stderr, flush=True)
            if args.grpc_port is not None:
                from agentspeed.entrypoints.grpc.servicer import GrpcWorker

                grpc_worker = await GrpcWorker.start(state, args.host, args.grpc_port)
                print(f"agentspeed: gRPC worker (tokenspeed.grpc.scheduler.TokenSpeedScheduler) on "
                      f"{args.host}:{args.grpc_port}, KV events {'on' if kv_events else 'off'}",
                      file=sys.stderr, flush=True)
            try:
                await serve_forever(build_app(state), args.host, args.port, args.drain_timeout,
                                    args.log_level if args.log_level != "warning" else "info")
            finally:
                if grpc_worker is not None:
                    await grpc_worker.stop(args.drain_timeout)
        finally:
            await engine.shutdown(args.drain_timeout)

    asyncio.run(run())
    return 0


def serve_argv(args: argparse.Namespace) -> list[str]:
    """The `serve` options set in args (those that differ from their defaults) as a command
    line: what `launch` passes to each replica."""
    p = argparse.ArgumentParser()
    add_serve_args(p, with_address=False)
    out: list[str] = []
    for a in p._actions:
        if not a.option_strings or a.dest in ("help", "model_path"):
            continue
        v = getattr(args, a.dest, a.default)
        if v == a.default:
            continue
        if isinstance(a, argparse._StoreConstAction):  # --overlap / --no-overlap share a dest
            flag = next(x.option_strings[0] for x in p._actions if x.dest == a.dest and x.const == v)
            if flag not in out:
                out.append(flag)
            continue
        flag = a.option_strings[0]
        if isinstance(a, argparse._AppendAction):
            for x in v:
                out += [flag, str(x)]
        elif isinstance(v, list):
            out += [flag, *map(str, v)]
        else:
            out += [flag, str(v)]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, getattr(args, "log_level", "warning").upper()), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if args.command == "generate":
            return _run_generate(args, argv)
        if args.command == "serve":
            return _run_serve(args)
        if args.command == "launch":
            from agentspeed.entrypoints.replicas import run_launch

            return run_launch(args, serve_argv(args))
        if args.command == "bench":
            from agentspeed.bench.main import run_bench

            return run_bench(args)
    except AgentspeedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
