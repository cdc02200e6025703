"""llguidance (the Guidance project's Rust engine, vLLM's `guidance` backend): the second
backend. It reads GBNF grammars itself."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch

from agentspeed.sampling_params import StructuredOutputs
from agentspeed.structured.backend import GrammarError, clean_message


class GuidanceMatcher:
    __slots__ = ("ended", "eos", "m")

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str) -> None:
        self.m = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        self.eos = tokenizer.eos_token
        self.ended = False

    def accept(self, token: int) -> bool:
        ok = bool(self.m.consume_token(token))
        self.ended = ok and token == self.eos
        return ok

    def fill(self, bitmask: Any, row: int) -> None:
        llguidance.torch.fill_next_token_bitmask(self.m, bitmask, row)

    def rollback(self, num_tokens: int) -> None:
        self.m.rollback(num_tokens)
        self.ended = False

    @property
    def terminated(self) -> bool:
        # is_stopped() turns true as soon as only the end token can follow, before it is
        # sampled; the mask must still force that token, so only its acceptance ends.
        return self.ended


class GuidanceBackend:
    name = "guidance"

    def __init__(self, hf_tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        # llguidance knows one end-of-sequence token; the request's other stop tokens still
        # end it, they are just never offered by the mask.
        eos = stop_token_ids[0] if stop_token_ids else None
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=eos)

    def compile(self, c: StructuredOutputs) -> str:
        try:
            grammar = self._grammar(c)
        except (ValueError, TypeError, RuntimeError) as e:
            raise GrammarError(f"invalid {c.kind} constraint: {clean_message(e)}") from None
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise GrammarError(f"invalid {c.kind} constraint: {'; '.join(messages)}")
        return grammar

    def _grammar(self, c: StructuredOutputs) -> str:
        compact: Any = {"whitespace_flexible": False}  # a JsonCompileOptions
        if c.json is not None:
            schema = no_additional_properties(json.loads(c.json))
            return str(llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=compact))
        if c.json_object:
            return str(llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=compact))
        if c.regex is not None:
            return str(llguidance.grammar_from("regex", c.regex))
        if c.choice is not None:
            return str(llguidance.grammar_from("choice", json.dumps(c.choice)))
        if c.structural_tag is not None:
            raise ValueError("structural tags are xgrammar's: serve with --structured-output-backend xgrammar")
        assert c.grammar is not None
        return str(llguidance.grammar_from("gbnf", c.grammar))

    def matcher(self, compiled: str) -> GuidanceMatcher:
        return GuidanceMatcher(self.tokenizer, compiled)


def no_additional_properties(schema: Any) -> Any:
    """The schema with additionalProperties false on every object that lists properties and
    says nothing about others: what xgrammar's strict mode does, so both backends produce
    the same shape (a sampled model otherwise invents keys)."""
    if isinstance(schema, list):
        return [no_additional_properties(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: no_additional_properties(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out
