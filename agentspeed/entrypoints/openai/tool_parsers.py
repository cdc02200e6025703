"""Tool-call parsers: model output text -> (content, OpenAI tool calls), one per model family.

    hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call>  (Hermes, Qwen 2.5/3,
                 SmolLM2-style templates); any number of calls, text before them is content
    llama3_json  {"name": ..., "parameters": {...}} as the whole output, optionally after
                 <|python_tag|>, several separated by ';' (Llama 3.1+ JSON tool calling)

Contract: parse(text) never raises; text that is not a well-formed call stays content.
`tools_start(text)` gives the index where a tool-call section begins (or may begin), so a
stream can show the content before it and hold back the rest until the end.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any


def _call(name: str, args: Any) -> dict[str, Any]:
    arguments = args if isinstance(args, str) else json.dumps(args if args is not None else {}, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


class ToolParser:
    name = ""

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        raise NotImplementedError

    def tools_start(self, text: str) -> int | None:
        """Index where tool calls start or could start (a marker prefix at the end), else None."""
        raise NotImplementedError


class HermesToolParser(ToolParser):
    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    _BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        start = text.find(self.OPEN)
        if start < 0:
            return text, []
        calls = []
        for body in self._BLOCK.findall(text[start:]):
            try:
                obj = json.loads(body)
            except json.JSONDecodeError:
                return text, []
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                return text, []
            calls.append(_call(obj["name"], obj.get("arguments", obj.get("parameters"))))
        content = text[:start].strip()
        return (content or None), calls

    def tools_start(self, text: str) -> int | None:
        i = text.find(self.OPEN)
        if i >= 0:
            return i
        for k in range(min(len(self.OPEN) - 1, len(text)), 0, -1):  # a marker cut mid-way
            if self.OPEN.startswith(text[-k:]):
                return len(text) - k
        return None


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    TAG = "<|python_tag|>"

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        body = text.strip()
        body = body.removeprefix(self.TAG).strip()
        if not body.startswith("{"):
            return text, []
        calls = []
        dec = json.JSONDecoder()
        i = 0
        while i < len(body):
            try:
                obj, end = dec.raw_decode(body, i)
            except json.JSONDecodeError:
                return text, []
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                return text, []
            calls.append(_call(obj["name"], obj.get("parameters", obj.get("arguments"))))
            i = end
            while i < len(body) and body[i] in " \t\r\n;":
                i += 1
        return None, calls

    def tools_start(self, text: str) -> int | None:
        s = text.lstrip()
        if not s:
            return 0  # nothing shown yet: could still become a call
        if s.startswith("{") or (self.TAG.startswith(s[: len(self.TAG)]) and s[:1] == "<"):
            return 0
        return None


TOOL_PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesToolParser, Llama3JsonToolParser)}


def default_tool_parser(architecture: str, chat_template: str | None) -> str:
    """A parser suited to the model: llama3_json for Llama 3 templates, else hermes."""
    if chat_template and "<|python_tag|>" in chat_template:
        return "llama3_json"
    return "hermes"
