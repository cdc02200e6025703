"""POST /v1/chat/completions: chat template, tools, reasoning, streaming (SSE) and not.

Reasoning goes to `reasoning_content`; tool calls stream as OpenAI's tool_call deltas (the
id, type and name first, then argument pieces) as soon as the model writes them."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from agentspeed.entrypoints.openai.protocol import ChatCompletionRequest, NamedToolChoice
from agentspeed.entrypoints.openai.serving import (
    SSE_DONE,
    OutputSetup,
    RunStats,
    ServerState,
    chat_logprobs,
    collect,
    new_id,
    output_setup,
    request_constraint,
    run_request,
    sampling_params,
    sse,
    with_first,
)
from agentspeed.entrypoints.parsers.output import (
    Event,
    OutputParser,
    Reasoning,
    Text,
    ToolCallStart,
)
from agentspeed.entrypoints.prompt import render
from agentspeed.entrypoints.structured import forced_tool_calls


def _tools(req: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    if not req.tools or req.tool_choice == "none":
        return None
    return [t.model_dump(exclude_none=True) for t in req.tools]


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


async def create_chat_completion(state: ServerState, req: ChatCompletionRequest, raw: Request) -> Any:
    state.check_model(req.model)
    tok = state.tokenizer("use /v1/completions with token ids")
    tools = _tools(req)
    prompt = render(tok, [m.to_template() for m in req.messages], tools,
                    req.add_generation_prompt and not req.continue_final_message, **(req.chat_template_kwargs or {}))
    functions = [t["function"] for t in tools] if tools else None
    forced = None
    if req.tool_choice == "required" or isinstance(req.tool_choice, NamedToolChoice):
        name = req.tool_choice.name if isinstance(req.tool_choice, NamedToolChoice) else None
        forced = forced_tool_calls(functions or [], name, req.parallel_tool_calls)
    constraint = request_constraint(req, ("tool_choice", forced))
    setup = output_setup(state, functions, prompt, constrained=constraint is not None, forced=forced is not None)
    top = req.top_logprobs or 0
    params = sampling_params(req, len(prompt), state, req.max_completion_tokens or req.max_tokens,
                             top if req.logprobs else None, setup.skip_special_tokens, constraint)
    rid = new_id("chatcmpl")
    stats = RunStats(len(prompt))
    gen = run_request(state, rid, prompt, params, raw, stats, req.agentspeed_test_output,
                      cache_salt=req.cache_salt, priority=req.priority)
    if req.stream:
        first = await anext(gen)  # errors before the first token are still plain HTTP errors
        return StreamingResponse(_stream(state, req, rid, gen, first, stats, setup, top),
                                 media_type="text/event-stream")
    deltas = await collect(raw, gen)
    texts: dict[int, str] = {}
    lps: dict[int, list[Any]] = {}
    stop: dict[int, Any] = {}
    for d in deltas:
        texts[d.index] = texts.get(d.index, "") + d.text
        if d.logprobs:
            lps.setdefault(d.index, []).extend(d.logprobs)
        if d.finish_reason is not None:
            stop[d.index] = d.stop_reason
    choices = []
    for i in range(req.n):
        out = setup.new().parse(texts.get(i, ""))
        finish = stats.finish_reasons.get(i, "abort")
        msg: dict[str, Any] = {"role": "assistant", "content": out.content}
        if out.reasoning:
            msg["reasoning_content"] = out.reasoning
        if out.calls:
            msg["content"] = out.content if out.content.strip() else None
            msg["tool_calls"] = [{"id": call_id(), "type": "function", "function": {"name": n, "arguments": a}}
                                 for n, a in out.calls]
            # A call cut off by max_tokens stays "length": its arguments may not parse.
            finish = "tool_calls" if finish == "stop" else finish
        choice: dict[str, Any] = {"index": i, "message": msg, "logprobs": None, "finish_reason": finish,
                                  "stop_reason": stop.get(i)}
        if req.logprobs:
            choice["logprobs"] = {"content": chat_logprobs(state, lps.get(i, []), top)}
        choices.append(choice)
    return JSONResponse({"id": rid, "object": "chat.completion", "created": int(time.time()),
                         "model": state.model_name, "choices": choices, "usage": stats.usage()})


def _delta(e: Event) -> dict[str, Any]:
    if isinstance(e, Text):
        return {"content": e.text}
    if isinstance(e, Reasoning):
        return {"reasoning_content": e.text}
    if isinstance(e, ToolCallStart):
        return {"tool_calls": [{"index": e.index, "id": call_id(), "type": "function",
                                "function": {"name": e.name, "arguments": ""}}]}
    return {"tool_calls": [{"index": e.index, "function": {"arguments": e.delta}}]}


async def _stream(state: ServerState, req: ChatCompletionRequest, rid: str, gen: AsyncIterator[Any], first: Any,
                  stats: RunStats, setup: OutputSetup, top: int) -> AsyncIterator[str]:
    created = int(time.time())
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name}

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> str:
        return sse({**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish}]})

    parsers: list[OutputParser] = [setup.new() for _ in range(req.n)]
    called = [False] * req.n
    for i in range(req.n):
        yield chunk(i, {"role": "assistant", "content": ""})

    try:
        async for d in with_first(first, gen):
            i = d.index
            lp = {"content": chat_logprobs(state, d.logprobs, top)} if req.logprobs and d.logprobs else None
            events = parsers[i].feed(d.text)
            if d.finish_reason is not None:
                events += parsers[i].finish()
            for k, e in enumerate(events):
                called[i] |= isinstance(e, ToolCallStart)
                yield chunk(i, _delta(e), None, lp if k == 0 else None)
            if not events and lp:
                yield chunk(i, {"content": ""}, None, lp)
            if d.finish_reason is not None:
                yield chunk(i, {}, "tool_calls" if called[i] and d.finish_reason == "stop" else d.finish_reason)
    except Exception as e:  # after the 200 went out, errors travel in the stream
        status = getattr(e, "status", 500)
        message = getattr(e, "message", str(e))
        yield sse({"error": {"message": message, "type": "internal_server_error", "param": None,
                             "code": status}})
        return
    if req.stream_options is not None and req.stream_options.include_usage:
        yield sse({**base, "choices": [], "usage": stats.usage()})
    yield SSE_DONE
