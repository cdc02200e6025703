"""Per-streamed-token cost of rendering each API's stream: chat completions, Anthropic
messages and OpenAI responses, in process (no HTTP, no engine).

A recorded token stream (SmolLM2's tokenizer, real text; optionally ending in a tool call
whose arguments are long) is fed to each endpoint's SSE generator as the engine's deltas
would arrive, one token per delta; the time per token is what the API path adds on the
server's event loop for that token: output parsing plus building and serialising events.
The messages and responses figures are compared with chat completions' (goal: < 0.2 ms
added per token).

    .venv/bin/python benchmarks/serving/bench_api_stream.py [--tokens 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

from agentspeed.engine.output_processor import RequestDelta
from agentspeed.entrypoints.anthropic import serving_messages
from agentspeed.entrypoints.openai import serving_chat, serving_responses
from agentspeed.entrypoints.openai.protocol import ChatCompletionRequest
from agentspeed.entrypoints.openai.protocol_responses import ResponsesRequest
from agentspeed.entrypoints.openai.serving import RunStats, ServerState, output_setup
from agentspeed.model_source import default_model_path
from agentspeed.tokenizer import _gguf_tokenizer

TEXT = ("The function reads the configuration file, validates every field against the schema and "
        "returns a typed object; errors name the field and the line. ")
TOOL = {"name": "write_file", "description": "Write a file",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}}}}


def token_pieces(hf: Any, text: str) -> list[str]:
    return [hf.decode([i]) for i in hf.encode(text, add_special_tokens=False)]


def stream_of(pieces: list[str]) -> tuple[RequestDelta, AsyncIterator[RequestDelta]]:
    deltas = [RequestDelta(0, p, [k]) for k, p in enumerate(pieces)]
    deltas[-1].finish_reason = "stop"

    async def rest() -> AsyncIterator[RequestDelta]:
        for d in deltas[1:]:
            yield d

    return deltas[0], rest()


async def drain(agen: AsyncIterator[str]) -> int:
    return sum([len(chunk) async for chunk in agen])


def runners(state: ServerState, tools: bool, prompt: list[int]) -> dict[str, Callable[[list[str]], AsyncIterator[str]]]:
    msgs = [{"role": "user", "content": "hi"}]
    chat_req = ChatCompletionRequest(model="m", messages=msgs, stream=True,
                                     tools=[{"type": "function", "function": TOOL}] if tools else None)
    resp_req = ResponsesRequest(model="m", input="hi", stream=True,
                                tools=[{"type": "function", **TOOL}] if tools else None)
    setup = output_setup(state, [TOOL] if tools else None, prompt)

    def chat(pieces: list[str]) -> AsyncIterator[str]:
        first, rest = stream_of(pieces)
        return serving_chat._stream(state, chat_req, "id", rest, first, RunStats(10), setup, 0)

    def messages(pieces: list[str]) -> AsyncIterator[str]:
        first, rest = stream_of(pieces)
        return serving_messages._stream(state, {"id": "m"}, rest, first, RunStats(10), setup.new())

    def responses(pieces: list[str]) -> AsyncIterator[str]:
        first, rest = stream_of(pieces)
        head = serving_responses._head(state, resp_req, "resp")
        return serving_responses._stream(state, resp_req, head, [], rest, first, RunStats(10), setup.new(), set())

    return {"chat": chat, "messages": messages, "responses": responses}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    hf = _gguf_tokenizer(default_model_path())
    tok = SimpleNamespace(encode=lambda s, add_special_tokens=False: hf.encode(s, add_special_tokens=False),
                          decode=lambda ids, skip_special_tokens=False: hf.decode(ids))
    state = ServerState(SimpleNamespace(tokenizer=tok), "m", SimpleNamespace(), "hermes",  # type: ignore[arg-type]
                        reasoning_parser="qwen3", responses_store_size=4)
    text = token_pieces(hf, TEXT * (args.tokens // 20))[: args.tokens]
    half = text[: args.tokens // 2]
    # a tool call writing a file: its arguments are about --tokens tokens long
    body = json.dumps({"name": "write_file", "arguments": {"path": "src/app.py",
                                                           "content": TEXT * (args.tokens // 25)}})
    call = token_pieces(hf, f"Writing it.\n<tool_call>\n{body}\n</tool_call>")
    cases = {"text": (False, text), "reasoning+text": (False, ["<think>", *half, "</think>", *half]),
             "tool call": (True, call)}
    print(f"# {sys.argv[0]} --tokens {args.tokens} --repeats {args.repeats}")
    print(f"{'case':16} {'tokens':>6} {'chat us/tok':>12} {'messages':>10} {'responses':>10} "
          f"{'+msg us':>8} {'+resp us':>9}")
    for name, (tools, pieces) in cases.items():
        run = runners(state, tools, hf.encode("<|im_start|>assistant\n", add_special_tokens=False))
        per: dict[str, float] = {}
        for api in ("chat", "messages", "responses"):
            times = []
            for _ in range(args.repeats):  # APIs take turns within one repeat set; median kept
                t0 = time.perf_counter()
                asyncio.run(drain(run[api](pieces)))
                times.append((time.perf_counter() - t0) / len(pieces) * 1e6)
            per[api] = statistics.median(times)
        print(f"{name:16} {len(pieces):>6} {per['chat']:>12.1f} {per['messages']:>10.1f} {per['responses']:>10.1f} "
              f"{per['messages'] - per['chat']:>+8.1f} {per['responses'] - per['chat']:>+9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
