"""Messages between the control plane and the execution plane: frozen msgspec Structs of ints
and strings, no tensors, so the same objects cross a process boundary (msgspec msgpack) as
are passed in-process. Structs, not dataclasses: a frozen dataclass costs ~0.5 µs to build
and the scheduler builds two of these per running request per step.

The plan is the execution plane's only input. A request reaches it once (NewRequest, in the
plan of its first chunk); after that each chunk carries only what changed: its tokens and
the pages its request gained (ScheduledChunk.page_offset/new_pages). The execution plane
keeps the rest (page-table rows, sampling state) per request until the request id appears
in a plan's `released`."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from agentspeed.control.errors import InvariantViolation
from agentspeed.control.fsm import FinishReason
from agentspeed.sampling_params import SamplingParams

# In a chunk's token_ids: "the token this request sampled in the step still in flight".
# The execution plane substitutes it (it runs steps in order, so it knows it by then).
LAST_SAMPLED = -1


class TokenLogprob(msgspec.Struct, frozen=True, gc=False):
    """The one logprob type, from the sampler to the API: the chosen token's logprob under
    the model's raw distribution, and the top alternatives as (token id, logprob), best
    first (as many as the request asked for)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class RequestSpec(msgspec.Struct, frozen=True):
    """A new request. stop_token_ids end it (after min_tokens outputs); max_tokens caps it.
    session_key groups the turns of one agent session; cache_salt partitions the prefix cache.
    speculate: the scheduler may add drafted tokens to its decode steps (only for requests
    whose next token is the argmax: verification keeps the drafts that match it).
    priority orders waiting requests, lower first (ties by arrival). params: how the
    execution plane samples it, forwarded to it in NewRequest; the scheduler itself reads
    only the fields above (max_tokens and stop_token_ids as the frontend resolved them)."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    min_tokens: int = 0
    stop_token_ids: frozenset[int] = frozenset()
    priority: int = 0
    session_key: str | None = None
    cache_salt: str | None = None
    speculate: bool = False
    params: SamplingParams = msgspec.field(default_factory=SamplingParams)


class NewRequest(msgspec.Struct, frozen=True, gc=False):
    """A request's first appearance in a plan: what execution keeps for its whole life."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams


class ScheduledChunk(msgspec.Struct, frozen=True, gc=False):
    """Compute token_ids at positions start, start+1, ... for one request. Its page-table
    row (pages in position order) becomes row[:page_offset] + new_pages, and must then cover
    [0, start + len(token_ids)): a first chunk, or the first after a preemption, carries
    every page at offset 0; later ones only the pages added since (often none).
    sample: sample one token afterwards (logits of the last token). num_draft > 0 (with
    sample): the last num_draft token_ids are speculative drafts; the step verifies them
    greedily and yields 1 to num_draft + 1 tokens (StepResult).
    window_offset/window_pages: the same delta for the request's row of the sliding-window
    layers' page table (hybrid models only): there, entries before the window are the null
    page once their pages are given back, so a delta may restart before the row's end."""

    request_id: str
    token_ids: Sequence[int]
    start: int
    new_pages: Sequence[int] = ()
    sample: bool = True
    num_draft: int = 0
    page_offset: int = 0
    window_offset: int = 0
    window_pages: Sequence[int] = ()


def apply_pages(row: list[int], chunk: ScheduledChunk, window: bool = False) -> None:
    """Update a request's page-table row (window: its sliding-window row) with a chunk's
    page delta, in place."""
    offset, new = (chunk.window_offset, chunk.window_pages) if window else (chunk.page_offset, chunk.new_pages)
    if offset > len(row):
        raise InvariantViolation(f"request {chunk.request_id}: pages from {offset} sent for a row of {len(row)}")
    del row[offset:]
    row.extend(new)


class ExecutionPlan(msgspec.Struct, frozen=True):
    """One step. An empty plan (no chunks) is not registered and must not be advanced.
    new_requests: requests whose first chunk is in this plan (before it runs, execution
    registers them). released: requests that finished before this plan was made, whose
    execution-side state is dropped before it runs (so a released id may be registered
    again by the same plan). The scheduler keeps releases for its next non-empty plan.
    kv_stores (device page, tier slot): copy these evicted pages' KV to the host tier; then
    kv_loads (tier slot, device page): copy these slots' KV into fresh pages; both before the
    forward (control/tier.py): a page this plan's allocations evicted may be written by its
    forward, and a loaded page is read by it."""

    step_id: int
    chunks: tuple[ScheduledChunk, ...]
    released: tuple[str, ...] = ()
    new_requests: tuple[NewRequest, ...] = ()
    kv_stores: tuple[tuple[int, int], ...] = ()
    kv_loads: tuple[tuple[int, int], ...] = ()

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
    logprobs[request_id], for requests that asked: the sampled token's TokenLogprob. The
    scheduler passes them on in that request's RequestUpdate."""

    step_id: int
    sampled: dict[str, int] = msgspec.field(default_factory=dict)
    logprobs: dict[str, TokenLogprob] = msgspec.field(default_factory=dict)
    accepted: dict[str, tuple[int, ...]] = msgspec.field(default_factory=dict)


class RequestUpdate(msgspec.Struct, frozen=True, gc=False):
    """What changed for one request in one advance(): its new tokens, their logprobs (if
    it asked: one per new token), and how it finished (message: why, for an error)."""

    request_id: str
    new_token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    num_cached_tokens: int = 0
    message: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
