"""agentspeed: an LLM inference engine for multi-turn agentic workloads.

`from agentspeed import LLM, SamplingParams` is the offline API (imported lazily so that
`import agentspeed.control` stays free of torch)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from agentspeed.engine.llm import LLM
    from agentspeed.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from agentspeed.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from agentspeed.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
