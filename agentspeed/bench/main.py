"""`agentspeed bench`: closed-loop replay of agent sessions against OpenAI-compatible endpoints,
a concurrency sweep per endpoint, a JSON report, a table and a Pareto plot."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
from typing import Any

from agentspeed.bench.client import RequestRecord
from agentspeed.bench.report import plot_pareto, print_table, summarize
from agentspeed.bench.runner import Endpoint, run_level
from agentspeed.bench.workloads import Session, Turn, load_sessions


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", action="append", required=True, metavar="[LABEL=]URL",
                   help="server base URL, e.g. http://127.0.0.1:8000 (repeat to compare endpoints; "
                        "LABEL names the curve)")
    p.add_argument("--workload", required=True,
                   help="trie .jsonl, Mooncake .jsonl (with hash_ids), or agent trajectories (.traj.json or a "
                        "directory of them)")
    p.add_argument("--scale", type=float, default=16.0,
                   help="divide token lengths (and message text) by this (default 16)")
    p.add_argument("--max-context", type=int, default=8192,
                   help="end a session before a turn whose prompt + output exceeds this (default 8192)")
    p.add_argument("--concurrency", default="1,2,4,8", help="sessions in flight, comma-separated sweep")
    p.add_argument("--num-sessions", type=int, default=16, help="sessions replayed per level (default 16)")
    p.add_argument("--max-turns", type=int, default=None, help="cap turns per session")
    p.add_argument("--duration", type=float, default=None, help="seconds per level after which no new session starts")
    p.add_argument("--delay-scale", type=float, default=0.0,
                   help="multiply the recorded tool times between turns (default 0: back to back)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="model name sent in requests (default: the endpoint's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--prompt-format", default="tokens", choices=["tokens", "text"],
                   help="token workloads (trie, Mooncake): send token ids (default), or their text decoded "
                        "with --tokenizer, for gateways that take only text on /v1/completions (SMG)")
    p.add_argument("--tokenizer", default=None, metavar="MODEL",
                   help="model directory or .gguf whose tokenizer --prompt-format text uses "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--devices", type=int, default=1, help="devices behind each endpoint, for tokens/min per device")
    p.add_argument("--output", default=None, help="write all results as JSON here")
    p.add_argument("--plot", default=None, help="write the Pareto plot (PNG) here")


def _endpoints(specs: list[str], model: str | None, api_key: str | None) -> list[Endpoint]:
    out = []
    for spec in specs:
        label, sep, url = spec.partition("=")
        if not sep:
            label, url = spec, spec
        out.append(Endpoint(label, url.rstrip("/").removesuffix("/v1"), model, api_key))
    return out


def _fresh(sessions: list[Session], level: int, args: argparse.Namespace) -> list[Session]:
    """The sessions with content unique to this level, so a level cannot hit the prefix cache
    filled by an earlier one."""
    if sessions[0].kind == "tokens":
        return load_sessions(args.workload, args.scale, args.max_context, args.num_sessions,
                             args.seed + 7919 * level, args.max_turns)
    out = []
    for s in sessions:
        turns = []
        for t in s.turns:
            assert t.messages is not None
            first = {**t.messages[0], "content": f"[replay {args.seed}-{level}] " + t.messages[0]["content"]}
            turns.append(Turn(t.output_tokens, t.delay_s, messages=[first, *t.messages[1:]]))
        out.append(Session(s.session_id, turns))
    return out


async def _model_of(ep: Endpoint) -> str | None:
    import httpx

    try:
        async with httpx.AsyncClient(timeout=30) as h:
            r = await h.get(f"{ep.url}/v1/models")
            return str(r.json()["data"][0]["id"])
    except (httpx.HTTPError, KeyError, IndexError, ValueError):
        return None


def run_bench(args: argparse.Namespace) -> int:
    from rich.progress import Progress, TaskID

    text_tok = None
    if args.prompt_format == "text":
        from agentspeed.model_source import resolve_model
        from agentspeed.tokenizer import Tokenizer

        text_tok = Tokenizer.load(resolve_model(args.tokenizer))

    levels = [int(x) for x in str(args.concurrency).split(",") if x.strip()]
    base = load_sessions(args.workload, args.scale, args.max_context, args.num_sessions, args.seed, args.max_turns)
    n_req = sum(len(s.turns) for s in base)
    print(f"workload {args.workload}: {len(base)} sessions, {n_req} requests, kind {base[0].kind}, "
          f"scale 1/{args.scale:g}, max context {args.max_context}", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    for ep in _endpoints(args.endpoint, args.model, args.api_key):
        ep.text_tokenizer = text_tok
        if ep.model is None:
            ep.model = asyncio.run(_model_of(ep))
        for i, c in enumerate(levels):
            sessions = _fresh(base, i + 1, args)
            total = sum(len(s.turns) for s in sessions)
            with Progress(transient=True) as prog:
                task = prog.add_task(f"{ep.label} C={c}", total=total)

                def advance(_: RequestRecord, prog: Progress = prog, task: TaskID = task) -> None:
                    prog.advance(task)

                recs, wall = asyncio.run(run_level(ep, sessions, c, args.delay_scale, args.duration,
                                                   f"{ep.label}-c{c}", advance))
            row = summarize(ep.label, c, recs, wall, args.devices)
            rows.append(row)
            print(f"{ep.label} C={c}: {row['requests']} requests in {wall:.1f}s, {row['errors']} errors", file=sys.stderr)
            for w, x in row["per_replica"].items():
                hit = "-" if x["eligible_hit_rate"] is None else f"{x['eligible_hit_rate'] * 100:.1f}%"
                print(f"  replica {w}: {x['requests']} requests, eligible hit rate {hit}", file=sys.stderr)
    print_table(rows)
    if args.output:
        meta = {"command": "agentspeed " + " ".join(sys.argv[1:]), "date": datetime.datetime.now().isoformat(
            timespec="seconds"), "workload": args.workload, "scale": args.scale, "max_context": args.max_context}
        with open(args.output, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)
    if args.plot:
        plot_pareto(rows, args.plot, f"{args.workload.rsplit('/', 1)[-1]}, scale 1/{args.scale:g}")
    return 1 if any(r["errors"] for r in rows) else 0
