"""xgrammar (what SGLang and TokenSpeed use, vLLM's first choice): the default backend.

JSON is compiled without free whitespace (any_whitespace=False): a sampled model may
otherwise spend its whole budget on spaces and newlines inside an object."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import xgrammar as xgr

from agentspeed.sampling_params import StructuredOutputs
from agentspeed.structured.backend import GrammarError, clean_message


class XGrammarMatcher:
    __slots__ = ("m",)

    def __init__(self, compiled: xgr.CompiledGrammar) -> None:
        # Enough history to roll back a round of speculative drafts.
        self.m = xgr.GrammarMatcher(compiled, max_rollback_tokens=16)

    def accept(self, token: int) -> bool:
        return bool(self.m.accept_token(token))

    def fill(self, bitmask: Any, row: int) -> None:
        self.m.fill_next_token_bitmask(bitmask, row)

    def rollback(self, num_tokens: int) -> None:
        self.m.rollback(num_tokens)

    @property
    def terminated(self) -> bool:
        return bool(self.m.is_terminated())


class XGrammarBackend:
    name = "xgrammar"

    def __init__(self, hf_tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=list(stop_token_ids))
        # One compile thread: the engine's cores belong to the forward pass.
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self, c: StructuredOutputs) -> xgr.CompiledGrammar:
        try:
            if c.json is not None:
                return self.compiler.compile_json_schema(c.json, any_whitespace=False, strict_mode=True)
            if c.json_object:  # an object, not any JSON value (the builtin grammar takes arrays)
                return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if c.regex is not None:
                return self.compiler.compile_regex(c.regex)
            if c.choice is not None:
                return self.compiler.compile_grammar(choice_ebnf(c.choice))
            if c.structural_tag is not None:
                return self.compiler.compile_structural_tag(c.structural_tag)
            assert c.grammar is not None
            return self.compiler.compile_grammar(c.grammar)
        except (RuntimeError, ValueError, TypeError) as e:
            raise GrammarError(f"invalid {c.kind} constraint: {clean_message(e)}") from None

    def matcher(self, compiled: xgr.CompiledGrammar) -> XGrammarMatcher:
        return XGrammarMatcher(compiled)


def choice_ebnf(choices: list[str]) -> str:
    """A grammar accepting exactly one of the strings (JSON string escapes are EBNF's)."""
    return "root ::= " + " | ".join(json.dumps(s) for s in choices)
