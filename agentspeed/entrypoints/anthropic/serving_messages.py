"""POST /v1/messages and /v1/messages/count_tokens.

Content blocks are built from the output pipeline's events by one builder, used by the
stream (as Anthropic's SSE events) and by the non-streaming response (its final blocks),
so both carry the same content: thinking, text and tool_use blocks in the order the model
wrote them."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from agentspeed.engine.output_processor import RequestDelta
from agentspeed.entrypoints.anthropic.protocol import (
    CountTokensRequest,
    MessagesRequest,
    template_kwargs,
    template_messages,
    template_tools,
)
from agentspeed.entrypoints.errors import APIError
from agentspeed.entrypoints.openai.serving import (
    RunStats,
    ServerState,
    collect,
    make_params,
    output_setup,
    run_request,
    token_budget,
    with_first,
)
from agentspeed.entrypoints.parsers.output import (
    Event,
    OutputParser,
    Reasoning,
    Text,
    ToolCallArgs,
    ToolCallStart,
)
from agentspeed.entrypoints.prompt import render
from agentspeed.entrypoints.structured import (
    forced_tool_calls,
    from_response_format,
    one_constraint,
)

log = logging.getLogger("agentspeed.server")


def _prompt(state: ServerState, req: MessagesRequest) -> tuple[list[int], list[dict[str, Any]] | None]:
    tok = state.tokenizer()
    messages = template_messages(req)
    tools = template_tools(req)
    prefill = messages[-1]["role"] == "assistant"  # Anthropic's prefill: continue that message
    kw = template_kwargs(req)
    if prefill:
        kw["continue_final_message"] = True
    return render(tok, messages, tools, not prefill, **kw), tools


async def count_tokens(state: ServerState, req: CountTokensRequest) -> dict[str, Any]:
    state.check_model(req.model)
    prompt, _ = _prompt(state, req)
    return {"input_tokens": len(prompt)}


class Blocks:
    """Events -> content blocks, and the SSE events that build them."""

    def __init__(self) -> None:
        self.blocks: list[dict[str, Any]] = []
        self.kind: str | None = None  # type of the open block
        self.args: list[str] = []  # tool_use blocks' arguments text, in block order
        self.tool_block: dict[int, int] = {}  # tool call index -> block index

    def on(self, events: list[Event]) -> list[tuple[str, dict[str, Any]]]:
        out: list[tuple[str, dict[str, Any]]] = []
        for e in events:
            if isinstance(e, Text | Reasoning):
                kind = "text" if isinstance(e, Text) else "thinking"
                if self.kind != kind:
                    out += self._open({"type": "text", "text": ""} if kind == "text" else
                                      {"type": "thinking", "thinking": "", "signature": ""})
                b = self.blocks[-1]
                b[kind] += e.text
                delta = {"type": "text_delta", "text": e.text} if kind == "text" else \
                    {"type": "thinking_delta", "thinking": e.text}
                out.append(("content_block_delta", {"type": "content_block_delta", "index": len(self.blocks) - 1,
                                                    "delta": delta}))
            elif isinstance(e, ToolCallStart):
                out += self._open({"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": e.name,
                                   "input": {}})
                self.tool_block[e.index] = len(self.blocks) - 1
            else:
                assert isinstance(e, ToolCallArgs)
                k = self.tool_block[e.index]
                self.blocks[k].setdefault("_args", "")
                self.blocks[k]["_args"] += e.delta
                out.append(("content_block_delta", {"type": "content_block_delta", "index": k,
                                                    "delta": {"type": "input_json_delta", "partial_json": e.delta}}))
        return out

    def close(self) -> list[tuple[str, dict[str, Any]]]:
        out = self._close()
        for b in self.blocks:
            if b["type"] == "tool_use":
                raw = b.pop("_args", "")
                try:
                    args = json.loads(raw) if raw.strip() else {}
                except json.JSONDecodeError:
                    args = None
                if not isinstance(args, dict):
                    log.warning("tool call %s: arguments are not a JSON object: %.200r", b["name"], raw)
                    args = {}
                b["input"] = args
        return out

    @property
    def has_tool_use(self) -> bool:
        return bool(self.tool_block)

    def _open(self, block: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        out = self._close()
        self.blocks.append(block)
        self.kind = block["type"]
        start = {k: v for k, v in block.items() if not k.startswith("_")}
        out.append(("content_block_start", {"type": "content_block_start", "index": len(self.blocks) - 1,
                                            "content_block": start}))
        return out

    def _close(self) -> list[tuple[str, dict[str, Any]]]:
        if self.kind is None:
            return []
        self.kind = None
        return [("content_block_stop", {"type": "content_block_stop", "index": len(self.blocks) - 1})]


def _stop(stats: RunStats, stop_reason: int | str | None, tool_use: bool) -> tuple[str, str | None]:
    if stats.finish_reasons.get(0) == "length":  # a call cut off here may not parse
        return "max_tokens", None
    if tool_use:
        return "tool_use", None
    if isinstance(stop_reason, str):
        return "stop_sequence", stop_reason
    return "end_turn", None


def _usage(stats: RunStats) -> dict[str, Any]:
    return {"input_tokens": stats.prompt_tokens - stats.cached_tokens, "output_tokens": stats.completion_tokens,
            "cache_read_input_tokens": stats.cached_tokens, "cache_creation_input_tokens": 0}


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


async def create_message(state: ServerState, req: MessagesRequest, raw: Request) -> Any:
    state.check_model(req.model)
    prompt, tools = _prompt(state, req)
    functions = [t["function"] for t in tools] if tools else None
    choice = req.tool_choice
    forced = None
    if choice is not None and choice.type in ("any", "tool"):
        forced = forced_tool_calls(functions or [], choice.name if choice.type == "tool" else None,
                                   not choice.disable_parallel_tool_use)
    fmt = req.output_config.format if req.output_config is not None else None
    constraint = one_constraint(("output_config.format", from_response_format(fmt, "output_config.format")),
                                ("output_format", from_response_format(req.output_format, "output_format")),
                                ("tool_choice", forced))
    setup = output_setup(state, functions, prompt, constrained=constraint is not None, forced=forced is not None)
    params = make_params(
        max_tokens=token_budget(state, len(prompt), req.max_tokens, "messages", "max_tokens"),
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
        stop=list(req.stop_sequences or []), skip_special_tokens=setup.skip_special_tokens,
        structured_outputs=constraint)
    mid = f"msg_{uuid.uuid4().hex[:24]}"
    stats = RunStats(len(prompt))
    session = req.metadata.user_id if req.metadata is not None else None
    gen = run_request(state, mid, prompt, params, raw, stats, req.agentspeed_test_output, session=session)
    head = {"id": mid, "type": "message", "role": "assistant", "model": req.model}
    if req.stream:
        first = await anext(gen)  # errors before the first token are still plain HTTP errors
        return StreamingResponse(_stream(state, head, gen, first, stats, setup.new()), media_type="text/event-stream")
    deltas = await collect(raw, gen)
    parser, blocks = setup.new(), Blocks()
    blocks.on(parser.run("".join(d.text for d in deltas)))
    blocks.close()
    stop_reason, seq = _stop(stats, _last_stop(deltas), blocks.has_tool_use)
    return JSONResponse({**head, "content": blocks.blocks, "stop_reason": stop_reason, "stop_sequence": seq,
                         "usage": _usage(stats)})


def _last_stop(deltas: list[RequestDelta]) -> int | str | None:
    return next((d.stop_reason for d in reversed(deltas) if d.finish_reason is not None), None)


async def _stream(state: ServerState, head: dict[str, Any], gen: AsyncIterator[RequestDelta], first: RequestDelta,
                  stats: RunStats, parser: OutputParser) -> AsyncIterator[str]:
    blocks = Blocks()
    stop: int | str | None = None
    yield _sse("message_start", {"type": "message_start", "message": {
        **head, "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {**_usage(stats), "output_tokens": 0}}})
    yield _sse("ping", {"type": "ping"})

    try:
        async for d in with_first(first, gen):
            events = parser.feed(d.text)
            if d.finish_reason is not None:
                events += parser.finish()
                stop = d.stop_reason
            for name, data in blocks.on(events):
                yield _sse(name, data)
        for name, data in blocks.close():
            yield _sse(name, data)
    except Exception as e:  # after the 200 went out, errors travel in the stream
        err = e if isinstance(e, APIError) else APIError(500, f"internal error: {type(e).__name__}: {e}")
        yield _sse("error", err.anthropic_body())
        return
    stop_reason, seq = _stop(stats, stop, blocks.has_tool_use)
    yield _sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": seq},
                                 "usage": _usage(stats)})
    yield _sse("message_stop", {"type": "message_stop"})
