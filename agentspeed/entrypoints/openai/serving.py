"""What every endpoint (chat, completions, messages, responses) shares: the server state,
the context-length budget, turning a request into SamplingParams, the output parsers,
running a request on AsyncLLM with timing, metrics and the one-line request log, and the
usage / logprob / SSE formatting."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from agentspeed.control.plan import TokenLogprob
from agentspeed.engine.async_llm import AsyncLLM, EngineDeadError, Overloaded
from agentspeed.engine.output_processor import RequestDelta
from agentspeed.entrypoints.openai.metrics import Metrics
from agentspeed.entrypoints.openai.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
)
from agentspeed.entrypoints.openai.response_store import ResponseStore
from agentspeed.entrypoints.parsers.output import OutputParser
from agentspeed.entrypoints.parsers.reasoning import ReasoningSplitter
from agentspeed.entrypoints.parsers.select import TOOL_PARSERS
from agentspeed.entrypoints.parsers.tool_parsers import ForcedCallsParser, ToolParser
from agentspeed.entrypoints.structured import (
    from_response_format,
    from_structured_outputs,
    one_constraint,
)
from agentspeed.errors import AgentspeedError
from agentspeed.sampling_params import SamplingParams, StructuredOutputs
from agentspeed.tokenizer import Tokenizer

log = logging.getLogger("agentspeed.requests")

SESSION_HEADERS = ("x-smg-routing-key", "x-session-id")


@dataclass
class ServerState:
    engine: AsyncLLM
    model_name: str
    metrics: Metrics
    tool_parser: str
    enable_test_hooks: bool = False
    api_key: str | None = None
    reasoning_parser: str | None = None
    # Further names clients may send for the model: exact names and fnmatch globs
    # ('claude-*'): agents send their own model ids.
    model_aliases: tuple[str, ...] = ()
    responses_store_size: int = 1000
    kv_events: bool = False  # the engine reports prefix-cache events (for the gRPC worker)
    responses: ResponseStore = field(init=False)

    def __post_init__(self) -> None:
        self.responses = ResponseStore(self.responses_store_size)

    @property
    def max_model_len(self) -> int:
        assert self.engine.info is not None
        return self.engine.info.max_model_len

    @property
    def max_running_requests(self) -> int:
        info = self.engine.info
        return info.max_num_seqs if info is not None else 0

    @property
    def kv_tokens(self) -> int:
        info = self.engine.info
        assert info is not None
        return (info.num_pages - 1) * info.page_size

    def tokenizer(self, hint: str = "", param: str | None = None) -> Tokenizer:
        """The engine's tokenizer, or a 400 for a server started without one."""
        tok = self.engine.tokenizer
        if tok is None:
            raise APIError(400, "this server has no tokenizer" + (f": {hint}" if hint else ""), param=param)
        return tok

    def check_model(self, name: str | None) -> None:
        if name is None or name == self.model_name or name in self.model_aliases:
            return
        if any(fnmatch.fnmatchcase(name, a) for a in self.model_aliases):
            return
        raise APIError(404, f"The model `{name}` does not exist (this server serves `{self.model_name}`; "
                            "--served-model-name and --model-alias add names).", param="model",
                       code="model_not_found")


def token_budget(state: ServerState, prompt_len: int, max_tokens: int | None, prompt_param: str,
                 max_param: str) -> int:
    """The completion's token limit: max_tokens if prompt + max_tokens fits the context and
    the KV cache, else a 400 naming the parameter; None means as much as fits."""
    limit = state.max_model_len
    if prompt_len >= limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your "
                            f"prompt has {prompt_len} tokens. Please reduce the length of the prompt.",
                       param=prompt_param, code="context_length_exceeded")
    if max_tokens is None:  # as much as the context and the KV cache allow
        max_tokens = min(limit, state.kv_tokens) - prompt_len
        if max_tokens < 1:
            raise APIError(400, f"the prompt ({prompt_len} tokens) fills the KV cache of this server "
                                f"({state.kv_tokens} tokens)", param=prompt_param, code="context_length_exceeded")
    elif prompt_len + max_tokens > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} in the "
                            f"completion). Please reduce the prompt or {max_param}.",
                       param=max_param, code="context_length_exceeded")
    if prompt_len + max_tokens > state.kv_tokens:
        raise APIError(400, f"prompt + {max_param} ({prompt_len + max_tokens} tokens) exceeds the KV cache "
                            f"of this server ({state.kv_tokens} tokens)", param=max_param)
    return max_tokens


def make_params(**kw: Any) -> SamplingParams:
    """SamplingParams, with the engine's refusals as 400s."""
    try:
        return SamplingParams(**kw)
    except (AgentspeedError, ValueError) as e:
        raise APIError(400, str(e)) from None


def sampling_params(req: ChatCompletionRequest | CompletionRequest, prompt_len: int, state: ServerState,
                    max_tokens: int | None, logprobs: int | None, skip_special_tokens: bool = True,
                    structured: StructuredOutputs | None = None) -> SamplingParams:
    """Raises APIError(400) for a prompt that does not fit, or invalid combinations.
    structured: the request's decoding constraint (request_constraint)."""
    chat = isinstance(req, ChatCompletionRequest)
    named = ("max_completion_tokens" if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens
             is not None else "max_tokens")
    max_tokens = token_budget(state, prompt_len, max_tokens, "messages" if chat else "prompt", named)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return make_params(
        n=req.n, max_tokens=max_tokens, min_tokens=req.min_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=max(req.top_k, 0), min_p=req.min_p,
        seed=req.seed, stop=stop, stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos, include_stop_str_in_output=req.include_stop_str_in_output,
        skip_special_tokens=req.skip_special_tokens and skip_special_tokens, logprobs=logprobs,
        repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, structured_outputs=structured,
    )


def request_constraint(req: ChatCompletionRequest | CompletionRequest,
                       forced: tuple[str, StructuredOutputs | None] = ("tool_choice", None)
                       ) -> StructuredOutputs | None:
    """The one constraint among response_format, structured_outputs and a forced tool call."""
    rf = req.response_format.model_dump(exclude_none=True) if req.response_format is not None else None
    return one_constraint(("response_format", from_response_format(rf)),
                          ("structured_outputs", from_structured_outputs(req.structured_outputs)), forced)


@dataclass(frozen=True, slots=True)
class OutputSetup:
    """How one request's output is parsed: a fresh OutputParser per sample, and whether
    special tokens must stay in the text (tool formats framed by special tokens)."""

    new: Callable[[], OutputParser]
    skip_special_tokens: bool


def output_setup(state: ServerState, tools: list[dict[str, Any]] | None, prompt: Sequence[int],
                 constrained: bool = False, forced: bool = False) -> OutputSetup:
    """tools: the function definitions ({"name", "description", "parameters"}) offered to the
    model, or None (tool calls are not parsed). constrained: a grammar writes the whole
    output (no reasoning to split off); forced: that grammar is a forced tool call's."""
    tool_cls: type[ToolParser] | None = ForcedCallsParser if forced else TOOL_PARSERS[state.tool_parser] \
        if tools and not constrained else None
    tail = ""
    rp = None if constrained else state.reasoning_parser
    if rp is not None and state.engine.tokenizer is not None:
        # Whether the prompt opened (or closed) a think block decides where the output starts.
        tail = state.engine.tokenizer.decode(list(prompt[-16:]), skip_special_tokens=False)

    def new() -> OutputParser:
        return OutputParser(ReasoningSplitter(rp, tail) if rp is not None else None,
                            tool_cls(tools) if tool_cls is not None else None)

    return OutputSetup(new, tool_cls is None or tool_cls.skip_special_tokens)


def session_key(raw: Request) -> str | None:
    for h in SESSION_HEADERS:
        v = raw.headers.get(h)
        if v:
            return v
    return None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass
class RunStats:
    prompt_tokens: int
    cached_tokens: int = 0
    completion_tokens: int = 0
    first_token: float | None = None
    finish_reasons: dict[int, str] = field(default_factory=dict)

    def usage(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


async def run_request(state: ServerState, request_id: str, prompt_ids: Sequence[int], params: SamplingParams,
                      raw: Request | None, stats: RunStats, forced_output: str | None = None, *,
                      cache_salt: str | None = None, priority: int = 0, session: str | None = None
                      ) -> AsyncGenerator[RequestDelta, None]:
    """Yield the request's deltas; record metrics and log one line when it ends. Raises
    APIError before the first delta for overload, a dead engine or an engine rejection.
    cache_salt: only requests with the same salt share prefix-cache pages. priority: lower
    runs first among waiting requests (ties by arrival), as in vLLM. session: the session
    key when no routing header names one (a body field such as prompt_cache_key); raw is
    None for requests that did not come over HTTP (the gRPC worker)."""
    t0 = time.monotonic()
    last: float | None = None
    itls: list[float] = []
    forced = None
    if forced_output is not None:
        if not state.enable_test_hooks:
            raise APIError(400, "agentspeed_test_output needs a server started with --enable-test-hooks")
        assert state.engine.tokenizer is not None
        forced = state.engine.tokenizer.encode(forced_output, add_special_tokens=False)
    try:
        key = session_key(raw) if raw is not None else None
        gen = state.engine.generate(request_id, prompt_ids, params, key or session, cache_salt,
                                    priority,
                                    forced_output=forced)
        async with contextlib.aclosing(gen):  # (ends the request when this generator is closed)
            async for d in gen:
                now = time.monotonic()
                if d.error is not None:
                    if stats.completion_tokens == 0 and d.index == 0 and state.engine.healthy:
                        raise APIError(400, d.error)
                    raise APIError(500, f"request failed: {d.error}", "internal_server_error")
                if d.token_ids:
                    if stats.first_token is None:
                        stats.first_token = now - t0
                    elif last is not None:
                        itls.append(now - last)
                    last = now
                    stats.completion_tokens += len(d.token_ids)
                    state.metrics.observe_tokens(len(d.token_ids), now)
                if d.index == 0:
                    stats.cached_tokens = d.num_cached_tokens
                if d.finish_reason is not None:
                    stats.finish_reasons[d.index] = d.finish_reason
                yield d
    except (Overloaded, EngineDeadError) as e:
        raise APIError(503, str(e), "service_unavailable") from None
    finally:
        dur = time.monotonic() - t0
        reason = ",".join(sorted(set(stats.finish_reasons.values()))) or "abort"
        state.metrics.observe_request(reason if "," not in reason else "mixed", stats.prompt_tokens,
                                      stats.cached_tokens, stats.first_token, itls, dur)
        ttft = f"{stats.first_token * 1000:.0f}ms" if stats.first_token is not None else "-"
        log.info("%s in=%d cached=%d out=%d ttft=%s dur=%.2fs finish=%s", request_id, stats.prompt_tokens,
                 stats.cached_tokens, stats.completion_tokens, ttft, dur, reason)


async def until_disconnected(raw: Request, task: asyncio.Task[Any]) -> None:
    """Cancel `task` if the client goes away (non-streaming requests: nothing else notices)."""
    while not task.done():
        if await raw.is_disconnected():
            task.cancel()
            return
        await asyncio.sleep(0.25)


async def collect(raw: Request, gen: AsyncIterator[RequestDelta]) -> list[RequestDelta]:
    async def drain() -> list[RequestDelta]:
        return [d async for d in gen]

    task = asyncio.create_task(drain())
    watcher = asyncio.create_task(until_disconnected(raw, task))
    try:
        return await task
    finally:
        watcher.cancel()


async def with_first(first: RequestDelta, rest: AsyncIterator[RequestDelta]) -> AsyncIterator[RequestDelta]:
    """The deltas of a stream whose first delta was awaited before the response began (so
    errors before it are still plain HTTP errors)."""
    yield first
    async for d in rest:
        yield d


def token_text(state: ServerState, token_id: int) -> str:
    tok = state.engine.tokenizer
    return tok.decode([token_id], skip_special_tokens=False) if tok is not None else str(token_id)


def chat_logprobs(state: ServerState, lps: Sequence[TokenLogprob], top_n: int) -> list[dict[str, Any]]:
    out = []
    for lp in lps:
        t = token_text(state, lp.token_id)
        out.append({"token": t, "logprob": lp.logprob, "bytes": list(t.encode()),
                    "top_logprobs": [{"token": (s := token_text(state, i)), "logprob": v, "bytes": list(s.encode())}
                                     for i, v in lp.top[:top_n]]})
    return out


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
