"""Which parsers a server uses: the registry behind --tool-call-parser / --reasoning-parser
and the defaults read from the chat template when the flags are not given."""

from __future__ import annotations

from agentspeed.entrypoints.parsers.reasoning import REASONING_PARSERS
from agentspeed.entrypoints.parsers.tool_parsers import (
    HermesToolParser,
    Llama3JsonToolParser,
    MistralToolParser,
    ToolParser,
)
from agentspeed.entrypoints.parsers.tool_parsers_tokens import (
    DeepSeekV3ToolParser,
    KimiK2ToolParser,
    Qwen3CoderToolParser,
)

TOOL_PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (
    HermesToolParser, Llama3JsonToolParser, MistralToolParser, DeepSeekV3ToolParser, KimiK2ToolParser,
    Qwen3CoderToolParser)}

# The first marker found in the template picks the format (the order matters: Qwen3-Coder
# templates also contain <tool_call>, which is hermes' marker).
_TEMPLATE_MARKERS = (
    ("<｜tool▁calls▁begin｜>", "deepseek_v3"),
    ("<|tool_calls_section_begin|>", "kimi_k2"),
    ("<function=", "qwen3_coder"),
    ("[TOOL_CALLS]", "mistral"),
    ("<|python_tag|>", "llama3_json"),
)


def default_tool_parser(chat_template: str | None) -> str:
    """The format the chat template teaches the model; hermes when it names none."""
    for marker, name in _TEMPLATE_MARKERS:
        if chat_template and marker in chat_template:
            return name
    return "hermes"


def default_reasoning_parser(chat_template: str | None) -> str | None:
    """deepseek_r1 for DeepSeek templates that think, qwen3 for other templates that know
    </think>; None (no reasoning split) otherwise."""
    if not chat_template or "</think>" not in chat_template:
        return None
    return "deepseek_r1" if "<｜Assistant｜>" in chat_template else "qwen3"


__all__ = ["REASONING_PARSERS", "TOOL_PARSERS", "default_reasoning_parser", "default_tool_parser"]
