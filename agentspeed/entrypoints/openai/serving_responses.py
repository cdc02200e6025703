"""POST /v1/responses and GET /v1/responses/{id}: OpenAI's Responses API.

Output items (reasoning, message, function_call / custom_tool_call) are built from the
output pipeline's events by one builder, used by the stream (as typed events with
sequence numbers) and by the non-streaming response, so both carry the same output.
`store` keeps a response, with the conversation that led to it, in a bounded in-memory
store (--responses-store-size; the oldest is dropped first), so a follow-up can send only
its new items with `previous_response_id`. Instructions are not carried over (as OpenAI's
API does)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from agentspeed.engine.output_processor import RequestDelta
from agentspeed.entrypoints.errors import APIError
from agentspeed.entrypoints.openai.protocol_responses import (
    ResponsesRequest,
    template_messages,
    template_tools,
)
from agentspeed.entrypoints.openai.response_store import Stored
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
from agentspeed.entrypoints.prompt import render, template_tool_call
from agentspeed.entrypoints.structured import (
    forced_tool_calls,
    from_response_format,
    one_constraint,
)


def get_response(state: ServerState, rid: str) -> dict[str, Any]:
    try:
        return state.responses.get(rid).response
    except APIError:
        raise APIError(404, f"No response with id '{rid}' is stored here.", param="response_id",
                       code="not_found") from None


def _uid(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


Emitted = list[tuple[str, dict[str, Any]]]


class Items:
    """Events -> output items, and the stream events that build them."""

    def __init__(self, custom_tools: set[str]) -> None:
        self.custom = custom_tools
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None
        self.text: str = ""  # the open item's text (message or reasoning)
        self.tool_item: dict[int, int] = {}  # tool call index -> output index

    def on(self, events: list[Event]) -> Emitted:
        out: Emitted = []
        item: dict[str, Any]
        for e in events:
            if isinstance(e, Text | Reasoning):
                kind = "message" if isinstance(e, Text) else "reasoning"
                if self.open is None or self.open["type"] != kind:
                    out += self._close()
                    item = ({"type": "message", "id": _uid("msg"), "status": "in_progress", "role": "assistant",
                             "content": []} if kind == "message" else
                            {"type": "reasoning", "id": _uid("rs"), "summary": [], "content": [],
                             "status": "in_progress"})
                    out += self._add(item)
                    out.append(("response.content_part.added", {**self._where(), "content_index": 0,
                                                                "part": self._part("")}))
                self.text += e.text
                name = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
                extra: dict[str, Any] = {"logprobs": []} if kind == "message" else {}
                out.append((name, {**self._where(), "content_index": 0, "delta": e.text, **extra}))
            elif isinstance(e, ToolCallStart):
                out += self._close()
                custom = e.name in self.custom
                item = {"type": "custom_tool_call" if custom else "function_call",
                        "id": _uid("ctc" if custom else "fc"), "call_id": _uid("call"), "name": e.name,
                        "input" if custom else "arguments": "", "status": "in_progress"}
                out += self._add(item)
                self.tool_item[e.index] = len(self.output) - 1
            else:
                assert isinstance(e, ToolCallArgs)
                k = self.tool_item[e.index]
                item = self.output[k]
                if item["type"] == "custom_tool_call":  # its input is plain text: sent whole when done
                    item["_args"] = item.get("_args", "") + e.delta
                    continue
                item["arguments"] += e.delta
                out.append(("response.function_call_arguments.delta",
                            {"item_id": item["id"], "output_index": k, "delta": e.delta}))
        return out

    def close(self) -> Emitted:
        return self._close()

    @property
    def has_calls(self) -> bool:
        return bool(self.tool_item)

    def _where(self) -> dict[str, Any]:
        assert self.open is not None
        return {"item_id": self.open["id"], "output_index": len(self.output) - 1}

    def _part(self, text: str) -> dict[str, Any]:
        assert self.open is not None
        if self.open["type"] == "message":
            return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return {"type": "reasoning_text", "text": text}

    def _add(self, item: dict[str, Any]) -> Emitted:
        self.output.append(item)
        self.open, self.text = item, ""
        return [("response.output_item.added", {"output_index": len(self.output) - 1, "item": dict(item)})]

    def _close(self) -> Emitted:
        item = self.open
        if item is None:
            return []
        out: Emitted = []
        where = self._where()
        if item["type"] in ("message", "reasoning"):
            part = self._part(self.text)
            done = "response.output_text.done" if item["type"] == "message" else "response.reasoning_text.done"
            extra: dict[str, Any] = {"logprobs": []} if item["type"] == "message" else {}
            out.append((done, {**where, "content_index": 0, "text": self.text, **extra}))
            out.append(("response.content_part.done", {**where, "content_index": 0, "part": part}))
            item["content"] = [part]
        elif item["type"] == "function_call":
            out.append(("response.function_call_arguments.done",
                        {**where, "name": item["name"], "arguments": item["arguments"]}))
        else:
            raw = item.pop("_args", "")
            try:
                value = json.loads(raw).get("input", "") if raw.strip() else ""
            except (json.JSONDecodeError, AttributeError):
                value = raw
            item["input"] = value if isinstance(value, str) else json.dumps(value)
            out.append(("response.custom_tool_call_input.delta", {**where, "delta": item["input"]}))
            out.append(("response.custom_tool_call_input.done", {**where, "input": item["input"]}))
        item["status"] = "completed"
        out.append(("response.output_item.done", {"output_index": where["output_index"], "item": dict(item)}))
        self.open, self.text = None, ""
        return out


def _history_out(items: Items) -> dict[str, Any]:
    """This response's output as one assistant template message (for previous_response_id)."""
    msg: dict[str, Any] = {"role": "assistant", "content": ""}
    for it in items.output:
        if it["type"] == "message":
            msg["content"] += "".join(p["text"] for p in it["content"])
        elif it["type"] == "reasoning":
            msg["reasoning_content"] = msg.get("reasoning_content", "") + "".join(p["text"] for p in it["content"])
        else:
            args = it["arguments"] if it["type"] == "function_call" else {"input": it["input"]}
            msg.setdefault("tool_calls", []).append(template_tool_call(it["call_id"], it["name"], args))
    return msg


async def create_response(state: ServerState, req: ResponsesRequest, raw: Request) -> Any:
    state.check_model(req.model)
    tok = state.tokenizer()
    history = list(state.responses.get(req.previous_response_id).history) if req.previous_response_id else []
    history += template_messages(req.input)
    system = [{"role": "system", "content": req.instructions}] if req.instructions else []
    tools, custom = template_tools(req)
    prompt = render(tok, system + history, tools, param="input")
    functions = [t["function"] for t in tools] if tools else None
    must_call, name = req.forced_tool
    forced = None
    if must_call:
        if name is not None and name in custom:
            raise APIError(400, f"tool_choice names the custom tool {name!r}; only function tools can be forced",
                           param="tool_choice")
        forced = forced_tool_calls([f for f in functions or [] if f["name"] not in custom], name,
                                   req.parallel_tool_calls is not False)
    fmt = req.text.format.as_dict() if req.text is not None and req.text.format is not None else None
    constraint = one_constraint(("text.format", from_response_format(fmt, "text.format")), ("tool_choice", forced))
    setup = output_setup(state, functions, prompt, constrained=constraint is not None, forced=forced is not None)
    params = make_params(
        max_tokens=token_budget(state, len(prompt), req.max_output_tokens, "input", "max_output_tokens"),
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, skip_special_tokens=setup.skip_special_tokens,
        structured_outputs=constraint)
    rid = _uid("resp")
    stats = RunStats(len(prompt))
    gen = run_request(state, rid, prompt, params, raw, stats, req.agentspeed_test_output,
                      session=req.prompt_cache_key)
    head = _head(state, req, rid)
    if req.stream:
        first = await anext(gen)  # errors before the first token are still plain HTTP errors
        return StreamingResponse(_stream(state, req, head, history, gen, first, stats, setup.new(), custom),
                                 media_type="text/event-stream")
    deltas = await collect(raw, gen)
    items = Items(custom)
    items.on(setup.new().run("".join(d.text for d in deltas)))
    items.close()
    return JSONResponse(_finish(state, req, head, history, items, stats))


def _head(state: ServerState, req: ResponsesRequest, rid: str) -> dict[str, Any]:
    return {"id": rid, "object": "response", "created_at": int(time.time()), "status": "in_progress",
            "model": req.model or state.model_name, "output": [], "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens, "previous_response_id": req.previous_response_id,
            "temperature": req.temperature, "top_p": req.top_p, "tool_choice": req.tool_choice or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "parallel_tool_calls": True if req.parallel_tool_calls is None else req.parallel_tool_calls,
            "store": req.store, "metadata": req.metadata or {},
            "text": {"format": req.text.format.model_dump(by_alias=True, exclude_none=True)
                     if req.text is not None and req.text.format is not None else {"type": "text"}},
            "truncation": "disabled", "error": None, "incomplete_details": None, "usage": None}


def _finish(state: ServerState, req: ResponsesRequest, head: dict[str, Any], history: list[dict[str, Any]],
            items: Items, stats: RunStats) -> dict[str, Any]:
    """The completed response object; stored when asked."""
    tok = state.tokenizer()
    reasoning = "".join(p["text"] for it in items.output if it["type"] == "reasoning" for p in it["content"])
    # Cut off by max_output_tokens, calls included: their arguments may not parse.
    incomplete = stats.finish_reasons.get(0) == "length"
    out = {**head, "status": "incomplete" if incomplete else "completed", "output": items.output,
           "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
           "usage": {"input_tokens": stats.prompt_tokens,
                     "input_tokens_details": {"cached_tokens": stats.cached_tokens},
                     "output_tokens": stats.completion_tokens,
                     # counted by re-tokenizing the reasoning text
                     "output_tokens_details": {"reasoning_tokens": len(tok.encode(reasoning, add_special_tokens=False))
                                               if reasoning else 0},
                     "total_tokens": stats.prompt_tokens + stats.completion_tokens}}
    if req.store:
        state.responses.put(out["id"], Stored(out, [*history, _history_out(items)]))
    return out


async def _stream(state: ServerState, req: ResponsesRequest, head: dict[str, Any], history: list[dict[str, Any]],
                  gen: AsyncIterator[RequestDelta], first: RequestDelta, stats: RunStats, parser: OutputParser,
                  custom: set[str]) -> AsyncIterator[str]:
    seq = 0

    def ev(name: str, data: dict[str, Any]) -> str:
        nonlocal seq
        seq += 1
        body = json.dumps({"type": name, "sequence_number": seq - 1, **data}, ensure_ascii=False)
        return f"event: {name}\ndata: {body}\n\n"

    yield ev("response.created", {"response": head})
    yield ev("response.in_progress", {"response": head})
    items = Items(custom)

    try:
        async for d in with_first(first, gen):
            events = parser.feed(d.text)
            if d.finish_reason is not None:
                events += parser.finish()
            for name, data in items.on(events):
                yield ev(name, data)
        for name, data in items.close():
            yield ev(name, data)
    except Exception as e:  # after the 200 went out, errors travel in the stream
        err = e if isinstance(e, APIError) else APIError(500, f"internal error: {type(e).__name__}: {e}")
        yield ev("error", {"code": err.code or err.type, "message": err.message, "param": err.param})
        yield ev("response.failed", {"response": {**head, "status": "failed", "output": items.output,
                                                  "error": {"code": "server_error", "message": err.message}}})
        return
    done = _finish(state, req, head, history, items, stats)
    yield ev("response.completed" if done["status"] == "completed" else "response.incomplete", {"response": done})
