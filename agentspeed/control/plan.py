"""Messages between the control plane and the execution plane: frozen msgspec Structs of ints
and strings, no tensors, so the same objects cross a process boundary (msgspec msgpack) as
are passed in-process. Structs, not dataclasses: a frozen dataclass costs ~0.5 µs to build
and the scheduler builds two of these per running request per step."""

from __future__ import annotations

import msgspec

from agentspeed.control.fsm import FinishReason

# In a chunk's token_ids: "the token this request sampled in the step still in flight".
# The execution plane substitutes it (it runs steps in order, so it knows it by then).
LAST_SAMPLED = -1


class RequestSpec(msgspec.Struct, frozen=True):
    """A new request. stop_token_ids end it (after min_tokens outputs); max_tokens caps it.
    session_key groups the turns of one agent session; cache_salt partitions the prefix cache.
    speculate: the scheduler may add drafted tokens to its decode steps (only for requests
    whose next token is the argmax: verification keeps the drafts that match it)."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    min_tokens: int = 0
    stop_token_ids: frozenset[int] = frozenset()
    priority: int = 0
    session_key: str | None = None
    cache_salt: str | None = None
    speculate: bool = False


class ScheduledChunk(msgspec.Struct, frozen=True, gc=False):
    """Compute token_ids at positions start, start+1, ... for one request, whose pages (in
    position order) cover [0, start + len(token_ids)). sample: sample one token afterwards.
    num_draft > 0 (with sample): the last num_draft token_ids are speculative drafts; the
    step verifies them greedily and yields 1 to num_draft + 1 tokens (StepResult)."""

    request_id: str
    token_ids: tuple[int, ...]
    start: int
    pages: tuple[int, ...]
    sample: bool
    num_draft: int = 0


class ExecutionPlan(msgspec.Struct, frozen=True):
    """One step. An empty plan (no chunks) is not registered and must not be advanced.
    released: requests whose execution-side state (e.g. sampler seeds) can be dropped."""

    step_id: int
    chunks: tuple[ScheduledChunk, ...]
    released: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.chunks

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


class StepResult(msgspec.Struct, frozen=True):
    """sampled[request_id]: the token sampled for each chunk of the step with sample=True.
    accepted[request_id], for chunks with drafts: the tokens after sampled[request_id] that
    verification produced, one per accepted draft (draft i is accepted when it equals the
    token before it in sampled + accepted; the last of them is the model's own next token).
    logprobs[request_id], for requests that asked: (chosen token's logprob, top
    alternatives as (token id, logprob)). The scheduler ignores logprobs; the engine forwards
    them."""

    step_id: int
    sampled: dict[str, int] = msgspec.field(default_factory=dict)
    logprobs: dict[str, tuple[float, tuple[tuple[int, float], ...]]] = msgspec.field(default_factory=dict)
    accepted: dict[str, tuple[int, ...]] = msgspec.field(default_factory=dict)


class RequestUpdate(msgspec.Struct, frozen=True, gc=False):
    """What changed for one request in one advance()."""

    request_id: str
    new_token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    num_cached_tokens: int = 0
    message: str = ""
