"""Tool-call parsers for the formats framed by special tokens or tags, not JSON objects:

    deepseek_v3  <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
                 ```json {...} ```<｜tool▁call▁end｜>...; V3.1 and later write
                 <｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>
    kimi_k2      <|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:0
                 <|tool_call_argument_begin|>{...}<|tool_call_end|>...
    qwen3_coder  <tool_call><function=NAME><parameter=P>value</parameter>...</function></tool_call>
                 (Qwen3-Coder, Qwen3.5): values are raw text, typed by the tool's schema

Same contract as tool_parsers.py.
"""

from __future__ import annotations

import json
from typing import Any

from agentspeed.entrypoints.parsers.partial_json import read_value
from agentspeed.entrypoints.parsers.tool_parsers import (
    PartialCall,
    Scan,
    ToolParser,
    args_text,
    block_body,
)


def _blocks(section: str, open_: str, close: str, final: bool) -> tuple[list[tuple[str, bool]], str]:
    """Each open_..close block: (body, complete), and the text outside blocks."""
    out: list[tuple[str, bool]] = []
    outside: list[str] = []
    pos = 0
    while True:
        i = section.find(open_, pos)
        if i < 0:
            outside.append(section[pos:])
            break
        outside.append(section[pos:i])
        body, after = block_body(section, i + len(open_), close, final)
        out.append((body, after is not None or final))
        if after is None:
            break
        pos = after
    return out, "".join(outside)


class DeepSeekV3ToolParser(ToolParser):
    name = "deepseek_v3"
    CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
    BEGIN, SEP, END = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"
    markers = (CALLS_BEGIN, BEGIN)
    skip_special_tokens = False

    def scan(self, section: str, final: bool) -> Scan | None:
        blocks, outside = _blocks(section, self.BEGIN, self.END, final)
        calls: list[PartialCall] = []
        for body, complete in blocks:
            call = self._call(body, complete)
            if call is None:
                break
            calls.append(call)
        if not calls:
            return None if final else ([], "")
        trailing = outside.replace(self.CALLS_BEGIN, "").replace(self.CALLS_END, "").strip()
        return calls, trailing

    def _call(self, body: str, complete: bool) -> PartialCall | None:
        sep = body.find(self.SEP)
        if sep < 0:
            return None
        left, right = body[:sep].strip(), body[sep + len(self.SEP) :]
        if left != "function":  # V3.1+: NAME<sep>{json}
            return PartialCall(left, args_text(right, read_value(right, 0, complete), complete)) if left else None
        nl = right.find("\n")
        if nl < 0:
            return PartialCall(right.strip(), "{}") if complete and right.strip() else None
        name, rest = right[:nl].strip(), right[nl + 1 :].lstrip()
        fence = "```json"
        if rest.startswith(fence):
            rest = rest[len(fence) :]
        elif fence.startswith(rest) and not complete:
            return PartialCall(name, "")
        v = read_value(rest, 0, complete)
        return PartialCall(name, args_text(rest, v, complete))


class KimiK2ToolParser(ToolParser):
    name = "kimi_k2"
    SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
    BEGIN, ARG, END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
    markers = (SECTION_BEGIN, BEGIN)
    skip_special_tokens = False

    def scan(self, section: str, final: bool) -> Scan | None:
        blocks, outside = _blocks(section, self.BEGIN, self.END, final)
        calls: list[PartialCall] = []
        for body, complete in blocks:
            a = body.find(self.ARG)
            if a < 0:
                break
            ident = body[:a].strip()  # functions.NAME:INDEX
            name = ident.removeprefix("functions.").rsplit(":", 1)[0]
            if not name:
                break
            rest = body[a + len(self.ARG) :]
            calls.append(PartialCall(name, args_text(rest, read_value(rest, 0, complete), complete)))
        if not calls:
            return None if final else ([], "")
        return calls, outside.replace(self.SECTION_BEGIN, "").replace(self.SECTION_END, "").strip()


class Qwen3CoderToolParser(ToolParser):
    name = "qwen3_coder"
    FUNC, FUNC_END = "<function=", "</function>"
    PARAM, PARAM_END = "<parameter=", "</parameter>"
    markers = ("<tool_call>", FUNC)

    def scan(self, section: str, final: bool) -> Scan | None:
        blocks, outside = _blocks(section, self.FUNC, self.FUNC_END, final)
        calls: list[PartialCall] = []
        for body, complete in blocks:
            gt = body.find(">")
            if gt < 0:
                if complete and body.strip():
                    calls.append(PartialCall(body.strip(), "{}"))
                break
            name = body[:gt].strip()
            calls.append(PartialCall(name, self._args(name, body[gt + 1 :], complete)))
        if not calls:
            return None if final else ([], "")
        trailing = outside.replace("<tool_call>", "").replace("</tool_call>", "").strip()
        return calls, trailing

    def _args(self, fn: str, body: str, complete: bool) -> str:
        """'{"p": value, ...' one parameter at a time, each once its closing tag (or, at the
        end, the next tag) is written; '}' once the function is complete."""
        props = self.schemas.get(fn, {}).get("properties") or {}
        members: list[str] = []
        pos = 0
        while True:
            i = body.find(self.PARAM, pos)
            if i < 0:
                break
            gt = body.find(">", i)
            if gt < 0:
                break
            pname = body[i + len(self.PARAM) : gt].strip()
            j = body.find(self.PARAM_END, gt)
            nxt = body.find(self.PARAM, gt)
            if j < 0 or (0 <= nxt < j):  # a missing close tag: the value ends at the next tag
                if nxt >= 0:
                    j = nxt
                elif complete:
                    j = len(body)
                else:
                    break
            raw = body[gt + 1 : j]
            value = _typed(raw.removeprefix("\n").removesuffix("\n"), props.get(pname) or {})
            members.append(f"{json.dumps(pname, ensure_ascii=False)}: {json.dumps(value, ensure_ascii=False)}")
            pos = j
        return "{" + ", ".join(members) + ("}" if complete else "")


def _typed(raw: str, schema: dict[str, Any]) -> Any:
    """A parameter's raw text as the JSON value its schema asks for; text that does not fit
    the type stays a string (the tool gets what the model wrote). No type: any JSON value,
    else the text."""
    t = schema.get("type")
    if isinstance(t, list):
        t = next((x for x in t if x != "null"), None)
    if t == "string":
        return raw
    s = raw.strip()
    if t == "boolean" and s in ("True", "False"):  # models trained on Python write these
        return s == "True"
    try:
        v = json.loads(s)
    except json.JSONDecodeError:
        return raw
    fits = {"integer": isinstance(v, int) and not isinstance(v, bool),
            "number": isinstance(v, int | float) and not isinstance(v, bool),
            "boolean": isinstance(v, bool), "object": isinstance(v, dict), "array": isinstance(v, list)}
    return v if fits.get(str(t), True) else raw
