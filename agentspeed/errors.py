"""Errors a user can act on. Each carries a one-line message; the CLI prints it
without a traceback."""


class AgentspeedError(Exception):
    """Base of every error agentspeed raises on purpose."""


class ModelLoadError(AgentspeedError):
    """The model path is missing, corrupt, truncated or not a supported architecture."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint is readable but its architecture or a feature of it is not supported."""


class PlacementError(AgentspeedError):
    """Two adjacent SPMD modules have placements no collective can reconcile."""


class KernelUnavailableError(AgentspeedError):
    """No registered backend can run an op for the requested device/dtype/traits,
    or a forced backend cannot."""


class ConfigError(AgentspeedError):
    """An invalid combination of options."""
