"""Tool-call parsers (--tool-call-parser) for the JSON-in-text formats:

    hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call>, any number (Hermes,
                 Qwen 2.5/3, SmolLM2-style templates); text before them is content
    llama3_json  {"name": ..., "parameters": {...}} as the whole output, optionally after
                 <|python_tag|>, several separated by ';' (Llama 3.1+ JSON tool calling)
    mistral      [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...] (v3 tokenizers) or
                 [TOOL_CALLS]name[ARGS]{...} repeated (v11+ tokenizers)

The contract a parser keeps (output.ToolStream relies on it): find() says where a tool-call
section begins, or may begin; scan(section, final) reads the section written so far into
calls, each with its name once complete and the arguments' JSON text so far, where a later
scan's arguments extend an earlier scan's. A call whose name is known stays a call; text
that never became one is returned as trailing content (or scan returns None: no call at all).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

from agentspeed.entrypoints.parsers.partial_json import Value, read_value, scan_object, skip_ws
from agentspeed.entrypoints.parsers.reasoning import _partial_suffix


@dataclass(slots=True)
class PartialCall:
    name: str | None  # None until the name is complete
    args: str  # the arguments' JSON text written so far
    # True: args is an unfinished object or array running to the end of the section, so
    # text without any of OPEN_STOPS only extends it (ToolStream then skips the rescan).
    open: bool = False


OPEN_STOPS = "}]<["  # what could end an open argument container, or begin a marker


Scan = tuple[list[PartialCall], str]  # calls, trailing content


class ToolParser:
    name: ClassVar[str]
    markers: ClassVar[tuple[str, ...]]
    # Formats whose markers are special tokens need them kept in the detokenized text.
    skip_special_tokens: ClassVar[bool] = True

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        """tools: the offered function definitions ({"name", "parameters"}), for formats
        whose argument types come from the schema."""
        self.schemas = {t["name"]: t.get("parameters") or {} for t in tools or [] if "name" in t}

    def find(self, buf: str, frm: int) -> tuple[int, bool] | None:
        """(start, certain) of a tool-call section in buf, searching from frm; certain=False
        for a partial marker at the end. None: no section yet."""
        hits = [i for m in self.markers if (i := buf.find(m, frm)) >= 0]
        if hits:
            return min(hits), True
        k = max(_partial_suffix(buf[frm:], m) for m in self.markers)
        return (len(buf) - k, False) if k else None

    def scan(self, section: str, final: bool) -> Scan | None:
        raise NotImplementedError


def block_body(section: str, start: int, close: str, final: bool) -> tuple[str, int | None]:
    """The text from start to `close` (or to the end, less a partial `close`), and the index
    just past `close` if it was found."""
    j = section.find(close, start)
    if j >= 0:
        return section[start:j], j + len(close)
    body = section[start:]
    if not final:
        body = body[: len(body) - _partial_suffix(body, close)]
    return body, None


def args_text(s: str, v: Value | None, ended: bool) -> str:
    """Arguments JSON text of a value: objects as written; a JSON string (some models quote
    their arguments) only once complete, decoded; missing -> "{}" once the call ended."""
    if v is None:
        return "{}" if ended else ""
    if v.start < len(s) and s[v.start] == '"':
        if v.end is None:
            return ""
        try:
            out = json.loads(s[v.start : v.end])
        except json.JSONDecodeError:
            return ""
        return out if isinstance(out, str) else ""
    return v.text(s)


def json_call(s: str, i: int, final: bool, args_keys: tuple[str, ...] = ("arguments", "parameters")
              ) -> tuple[PartialCall | None, int | None]:
    """An {"name": ..., <args key>: ...} object at s[i:]: (call, end). call None when it has
    no name (yet, or at all); end None while the object is unfinished."""
    obj = scan_object(s, i, final)
    name = obj.string(s, "name")
    if name is None:
        return None, obj.end
    v = next((obj.members[k] for k in args_keys if k in obj.members), None)
    is_open = v is not None and v.end is None and not final and s[v.start : v.start + 1] in ("{", "[")
    return PartialCall(name, args_text(s, v, obj.end is not None or final), is_open), obj.end


def call_array(s: str, i: int, final: bool) -> tuple[list[PartialCall], int | None]:
    """The calls of a JSON array of {"name", "arguments"} objects starting at s[i] ("["), and
    the index just past its "]" (None while unfinished)."""
    calls: list[PartialCall] = []
    i += 1
    while True:
        i = skip_ws(s, i)
        if i < len(s) and s[i] == ",":
            i = skip_ws(s, i + 1)
        if i >= len(s) or s[i] != "{":
            return calls, (i + 1 if i < len(s) and s[i] == "]" else None)
        call, end = json_call(s, i, final)
        if call is None:
            return calls, None
        calls.append(call)
        if end is None:
            return calls, None
        i = end


class ForcedCallsParser(ToolParser):
    """The output of a forced tool call (tool_choice required or named): a JSON array of
    {"name", "arguments"} objects and nothing else, whatever the model's own tool format,
    because a grammar built from the tools' schemas (entrypoints/structured.py) wrote it."""

    name = "forced"
    markers = ("[",)

    def find(self, buf: str, frm: int) -> tuple[int, bool] | None:
        return (0, True) if frm == 0 and buf.lstrip().startswith("[") else None

    def scan(self, section: str, final: bool) -> Scan | None:
        i = skip_ws(section, 0)
        calls, after = call_array(section, i, final)
        if not calls:
            return None if final else ([], "")
        return calls, section[after:].strip() if after is not None else ""


class HermesToolParser(ToolParser):
    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    markers = (OPEN,)

    def scan(self, section: str, final: bool) -> Scan | None:
        calls: list[PartialCall] = []
        trailing: list[str] = []
        pos = 0
        while True:
            i = section.find(self.OPEN, pos)
            if i < 0:
                trailing.append(section[pos:])
                break
            trailing.append(section[pos:i])
            body, after = block_body(section, i + len(self.OPEN), self.CLOSE, final)
            call, _ = json_call(body, 0, final or after is not None)
            if call is not None:
                call.open = call.open and i + len(self.OPEN) + len(body) == len(section)
                calls.append(call)
            elif after is not None or final:  # a block that is not a call stays text
                trailing.append(section[i : after if after is not None else len(section)])
            if after is None:
                break
            pos = after
        if not calls:
            return None if final else ([], "")
        return calls, "".join(trailing).strip()


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    TAG = "<|python_tag|>"
    markers = (TAG,)

    def find(self, buf: str, frm: int) -> tuple[int, bool] | None:
        if frm > 0:
            return None  # calls are the whole output: text already shown means none
        s = buf.lstrip()
        if s.startswith((self.TAG, "{")):
            return 0, True
        return (0, False) if self.TAG.startswith(s) else None

    def scan(self, section: str, final: bool) -> Scan | None:
        s = section.lstrip()
        s = s.removeprefix(self.TAG)
        calls: list[PartialCall] = []
        i = 0
        while True:
            i = skip_ws(s, i)
            if i >= len(s) or s[i] != "{":
                break
            call, end = json_call(s, i, final)
            if call is None:
                break
            calls.append(call)
            if end is None:
                i = len(s)
                break
            i = skip_ws(s, end)
            if i < len(s) and s[i] == ";":
                i += 1
        if not calls:
            return None if final else ([], "")
        return calls, s[i:].strip()


class MistralToolParser(ToolParser):
    name = "mistral"
    MARK, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
    markers = (MARK,)
    skip_special_tokens = False

    def scan(self, section: str, final: bool) -> Scan | None:
        calls: list[PartialCall] = []
        trailing = ""
        for chunk in section.split(self.MARK)[1:]:
            i = skip_ws(chunk, 0)
            if i >= len(chunk):
                continue
            if chunk[i] == "[":  # a JSON array of calls
                more, after = call_array(chunk, i, final)
                calls += more
                if after is not None:
                    trailing += chunk[after:]
                continue
            j = chunk.find(self.ARGS, i)
            if j < 0:
                if final:
                    trailing += chunk
                continue
            name = chunk[i:j].split(self.CALL_ID)[0].strip()
            if not name or any(c in name for c in " {}[]\"'"):
                trailing += chunk
                continue
            v = read_value(chunk, j + len(self.ARGS), final)
            calls.append(PartialCall(name, args_text(chunk, v, final)))
            if v is not None and v.end is not None:
                trailing += chunk[v.end :]
        if not calls:
            return None if final else ([], "")
        return calls, trailing.strip()
