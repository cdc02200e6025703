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
from typing import ClassVar

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


class TierOp(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """One page copy between the KV pool and a tier below it. The ops of a plan run in the
    order the scheduler made them, so each reads what the ops before it left (a slot stored
    and then spilled in one plan spills the new copy). kind:
      STORE  src device page -> dst host slot (an evicted page)
      LOAD   src host slot -> dst device page (a prefix hit below the pool)
      SPILL  src host slot -> dst disk slot (a host copy about to be reused), key written along
      FETCH  src disk slot -> dst host slot, if the file holds key's intact copy
             (StepResult.tier_failed names the fetches that did not)
      WRITEBACK  src device page -> dst host slot, a cached page at the front of the eviction
             order copied before it is evicted, so that its eviction copies nothing. After
             every other op of its plan; neither the plan nor its forward writes the page, so
             the copy may run alongside the forward or after it, but it completes before the
             next plan's ops run."""

    STORE: ClassVar[int] = 0
    LOAD: ClassVar[int] = 1
    SPILL: ClassVar[int] = 2
    FETCH: ClassVar[int] = 3
    WRITEBACK: ClassVar[int] = 4

    kind: int
    src: int
    dst: int
    key: bytes = b""


class ExecutionPlan(msgspec.Struct, frozen=True):
    """One step. An empty plan (no chunks) is not registered and must not be advanced.
    new_requests: requests whose first chunk is in this plan (before it runs, execution
    registers them). released: requests that finished before this plan was made, whose
    execution-side state is dropped before it runs (so a released id may be registered
    again by the same plan). The scheduler keeps releases for its next non-empty plan.
    tier_ops: copies between the pool and its tiers (control/tier.py), run in order before
    the forward (which may write a page stored here and reads the pages loaded here), except
    the write-backs at the end, which may overlap it. A plan with tier operations and no
    chunks is run (it is not empty)."""

    step_id: int
    chunks: tuple[ScheduledChunk, ...]
    released: tuple[str, ...] = ()
    new_requests: tuple[NewRequest, ...] = ()
    tier_ops: tuple[TierOp, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.chunks and not self.tier_ops

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


class StepResult(msgspec.Struct, frozen=True):
    """sampled[request_id]: the token sampled for each chunk of the step with sample=True.
    accepted[request_id], for chunks with drafts: the tokens after sampled[request_id] that
    verification produced, one per accepted draft (draft i is accepted when it equals the
    token before it in sampled + accepted; the last of them is the model's own next token).
    logprobs[request_id], for requests that asked: the sampled token's TokenLogprob. The
    scheduler passes them on in that request's RequestUpdate.
    tier_failed: host slots of the plan's kv_fetches that did not read back (missing or
    corrupt on disk, on any rank): those copies are forgotten, their tokens recomputed."""

    step_id: int
    sampled: dict[str, int] = msgspec.field(default_factory=dict)
    logprobs: dict[str, TokenLogprob] = msgspec.field(default_factory=dict)
    accepted: dict[str, tuple[int, ...]] = msgspec.field(default_factory=dict)
    tier_failed: tuple[int, ...] = ()


class RequestUpdate(msgspec.Struct, frozen=True, gc=False):
    """What changed for one request in one advance(): its new tokens, their logprobs (if
    it asked: one per new token), and how it finished (message: why, for an error)."""

    request_id: str
    new_token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    num_cached_tokens: int = 0
    message: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
