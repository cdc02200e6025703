"""Named run-time errors of the control plane."""

from agentspeed.errors import AgentspeedError


class IllegalTransition(AgentspeedError):
    """A lifecycle transition was called on a request in a state it does not start from."""


class HandleReleased(AgentspeedError):
    """A block-table handle was used after it was given back to the pool."""


class InvariantViolation(AgentspeedError):
    """check_invariants() found the page pool or the scheduler in an inconsistent state."""


class OutOfPages(AgentspeedError):
    """The pool cannot supply the pages asked for (callers check can_allocate first)."""
