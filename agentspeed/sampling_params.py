"""Per-request sampling settings (a msgspec Struct: it crosses process boundaries later)."""

from __future__ import annotations

import msgspec

from agentspeed.errors import ConfigError


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """temperature 0 = greedy. top_k 0 (or -1) and top_p 1.0 disable those filters.
    With a seed, a request's samples depend only on the seed, not on the batch it ran in."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ConfigError(f"top_k must be -1, 0 or positive, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
