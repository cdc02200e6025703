"""Closed-loop replay: C sessions in flight, each sending its turns one after another.

A session's next turn starts when its previous response has fully arrived plus the turn's
tool time (times `delay_scale`). When a session ends, the next unstarted one begins, so C
sessions are in flight until the workload runs out (or `duration_s` passes: then no new
session starts). Token-workload sessions re-send what was actually generated: the ids the
server returned (`return_token_ids`), else the answer text re-tokenised through the
endpoint's /tokenize (ours, vLLM or llama.cpp shape). With a local tokenizer (text prompts,
for gateways that refuse token ids) the context is sent as its decoded text and answers
are tokenised locally.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from agentspeed.bench.client import RequestRecord, stream_request
from agentspeed.bench.workloads import Session
from agentspeed.tokenizer import Tokenizer


@dataclass(slots=True)
class Endpoint:
    label: str
    url: str
    model: str | None = None
    api_key: str | None = None
    text_tokenizer: Tokenizer | None = None  # send token-workload prompts as text decoded with it


@dataclass(slots=True)
class SessionRecord:
    session_id: str
    start: float
    requests: list[RequestRecord]
    end: float = 0.0


async def _tokenize(http: httpx.AsyncClient, ep: Endpoint, text: str) -> list[int]:
    r = await http.post(f"{ep.url}/tokenize", json={"prompt": text, "add_special_tokens": False,
                                                    "content": text, "model": ep.model})
    r.raise_for_status()
    data = r.json()
    return list(data["tokens"])


async def run_session(http: httpx.AsyncClient, ep: Endpoint, s: Session, tag: str, delay_scale: float,
                      on_request: Callable[[RequestRecord], None]) -> SessionRecord:
    rec = SessionRecord(s.session_id, time.perf_counter(), [])
    key = f"{tag}-{s.session_id}"
    context: list[int] = []  # token workloads: what the agent re-sends
    prev_total = 0  # tokens of the previous turn's prompt + answer
    for k, turn in enumerate(s.turns):
        prompt: str | list[int] | list[dict[str, Any]]
        if turn.messages is not None:
            prompt = turn.messages
        elif turn.prompt_tokens is not None:
            prompt = turn.prompt_tokens
        else:
            context = context + (turn.new_tokens or [])
            prompt = context
        tok = ep.text_tokenizer
        if tok is not None and prompt and not isinstance(prompt[0], dict):
            prompt = tok.decode(prompt, skip_special_tokens=False)  # type: ignore[arg-type]
        r = RequestRecord(s.session_id, k, 0.0)
        await stream_request(http, ep.url, ep.model, key, prompt, turn.output_tokens, r, ep.api_key)
        r.eligible_tokens = min(prev_total, r.prompt_tokens)
        rec.requests.append(r)
        on_request(r)
        if r.error is not None:
            break
        # What the next turn can reuse: the prompt, plus the answer where the next turn
        # re-sends the generated answer (token workloads). Recorded conversations re-send the
        # recorded answer, not ours, so only the prompt is eligible there.
        prev_total = r.prompt_tokens + (r.completion_tokens if turn.messages is None else 0)
        if turn.new_tokens is not None:
            if tok is not None:
                answer = tok.encode(r.text, add_special_tokens=False) if r.text else []
            else:
                answer = r.output_ids or (await _tokenize(http, ep, r.text) if r.text else [])
            context = context + answer
        if k + 1 < len(s.turns) and turn.delay_s > 0 and delay_scale > 0:
            await asyncio.sleep(turn.delay_s * delay_scale)
    rec.end = time.perf_counter()
    return rec


async def run_level(ep: Endpoint, sessions: list[Session], concurrency: int, delay_scale: float,
                    duration_s: float | None, tag: str, on_request: Callable[[RequestRecord], None]
                    ) -> tuple[list[SessionRecord], float]:
    """Replay `sessions` with `concurrency` in flight; returns the records and the wall time."""
    queue = list(sessions)
    out: list[SessionRecord] = []
    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600, connect=30), limits=limits) as http:
        async def worker() -> None:
            while queue:
                if duration_s is not None and time.perf_counter() - t0 > duration_s:
                    return
                s = queue.pop(0)
                out.append(await run_session(http, ep, s, tag, delay_scale, on_request))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out, time.perf_counter() - t0
