"""POST /v1/chat/completions: chat template, tools, streaming (SSE) and non-streaming."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from agentspeed.entrypoints.openai.protocol import APIError, ChatCompletionRequest
from agentspeed.entrypoints.openai.serving import (
    SSE_DONE,
    RunStats,
    ServerState,
    chat_logprobs,
    collect,
    new_id,
    run_request,
    sampling_params,
    sse,
)
from agentspeed.entrypoints.openai.tool_parsers import TOOL_PARSERS, ToolParser
from agentspeed.errors import ConfigError


def _prompt(state: ServerState, req: ChatCompletionRequest) -> list[int]:
    tok = state.tokenizer("use /v1/completions with token ids")
    messages = [m.to_template() for m in req.messages]
    tools = None
    if req.tools and req.tool_choice != "none":
        tools = [t.model_dump(exclude_none=True) for t in req.tools]
    try:
        return tok.apply_chat_template(
            messages, req.add_generation_prompt and not req.continue_final_message, tools=tools,
            **(req.chat_template_kwargs or {}),
        )
    except (ConfigError, ValueError) as e:
        raise APIError(400, str(e), param="messages") from None


def _parser(state: ServerState, req: ChatCompletionRequest) -> ToolParser | None:
    if not req.tools or req.tool_choice == "none":
        return None
    return TOOL_PARSERS[state.tool_parser]()


async def create_chat_completion(state: ServerState, req: ChatCompletionRequest, raw: Request) -> Any:
    state.check_model(req.model)
    prompt = _prompt(state, req)
    top = req.top_logprobs or 0
    params = sampling_params(req, len(prompt), state, req.max_completion_tokens or req.max_tokens,
                             top if req.logprobs else None)
    rid = new_id("chatcmpl")
    stats = RunStats(len(prompt))
    gen = run_request(state, rid, prompt, params, raw, stats, req.agentspeed_test_output,
                      cache_salt=req.cache_salt, priority=req.priority)
    parser = _parser(state, req)
    if req.stream:
        first = await anext(gen)  # errors before the first token are still plain HTTP errors
        return StreamingResponse(_stream(state, req, rid, gen, first, stats, parser, top),
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
        text = texts.get(i, "")
        msg: dict[str, Any] = {"role": "assistant", "content": text}
        finish = stats.finish_reasons.get(i, "abort")
        if parser is not None:
            content, calls = parser.parse(text)
            if calls:
                msg = {"role": "assistant", "content": content, "tool_calls": calls}
                finish = "tool_calls"
        choice: dict[str, Any] = {"index": i, "message": msg, "logprobs": None, "finish_reason": finish,
                                  "stop_reason": stop.get(i)}
        if req.logprobs:
            choice["logprobs"] = {"content": chat_logprobs(state, lps.get(i, []), top)}
        choices.append(choice)
    return JSONResponse({"id": rid, "object": "chat.completion", "created": int(time.time()),
                         "model": state.model_name, "choices": choices, "usage": stats.usage()})


async def _stream(state: ServerState, req: ChatCompletionRequest, rid: str, gen: AsyncIterator[Any], first: Any,
                  stats: RunStats, parser: ToolParser | None, top: int) -> AsyncIterator[str]:
    created = int(time.time())
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name}

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> str:
        return sse({**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish}]})

    for i in range(req.n):
        yield chunk(i, {"role": "assistant", "content": ""})
    # With tools: content streams until a tool-call section may begin; the rest is held
    # and parsed when the sample finishes.
    full: dict[int, str] = {}
    shown: dict[int, int] = {}

    async def deltas() -> AsyncIterator[Any]:
        yield first
        async for d in gen:
            yield d

    try:
        async for d in deltas():
            i = d.index
            lp = {"content": chat_logprobs(state, d.logprobs, top)} if req.logprobs and d.logprobs else None
            if parser is None:
                if d.text or lp:
                    yield chunk(i, {"content": d.text}, None, lp)
            else:
                full[i] = text = full.get(i, "") + d.text
                start = parser.tools_start(text)
                upto = len(text) if start is None else start
                if upto > shown.get(i, 0):
                    yield chunk(i, {"content": text[shown.get(i, 0) : upto]}, None, lp)
                    shown[i] = upto
            if d.finish_reason is not None:
                finish = d.finish_reason
                if parser is not None:
                    text = full.get(i, "")
                    _, calls = parser.parse(text)
                    if calls:
                        finish = "tool_calls"
                        tool_deltas = [{"index": k, **c} for k, c in enumerate(calls)]
                        yield chunk(i, {"tool_calls": tool_deltas})
                    elif len(text) > shown.get(i, 0):
                        yield chunk(i, {"content": text[shown.get(i, 0) :]})
                yield chunk(i, {}, finish)
    except Exception as e:  # after the 200 went out, errors travel in the stream
        status = getattr(e, "status", 500)
        message = getattr(e, "message", str(e))
        yield sse({"error": {"message": message, "type": "internal_server_error", "param": None,
                             "code": status}})
        return
    if req.stream_options is not None and req.stream_options.include_usage:
        yield sse({**base, "choices": [], "usage": stats.usage()})
    yield SSE_DONE
