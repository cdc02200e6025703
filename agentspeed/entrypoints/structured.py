"""What clients send to constrain output, as one StructuredOutputs (or a 400).

- OpenAI `response_format` (chat, completions) and Responses `text.format`: json_object,
  json_schema (strict or not: the schema is always enforced), text;
- vLLM's `structured_outputs` extension: json, regex, choice, grammar, json_object;
- Anthropic `output_config.format` (and the older `output_format`): json_schema;
- forced tool calls (tool_choice required / a named function / Anthropic any / tool): a JSON
  array of {"name", "arguments"} calls whose arguments follow each tool's parameter schema.
  This one format serves every model and tool parser (parsers.tool_parsers.ForcedCallsParser
  reads it), the approach vLLM takes for chat; a model's native call syntax would need a
  grammar per tool format and per backend.

Compilation (and so most schema errors) happens in the engine at admission; this module
rejects what is malformed before it gets there.
"""

from __future__ import annotations

import json
from typing import Any

from agentspeed.entrypoints.errors import APIError
from agentspeed.errors import ConfigError
from agentspeed.sampling_params import StructuredOutputs


def _make(param: str, **kw: Any) -> StructuredOutputs:
    try:
        return StructuredOutputs(**kw)
    except ConfigError as e:
        raise APIError(400, str(e), param=param) from None


def _schema_text(schema: Any, param: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise APIError(400, f"{param} is not valid JSON: {e}", param=param) from None
    if not isinstance(schema, (dict, bool)):
        raise APIError(400, f"{param} must be a JSON schema object", param=param)
    return json.dumps(schema)  # key order kept: it is the order properties are written in


def from_response_format(fmt: dict[str, Any] | None, param: str = "response_format") -> StructuredOutputs | None:
    """OpenAI's response_format / Responses text.format / Anthropic's output format. The
    schema sits under json_schema.schema (chat) or schema (Responses, Anthropic)."""
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return _make(param, json_object=True)
    if kind == "json_schema":
        inner = fmt.get("json_schema")
        holder: dict[str, Any] = inner if isinstance(inner, dict) else fmt
        if "schema" not in holder:
            raise APIError(400, f"{param} of type json_schema needs a schema", param=param)
        return _make(param, json=_schema_text(holder["schema"], f"{param}.schema"))
    raise APIError(400, f"{param} type {kind!r} is not supported (text, json_object or json_schema)", param=param)


_VLLM_KEYS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


def from_structured_outputs(so: dict[str, Any] | None) -> StructuredOutputs | None:
    """vLLM's structured_outputs: {"json": schema} | {"regex": ...} | {"choice": [...]} |
    {"grammar": EBNF} | {"json_object": true} | {"structural_tag": JSON text}."""
    if so is None:
        return None
    unknown = sorted(k for k, v in so.items() if k not in _VLLM_KEYS and v not in (None, False))
    if unknown:
        raise APIError(400, f"structured_outputs field(s) not supported: {', '.join(unknown)} "
                            f"(supported: {', '.join(_VLLM_KEYS)})", param="structured_outputs")
    kw: dict[str, Any] = {}
    if so.get("json") is not None:
        kw["json"] = _schema_text(so["json"], "structured_outputs.json")
    for k in ("regex", "grammar", "structural_tag"):
        if so.get(k) is not None:
            if not isinstance(so[k], str):
                raise APIError(400, f"structured_outputs.{k} must be a string", param="structured_outputs")
            kw[k] = so[k]
    if so.get("choice") is not None:
        if not isinstance(so["choice"], list) or not all(isinstance(c, str) for c in so["choice"]):
            raise APIError(400, "structured_outputs.choice must be a list of strings", param="structured_outputs")
        kw["choice"] = so["choice"]
    if so.get("json_object"):
        kw["json_object"] = True
    return _make("structured_outputs", **kw)


def forced_tool_calls(tools: list[dict[str, Any]], name: str | None, parallel: bool = True,
                      param: str = "tool_choice") -> StructuredOutputs:
    """tools: function definitions ({"name", "parameters"}). name: the one function to call
    (exactly one call), or None for any of them (tool_choice required: one call, or several
    when parallel calls are allowed)."""
    if not tools:
        raise APIError(400, f"{param} forces a tool call, but the request offers no tools", param=param)
    if name is not None:
        tools = [t for t in tools if t.get("name") == name]
        if not tools:
            raise APIError(400, f"{param} names the function {name!r}, which is not among the tools", param=param)
    variants = [{"type": "object",
                 "properties": {"name": {"const": t["name"]},
                                "arguments": t.get("parameters") or {"type": "object"}},
                 "required": ["name", "arguments"]} for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": variants[0] if len(variants) == 1 else {"anyOf": variants}}
    if name is not None or not parallel:
        schema["maxItems"] = 1
    return _make(param, json=json.dumps(schema))


def one_constraint(*given: tuple[str, StructuredOutputs | None]) -> StructuredOutputs | None:
    """The single constraint among the request's fields; two at once is a 400."""
    named = [(k, c) for k, c in given if c is not None]
    if len(named) > 1:
        raise APIError(400, f"{' and '.join(k for k, _ in named)} each constrain the output; send only one")
    return named[0][1] if named else None
