"""The agents' APIs on a real `agentspeed serve`, driven by the official SDKs: Anthropic's
Messages API with `anthropic`, OpenAI's Responses API with `openai`, and reasoning in all
three APIs. The default model rarely writes a tool call on request, so tool calls and
reasoning come from the forced-output test hook (the model's text replaced by a given one);
the parsers themselves are tested on literal outputs in test_parsers.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from server_util import ServerProcess

KEY = "test-key"
MODEL = "SmolLM2-135M-Instruct"
HELLO = [{"role": "user", "content": "Write a haiku about the sea."}]
WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALL = 'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
THINK = "<think>The user wants weather.</think>\n\nIt is sunny."


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    srv = ServerProcess(["--enable-test-hooks", "--api-key", KEY, "--reasoning-parser", "qwen3",
                         "--served-model-name", MODEL, "agent-model", "--model-alias", "claude-*",
                         "--responses-store-size", "8"])
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def claude(server: ServerProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def oai(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def forced(text: str) -> dict[str, Any]:
    return {"agentspeed_test_output": text}


# ---- Messages ----------------------------------------------------------------------------
def test_messages_plain_and_stream_agree(claude: anthropic.Anthropic) -> None:
    # temperature is no longer in the SDK's signature; older clients send it, it is honoured.
    kw: dict[str, Any] = dict(model="claude-sonnet-4-5", max_tokens=24, messages=HELLO, extra_body={"temperature": 0},
                              output_config={"effort": "low"}, cache_control={"type": "ephemeral"},
                              system=[{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
                              metadata={"user_id": "u1"}, extra_headers={"anthropic-beta": "prompt-caching-2024-07-31"})
    msg = claude.messages.create(**kw)
    assert msg.model == "claude-sonnet-4-5" and msg.role == "assistant"
    [block] = msg.content
    assert block.type == "text" and block.text
    assert msg.stop_reason in ("end_turn", "max_tokens") and msg.usage.output_tokens > 0
    assert msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0) > 10
    kinds = []
    with claude.messages.stream(**kw) as stream:
        for event in stream:
            kinds.append(event.type)
        final = stream.get_final_message()
    assert final.content[0].text == block.text and final.stop_reason == msg.stop_reason
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "message_delta" in kinds and kinds.count("content_block_stop") == 1


def test_messages_tool_use_streams_and_matches(claude: anthropic.Anthropic) -> None:
    kw: dict[str, Any] = dict(model=MODEL, max_tokens=64, tools=[WEATHER],
                              messages=[{"role": "user", "content": "Weather in Paris?"}], extra_body=forced(CALL))
    msg = claude.messages.create(**kw)
    assert msg.stop_reason == "tool_use"
    text, use = msg.content
    assert text.type == "text" and text.text == "Let me check. "
    assert use.type == "tool_use" and use.name == "get_weather" and use.input == {"city": "Paris"}
    assert use.id.startswith("toolu_")
    pieces = []
    with claude.messages.stream(**kw) as stream:
        for event in stream:
            if event.type == "content_block_start" and event.content_block.type == "tool_use":
                assert event.content_block.name == "get_weather"  # the name comes first
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                pieces.append(event.delta.partial_json)
        final = stream.get_final_message()
    assert len(pieces) > 2 and json.loads("".join(pieces)) == {"city": "Paris"}
    assert [b.type for b in final.content] == ["text", "tool_use"] and final.content[1].input == use.input
    assert final.stop_reason == "tool_use"
    # Without tools the same text is plain text.
    plain = claude.messages.create(**{k: v for k, v in kw.items() if k != "tools"})
    assert [b.type for b in plain.content] == ["text"] and plain.content[0].text == CALL


def test_messages_tool_result_round_trip_hits_the_cache(claude: anthropic.Anthropic) -> None:
    turn1: list[dict[str, Any]] = [{"role": "user", "content": "What's the weather in Paris? " * 8}]
    first = claude.messages.create(model=MODEL, max_tokens=64, tools=[WEATHER], messages=turn1,
                                   metadata={"user_id": "session-7"}, extra_body=forced(CALL))
    use = first.content[1]
    turn2 = [*turn1,
             {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
             {"role": "user", "content": [
                 {"type": "tool_result", "tool_use_id": use.id, "content": [{"type": "text", "text": "18C, sunny"}],
                  "cache_control": {"type": "ephemeral"}},
                 {"type": "text", "text": "Thanks. And tomorrow?"}]}]
    second = claude.messages.create(model=MODEL, max_tokens=8, tools=[WEATHER], messages=turn2,
                                    metadata={"user_id": "session-7"})
    assert second.content and second.usage.cache_read_input_tokens > 0
    count = claude.messages.count_tokens(model=MODEL, tools=[WEATHER], messages=turn2)
    assert count.input_tokens == second.usage.input_tokens + second.usage.cache_read_input_tokens
    # A string tool result and a thinking block in the history are accepted too.
    turn2b = [*turn1, {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "x"},
                                                        *turn2[1]["content"]]},
              {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18C"}]}]
    assert claude.messages.create(model=MODEL, max_tokens=4, tools=[WEATHER], messages=turn2b).content


def test_messages_thinking_blocks(claude: anthropic.Anthropic) -> None:
    kw: dict[str, Any] = dict(model=MODEL, max_tokens=64, messages=HELLO, extra_body=forced(THINK),
                              thinking={"type": "enabled", "budget_tokens": 1024})
    msg = claude.messages.create(**kw)
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[0].thinking == "The user wants weather." and msg.content[1].text == "It is sunny."
    deltas = []
    with claude.messages.stream(**kw) as stream:
        for event in stream:
            if event.type == "content_block_delta":
                deltas.append(event.delta.type)
        final = stream.get_final_message()
    assert "thinking_delta" in deltas and "text_delta" in deltas
    assert [b.type for b in final.content] == ["thinking", "text"] and final.content[0].thinking == msg.content[0].thinking


def test_messages_history_with_hosted_tool_blocks(server: ServerProcess, claude: anthropic.Anthropic) -> None:
    # A conversation first served by Anthropic's API (its web search ran there) continues here:
    # the hosted call and its results reach the model as text, without the encrypted parts.
    history = [{"role": "user", "content": "Who won the 2022 World Cup?"},
               {"role": "assistant", "content": [
                   {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search",
                    "input": {"query": "2022 World Cup winner"}},
                   {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": [
                       {"type": "web_search_result", "title": "Argentina win the World Cup",
                        "url": "https://example.com/wc", "encrypted_content": "SECRETBLOB", "page_age": "2022"}]},
                   {"type": "text", "text": "Argentina won."}]},
               {"role": "user", "content": "And who was the runner-up?"}]
    counted = claude.messages.count_tokens(model=MODEL, messages=history)  # type: ignore[arg-type]
    plain = claude.messages.count_tokens(model=MODEL, messages=[history[0], {"role": "assistant", "content": "Argentina won."},
                                                               history[2]])  # type: ignore[arg-type]
    assert counted.input_tokens > plain.input_tokens + 10  # the search call and results are in the prompt
    msg = claude.messages.create(model=MODEL, max_tokens=8, messages=history)  # type: ignore[arg-type]
    assert msg.content and msg.stop_reason in ("end_turn", "max_tokens")
    from agentspeed.entrypoints.anthropic.protocol import MessagesRequest, template_messages

    rendered = template_messages(MessagesRequest(model=MODEL, max_tokens=8, messages=history))  # type: ignore[arg-type]
    text = rendered[1]["content"]
    assert "web_search" in text and "Argentina win the World Cup" in text and "https://example.com/wc" in text
    assert "SECRETBLOB" not in text and text.endswith("Argentina won.")
    assert "hosted-tool blocks given to the model as text: server_tool_use, web_search_tool_result" in server.log()


def test_messages_errors_in_anthropic_shape(server: ServerProcess, claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as nf:
        claude.messages.create(model="gpt-4o", max_tokens=4, messages=HELLO)
    assert nf.value.body["type"] == "error" and nf.value.body["error"]["type"] == "not_found_error"
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": [image]}])
    assert bad.value.body["error"]["type"] == "invalid_request_error" and "image" in bad.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude.messages.create(model=MODEL, max_tokens=4, messages=HELLO, tools=[WEATHER],
                               tool_choice={"type": "tool", "name": "nope"})
    assert "not among the tools" in bad.value.body["error"]["message"]
    raw = httpx.post(f"{server.url}/v1/messages", headers={"x-api-key": KEY}, json={"model": MODEL, "messages": HELLO})
    assert raw.status_code == 400 and raw.json()["error"] == {"type": "invalid_request_error",
                                                              "message": "max_tokens: Field required"}
    wrong = anthropic.Anthropic(base_url=server.url, api_key="nope", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as auth:
        wrong.messages.create(model=MODEL, max_tokens=4, messages=HELLO)
    assert auth.value.body["error"]["type"] == "authentication_error"
    # The beta client (?beta=true, anthropic-beta header) and Anthropic-only tools still work:
    # hosted tools are not offered to the model.
    msg = claude.beta.messages.create(model=MODEL, max_tokens=4, messages=HELLO, betas=["context-1m-2025-08-07"],
                                      tools=[{"type": "web_search_20250305", "name": "web_search"}, WEATHER])
    assert msg.content
    assert "web_search (web_search_20250305)" in server.log()


# ---- Responses ---------------------------------------------------------------------------
def test_responses_plain_and_stream_events_in_order(oai: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model=MODEL, input="Write a haiku about the sea.", max_output_tokens=24,
                              temperature=0, instructions="You are terse.", include=["reasoning.encrypted_content"],
                              reasoning={"effort": "low"}, parallel_tool_calls=True, prompt_cache_key="s1",
                              text={"format": {"type": "text"}, "verbosity": "low"})
    r = oai.responses.create(**kw)
    assert r.status in ("completed", "incomplete") and r.output_text
    assert r.usage.input_tokens > 0 and r.usage.output_tokens > 0
    events = list(oai.responses.create(stream=True, **kw))
    types = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert types[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{r.status}"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert events[-1].response.output_text == r.output_text


def test_responses_function_call_round_trip(oai: openai.OpenAI) -> None:
    tool = {"type": "function", "name": "get_weather", "description": "Current weather",
            "parameters": WEATHER["input_schema"], "strict": True}
    kw: dict[str, Any] = dict(model=MODEL, input="Weather in Paris? " * 8, tools=[tool], extra_body=forced(CALL))
    r = oai.responses.create(**kw)
    msg, call = r.output
    assert msg.type == "message" and msg.content[0].text == "Let me check. "
    assert call.type == "function_call" and call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    events = list(oai.responses.create(stream=True, **kw))
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(deltas) > 2 and "".join(deltas) == done.arguments == call.arguments
    added = [e.item.type for e in events if e.type == "response.output_item.added"]
    assert added == ["message", "function_call"]
    # The follow-up sends only the tool's output; the stored response supplies the rest.
    follow = oai.responses.create(model=MODEL, previous_response_id=r.id, tools=[tool], max_output_tokens=8,
                                  input=[{"type": "function_call_output", "call_id": call.call_id, "output": "18C"}])
    assert follow.previous_response_id == r.id and follow.output
    assert follow.usage.input_tokens_details.cached_tokens > 0
    assert oai.responses.retrieve(r.id).id == r.id
    # The same conversation sent whole (items as the client holds them) renders the same prompt.
    whole = oai.responses.create(model=MODEL, tools=[tool], max_output_tokens=8, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris? " * 8}]},
        *[o.model_dump(exclude_none=True) for o in r.output],
        {"type": "function_call_output", "call_id": call.call_id, "output": "18C"}])
    assert whole.usage.input_tokens == follow.usage.input_tokens


def test_responses_store_and_unknown_ids(oai: openai.OpenAI) -> None:
    r = oai.responses.create(model=MODEL, input="hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        oai.responses.create(model=MODEL, input="again", max_output_tokens=2, previous_response_id=r.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve("resp_missing")
    kept = [oai.responses.create(model=MODEL, input="hi", max_output_tokens=1).id for _ in range(9)]
    with pytest.raises(openai.NotFoundError):  # --responses-store-size 8: the oldest is gone
        oai.responses.retrieve(kept[0])
    assert oai.responses.retrieve(kept[-1]).id == kept[-1]
    with pytest.raises(openai.BadRequestError):
        oai.responses.create(model=MODEL, max_output_tokens=2, input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}])
    with pytest.raises(openai.BadRequestError):
        oai.responses.create(model=MODEL, input="x", text={"format": {"type": "json_schema", "name": "x",
                                                                      "schema": {"type": "nope"}}})


def test_responses_reasoning_custom_and_hosted_tools(server: ServerProcess, oai: openai.OpenAI) -> None:
    r = oai.responses.create(model=MODEL, input="weather?", extra_body=forced(THINK))
    reasoning, msg = r.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == "The user wants weather."
    assert msg.type == "message" and r.output_text == "It is sunny."
    assert r.usage.output_tokens_details.reasoning_tokens > 0
    events = list(oai.responses.create(model=MODEL, input="weather?", stream=True, extra_body=forced(THINK)))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == reasoning.content[0].text
    patch = '<tool_call>{"name": "apply_patch", "arguments": {"input": "*** Begin Patch"}}</tool_call>'
    r = oai.responses.create(model=MODEL, input="fix it", extra_body=forced(patch), tools=[
        {"type": "custom", "name": "apply_patch", "description": "Apply a patch"}, {"type": "web_search"}])
    [call] = r.output
    assert call.type == "custom_tool_call" and call.name == "apply_patch" and call.input == "*** Begin Patch"
    assert "web_search" in server.log()


# ---- chat completions, shared behaviour ----------------------------------------------------
def test_chat_reasoning_content(oai: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model="agent-model", messages=HELLO, extra_body=forced(THINK))
    m = oai.chat.completions.create(**kw).choices[0].message
    assert m.content == "It is sunny." and m.model_extra["reasoning_content"] == "The user wants weather."
    reasoning, content = [], []
    for chunk in oai.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            reasoning.append((c.delta.model_extra or {}).get("reasoning_content") or "")
            content.append(c.delta.content or "")
    assert "".join(reasoning) == "The user wants weather." and "".join(content) == "It is sunny."
    back = {"role": "assistant", "content": m.content, "reasoning_content": m.model_extra["reasoning_content"]}
    assert oai.chat.completions.create(model=MODEL, max_tokens=2, messages=[*HELLO, back, *HELLO]).choices


def test_schema_violations_and_health(server: ServerProcess) -> None:
    h = {"authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{server.url}/v1/completions", headers=h, json={"model": MODEL, "prompt": [[False]]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("prompt")
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    spec = httpx.get(f"{server.url}/openapi.json", headers=h).json()
    for path in ("/v1/messages", "/v1/responses", "/v1/chat/completions"):
        assert {"200", "400", "401", "404", "500", "503"} <= set(spec["paths"][path]["post"]["responses"]), path


# ---- requests of real agent size -----------------------------------------------------------
def make_long_context_model(root: Path) -> Path:
    """A random-weight 2-layer Llama with 32K positions and SmolLM2's tokenizer and chat
    template, so prompts of real agent size (tens of thousands of tokens) can be served."""
    from conftest import make_tiny

    from agentspeed.model_source import default_model_path
    from agentspeed.tokenizer import _gguf_tokenizer

    hf = _gguf_tokenizer(default_model_path())
    path = make_tiny("llama", root, vocab_size=len(hf), max_position_embeddings=32768,
                     bos_token_id=hf.bos_token_id, eos_token_id=hf.eos_token_id)
    hf.save_pretrained(path)  # the engine loads it from the directory like any HF model's
    return path


def agent_system_prompt(tokens: int) -> str:
    rules = [f"Rule {i}: when editing file src/module_{i % 97}.py keep the public function "
             f"handler_{i}() stable, run the tests in tests/test_{i % 31}.py and report any failure "
             f"with its traceback; never touch vendored code under third_party/{i % 13}/."
             for i in range(tokens // 40 + 1)]
    return "You are a coding agent working in a large repository.\n" + "\n".join(rules)


AGENT_TOOLS = [{"name": f"tool_{i}", "description": f"Tool number {i}: does step {i} of the workflow.",
                "input_schema": {"type": "object", "properties": {
                    "path": {"type": "string", "description": "a file path"},
                    "line": {"type": "integer"}, "dry_run": {"type": "boolean"}}, "required": ["path"]}}
               for i in range(24)]


def test_agent_sized_requests_on_a_long_context_model(tmp_path: Path) -> None:
    model = make_long_context_model(tmp_path)
    srv = ServerProcess([str(model), "--served-model-name", "long", "--kv-cache-memory", "64MiB"])
    try:
        claude = anthropic.Anthropic(base_url=srv.url, api_key="x", max_retries=0, timeout=600)
        system = agent_system_prompt(20_000)
        messages: list[dict[str, Any]] = [{"role": "user", "content": "Fix the failing test in tests/test_3.py."}]
        count = claude.messages.count_tokens(model="long", system=system, tools=AGENT_TOOLS, messages=messages)
        assert 20_000 <= count.input_tokens <= 32_000
        first = claude.messages.create(model="long", max_tokens=8, system=system, tools=AGENT_TOOLS,
                                       messages=messages, metadata={"user_id": "agent-1"})
        assert first.usage.input_tokens + first.usage.cache_read_input_tokens == count.input_tokens
        assert first.usage.output_tokens > 0
        messages += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                     {"role": "user", "content": "Go on."}]
        second = claude.messages.create(model="long", max_tokens=8, system=system, tools=AGENT_TOOLS,
                                        messages=messages, metadata={"user_id": "agent-1"})
        # turn 2 re-sends turn 1: all but the last page or so comes from the prefix cache
        assert second.usage.cache_read_input_tokens >= count.input_tokens - 64
    finally:
        assert srv.stop() == 0, srv.log()
