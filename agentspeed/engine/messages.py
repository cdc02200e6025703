"""Messages between the frontend (AsyncLLM) and the engine-core process, and from the
engine core to its tensor-parallel workers. msgspec Structs encoded as msgpack over ZMQ:
typed on both ends, no pickle. Each direction is a tagged union decoded in one call."""

from __future__ import annotations

import msgspec

from agentspeed.control.kv_events import KvEvent
from agentspeed.control.plan import RequestSpec, RequestUpdate


# ---- frontend -> engine core (and engine core -> TP workers, replayed per step) ----------
class AddRequest(msgspec.Struct, tag=True, frozen=True):
    """spec.stop_token_ids already includes EOS unless the request ignores it; spec.params
    is how it is sampled."""

    spec: RequestSpec


class AbortRequests(msgspec.Struct, tag=True, frozen=True):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag=True, frozen=True):
    pass


class FlushCache(msgspec.Struct, tag=True, frozen=True):
    """Evict every cached prefix page that no live request holds."""


EngineInput = AddRequest | AbortRequests | Shutdown | FlushCache


class StepInputs(msgspec.Struct, tag=True, frozen=True):
    """Engine core -> TP worker: apply these inputs, then step if there is work. Every rank
    runs the same deterministic scheduler, so replaying the inputs at the same step
    boundaries keeps all ranks' plans identical (SPMD). now: rank 0's clock for them (the
    scheduler's time, control/retention.py), so no rank reads its own."""

    inputs: list[EngineInput]
    now: float = 0.0
    # rank 0's tier cost estimates (control/tier.py TierCost: load_s, fetch_s, prefill_s)
    tier_cost: tuple[float | None, float | None, float | None] = (None, None, None)


# ---- engine core -> frontend ------------------------------------------------------------
class EngineStats(msgspec.Struct, frozen=True, gc=False):
    num_running: int
    num_waiting: int
    kv_pages_used: int  # held by live requests (owned or shared), not merely cached
    kv_pages_total: int
    num_preemptions: int  # since start
    steps: int  # since start
    num_draft_tokens: int = 0  # speculative drafts verified, since start
    num_accepted_tokens: int = 0  # of those, accepted
    kv_window_pages_used: int = 0  # the sliding-window layers' pool (hybrid models; else 0)
    kv_window_pages_total: int = 0
    num_spec_disabled_structured: int = 0  # constrained requests that decoded without drafts
    num_structured_requests: int = 0  # constrained requests admitted, since start
    num_grammar_cache_hits: int = 0  # of those, whose grammar was already compiled
    num_partial_hit_tokens: int = 0  # prompt tokens reused from partly filled pages, since start
    kv_evictions: int = 0  # cached prefix pages evicted, since start
    num_tier_hit_tokens: int = 0  # prompt tokens loaded back from the host KV tier, since start
    kv_tier_pages_used: int = 0  # pages the host tier holds copies of
    kv_tier_pages_total: int = 0  # its slots (0: no tier)
    kv_tier_stores: int = 0  # pages copied into it, since start
    kv_tier_writebacks: int = 0  # of those, copied ahead of their eviction (write-back)
    num_disk_hit_tokens: int = 0  # prompt tokens read back from the disk tier (then loaded), since start
    kv_disk_pages_used: int = 0  # pages the disk tier holds copies of
    kv_disk_pages_total: int = 0  # its files at most (0: no disk tier)
    kv_disk_failed: int = 0  # disk copies missing or corrupt when read back, since start


class EngineReady(msgspec.Struct, tag=True, frozen=True):
    """What the frontend needs from the engine, as the engine resolved it."""

    model_name: str
    model_path: str  # the file or directory the weights were loaded from
    max_model_len: int
    page_size: int
    num_pages: int
    eos_token_ids: list[int]
    kv_bytes_per_token: int
    num_speculative_tokens: int = 0  # as resolved by the engine (its default depends on the device)
    overlap: bool = False
    linear_note: str = ""  # KernelSet.numerics_notes(): linears that are not plain fp32
    architecture: str = ""  # e.g. LlamaForCausalLM
    vocab_size: int = 0  # rows of the model's output layer
    dtype: str = ""  # compute dtype, e.g. float32
    device: str = ""  # cpu | cuda
    max_num_seqs: int = 0  # most requests in one step (the admission window)


class EngineOutputs(msgspec.Struct, tag=True, frozen=True):
    """One step's (or one idle poll's) updates, logprobs inside them, and the prefix-cache
    events of that step (only when the engine reports them: SchedulingConfig.kv_events)."""

    updates: list[RequestUpdate]
    stats: EngineStats
    kv_events: list[KvEvent] = msgspec.field(default_factory=list)


class EngineFailed(msgspec.Struct, tag=True, frozen=True):
    """The engine cannot go on (startup or step failed); it exits after sending this."""

    message: str


EngineOutput = EngineReady | EngineOutputs | EngineFailed
