"""agentspeed: an LLM inference engine for multi-turn agentic workloads."""

__version__ = "0.1.0"
