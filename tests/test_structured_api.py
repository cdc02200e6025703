"""Constrained output through the APIs, driven by the official SDKs on a real server:
response_format json_schema (chat, streamed and not), vLLM's structured_outputs (chat and
completions), forced tool calls in chat, Responses and Messages (arguments valid against
the tool schema), Responses text.format and Messages output_config.format, and the
metrics. Bad constraints are 400s (test_server.py::test_invalid_requests)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import anthropic
import httpx
import jsonschema
import openai
import pytest
from server_util import ServerProcess

CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                         "parameters": CITY}}


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    srv = ServerProcess(["--model-alias", "*"])
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def oai(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)


def test_chat_response_format_and_structured_outputs(oai: openai.OpenAI) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "w", "schema": CITY, "strict": True}}
    for seed in range(3):
        r = oai.chat.completions.create(model="m", messages=ASK, max_tokens=60, temperature=1.0, seed=seed,
                                        response_format=rf)  # type: ignore[arg-type]
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content or ""), CITY)
    text = "".join(c.choices[0].delta.content or "" for c in oai.chat.completions.create(
        model="m", messages=ASK, max_tokens=60, temperature=0, response_format=rf, stream=True)  # type: ignore[arg-type]
        if c.choices)
    jsonschema.validate(json.loads(text), CITY)
    r = oai.chat.completions.create(model="m", messages=ASK, max_tokens=8, temperature=0,
                                    extra_body={"structured_outputs": {"choice": ["sunny", "rainy"]}})
    assert r.choices[0].message.content in ("sunny", "rainy")
    c = oai.completions.create(model="m", prompt="Order number:", max_tokens=12, temperature=0,
                               extra_body={"structured_outputs": {"regex": "[A-Z]{2}-[0-9]{4}"}})
    assert len(c.choices[0].text) == 7 and c.choices[0].text[2] == "-"


def test_chat_forced_tool_calls(oai: openai.OpenAI) -> None:
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = oai.chat.completions.create(model="m", messages=ASK, max_tokens=80, temperature=0.8, seed=1,
                                        tools=[TOOL], tool_choice=choice)  # type: ignore[arg-type]
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and ch.message.tool_calls
        for call in ch.message.tool_calls:
            assert call.function.name == "get_weather"  # type: ignore[union-attr]
            jsonschema.validate(json.loads(call.function.arguments), CITY)  # type: ignore[union-attr]
    args = ""
    for c in oai.chat.completions.create(model="m", messages=ASK, max_tokens=80, temperature=0, tools=[TOOL],
                                         tool_choice="required", stream=True):  # type: ignore[arg-type]
        for tc in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            args += tc.function.arguments or "" if tc.function else ""
    jsonschema.validate(json.loads(args), CITY)


def test_responses_forced_call_and_text_format(oai: openai.OpenAI) -> None:
    tool = {"type": "function", "name": "get_weather", "parameters": CITY}
    r = oai.responses.create(model="m", input="Weather in Oslo?", max_output_tokens=80, temperature=0,
                             tools=[tool], tool_choice="required")  # type: ignore[list-item]
    calls = [it for it in r.output if it.type == "function_call"]
    assert calls and r.status == "completed"
    jsonschema.validate(json.loads(calls[0].arguments), CITY)  # type: ignore[union-attr]
    r = oai.responses.create(model="m", input="Weather in Oslo?", max_output_tokens=60, temperature=0,
                             text={"format": {"type": "json_schema", "name": "w", "schema": CITY}})
    jsonschema.validate(json.loads(r.output_text), CITY)


def test_messages_forced_tool_and_output_format(server: ServerProcess) -> None:
    claude = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0, timeout=120)
    tool = {"name": "get_weather", "description": "Weather in a city", "input_schema": CITY}
    for choice in ({"type": "any"}, {"type": "tool", "name": "get_weather"}):
        msg = claude.messages.create(model="m", max_tokens=80, messages=ASK, tools=[tool],  # type: ignore[list-item]
                                     tool_choice=choice)  # type: ignore[arg-type]
        uses = [b for b in msg.content if b.type == "tool_use"]
        assert msg.stop_reason == "tool_use" and uses
        jsonschema.validate(uses[0].input, CITY)  # type: ignore[union-attr]
    msg = claude.messages.create(model="m", max_tokens=60, messages=ASK,
                                 extra_body={"output_config": {"format": {"type": "json_schema", "schema": CITY}}})
    jsonschema.validate(json.loads(msg.content[0].text), CITY)  # type: ignore[union-attr]
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model="m", max_tokens=8, messages=ASK,
                               extra_body={"output_config": {"format": {"type": "json_schema",
                                                                        "schema": {"type": "nope"}}}})
    m = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert 'agentspeed:spec_decode_disabled_requests_total{model_name=' in m
    assert "agentspeed:structured_output_grammar_cache_hits_total" in m
