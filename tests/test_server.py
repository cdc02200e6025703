"""The OpenAI-compatible server, started as a real process on 127.0.0.1 with the default
model (SmolLM2-135M-Instruct), driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from server_util import ServerProcess, metric

MODEL = "SmolLM2-135M-Instruct"
HAIKU = [{"role": "user", "content": "Write a haiku about the sea."}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    srv = ServerProcess(["--enable-test-hooks", "--max-queue", "64"])
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _metrics(server: ServerProcess) -> str:
    return httpx.get(f"{server.url}/metrics").text


# ---- the happy paths ---------------------------------------------------------------------
def test_chat_stream_concatenates_to_non_stream(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model=MODEL, messages=HAIKU, max_tokens=32, temperature=0)
    text = full.choices[0].message.content
    assert text and full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.prompt_tokens > 0 and full.usage.completion_tokens > 0
    stream = client.chat.completions.create(model=MODEL, messages=HAIKU, max_tokens=32, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    parts, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            parts.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert "".join(parts) == text
    assert finish == full.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens


def test_real_answer(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=16,
                                       messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in r.choices[0].message.content


def test_second_turn_hits_the_prefix_cache(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model=MODEL, messages=HAIKU, max_tokens=24, temperature=0)
    answer = first.choices[0].message.content
    turn2 = [*HAIKU, {"role": "assistant", "content": answer}, {"role": "user", "content": "Now one about rain."}]
    second = client.chat.completions.create(model=MODEL, messages=turn2, max_tokens=8, temperature=0,
                                            extra_headers={"X-SMG-Routing-Key": "session-1"})
    cached = second.usage.prompt_tokens_details.cached_tokens
    # Turn 1's prompt and answer are re-sent; at least its full 16-token pages are cached.
    assert cached >= (first.usage.prompt_tokens + first.usage.completion_tokens - 16) // 16 * 16 - 16
    assert cached > 0


def test_next_turn_reuses_the_last_partial_page(client: openai.OpenAI) -> None:
    prompt = list(range(1000, 1021))  # 21 tokens: turn 1's KV ends inside a 16-token page
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                      extra_body={"return_token_ids": True, "ignore_eos": True},
                                      extra_headers={"X-Session-Id": "partial-1"})
    out = first.choices[0].model_extra["token_ids"]
    assert len(out) == 6
    second = client.completions.create(model=MODEL, prompt=prompt + out + [1100, 1101], max_tokens=2,
                                       temperature=0, extra_headers={"X-Session-Id": "partial-1"})
    # turn 1 left KV for its prompt and answer but the last sampled token: 26 tokens, not 16
    assert second.usage.prompt_tokens_details.cached_tokens == len(prompt) + len(out) - 1


def test_completions_shapes(client: openai.OpenAI) -> None:
    one = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert len(one.choices) == 1 and one.choices[0].text and one.usage.completion_tokens == 6
    many = client.completions.create(model=MODEL, prompt=["Once upon a time", "The answer is"], max_tokens=5,
                                     temperature=0)
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].text == one.choices[0].text[: len(many.choices[0].text)]
    ids = httpx.post(f"{client.base_url}".removesuffix("/v1/") + "/tokenize", json={"prompt": "Once upon a time"}).json()
    by_ids = client.completions.create(model=MODEL, prompt=ids["tokens"], max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == one.choices[0].text
    assert by_ids.usage.prompt_tokens == ids["count"]


def test_n_logprobs_and_seed(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, messages=HAIKU, max_tokens=12, temperature=1.0, seed=1234)
    a = client.chat.completions.create(n=2, logprobs=True, top_logprobs=3, **kw)
    assert [c.index for c in a.choices] == [0, 1]
    lp = a.choices[0].logprobs.content
    assert 1 <= len(lp) <= 12
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 3 for t in lp)
    b = client.chat.completions.create(n=2, **kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    comp = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=4, temperature=0, logprobs=2)
    assert len(comp.choices[0].logprobs.tokens) == 4 and all(len(t) == 2 for t in comp.choices[0].logprobs.top_logprobs)


def test_tool_calls_parsed_from_model_output(client: openai.OpenAI) -> None:
    forced = 'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER_TOOL],
              temperature=0, extra_body={"agentspeed_test_output": forced})
    r = client.chat.completions.create(**kw)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls"
    assert ch.message.content == "Let me check. "
    [call] = ch.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    # Streaming: content before the call streams, then the call: id and name first, then
    # its arguments in pieces that add up to the non-streamed arguments.
    content, calls, finish = [], [], None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            content.append(c.delta.content or "")
            calls += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert "".join(content) == "Let me check. "
    assert calls[0].id and calls[0].function.name == "get_weather" and not calls[0].function.arguments
    assert len(calls) > 2 and all(c.index == 0 and c.id is None for c in calls[1:])
    assert "".join(c.function.arguments for c in calls) == call.function.arguments and finish == "tool_calls"
    # Without tools in the request the same text is plain content.
    plain = client.chat.completions.create(model=MODEL, messages=kw["messages"], temperature=0,
                                           extra_body={"agentspeed_test_output": forced})
    assert plain.choices[0].message.content == forced and not plain.choices[0].message.tool_calls


def test_tokenize_detokenize_models(server: ServerProcess) -> None:
    t = httpx.post(f"{server.url}/tokenize", json={"prompt": "hello world", "add_special_tokens": False}).json()
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": t["tokens"]}).json()["prompt"] == "hello world"
    models = httpx.get(f"{server.url}/v1/models").json()
    assert models["data"][0]["id"] == MODEL


def test_32_concurrent_streams(server: ServerProcess) -> None:
    async def one(c: openai.AsyncOpenAI, i: int) -> tuple[str, int]:
        s = await c.chat.completions.create(
            model=MODEL, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": f"Count from {i} to {i + 5}."}])
        text, n = "", -1
        async for chunk in s:
            if chunk.usage:
                n = chunk.usage.completion_tokens
            for ch in chunk.choices:
                text += ch.delta.content or ""
        return text, n

    async def main() -> list[tuple[str, int]]:
        c = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=300)
        return await asyncio.gather(*(one(c, i) for i in range(32)))

    results = asyncio.run(main())
    assert len(results) == 32 and all(text and n > 0 for text, n in results)
    # Each equals the same request run alone (greedy, batch-invariant).
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    for i in (0, 17, 31):
        alone = c.chat.completions.create(model=MODEL, max_tokens=12, temperature=0,
                                          messages=[{"role": "user", "content": f"Count from {i} to {i + 5}."}])
        assert alone.choices[0].message.content == results[i][0]


def test_disconnect_mid_stream_frees_pages(server: ServerProcess) -> None:
    body = {"model": MODEL, "messages": HAIKU, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as h, h.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept referenced: a dropped iterator closes the stream
        n = 0
        while n < 5:
            n += next(lines).startswith("data:")
        m = _metrics(server)
        assert metric(m, "agentspeed:num_requests_running") == 1
        assert metric(m, "agentspeed:kv_pages_used") > 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = _metrics(server)
        if metric(m, "agentspeed:kv_pages_used") == 0 and metric(m, "agentspeed:num_requests_running") == 0:
            break
        time.sleep(0.2)
    assert metric(m, "agentspeed:kv_pages_used") == 0, m
    assert metric(m, "agentspeed:num_requests_running") == 0


def test_metrics_exposition(server: ServerProcess) -> None:
    m = _metrics(server)
    for name in ("agentspeed:request_success_total", "agentspeed:time_to_first_token_seconds_bucket",
                 "agentspeed:inter_token_latency_seconds_bucket", "agentspeed:e2e_request_latency_seconds_count",
                 "agentspeed:prompt_tokens_total", "agentspeed:prefix_cache_hit_tokens_total",
                 "agentspeed:num_requests_waiting", "agentspeed:num_preemptions_total",
                 "agentspeed:generation_tokens_total", "agentspeed:generation_tokens_per_second"):
        assert name in m, name
    assert metric(m, "agentspeed:prefix_cache_hit_tokens_total") > 0


# ---- errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("body,status,needle", [
    ({"messages": HAIKU, "max_tokens": -1}, 400, "max_tokens"),
    ({"messages": HAIKU, "max_tokens": "ten"}, 400, "max_tokens"),
    ({"messages": HAIKU, "top_p": 1.5}, 400, "top_p"),
    ({"messages": HAIKU, "temperature": -0.1}, 400, "temperature"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({"messages": []}, 400, "messages"),
    ({"messages": HAIKU, "max_tokens": 100000}, 400, "context length"),
    ({"messages": HAIKU, "response_format": {"type": "xml"}}, 400, "response_format"),
    ({"messages": HAIKU, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400,
     "needs a schema"),
    ({"messages": HAIKU, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "strin"}}}}}}, 400, "strin"),
    ({"messages": HAIKU, "structured_outputs": {"regex": "a(b"}}, 400, "regex"),
    ({"messages": HAIKU, "structured_outputs": {"choice": []}}, 400, "choice"),
    ({"messages": HAIKU, "structured_outputs": {"regex": "a", "choice": ["a"]}}, 400, "exactly one"),
    ({"messages": HAIKU, "structured_outputs": {"structural_tag": "{}"}}, 400, "structural_tag"),
    ({"messages": HAIKU, "structured_outputs": {"grammar": "root ::= missing"}}, 400, "grammar"),
    ({"messages": HAIKU, "response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, 400,
     "send only one"),
    ({"messages": HAIKU, "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ({"messages": HAIKU, "tool_choice": "required"}, 400, "offers no tools"),
    ({"messages": HAIKU, "tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "f"}}},
     400, "not among the tools"),
    ({"messages": HAIKU, "model": "gpt-17"}, 404, "does not exist"),
    ({"messages": HAIKU, "agentspeed_test_output": "x", "n": 0}, 400, "n"),
])
def test_invalid_requests(server: ServerProcess, body: dict[str, object], status: int, needle: str) -> None:
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and {"message", "type", "param", "code"} <= set(err)


def test_malformed_json_and_huge_prompt(server: ServerProcess, client: openai.OpenAI) -> None:
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b'{"messages": [', timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    garbage = "".join(chr(33 + (i * 7919) % 90) for i in range(1 << 20))  # 1 MB
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": garbage, "max_tokens": 4}, timeout=120)
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": [10**9], "max_tokens": 4}, timeout=30)
    assert r.status_code == 400
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices[0].text is not None


# ---- a second server: API key, overload, engine death, shutdown ---------------------------
def test_api_key_overload_and_engine_death() -> None:
    srv = ServerProcess(["--api-key", "sekret", "--max-queue", "2"])
    try:
        url = f"{srv.url}/v1/chat/completions"
        body = {"messages": HAIKU, "max_tokens": 4}
        assert httpx.post(url, json=body).status_code == 401
        assert httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        auth = {"Authorization": "Bearer sekret"}
        assert httpx.post(url, json=body, headers=auth, timeout=60).status_code == 200
        assert httpx.get(f"{srv.url}/health").status_code == 200  # health needs no key

        long = {"messages": HAIKU, "max_tokens": 3000, "ignore_eos": True}

        async def flood() -> list[httpx.Response | BaseException]:
            async with httpx.AsyncClient(timeout=120, headers=auth) as h:
                tasks = [asyncio.create_task(h.post(url, json=long)) for _ in range(5)]
                await asyncio.sleep(3)
                # The queue holds 2: the others were refused at once with 503.
                done = [t for t in tasks if t.done()]
                statuses = [t.result().status_code for t in done]
                assert statuses.count(503) == 3, statuses
                assert "limit" in done[0].result().json()["error"]["message"]
                # Kill the engine: the two in-flight requests fail fast, health turns red.
                t0 = time.monotonic()
                os.kill(srv.engine_pid(), signal.SIGKILL)
                rest = await asyncio.gather(*[t for t in tasks if not t.done()], return_exceptions=True)
                assert time.monotonic() - t0 < 5
                return list(rest)

        rest = asyncio.run(flood())
        assert [r.status_code for r in rest if isinstance(r, httpx.Response)] == [500, 500], rest
        assert httpx.get(f"{srv.url}/health").status_code == 503
        assert httpx.post(url, json=body, headers=auth).status_code == 503
    finally:
        rc = srv.stop()
    assert rc == 0, srv.log()


def test_sigterm_drains_in_flight_requests() -> None:
    srv = ServerProcess([])
    engine = srv.engine_pid()
    result: list[httpx.Response] = []

    async def go() -> None:
        async with httpx.AsyncClient(timeout=120) as h:
            task = asyncio.create_task(h.post(f"{srv.url}/v1/chat/completions",
                                              json={"messages": HAIKU, "max_tokens": 40, "ignore_eos": True}))
            await asyncio.sleep(1.0)
            srv.proc.send_signal(signal.SIGTERM)
            result.append(await task)

    asyncio.run(go())
    assert result[0].status_code == 200 and result[0].json()["usage"]["completion_tokens"] == 40
    assert srv.proc.wait(60) == 0
    time.sleep(0.5)
    assert not os.path.exists(f"/proc/{engine}"), "the engine process outlived the server"


def test_tensor_parallel_server_matches_tp1(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> None:
    """--tp 2: the engine core runs rank 0 and starts rank 1 as a further process; both
    step in lock-step. Same greedy text as --tp 1; no process left behind."""
    from conftest import make_tiny
    from transformers import AutoTokenizer

    path = make_tiny("llama", tmp_path_factory.mktemp("tp_serve"), vocab_size=49152)
    AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name).save_pretrained(path)
    body = {"prompt": ["The quick brown fox", "Hello"], "max_tokens": 12, "temperature": 0}
    texts = []
    for tp in (1, 2):
        srv = ServerProcess([str(path), "--tp", str(tp), "--kv-cache-memory", "32MiB"])
        try:
            r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            texts.append([c["text"] for c in r.json()["choices"]])
            engines = [srv.engine_pid()]
        finally:
            assert srv.stop() == 0, srv.log()
        time.sleep(0.5)
        assert not any(os.path.exists(f"/proc/{p}") for p in engines)
    assert texts[0] == texts[1] and all(texts[0])


def test_cache_salt_isolates_tenants_over_http(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "Salted prompt: list three prime numbers and explain why each is prime."}]
    kw: dict = dict(model=MODEL, messages=msgs, max_tokens=4, temperature=0)
    first = client.chat.completions.create(**kw, extra_body={"cache_salt": "tenant-a"})
    assert first.usage.prompt_tokens > 16
    same = client.chat.completions.create(**kw, extra_body={"cache_salt": "tenant-a"})
    other = client.chat.completions.create(**kw, extra_body={"cache_salt": "tenant-b"})
    unsalted = client.chat.completions.create(**kw)
    assert same.usage.prompt_tokens_details.cached_tokens > 0
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    # unsalted requests share only what other unsalted ones cached (the chat template's
    # system prefix from earlier tests), never the salted pages
    assert unsalted.usage.prompt_tokens_details.cached_tokens < same.usage.prompt_tokens_details.cached_tokens
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**kw, extra_body={"cache_salt": ""})
    # priority is accepted and honoured by the scheduler (ordering: tests/test_request_path.py)
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_body={"priority": -3}).choices
