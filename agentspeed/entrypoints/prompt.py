"""Conversations -> prompt token ids, the same way for every API.

Each API (chat completions, messages, responses) turns its own request shape into the
messages HF chat templates expect; this module holds what they share: tool calls with
their arguments as a dict (what templates are written for: `arguments | tojson` on a
string would quote it twice), and the one rendering call with its errors as 400s."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from agentspeed.entrypoints.errors import APIError
from agentspeed.errors import ConfigError
from agentspeed.tokenizer import Tokenizer


def template_tool_call(call_id: str, name: str, arguments: str | dict[str, Any]) -> dict[str, Any]:
    """A tool call as chat templates expect it; arguments that are not a JSON object are
    passed on as the text the client sent."""
    args: Any = arguments
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            args = parsed
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def function_tool(name: str, description: str | None, parameters: dict[str, Any] | None) -> dict[str, Any]:
    """A tool definition as chat templates expect it (OpenAI's function shape)."""
    fn: dict[str, Any] = {"name": name, "parameters": parameters or {"type": "object", "properties": {}}}
    if description:
        fn["description"] = description
    return {"type": "function", "function": fn}


def render(tok: Tokenizer, messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None,
           add_generation_prompt: bool = True, param: str = "messages", **template_kwargs: Any) -> list[int]:
    """The prompt's token ids; a 400 (naming `param`) without a chat template or when the
    template rejects the conversation."""
    try:
        return tok.apply_chat_template(messages, add_generation_prompt, tools=tools or None, **template_kwargs)
    except (ConfigError, ValueError) as e:
        raise APIError(400, str(e), param=param) from None
