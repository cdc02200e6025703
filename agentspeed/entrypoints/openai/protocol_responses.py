"""OpenAI Responses API request bodies (pydantic), and their conversion to chat-template
messages.

Every field of the published API is accepted. No effect here: `include`, `reasoning` (effort and summary: a model thinks
as its template says), `text.verbosity`, `metadata`, `user`, `safety_identifier`,
`service_tier`, `truncation`, `prompt_cache_key` (except as the session key when no
routing header is sent), `stream_options`, tools' `strict`. Hosted tools (web search, file
search, computer use, code interpreter, image generation, MCP, local shell) are not offered
to the model and are named in a warning log line. 400s are for what would change the
answer and cannot be honoured: image and file inputs, `background`, `conversation`,
`item_reference` items. `tool_choice` required or named and `text.format` json_schema /
json_object constrain decoding (entrypoints/structured.py); `parallel_tool_calls` false
limits a forced call to one.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agentspeed.entrypoints.errors import APIError
from agentspeed.entrypoints.prompt import function_tool, template_tool_call

log = logging.getLogger("agentspeed.server")


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Base):
    type: Literal["input_text", "output_text", "text", "refusal", "summary_text", "reasoning_text"]
    text: str = ""
    refusal: str | None = None


class OtherPart(_Base):
    type: str  # input_image, input_file, input_audio, ...


def _text(parts: str | list[TextPart | OtherPart], where: str) -> str:
    if isinstance(parts, str):
        return parts
    out = []
    for p in parts:
        if not isinstance(p, TextPart):
            raise APIError(400, f"{where}: content type {p.type!r} is not supported (text only)", param="input")
        out.append(p.refusal if p.type == "refusal" and p.refusal else p.text)
    return "".join(out)


class MessageItem(_Base):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[TextPart | OtherPart]


class FunctionCallItem(_Base):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str = ""


class CustomToolCallItem(_Base):
    type: Literal["custom_tool_call"]
    call_id: str
    name: str
    input: str = ""


class ToolOutputItem(_Base):
    type: Literal["function_call_output", "custom_tool_call_output"]
    call_id: str
    output: str | list[TextPart | OtherPart]


class ReasoningItem(_Base):
    type: Literal["reasoning"]
    summary: list[TextPart] = Field(default_factory=list)
    content: list[TextPart] | None = None


class OtherItem(_Base):
    type: str


Item = MessageItem | FunctionCallItem | CustomToolCallItem | ToolOutputItem | ReasoningItem | OtherItem


class FunctionTool(_Base):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class CustomTool(_Base):
    type: Literal["custom"]
    name: str
    description: str | None = None


class OtherTool(_Base):
    type: str


class TextFormat(_Base):
    type: str = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.type, **({"schema": self.schema_} if self.schema_ is not None else {})}


class TextConfig(_Base):
    format: TextFormat | None = None


class ResponsesRequest(_Base):
    model: str | None = None
    input: str | list[Item]
    instructions: str | None = None
    tools: list[FunctionTool | CustomTool | OtherTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    prompt_cache_key: str | None = None
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    # Test hook (only with --enable-test-hooks): show this text instead of the sampled tokens.
    agentspeed_test_output: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ResponsesRequest:
        choice = self.tool_choice
        if isinstance(choice, dict) and choice.get("type") not in ("auto", "none", "required", "function"):
            raise ValueError(f"tool_choice of type {choice.get('type')!r} is not supported (auto, none, required "
                             "or {'type': 'function', 'name': ...})")
        if isinstance(choice, dict) and choice.get("type") == "function" and not choice.get("name"):
            raise ValueError("a tool_choice of type function needs a name")
        if self.background:
            raise ValueError("background responses are not supported")
        if self.conversation is not None:
            raise ValueError("conversation objects are not supported; use previous_response_id")
        return self

    @property
    def forced_tool(self) -> tuple[bool, str | None]:
        """(a call is forced, the function it must be: None for any)."""
        c = self.tool_choice
        if c == "required" or (isinstance(c, dict) and c.get("type") == "required"):
            return True, None
        if isinstance(c, dict) and c.get("type") == "function":
            return True, str(c["name"])
        return False, None

    @property
    def tools_off(self) -> bool:
        return self.tool_choice == "none" or (isinstance(self.tool_choice, dict)
                                              and self.tool_choice.get("type") == "none")


CUSTOM_INPUT = {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}


def template_tools(req: ResponsesRequest) -> tuple[list[dict[str, Any]] | None, set[str]]:
    """(tools for the chat template, names of the custom tools among them). A custom tool is
    offered as a function taking one string, `input`."""
    if not req.tools or req.tools_off:
        return None, set()
    out, custom, skipped = [], set(), []
    for t in req.tools:
        if isinstance(t, FunctionTool):
            out.append(function_tool(t.name, t.description, t.parameters))
        elif isinstance(t, CustomTool):
            out.append(function_tool(t.name, t.description, CUSTOM_INPUT))
            custom.add(t.name)
        else:
            skipped.append(t.type)
    if skipped:
        log.warning("tools not offered to the model (only a hosted service runs them): %s", ", ".join(skipped))
    return out or None, custom


def template_messages(items: str | list[Item]) -> list[dict[str, Any]]:
    """Input items as chat-template messages: consecutive function calls join one assistant
    message, outputs become role "tool", reasoning the next assistant message's
    reasoning_content."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    reasoning: list[str] = []

    def new_assistant() -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": ""}
        if reasoning:
            msg["reasoning_content"] = "".join(reasoning)
            reasoning.clear()
        out.append(msg)
        return msg

    for n, it in enumerate(items):
        where = f"input.{n}"
        if isinstance(it, MessageItem):
            if it.role == "assistant":
                new_assistant()["content"] = _text(it.content, where)
            else:
                out.append({"role": "system" if it.role == "developer" else it.role,
                            "content": _text(it.content, where)})
        elif isinstance(it, FunctionCallItem | CustomToolCallItem):
            args: str | dict[str, Any] = it.arguments if isinstance(it, FunctionCallItem) else {"input": it.input}
            same_turn = out and out[-1]["role"] == "assistant" and not reasoning
            msg = out[-1] if same_turn else new_assistant()
            msg.setdefault("tool_calls", []).append(template_tool_call(it.call_id, it.name, args))
        elif isinstance(it, ToolOutputItem):
            out.append({"role": "tool", "tool_call_id": it.call_id, "content": _text(it.output, where)})
        elif isinstance(it, ReasoningItem):
            reasoning.append("".join(p.text for p in (it.content or it.summary)))
        else:
            raise APIError(400, f"{where}: input item type {it.type!r} is not supported", param="input")
    return out
