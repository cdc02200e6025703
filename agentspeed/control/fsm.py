"""The request lifecycle as a finite-state machine.

    Waiting -> Prefilling -> PrefillDone -> Decoding -> Finished
        ^          |             |              |
        +------ Preempted <------+--------------+        (any live state -> Finished)

Each state is its own class and each transition a function whose parameter type is its legal
source state(s), so `mypy --strict` rejects an illegal call at check time; at run time an
illegal call raises IllegalTransition. States that hold KV own the request's BlockTables (one
for the full-attention layers, and one for the sliding-window layers of a hybrid model whose
window pages are given back as the window moves); the transitions that leave them hand them
on or give them back.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from agentspeed.control.errors import IllegalTransition
from agentspeed.control.page_pool import BlockTable


class FinishReason(str, Enum):
    STOP = "stop"  # EOS, stop token or stop string
    LENGTH = "length"  # max_tokens or context length
    ABORT = "abort"  # client abort
    ERROR = "error"  # could never be served (too long for the pool or the model)


@dataclass(slots=True)
class Waiting:
    """Queued; holds no KV."""


@dataclass(slots=True)
class Prefilling:
    """Prompt (or recomputed context) partly computed; owns its pages."""

    blocks: BlockTable
    window: BlockTable | None = None


@dataclass(slots=True)
class PrefillDone:
    """Whole prompt computed; its first token is being sampled."""

    blocks: BlockTable
    window: BlockTable | None = None


@dataclass(slots=True)
class Decoding:
    """Generating one token per step."""

    blocks: BlockTable
    window: BlockTable | None = None


@dataclass(slots=True)
class Preempted:
    """Evicted for memory; its KV was given back and will be recomputed."""


@dataclass(slots=True)
class Finished:
    reason: FinishReason


RequestState = Waiting | Prefilling | PrefillDone | Decoding | Preempted | Finished
Running = Prefilling | PrefillDone | Decoding
Live = Waiting | Prefilling | PrefillDone | Decoding | Preempted


def _expect(state: object, allowed: tuple[type, ...], transition: str) -> None:
    if not isinstance(state, allowed):
        names = "/".join(t.__name__ for t in allowed)
        raise IllegalTransition(f"{transition}: request is {type(state).__name__}, expected {names}")


def start_prefill(state: Waiting, blocks: BlockTable, window: BlockTable | None = None) -> Prefilling:
    _expect(state, (Waiting,), "start_prefill")
    return Prefilling(blocks, window)


def complete_prefill(state: Prefilling) -> PrefillDone:
    _expect(state, (Prefilling,), "complete_prefill")
    return PrefillDone(state.blocks, state.window)


def start_decode(state: PrefillDone) -> Decoding:
    _expect(state, (PrefillDone,), "start_decode")
    return Decoding(state.blocks, state.window)


def preempt(state: Running) -> tuple[Preempted, BlockTable, BlockTable | None]:
    """Returns the new state and the handles the caller must give back to their pools."""
    _expect(state, (Prefilling, PrefillDone, Decoding), "preempt")
    return Preempted(), state.blocks, state.window


def requeue(state: Preempted) -> Waiting:
    _expect(state, (Preempted,), "requeue")
    return Waiting()


def finish(state: Live, reason: FinishReason) -> tuple[Finished, BlockTable | None, BlockTable | None]:
    """Returns Finished and the handles to give back (None where the state held none)."""
    _expect(state, (Waiting, Prefilling, PrefillDone, Decoding, Preempted), "finish")
    if isinstance(state, (Prefilling, PrefillDone, Decoding)):
        return Finished(reason), state.blocks, state.window
    return Finished(reason), None, None
