"""Per-request sampling settings (a msgspec Struct: it crosses process boundaries later).
Field names and defaults follow vLLM's SamplingParams so code ports with an import change."""

from __future__ import annotations

from typing import ClassVar

import msgspec
import msgspec.structs

from agentspeed.errors import ConfigError


class StructuredOutputs(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One decoding constraint (vLLM's StructuredOutputsParams): exactly one of json (a JSON
    schema, as JSON text), json_object (any JSON object), regex, choice (one of these strings),
    grammar (EBNF in the GBNF dialect llama.cpp and xgrammar read) or structural_tag
    (xgrammar's structural tag, as JSON text: free text with tagged regions held to schemas,
    how SMG and SGLang force tool-call formats). The grammar backend (agentspeed/structured)
    compiles it once per distinct constraint."""

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    structural_tag: str | None = None

    _VALUED: ClassVar[tuple[str, ...]] = ("json", "regex", "choice", "grammar", "structural_tag")

    def __post_init__(self) -> None:
        given = [k for k in self._VALUED if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ConfigError("structured outputs take exactly one of json, json_object, regex, choice, grammar "
                              f"or structural_tag; got {', '.join(given) or 'none'}")
        if self.choice is not None and not self.choice:
            raise ConfigError("structured outputs choice must list at least one string")

    @property
    def kind(self) -> str:
        return next(k for k in self._VALUED if getattr(self, k) is not None) if not self.json_object else "json_object"

    def key(self) -> tuple[str, str]:
        """A hashable identity (the grammar cache's key, with the tokenizer fixed per engine)."""
        value = getattr(self, self.kind)
        return self.kind, "\x00".join(value) if isinstance(value, list) else str(value)


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """temperature 0 = greedy. top_k 0 (or -1), top_p 1.0 and min_p 0 disable those filters.
    With a seed, a request's samples depend only on the seed, not on the batch it ran in.
    n samples share the prompt's KV pages through the prefix cache."""

    n: int = 1
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = msgspec.field(default_factory=list)
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # number of top alternatives per token (0: only the chosen)
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Constrained decoding: tokens outside the constraint are masked before sampling.
    structured_outputs: StructuredOutputs | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (0 <= self.min_tokens <= self.max_tokens, f"min_tokens must be in [0, max_tokens], got {self.min_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= -1, f"top_k must be -1, 0 or positive, got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be in [0, 20], got {self.logprobs}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        if isinstance(self.stop, str):  # vLLM accepts a single string
            msgspec.structs.force_setattr(self, "stop", [self.stop])

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0
