"""OpenAI API request bodies (pydantic) and the error shape.

Validation happens here, so a bad field is a 400 naming the field before anything reaches
the engine. Unknown fields are accepted and ignored (agent clients send many: `store`,
`metadata`, `user`, ...), as vLLM and SGLang do; fields we cannot honour are
rejected explicitly instead of being silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from agentspeed.entrypoints.errors import APIError
from agentspeed.entrypoints.prompt import template_tool_call

__all__ = ["APIError"]  # re-exported: endpoints raise it from here


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Base):
    include_usage: bool = False


class TextPart(_Base):
    type: Literal["text"]
    text: str


class OtherPart(_Base):
    type: str


class FunctionCall(_Base):
    name: str
    arguments: str = ""


class ToolCall(_Base):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Base):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | OtherPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # an assistant turn's reasoning, as this server returns it

    def to_template(self) -> dict[str, Any]:
        """The message as a chat template expects it (content flattened to text)."""
        content = self.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, TextPart):
                    raise APIError(400, f"content part type {part.type!r} is not supported (text only)",
                                   param="messages")
                texts.append(part.text)
            content = "".join(texts)
        msg: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                               "content": content or ""}
        if self.name is not None:
            msg["name"] = self.name
        if self.tool_calls:
            msg["tool_calls"] = [template_tool_call(c.id, c.function.name, c.function.arguments)
                                 for c in self.tool_calls]
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        if self.reasoning_content:
            msg["reasoning_content"] = self.reasoning_content
        return msg


class FunctionDef(_Base):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Base):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(_Base):
    type: Literal["function"] = "function"
    function: dict[str, str]

    @property
    def name(self) -> str:
        return self.function["name"]


class ResponseFormat(_Base):
    type: str
    json_schema: dict[str, Any] | None = None  # {"name", "schema", "strict", "description"}


Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _SamplingFields(_Base):
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Extensions (vLLM / SGLang names) that agent benchmarks rely on.
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0)] = 0
    top_k: Annotated[int, Field(ge=-1)] = 0
    min_p: Probability = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0)] = 1.0
    stop_token_ids: list[StrictInt] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    response_format: ResponseFormat | None = None
    # vLLM's constraint extension: {"json" | "regex" | "choice" | "grammar" | "json_object": ...}
    structured_outputs: dict[str, Any] | None = None
    # Only requests with the same salt share prefix-cache pages (tenants isolate their KV).
    cache_salt: Annotated[str, Field(min_length=1)] | None = None
    priority: int = 0  # lower first among waiting requests (vLLM's convention)
    # Test hook (only with --enable-test-hooks): show this text instead of the sampled tokens.
    agentspeed_test_output: str | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> _SamplingFields:
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        return self


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if isinstance(self.tool_choice, NamedToolChoice) and not self.tool_choice.function.get("name"):
            raise ValueError("a named tool_choice needs function.name")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self


class CompletionRequest(_SamplingFields):
    # Strict: JSON booleans and floats are not token ids ([[false]] is a 400, not token 0).
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    return_token_ids: bool = False  # vLLM extension: each choice also carries its token ids
    echo: bool = False
    suffix: str | None = None

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        return self


class TokenizeRequest(_Base):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Base):
    model: str | None = None
    tokens: list[StrictInt]


class ErrorDetail(_Base):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Base):
    """OpenAI's error body, as every OpenAI route returns it."""

    error: ErrorDetail
