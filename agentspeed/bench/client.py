"""One streaming request against any OpenAI-compatible endpoint, timed at the client.

Token-id and text prompts go to /v1/completions, message prompts to /v1/chat/completions
(a gateway such as SMG takes only text on /v1/completions: see `--prompt-format text`). Every
request streams with `stream_options.include_usage` (prompt, cached and completion tokens
come from the server's `usage`), sends the session key as `X-SMG-Routing-Key`, and asks for
exactly `max_tokens` tokens (`ignore_eos`, `min_tokens`) so output lengths follow the trace.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass(slots=True)
class RequestRecord:
    session_id: str
    turn: int
    start: float  # perf_counter at send
    ttft: float | None = None
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    eligible_tokens: int = 0  # prompt tokens that were in the previous turn's prompt + answer
    output_ids: list[int] = field(default_factory=list)  # completions: the generated ids, if returned
    worker: str | None = None  # the replica a gateway routed it to (SMG's x-smg-routed-worker-id)
    text: str = ""
    error: str | None = None

    @property
    def decode_tok_s(self) -> float | None:
        """Tokens after the first / time from first to last chunk (None if < 2 chunks)."""
        if len(self.chunk_times) < 2 or self.completion_tokens < 2:
            return None
        dt = self.chunk_times[-1] - self.chunk_times[0]
        return (self.completion_tokens - 1) / dt if dt > 0 else None


async def stream_request(http: httpx.AsyncClient, base_url: str, model: str | None, session_key: str,
                         prompt: str | list[int] | list[dict[str, Any]], max_tokens: int, rec: RequestRecord,
                         api_key: str | None = None) -> None:
    chat = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)
    body: dict[str, Any] = {"max_tokens": max_tokens, "min_tokens": max_tokens, "ignore_eos": True,
                            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    if chat:
        body["messages"] = prompt
        url = f"{base_url}/v1/chat/completions"
    else:
        body["prompt"] = prompt
        if not isinstance(prompt, str):
            body["return_token_ids"] = True  # vLLM's name; servers without it send text only
        url = f"{base_url}/v1/completions"
    headers = {"X-SMG-Routing-Key": session_key, "X-Session-Id": session_key}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    rec.start = time.perf_counter()
    try:
        async with http.stream("POST", url, json=body, headers=headers) as r:
            rec.worker = r.headers.get("x-smg-routed-worker-id")
            if r.status_code != 200:
                rec.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    rec.error = str(obj["error"])[:300]
                    break
                now = time.perf_counter()
                for ch in obj.get("choices") or []:
                    piece = (ch.get("delta") or {}).get("content") if chat else ch.get("text")
                    ids = None if chat else ch.get("token_ids")
                    if ids:
                        rec.output_ids.extend(ids)
                    if piece or ids:
                        if rec.ttft is None:
                            rec.ttft = now - rec.start
                        rec.chunk_times.append(now)
                        rec.text += piece or ""
                usage = obj.get("usage")
                if usage:
                    rec.prompt_tokens = usage.get("prompt_tokens", 0)
                    rec.completion_tokens = usage.get("completion_tokens", 0)
                    details = usage.get("prompt_tokens_details") or {}
                    # llama.cpp reports the reused prefix as timings.cache_n
                    rec.cached_tokens = details.get("cached_tokens") or (obj.get("timings") or {}).get("cache_n", 0)
    except httpx.HTTPError as e:
        rec.error = f"{type(e).__name__}: {e}"
    finally:
        rec.end = time.perf_counter()
