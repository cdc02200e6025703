"""The grammar backend interface and how one is chosen (--structured-output-backend).

Both libraries share llama.cpp-style 32-bit token bitmasks ([rows, ceil(vocab / 32)] int32,
bit t % 32 of word t // 32 set = token t allowed), so one apply function serves both.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Sequence
from typing import Any, Protocol

from agentspeed.errors import AgentspeedError
from agentspeed.sampling_params import StructuredOutputs

BACKENDS = ("auto", "xgrammar", "guidance")


class GrammarError(AgentspeedError):
    """A constraint that cannot be compiled: an invalid schema, an unsupported keyword, a
    regex or grammar with a syntax error. The message names the problem (a 400 upstream)."""


class Matcher(Protocol):
    """One request's position in its grammar."""

    def accept(self, token: int) -> bool:
        """Advance by one sampled token; False (state unchanged) if the grammar forbids it."""

    def fill(self, bitmask: Any, row: int) -> None:
        """Write the tokens allowed next into bitmask[row]."""

    def rollback(self, num_tokens: int) -> None:
        """Undo the last num_tokens accepted tokens (rejected speculative drafts)."""

    @property
    def terminated(self) -> bool:
        """The grammar is complete and a stop token was accepted: nothing more to constrain."""


class GrammarBackend(Protocol):
    name: str

    def compile(self, constraint: StructuredOutputs) -> Any:
        """A compiled grammar for this engine's tokenizer; raises GrammarError."""

    def matcher(self, compiled: Any) -> Matcher:
        """A fresh matcher at the grammar's start."""


def resolve_backend_name(name: str) -> str:
    """auto: xgrammar where it is installed, else llguidance."""
    if name not in BACKENDS:
        raise AgentspeedError(f"unknown structured output backend {name!r}; choose from {', '.join(BACKENDS)}")
    if name != "auto":
        return name
    for cand, module in (("xgrammar", "xgrammar"), ("guidance", "llguidance")):
        if importlib.util.find_spec(module) is not None:
            return cand
    raise AgentspeedError("structured output needs xgrammar or llguidance installed (pip install xgrammar)")


def load_backend(name: str, hf_tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> GrammarBackend:
    """The backend `name` (already resolved) for a transformers tokenizer whose model emits
    vocab_size logits; stop_token_ids are the tokens that end a request (allowed once the
    grammar is complete)."""
    if name == "xgrammar":
        from agentspeed.structured.xgrammar_backend import XGrammarBackend

        return XGrammarBackend(hf_tokenizer, vocab_size, stop_token_ids)
    if name == "guidance":
        from agentspeed.structured.guidance_backend import GuidanceBackend

        return GuidanceBackend(hf_tokenizer, vocab_size, stop_token_ids)
    raise AgentspeedError(f"unknown structured output backend {name!r}")


_LOG_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")


def clean_message(e: BaseException) -> str:
    """A library's error text without its C++ log prefix ("[09:41:59] /project/x.cc:94: ")."""
    return _LOG_PREFIX.sub("", str(e).strip()).strip()
