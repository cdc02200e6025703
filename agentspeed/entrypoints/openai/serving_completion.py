"""POST /v1/completions: prompts as a string, strings, token ids, or lists of token ids; each
prompt yields n choices (index = prompt * n + sample). Prompts run concurrently."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from agentspeed.control.plan import TokenLogprob
from agentspeed.engine.output_processor import RequestDelta
from agentspeed.entrypoints.openai.protocol import APIError, CompletionRequest
from agentspeed.entrypoints.openai.serving import (
    SSE_DONE,
    RunStats,
    ServerState,
    collect,
    new_id,
    request_constraint,
    run_request,
    sampling_params,
    sse,
    token_text,
)

_END = object()


def _prompts(state: ServerState, req: CompletionRequest) -> list[list[int]]:
    p = req.prompt
    if isinstance(p, str):
        p = [p]
    if p and isinstance(p[0], int):
        p = [p]  # type: ignore[list-item]
    out: list[list[int]] = []
    tok = state.engine.tokenizer
    for item in p:
        if isinstance(item, str):
            out.append(state.tokenizer("send token ids", "prompt").encode(item))
        else:
            ids = list(item)  # type: ignore[arg-type]
            vocab = tok.vocab_size if tok is not None else None
            if not ids or any(t < 0 or (vocab is not None and t >= vocab) for t in ids):
                raise APIError(400, "prompt token ids must be non-empty and within the vocabulary", param="prompt")
            out.append(ids)
    if any(not ids for ids in out):
        raise APIError(400, "prompt must not be empty", param="prompt")
    return out


def _logprobs(state: ServerState, lps: list[TokenLogprob], offset: int) -> dict[str, Any]:
    tokens, token_lps, tops, offsets = [], [], [], []
    for lp in lps:
        t = token_text(state, lp.token_id)
        tokens.append(t)
        token_lps.append(lp.logprob)
        tops.append({token_text(state, i): v for i, v in lp.top})
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


async def create_completion(state: ServerState, req: CompletionRequest, raw: Request) -> Any:
    state.check_model(req.model)
    prompts = _prompts(state, req)
    constraint = request_constraint(req)
    rid = new_id("cmpl")
    runs = []
    for k, ids in enumerate(prompts):
        params = sampling_params(req, len(ids), state, req.max_tokens or 16, req.logprobs,
                                 structured=constraint)
        stats = RunStats(len(ids))
        sub = rid if len(prompts) == 1 else f"{rid}-p{k}"
        runs.append((k, stats, run_request(state, sub, ids, params, raw, stats, req.agentspeed_test_output,
                                           cache_salt=req.cache_salt, priority=req.priority)))
    if req.stream:
        # Wait for every prompt's first delta: errors before any token are plain HTTP errors.
        try:
            firsts = await asyncio.gather(*(anext(gen) for _, _, gen in runs))
        except BaseException:
            for _, _, gen in runs:
                await gen.aclose()
            raise
        return StreamingResponse(_stream(state, req, rid, runs, firsts), media_type="text/event-stream")
    results = await asyncio.gather(*(collect(raw, gen) for _, _, gen in runs))
    choices = []
    for (k, stats, _), deltas in zip(runs, results):
        for i in range(req.n):
            mine = [d for d in deltas if d.index == i]
            text = "".join(d.text for d in mine)
            lps = [lp for d in mine for lp in (d.logprobs or [])]
            if req.return_token_ids:
                extra = {"token_ids": [t for d in mine for t in d.token_ids]}
            else:
                extra = {}
            choices.append({
                **extra, "index": k * req.n + i, "text": text,
                "logprobs": _logprobs(state, lps, 0) if req.logprobs is not None else None,
                "finish_reason": stats.finish_reasons.get(i, "abort"),
                "stop_reason": next((d.stop_reason for d in mine if d.finish_reason), None),
            })
    return JSONResponse({"id": rid, "object": "text_completion", "created": int(time.time()),
                         "model": state.model_name, "choices": choices, "usage": _total(runs)})


def _total(runs: list[tuple[int, RunStats, Any]]) -> dict[str, Any]:
    p = sum(s.prompt_tokens for _, s, _ in runs)
    c = sum(s.completion_tokens for _, s, _ in runs)
    cached = sum(s.cached_tokens for _, s, _ in runs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def _stream(state: ServerState, req: CompletionRequest, rid: str,
                  runs: list[tuple[int, RunStats, AsyncGenerator[RequestDelta, None]]],
                  firsts: list[RequestDelta]) -> AsyncIterator[str]:
    base = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": state.model_name}
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def pump(k: int, gen: AsyncIterator[RequestDelta]) -> None:
        try:
            await queue.put((k, firsts[k]))
            async for d in gen:
                await queue.put((k, d))
        except Exception as e:
            await queue.put(e)
        finally:
            await queue.put(_END)

    tasks = [asyncio.create_task(pump(k, gen)) for k, _, gen in runs]
    offsets: dict[int, int] = {}
    try:
        ended = 0
        while ended < len(tasks):
            item = await queue.get()
            if item is _END:
                ended += 1
                continue
            if isinstance(item, Exception):
                yield sse({"error": {"message": getattr(item, "message", str(item)),
                                     "type": "internal_server_error", "param": None,
                                     "code": getattr(item, "status", 500)}})
                return
            k, d = item
            index = k * req.n + d.index
            lp = None
            if req.logprobs is not None and d.logprobs:
                lp = _logprobs(state, d.logprobs, offsets.get(index, 0))
            offsets[index] = offsets.get(index, 0) + len(d.text)
            if d.text or lp or d.finish_reason or (req.return_token_ids and d.token_ids):
                choice = {"index": index, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason,
                          "stop_reason": d.stop_reason}
                if req.return_token_ids:
                    choice["token_ids"] = d.token_ids
                yield sse({**base, "choices": [choice]})
        if req.stream_options is not None and req.stream_options.include_usage:
            yield sse({**base, "choices": [], "usage": _total(runs)})
        yield SSE_DONE
    finally:
        for t in tasks:
            t.cancel()
