"""Reasoning and tool-call parsers on literal model outputs: the non-streamed parse, and the
same output streamed in pieces reassembling to exactly the same result."""

from __future__ import annotations

import json

import pytest

from agentspeed.entrypoints.parsers.output import (
    OutputParser,
    Parsed,
    Text,
    ToolCallArgs,
    ToolCallStart,
)
from agentspeed.entrypoints.parsers.reasoning import ReasoningSplitter
from agentspeed.entrypoints.parsers.select import (
    TOOL_PARSERS,
    default_reasoning_parser,
    default_tool_parser,
)

WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
    "extra": {"type": "object"}}}}
TOOLS = [WEATHER, {"name": "read_file", "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}]


def make(tool: str | None, reasoning: str | None = None, prompt: str = "") -> OutputParser:
    return OutputParser(ReasoningSplitter(reasoning, prompt) if reasoning else None,
                        TOOL_PARSERS[tool](TOOLS) if tool else None)


def streamed(tool: str | None, text: str, step: int, reasoning: str | None = None, prompt: str = "") -> Parsed:
    p, out = make(tool, reasoning, prompt), Parsed()
    for i in range(0, len(text), step):
        out.add(p.feed(text[i : i + step]))
    out.add(p.finish())
    return out


def check(tool: str | None, text: str, reasoning: str | None = None, prompt: str = "") -> Parsed:
    whole = make(tool, reasoning, prompt).parse(text)
    for step in (1, 2, 3, 7):
        assert streamed(tool, text, step, reasoning, prompt) == whole, step
    return whole


def calls(p: Parsed) -> list[tuple[str, object]]:
    return [(n, json.loads(a)) for n, a in p.calls]


CASES = {
    "hermes": [
        ('I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>',
         "I will check.\n", [("get_weather", {"city": "Paris", "days": 3})]),
        ('<tool_call>{"name": "read_file", "arguments": {"path": "a.py"}}</tool_call>\n'
         '<tool_call>{"name": "read_file", "arguments": "{\\"path\\": \\"b.py\\"}"}</tool_call>',
         "", [("read_file", {"path": "a.py"}), ("read_file", {"path": "b.py"})]),
    ],
    "llama3_json": [
        ('{"name": "get_weather", "parameters": {"city": "Oslo"}}', "", [("get_weather", {"city": "Oslo"})]),
        ('<|python_tag|>{"name": "read_file", "parameters": {"path": "x"}}; {"name": "get_weather", '
         '"parameters": {"city": "Rome", "days": 10}}',
         "", [("read_file", {"path": "x"}), ("get_weather", {"city": "Rome", "days": 10})]),
    ],
    "mistral": [
        ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Lyon"}}, {"name": "read_file", '
         '"arguments": {"path": "p"}}]', "", [("get_weather", {"city": "Lyon"}), ("read_file", {"path": "p"})]),
        ('Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Nice", "days": 2}[TOOL_CALLS]read_file[ARGS]{"path": "q"}',
         "Sure.", [("get_weather", {"city": "Nice", "days": 2}), ("read_file", {"path": "q"})]),
    ],
    "deepseek_v3": [
        ("Let me look.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
         '{"city": "Kyiv"}\n```<｜tool▁call▁end｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>read_file\n```json\n'
         '{"path": "r"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
         "Let me look.", [("get_weather", {"city": "Kyiv"}), ("read_file", {"path": "r"})]),
        ('<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Baku", "days": 1}'
         "<｜tool▁call▁end｜><｜tool▁calls▁end｜>", "", [("get_weather", {"city": "Baku", "days": 1})]),
    ],
    "kimi_k2": [
        ('ok <|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>'
         '{"city": "Lima"}<|tool_call_end|><|tool_call_begin|>functions.read_file:1<|tool_call_argument_begin|>'
         '{"path": "s"}<|tool_call_end|><|tool_calls_section_end|>',
         "ok ", [("get_weather", {"city": "Lima"}), ("read_file", {"path": "s"})]),
    ],
    "qwen3_coder": [
        ("Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nSan José\n</parameter>\n"
         "<parameter=days>\n3\n</parameter>\n<parameter=metric>\ntrue\n</parameter>\n<parameter=extra>\n"
         '{"a": [1, 2]}\n</parameter>\n</function>\n</tool_call>',
         "Checking.\n", [("get_weather", {"city": "San José", "days": 3, "metric": True, "extra": {"a": [1, 2]}})]),
        ("<tool_call>\n<function=read_file>\n<parameter=path>\n12\n</parameter>\n</function>\n</tool_call>\n"
         "<tool_call>\n<function=get_weather>\n<parameter=city>\nx\n</parameter>\n<parameter=days>\nsoon\n"
         "</parameter>\n</function>\n</tool_call>",
         "", [("read_file", {"path": "12"}), ("get_weather", {"city": "x", "days": "soon"})]),
    ],
}


@pytest.mark.parametrize(("tool", "text", "content", "expected"),
                         [(t, *c) for t, cs in CASES.items() for c in cs])
def test_tool_parser_literal_outputs(tool: str, text: str, content: str, expected: list[tuple[str, object]]) -> None:
    p = check(tool, text)
    assert p.content == content
    assert calls(p) == expected


@pytest.mark.parametrize("tool", sorted(TOOL_PARSERS))
def test_plain_text_and_malformed_calls_stay_text(tool: str) -> None:
    for text in ["Just an answer, no tools. {braces} <tags> [brackets]", "", "   "]:
        p = check(tool, text)
        assert (p.content, p.calls) == (text, [])
    for text in ['<tool_call>{"name": 3}</tool_call>', "<tool_call>not json", "[TOOL_CALLS]oops",
                 "<｜tool▁call▁begin｜>garbage", "<|tool_call_begin|>nothing", "<function=", '{"no": "name"}']:
        p = check(tool, text)
        assert p.calls == [] and p.content == text, (tool, text)


def test_tool_call_streams_name_first_then_argument_deltas() -> None:
    p = make("hermes")
    text = 'Hi <tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}</tool_call>'
    events = [e for i in range(len(text)) for e in p.feed(text[i])] + p.finish()
    assert events[0] == Text("H")
    starts = [k for k, e in enumerate(events) if isinstance(e, ToolCallStart)]
    assert len(starts) == 1 and events[starts[0]] == ToolCallStart(0, "get_weather")
    deltas = [e for e in events if isinstance(e, ToolCallArgs)]
    assert len(deltas) > 5 and all(events.index(d) > starts[0] for d in deltas)  # incremental, after the name
    assert "".join(d.delta for d in deltas) == '{"city": "Paris", "days": 3}'
    assert "".join(e.text for e in events if isinstance(e, Text)) == "Hi "


def test_partial_marker_is_held_then_released_as_text() -> None:
    p = make("hermes")
    assert p.feed("a <tool") == [Text("a ")]
    assert p.feed("box") == [Text("<toolbox")]
    assert p.feed(" <tool_c") == [Text(" ")]
    assert p.finish() == [Text("<tool_c")]


@pytest.mark.parametrize(("parser", "prompt", "text", "reasoning", "content"), [
    ("deepseek_r1", "<｜Assistant｜>", "Let me think.\nok</think>\n\nThe answer is 4.", "Let me think.\nok",
     "The answer is 4."),
    ("deepseek_r1", "<｜Assistant｜><think>\n", "hmm</think>4", "hmm", "4"),
    ("deepseek_r1", "", "<think>hmm</think>\n4", "hmm", "4"),
    ("deepseek_r1", "", "no end tag, all reasoning", "no end tag, all reasoning", ""),
    ("qwen3", "<|im_start|>assistant\n", "<think>\nplan\n</think>\n\nDone.", "\nplan\n", "Done."),
    ("qwen3", "<|im_start|>assistant\n", "Done without thinking.", "", "Done without thinking."),
    ("qwen3", "<|im_start|>assistant\n<think>\n\n</think>\n\n", "<think>x</think>y", "x", "y"),
    ("qwen3", "<|im_start|>assistant\n<think>\n\n</think>\n\n", "Direct.", "", "Direct."),
    ("qwen3", "<|im_start|>assistant\n<think>\n", "plan</think>answer", "plan", "answer"),
    ("qwen3", "", "<thin", "", "<thin"),
])
def test_reasoning_split(parser: str, prompt: str, text: str, reasoning: str, content: str) -> None:
    p = check(None, text, parser, prompt)
    assert (p.reasoning, p.content) == (reasoning, content)


@pytest.mark.parametrize("tool", ["hermes", "qwen3_coder"])
def test_tool_call_after_reasoning_is_parsed(tool: str) -> None:
    call = ('<tool_call>{"name": "read_file", "arguments": {"path": "a"}}</tool_call>' if tool == "hermes" else
            "<tool_call>\n<function=read_file>\n<parameter=path>\na\n</parameter>\n</function>\n</tool_call>")
    # the reasoning mentions a tool call: it stays reasoning
    text = f"<think>I should call read_file, like <tool_call> ...</think>\n\n{call}"
    p = check(tool, text, "qwen3", "<|im_start|>assistant\n")
    assert p.reasoning == "I should call read_file, like <tool_call> ..."
    assert calls(p) == [("read_file", {"path": "a"})] and p.content == ""


@pytest.mark.parametrize(("tool", "text"), [
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": "Par'),
    ("qwen3_coder", "<tool_call><function=get_weather><parameter=city>Par"),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": 12'),
    ("kimi_k2", "<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"),
])
def test_unfinished_call_at_the_end_still_reassembles(tool: str, text: str) -> None:
    p = check(tool, text)  # cut off by max_tokens: the call is reported as far as it got
    assert [n for n, _ in p.calls] == ["get_weather"]


def test_default_parsers_from_the_template() -> None:
    assert default_tool_parser(None) == "hermes"
    assert default_tool_parser("{{ '<tool_call>' }}") == "hermes"
    assert default_tool_parser("<tool_call><function={{ name }}>") == "qwen3_coder"
    assert default_tool_parser("<|python_tag|>") == "llama3_json"
    assert default_tool_parser("[TOOL_CALLS]") == "mistral"
    assert default_tool_parser("<｜tool▁calls▁begin｜>") == "deepseek_v3"
    assert default_tool_parser("<|tool_calls_section_begin|>") == "kimi_k2"
    assert default_reasoning_parser("<|im_start|></think>") == "qwen3"
    assert default_reasoning_parser("<｜Assistant｜></think>") == "deepseek_r1"
    assert default_reasoning_parser("<|im_start|>") is None


def test_long_arguments_stream_in_token_sized_pieces() -> None:
    """A file-writing call: most pieces take the open-arguments fast path (no rescan), and
    the result equals the whole-text parse."""
    content = "def f(x):\n    return {'a': [x, 2]}  # <- brackets and a < sign\n" * 40
    body = json.dumps({"name": "read_file", "arguments": {"path": "a.py", "content": content}})
    text = f"Writing.\n<tool_call>\n{body}\n</tool_call>\nDone?"
    whole = check("hermes", text)
    assert calls(whole) == [("read_file", {"path": "a.py", "content": content})]
    assert whole.content == "Writing.\nDone?"
    for step in (4, 5):
        assert streamed("hermes", text, step) == whole
