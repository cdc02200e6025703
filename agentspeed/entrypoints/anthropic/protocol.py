"""Messages API request bodies (pydantic), and their conversion to chat-template messages.

Every field of the published API is accepted (and the sampling fields older clients send:
`temperature`, `top_p`, `top_k`, which are honoured). Those with no effect here:
`cache_control` (top-level, on blocks and on tools: the prefix cache is automatic),
`citations`, `service_tier`, `speed`, `inference_geo`, `container`, `context_management`,
`diagnostics`, `user_profile_id`, `workspace_id`, `output_config.effort`,
`thinking.budget_tokens`, tools' `strict`,
`defer_loading`, `eager_input_streaming`, `input_examples`, `allowed_callers`, `metadata`
(except `user_id`, the session key when no routing header is sent), and the
`anthropic-version` / `anthropic-beta` headers and `?beta=true` query. `thinking` turns the
template's thinking switch on or off (Qwen3, DeepSeek V3.1). 400s are for what would change
the answer and cannot be honoured: images, documents and other non-text blocks (the models
served here read text), MCP servers. Blocks of hosted tools in a history (server_tool_use,
web_search_tool_result, code execution and MCP results, ...) reach the model as text. `tool_choice` any / tool and `output_config.format`
(or `output_format`) constrain decoding (entrypoints/structured.py).
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agentspeed.entrypoints.errors import APIError
from agentspeed.entrypoints.prompt import function_tool, template_tool_call

log = logging.getLogger("agentspeed.server")


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextBlock(_Base):
    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = None


class ToolUseBlock(_Base):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ThinkingBlock(_Base):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class OtherBlock(_Base):
    model_config = ConfigDict(extra="allow")  # server tool blocks are rendered from their fields
    type: str  # image, document, redacted_thinking, server tool blocks, ...


class ToolResultBlock(_Base):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock | OtherBlock] | None = None
    is_error: bool | None = None


Block = TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | OtherBlock


class Message(_Base):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(_Base):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None  # "custom" or absent for client tools; versioned names for Anthropic's own


class ToolChoice(_Base):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(_Base):
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = None


class OutputConfig(_Base):
    effort: str | None = None
    format: dict[str, Any] | None = None


class Metadata(_Base):
    user_id: str | None = None


class MessagesRequest(_Base):
    model: str
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)]
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    metadata: Metadata | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    mcp_servers: list[dict[str, Any]] | None = None
    output_config: OutputConfig | None = None
    output_format: dict[str, Any] | None = None  # the structured-outputs beta's name for output_config.format
    # Test hook (only with --enable-test-hooks): show this text instead of the sampled tokens.
    agentspeed_test_output: str | None = None

    @model_validator(mode="after")
    def _check(self) -> MessagesRequest:
        if self.tool_choice is not None and self.tool_choice.type == "tool" and not self.tool_choice.name:
            raise ValueError("tool_choice of type 'tool' needs a name")
        if self.mcp_servers:
            raise ValueError("mcp_servers are not supported (this server cannot reach MCP servers)")
        return self


class CountTokensRequest(MessagesRequest):
    max_tokens: Annotated[int, Field(ge=1)] = 1


def template_tools(req: MessagesRequest) -> list[dict[str, Any]] | None:
    """Client tools as chat-template tools. Tools only Anthropic's service runs (web search,
    code execution, computer use, ...) have no schema to offer: skipped, with a warning."""
    if not req.tools or (req.tool_choice is not None and req.tool_choice.type == "none"):
        return None
    out, skipped = [], []
    for t in req.tools:
        if t.input_schema is None:
            skipped.append(f"{t.name} ({t.type})")
            continue
        out.append(function_tool(t.name, t.description, t.input_schema))
    if skipped:
        log.warning("tools not offered to the model (only Anthropic's service runs them): %s", ", ".join(skipped))
    return out or None


def _text(blocks: list[TextBlock | OtherBlock], where: str) -> str:
    parts = []
    for b in blocks:
        if not isinstance(b, TextBlock):
            raise APIError(400, f"{where}: content block type {b.type!r} is not supported (text only)",
                           param="messages")
        parts.append(b.text)
    return "".join(parts)


def template_messages(req: MessagesRequest) -> list[dict[str, Any]]:
    """The conversation as chat-template messages: tool results become role "tool"
    messages, tool_use blocks tool calls, thinking blocks reasoning_content."""
    out: list[dict[str, Any]] = []
    if req.system:
        out.append({"role": "system", "content": req.system if isinstance(req.system, str)
                    else _text(list(req.system), "system")})
    for n, m in enumerate(req.messages):
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        text: list[str] = []
        calls: list[dict[str, Any]] = []
        thinking: list[str] = []
        rendered: list[str] = []
        for b in m.content:
            if isinstance(b, TextBlock):
                text.append(b.text)
            elif isinstance(b, ToolUseBlock) and m.role == "assistant":
                calls.append(template_tool_call(b.id, b.name, b.input))
            elif isinstance(b, ThinkingBlock) and m.role == "assistant":
                thinking.append(b.thinking)
            elif isinstance(b, ToolResultBlock) and m.role == "user":
                _flush_user(out, text)
                content = b.content if isinstance(b.content, str) or b.content is None else \
                    _text(b.content, f"messages.{n}: tool_result")
                out.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": content or ""})
            elif isinstance(b, OtherBlock) and b.type == "redacted_thinking":
                continue  # encrypted by Anthropic's service: nothing a local model can read
            elif isinstance(b, OtherBlock) and _is_server_tool_block(b.type):
                # A hosted tool's call or result from an earlier turn (served elsewhere): the
                # model reads what it did as text.
                text.append(server_tool_text(b))
                rendered.append(b.type)
            else:
                raise APIError(400, f"messages.{n}: content block type {b.type!r} is not supported in a "
                                    f"{m.role} message" + (" (text only)" if isinstance(b, OtherBlock) else ""),
                               param="messages")
        if rendered:
            log.warning("messages.%d: hosted-tool blocks given to the model as text: %s", n,
                        ", ".join(dict.fromkeys(rendered)))
        if m.role == "user":
            _flush_user(out, text)
            continue
        msg: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
        if calls:
            msg["tool_calls"] = calls
        if thinking:
            msg["reasoning_content"] = "".join(thinking)
        out.append(msg)
    return out


_SERVER_TOOL_BLOCKS = ("server_tool_use", "mcp_tool_use", "mcp_tool_result", "container_upload")
_SECRET_FIELDS = {"encrypted_content", "encrypted_index", "cache_control", "citations"}


def _is_server_tool_block(kind: str) -> bool:
    return kind in _SERVER_TOOL_BLOCKS or kind.endswith("_tool_result")


def server_tool_text(b: OtherBlock) -> str:
    """A hosted tool's block (server_tool_use, web_search_tool_result, code execution results,
    MCP calls, ...) as one bracketed text line: its readable fields, without the encrypted ones
    only Anthropic's service can read."""
    fields = {k: v for k, v in (b.model_extra or {}).items() if k not in _SECRET_FIELDS}
    content = fields.pop("content", None)
    if b.type in ("server_tool_use", "mcp_tool_use"):
        return f"\n[{b.type} {fields.get('name', '')}: {json.dumps(fields.get('input', {}), ensure_ascii=False)}]\n"
    lines: list[str] = []
    for item in content if isinstance(content, list) else [content] if content is not None else []:
        if isinstance(item, dict):
            if item.get("type") == "text" and isinstance(item.get("text"), str):
                lines.append(item["text"])
                continue
            item = {k: v for k, v in item.items() if k not in _SECRET_FIELDS}
            lines.append(" ".join(f"{k}={v}" for k, v in item.items() if k != "type" and v not in (None, "")))
        else:
            lines.append(str(item))
    return f"\n[{b.type}]\n" + "\n".join(x for x in lines if x) + "\n"


def _flush_user(out: list[dict[str, Any]], text: list[str]) -> None:
    """User text gathered so far becomes a message (tool results split a user turn)."""
    if text:
        out.append({"role": "user", "content": "".join(text)})
        text.clear()


def template_kwargs(req: MessagesRequest) -> dict[str, Any]:
    """Template variables the request sets: thinking on/off (Qwen3, DeepSeek V3.1 templates)."""
    if req.thinking is None or req.thinking.type in ("adaptive", "between_tools"):
        return {}
    on = req.thinking.type == "enabled"
    return {"enable_thinking": on, "thinking": on}


class AnthropicErrorDetail(_Base):
    type: str
    message: str


class AnthropicError(_Base):
    """Anthropic's error body, as /v1/messages returns it."""

    type: Literal["error"] = "error"
    error: AnthropicErrorDetail
