"""The scheduler: the control plane's whole public interface.

    submit(spec)            queue a request (raises RequestRejected if it can never be served)
    abort(request_id)       finish it now; its pages go back (fenced if a step is in flight)
    next_plan()             the next step: decodes first, then chunked prefill, in one budget
    advance(result)         take a step's sampled tokens; returns what changed per request

Overlap, depth 1: next_plan() may be called once while the previous plan is still executing.
Decode inputs then refer to tokens not yet known (LAST_SAMPLED), and pages given back while
a planned step has not been advanced are fenced until it is.

Speculative decoding (num_speculative_tokens > 0): a decode of a request with spec.speculate
and no token in flight carries up to that many n-gram drafts (control/ngram.py). Its KV is
computed for all of them; advance() keeps what verification accepted and rolls the rest
back (num_computed, num_confirmed), so the rejected positions are simply rewritten by the
next step. Pages for drafts come only from free memory: drafting never preempts. With
adaptive_drafts each request drafts as many as its recent acceptance pays for at the current
batch size (control/draft_policy.py), up to num_speculative_tokens.

Hybrid models (window set: sliding-window layers beside full-attention ones) keep two page
tables per request, in two pools: the full layers' table as above, and the window layers'
table, which holds only the pages some future query can still see. Its pages are taken a
chunk at a time (not for the whole prompt at admission) and the pages behind the window are
given back as it moves (fenced like any release), published first so another request can
still hit them. A prefix hit needs full pages for the whole prefix and window pages for the
last window before it; the hit shrinks until both pools have what it needs.

Sessions (control/retention.py): pages a request gives back join its session's group, and
the pool evicts groups in the retention policy's order, so a session paused for a tool call
keeps its prefix while sessions long idle and session-less pages go first. `now` (seconds)
is set by the engine before each call: the scheduler never reads a clock, so TP ranks fed
the same inputs and times stay in lock-step.

Partial pages: a request that finishes or is preempted leaves its last, partly filled page
findable (PagePool.publish_partial); a later request whose tokens continue the same prefix
takes that page over at admission and starts computing after the tokens it matches, so a
turn re-sent with the previous turn's output reuses it to the token, not just to the last
full page. Not for hybrid models (their window pool would need the same page too).

Host tier (control/tier.py, tier_slots > 0): a full page the pool evicts is copied to a
slot of a bounded host tier (a STORE in the plan's tier_ops, run before its forward), and a
prefix that misses in the pool continues in the tier: admission takes fresh pages for the run
of pages found there and the plan loads them (LOAD) instead of recomputing them. A
preempted request's pages follow the same path, so it resumes by loading what was evicted
while it waited (a swap) rather than recomputing it. With a disk tier below (disk_slots),
a host copy about to be reused is spilled to disk first (SPILL), and a prefix that
continues on disk is read back into the host tier (FETCH) by one plan while its request
waits, then loaded by a later one: a copy that fails to read back (missing, corrupt) is
forgotten and those tokens are recomputed, never loaded.

Write-back (tier_writeback): each plan also copies the cached pages at the front of the
eviction order that a next plan could evict (up to one token budget's pages beyond the free
ones) into the tier ahead of time (WRITEBACK ops, which the execution plane may run beside
the forward): evicting a page the tier already holds copies nothing, so an admission that
evicts a run of pages does not wait for their copies.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field

from agentspeed.config import SchedulingConfig
from agentspeed.control import fsm
from agentspeed.control.draft_policy import DraftPolicy, DraftStats
from agentspeed.control.errors import InvariantViolation
from agentspeed.control.fsm import FinishReason, RequestState
from agentspeed.control.ngram import NgramDrafter
from agentspeed.control.page_pool import BlockTable, PagePool, PageState
from agentspeed.control.plan import (
    LAST_SAMPLED,
    ExecutionPlan,
    NewRequest,
    RequestSpec,
    RequestUpdate,
    ScheduledChunk,
    StepResult,
    TierOp,
)
from agentspeed.control.prefix_cache import PageKey, chain_hash, extend_hashes
from agentspeed.control.retention import SessionRetention
from agentspeed.control.tier import TierCost, TierIndex
from agentspeed.errors import AgentspeedError


class RequestRejected(AgentspeedError):
    """The request can never be served (too long for the model or the KV pool)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerConfig(SchedulingConfig):
    """The scheduling settings (config.SchedulingConfig, defaults resolved) and the sizes
    the engine found: pages in the pool, tokens per page, the context length."""

    num_pages: int
    page_size: int
    max_model_len: int = 8192
    window: int | None = None  # the sliding window of a hybrid model's window layers (tokens)
    window_num_pages: int = 0  # pages in the window layers' pool (with window)
    tier_slots: int = 0  # pages the host KV tier holds (0: no tier)
    disk_slots: int = 0  # pages the disk tier below it holds (0: none)
    tier_writeback: bool = True  # copy the next pages to be evicted ahead (with tier_slots)

    @staticmethod
    def of(s: SchedulingConfig, *, num_pages: int, page_size: int, max_model_len: int,
           window: int | None = None, window_num_pages: int = 0, tier_slots: int = 0,
           disk_slots: int = 0, tier_writeback: bool = True) -> SchedulerConfig:
        fields = {f.name: getattr(s, f.name) for f in dataclasses.fields(SchedulingConfig)}
        return SchedulerConfig(**fields, num_pages=num_pages, page_size=page_size, max_model_len=max_model_len,
                               window=window, window_num_pages=window_num_pages, tier_slots=tier_slots,
                               disk_slots=disk_slots, tier_writeback=tier_writeback)


_RUNNING = (fsm.Prefilling, fsm.PrefillDone, fsm.Decoding)
_DECODABLE = (fsm.PrefillDone, fsm.Decoding)


@dataclass(slots=True)
class _Request:
    spec: RequestSpec
    arrival: int
    rid: str = ""  # spec.request_id, hoisted: the hot loops read it per request per step
    state: RequestState = field(default_factory=fsm.Waiting)
    tokens: list[int] = field(default_factory=list)  # prompt + known outputs
    num_outputs: int = 0
    pending: int = 0  # samples in flight (tokens not yet known)
    num_computed: int = 0  # tokens whose KV is written or scheduled to be
    num_confirmed: int = 0  # tokens whose KV is written by advanced steps
    num_published: int = 0  # leading pages checked for publication
    num_cached_tokens: int = -1  # prefix-cache hit at first admission (-1: not admitted yet)
    hashes: list[PageKey] = field(default_factory=list)
    drafts: int = 0  # drafted tokens in flight (their KV is scheduled, they are not tokens)
    drafter: NgramDrafter | None = None
    draft_stats: DraftStats = field(default_factory=DraftStats)
    pages_sent: int = 0  # leading pages of its table the execution plane has been sent
    announced: bool = False  # its NewRequest has been planned
    wfloor: int = 0  # leading entries of its window table given back (null pages now)
    wsent: int = 0  # leading entries of its window table execution has as they are now
    fetched: bool = False  # disk reads were planned for its admission (one round per admission)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens) + self.pending

    @property
    def blocks(self) -> BlockTable | None:
        s = self.state
        return s.blocks if isinstance(s, _RUNNING) else None

    @property
    def wblocks(self) -> BlockTable | None:
        s = self.state
        return s.window if isinstance(s, _RUNNING) else None


class Scheduler:
    def __init__(self, cfg: SchedulerConfig) -> None:
        self.cfg = cfg
        self.pool = PagePool(cfg.num_pages, cfg.page_size)
        self.wpool = PagePool(cfg.window_num_pages, cfg.page_size) if cfg.window is not None else None
        self._window = cfg.window or 0
        self._requests: dict[str, _Request] = {}
        self._waiting: list[tuple[int, int, str]] = []  # sorted (priority, arrival, id)
        self._running: list[_Request] = []  # admission order
        self._arrivals = itertools.count()
        self._step_ids = itertools.count()
        self._unadvanced: deque[ExecutionPlan] = deque()
        self._aborted: list[RequestUpdate] = []
        self._released: list[str] = []
        self._new: list[NewRequest] = []  # NewRequests of the plan being built
        self._preempted_now: set[str] = set()
        self.num_preemptions = 0
        self.num_draft_tokens = 0  # drafts verified (advanced), since start
        self.num_accepted_tokens = 0  # of those, accepted
        self._drafts = k = cfg.num_speculative_tokens or 0  # None (unresolved) means none
        self._draft_policy = DraftPolicy(k) if k and cfg.adaptive_drafts else None
        self.kv_events = self.pool.events
        self.kv_events.enabled = cfg.kv_events and cfg.enable_prefix_caching
        self.now = 0.0  # seconds, set by the engine before each call (module docstring)
        self.retention = SessionRetention(cap_s=cfg.session_gap_cap_s) if cfg.session_retention else None
        if self.retention is not None:
            for pool in (self.pool, self.wpool):
                if pool is not None:
                    pool.eviction_order = self._eviction_order
        self._partial_pages = cfg.partial_page_reuse and cfg.enable_prefix_caching and self.wpool is None
        self.num_partial_hit_tokens = 0  # prompt tokens reused from partial pages, since start
        if cfg.tier_slots and (self.wpool is not None or not cfg.enable_prefix_caching):
            raise ValueError("a host KV tier needs the prefix cache and a model without a sliding-window pool")
        if cfg.disk_slots and not cfg.tier_slots:
            raise ValueError("a disk KV tier needs the host tier above it")
        self.tier = TierIndex(cfg.tier_slots) if cfg.tier_slots else None
        self.disk = TierIndex(cfg.disk_slots) if cfg.disk_slots else None
        self._ops: list[TierOp] = []  # the tier operations of the plan being built, in order
        self._planning = -1  # its step id
        self._fetching: set[int] = set()  # host slots a step not advanced yet reads from disk into
        self.tier_cost = TierCost()  # fed by the engine, like `now`
        if self.tier is not None:
            self.pool.on_evict = self._offload
            if self.disk is not None:
                self.tier.on_evict = self._spill
        self.num_tier_writebacks = 0  # pages copied to the host tier ahead of eviction, since start
        self.num_tier_hit_tokens = 0  # prompt tokens loaded back from the host tier, since start
        self.num_disk_hit_tokens = 0  # of those, tokens first read back from disk
        self.num_disk_failed = 0  # disk copies that were missing or corrupt, since start

    # ---- public interface ---------------------------------------------------------------
    def submit(self, spec: RequestSpec) -> None:
        if spec.request_id in self._requests:
            raise ValueError(f"duplicate request id {spec.request_id!r}")
        n_prompt = len(spec.prompt_token_ids)
        if n_prompt == 0:
            raise RequestRejected("the prompt is empty")
        if spec.max_tokens < 1:
            raise RequestRejected("max_tokens must be at least 1")
        total = n_prompt + spec.max_tokens
        if total > self.cfg.max_model_len:
            raise RequestRejected(
                f"prompt ({n_prompt} tokens) + max_tokens ({spec.max_tokens}) exceeds the "
                f"context length {self.cfg.max_model_len}"
            )
        if self._pages_for(total) > self.pool.num_usable:
            raise RequestRejected(
                f"prompt + max_tokens ({total} tokens) exceeds the whole KV cache "
                f"({self.pool.num_usable * self.cfg.page_size} tokens)"
            )
        if self.wpool is not None and self._window_pages_needed(total) > self.wpool.num_usable:
            raise RequestRejected(
                f"the sliding-window layers' KV pool ({self.wpool.num_usable} pages) cannot hold one "
                f"window of {self._window} tokens plus a step's chunk"
            )
        r = _Request(spec, next(self._arrivals), spec.request_id, tokens=list(spec.prompt_token_ids))
        self._requests[spec.request_id] = r
        self._enqueue(r)
        if self.retention is not None and spec.session_key is not None:
            self.retention.turn_started(spec.session_key, self.now)

    def abort(self, request_id: str) -> None:
        r = self._requests.get(request_id)
        if r is None or isinstance(r.state, fsm.Finished):
            return
        self._finish(r, FinishReason.ABORT)
        self._aborted.append(RequestUpdate(request_id, (), FinishReason.ABORT, max(r.num_cached_tokens, 0)))

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def next_plan(self) -> ExecutionPlan:
        if len(self._unadvanced) > 1:
            raise InvariantViolation("next_plan() with two steps un-advanced: overlap depth is 1")
        step_id = self._planning = next(self._step_ids)
        budget = self.cfg.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        scheduled: set[str] = set()
        self._preempted_now = set()

        # 1. Running decodes (and their pages), preempting when memory runs out. This loop
        # runs once per running request per step: it is kept free of needless calls.
        ps = self.cfg.page_size
        k = self._drafts
        policy, batch = self._draft_policy, len(self._running)
        for r in list(self._running):
            s = r.state
            if not isinstance(s, _DECODABLE) or budget < 1 or r.rid in scheduled:
                continue
            n_known = len(r.tokens)
            if r.num_outputs + r.pending >= r.spec.max_tokens or n_known + r.pending - r.num_computed != 1:
                continue
            wb = s.window
            if (r.num_computed >= len(s.blocks.pages) * ps or (wb is not None and r.num_computed >= len(wb.pages) * ps)) \
                    and not self._reserve(r, r.num_computed + 1, scheduled):
                continue
            if wb is not None:
                self._drop_window(r, wb)
            if k and r.pending == 0 and r.spec.speculate:
                n = r.draft_stats.next_length(policy, batch) if policy is not None else k
                draft = self._draft(r, min(n, budget - 1))
                if draft:
                    # a decode of the last token (none in flight) followed by the drafts
                    chunks.append(self._chunk(r, (r.tokens[-1], *draft), True, len(draft)))
                    scheduled.add(r.rid)
                    budget -= 1 + len(draft)
                    continue
            chunks.append(self._decode_chunk(r, s.blocks, r.tokens[-1] if r.pending == 0 else LAST_SAMPLED))
            scheduled.add(r.rid)
            budget -= 1

        # 2. Chunked prefill: running prefills, then waiting requests in order.
        for r in list(self._running):
            if budget < 1 or len(scheduled) >= self.cfg.max_num_seqs:
                break
            if isinstance(r.state, fsm.Prefilling) and r.rid not in scheduled:
                budget -= self._schedule_prefill(r, budget, chunks, scheduled)
        while self._waiting and budget >= 1 and len(scheduled) < self.cfg.max_num_seqs:
            r = self._requests[self._waiting[0][2]]
            # Not while a token of its previous run is in flight, nor right after preemption
            # (a step still in flight holds chunks of its previous run).
            if r.pending or r.rid in self._preempted_now:
                break
            if not self._admit(r):
                break
            self._waiting.pop(0)
            self._running.append(r)
            budget -= self._schedule_prefill(r, budget, chunks, scheduled)
            if r.rid not in scheduled:  # the window pool is short: admit no more now
                break

        if not chunks and not self._ops:
            # an empty plan never runs: releases wait for one that does
            if self.wpool is not None and len(self._running) > 1 and not self._unadvanced:
                # Prefills wait for window pages that only other running prefills hold and
                # nothing in flight will give back: the newest makes room (it is re-queued).
                self._preempt(self._running[-1])
            for t in (self.tier, self.disk):
                if t is not None and t.fenced(step_id):
                    raise InvariantViolation(f"tier slots pinned by step {step_id}, which never runs")
            return ExecutionPlan(step_id, ())
        if not chunks and any(op.kind == TierOp.LOAD for op in self._ops):  # (admissions schedule chunks)
            raise InvariantViolation("tier loads planned in a plan without chunks")
        released, self._released = tuple(self._released), []
        new, self._new = tuple(self._new), []
        if self.tier is not None and self.cfg.tier_writeback and chunks:
            self._writeback()
        ops, self._ops = tuple(self._ops), []
        plan = ExecutionPlan(step_id, tuple(chunks), released, new, ops)
        self._unadvanced.append(plan)
        return plan

    def advance(self, result: StepResult) -> list[RequestUpdate]:
        if not self._unadvanced or self._unadvanced[0].step_id != result.step_id:
            raise InvariantViolation(f"advance of step {result.step_id} out of order")
        plan = self._unadvanced.popleft()
        updates, self._aborted = self._aborted, []
        requests = self._requests
        ps = self.cfg.page_size
        max_len = self.cfg.max_model_len
        for c in plan.chunks:
            r = requests.get(c.request_id)
            if r is None:
                continue
            s = r.state
            running = isinstance(s, _RUNNING)
            if not running and isinstance(s, fsm.Finished):
                continue
            toks: tuple[int, ...] = ()
            rejected = 0
            if c.num_draft:
                toks = (result.sampled[c.request_id], *result.accepted.get(c.request_id, ()))
                if not 1 <= len(toks) <= c.num_draft + 1:
                    raise InvariantViolation(f"step {plan.step_id}: {len(toks)} tokens for {c.num_draft} drafts")
                rejected = c.num_draft + 1 - len(toks)
                r.drafts = 0
                self.num_draft_tokens += c.num_draft
                self.num_accepted_tokens += c.num_draft - rejected
                r.draft_stats.update(c.num_draft, c.num_draft - rejected)
                if running:  # (a preempted request's counters were reset already)
                    r.num_computed -= rejected
            if running:
                end = c.start + len(c.token_ids) - rejected
                if end > r.num_confirmed:
                    r.num_confirmed = end
            if not c.sample:
                if isinstance(s, fsm.Prefilling):  # prefill progress: publish its full pages
                    self._publish(r)
                continue
            # A token sampled before a preemption is still a valid continuation: keep it.
            r.pending -= 1
            if isinstance(s, fsm.PrefillDone):
                r.state = fsm.start_decode(s)
            if not c.num_draft:
                toks = (result.sampled[c.request_id],)
            lp = result.logprobs.get(c.request_id) if result.logprobs else None
            reason = None
            for i, tok in enumerate(toks):
                r.tokens.append(tok)
                r.num_outputs += 1
                if tok in r.spec.stop_token_ids or r.num_outputs >= r.spec.max_tokens or len(r.tokens) >= max_len:
                    reason = self._stop_reason(r, tok)
                    if reason is not None:
                        toks = toks[: i + 1]
                        break
            # Publish before a finish gives the pages back: the next turn re-sends them.
            if running and min(r.num_confirmed, len(r.tokens)) // ps > r.num_published:
                self._publish(r)
            if reason is not None:
                self._finish(r, reason)
                requests.pop(r.rid, None)
            n_cached = r.num_cached_tokens
            updates.append(RequestUpdate(r.rid, toks, reason, n_cached if n_cached > 0 else 0, "",
                                         () if lp is None else (lp,)))
        self.pool.clear_fence(plan.step_id)
        if self.wpool is not None:
            self.wpool.clear_fence(plan.step_id)
        if self.tier is not None:
            self._tier_advanced(plan, result)
        return updates

    def advance_idle(self) -> list[RequestUpdate]:
        """Updates produced outside any step (aborts) when there is nothing to run."""
        updates, self._aborted = self._aborted, []
        return updates

    def num_cached_tokens(self, request_id: str) -> int:
        r = self._requests.get(request_id)
        return max(r.num_cached_tokens, 0) if r else 0

    # ---- internals ----------------------------------------------------------------------
    def _eviction_order(self, groups: Collection[str | None]) -> list[str | None]:
        assert self.retention is not None
        return self.retention.eviction_order(groups, self.now)

    def _offload(self, page: int, key: PageKey) -> None:
        """The pool is evicting a full page: copy it to the host tier (before the plan's
        forward, which may write the page) unless the tier holds it already."""
        assert self.tier is not None
        slot = self.tier.store(key)
        if slot is not None:
            self._ops.append(TierOp(TierOp.STORE, page, slot))

    def _writeback(self) -> None:
        """Copy ahead the cached pages a next plan could evict (one token budget's pages
        beyond the free ones) that the tier does not hold yet. Last in the plan: nothing
        after it allocates, so no page copied here is written by this plan. The slots are
        pinned for the plan, so that no later write-back of it takes one (its spill would
        read a copy not made yet); the spills of the slots taken go before every write-back."""
        tier, pool = self.tier, self.pool
        assert tier is not None
        budget = -(-self.cfg.max_num_batched_tokens // self.cfg.page_size)
        wbs = []
        for page in pool.next_victims(budget - pool.num_free()):
            key = pool.page_hash[page]
            assert key is not None
            if tier.lookup(key) is None:
                slot = tier.store(key)  # (a spill it causes joins self._ops)
                if slot is None:
                    break
                tier.pin(slot, self._planning)
                wbs.append(TierOp(TierOp.WRITEBACK, page, slot))
        self._ops += wbs
        self.num_tier_writebacks += len(wbs)

    def _spill(self, key: PageKey, slot: int) -> None:
        """The host tier is reusing `slot`: write key's copy there to disk first (the ops
        before this one made it), unless the disk holds it already."""
        assert self.disk is not None
        d = self.disk.store(key)
        if d is not None:
            self._ops.append(TierOp(TierOp.SPILL, slot, d, key))

    def _fetch(self, r: _Request, start: int, limit: int) -> bool:
        """Plan disk reads of the run of r's pages from `start` found on disk into the host
        tier (at most half of it). True if any: r waits for them (a failed read must not be
        loaded), and is admitted by a later plan."""
        tier, disk = self.tier, self.disk
        assert tier is not None and disk is not None
        n = 0
        for h in r.hashes[start:limit]:
            d = disk.lookup(h)
            if d is None or n >= tier.num_slots // 2:
                break
            disk.pin(d, self._planning)  # (before the host store: its spill must not take d)
            slot = tier.store(h)
            if slot is None:  # held already, or every host slot pinned: no read, no pin
                disk.unpin(d, self._planning)
                break
            tier.pin(slot, self._planning)
            self._ops.append(TierOp(TierOp.FETCH, d, slot, h))
            self._fetching.add(slot)
            n += 1
        r.fetched = n > 0
        return r.fetched

    def _tier_advanced(self, plan: ExecutionPlan, result: StepResult) -> None:
        """Release the tiers' pins of an advanced step; forget copies that did not read back."""
        assert self.tier is not None
        fetches = [op for op in plan.tier_ops if op.kind == TierOp.FETCH]
        self._fetching -= {op.dst for op in fetches}
        self.tier.clear_fence(plan.step_id)
        if self.disk is None:
            return
        self.disk.clear_fence(plan.step_id)
        failed = set(result.tier_failed)
        for op in fetches:
            if op.dst in failed:
                self.tier.drop(op.key)
                self.disk.drop(op.key)
                self.num_disk_failed += 1
            else:
                self.num_disk_hit_tokens += self.cfg.page_size

    def _group(self, r: _Request) -> str | None:
        """The cached-page group r's pages join when it gives them back."""
        return r.spec.session_key if self.retention is not None else None

    def _publish_partial(self, r: _Request, bt: BlockTable) -> None:
        """Leave r's last, partly filled page findable before r gives it back."""
        ps = self.cfg.page_size
        n = min(r.num_confirmed, len(r.tokens))
        k = n // ps
        if not self._partial_pages or n % ps == 0 or r.num_published != k or len(bt.pages) <= k:
            return
        page = bt.pages[k]
        if self.pool.state[page] != PageState.OWNED:
            return
        self.pool.publish_partial(page, self._partial_parent(r, k), r.tokens[k * ps : n])

    def _partial_parent(self, r: _Request, k: int) -> PageKey:
        """The key a partial page k of r is found under: its parent page's key, or for the
        first page the key of no tokens under r's salt (so salts never share pages)."""
        return r.hashes[k - 1] if k else chain_hash(None, (), r.spec.cache_salt)

    def _pages_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.cfg.page_size)

    def _fence(self) -> int | None:
        """The step whose advance must precede reuse of pages given back now."""
        return self._unadvanced[-1].step_id if self._unadvanced else None

    def _enqueue(self, r: _Request, front: bool = False) -> None:
        key = (-(1 << 62) if front else r.spec.priority, r.arrival, r.rid)
        bisect.insort(self._waiting, key)

    def _page_delta(self, r: _Request, pages: list[int]) -> tuple[int, tuple[int, ...]]:
        """(page_offset, new_pages) of r's next chunk; announces r on its first chunk."""
        if not r.announced:
            r.announced = True
            self._new.append(NewRequest(r.rid, r.spec.prompt_token_ids, r.spec.params))
        sent = r.pages_sent
        if sent == len(pages):
            return sent, ()
        r.pages_sent = len(pages)
        return sent, tuple(pages[sent:])

    def _window_delta(self, r: _Request, wb: BlockTable | None) -> tuple[int, tuple[int, ...]]:
        if wb is None:
            return 0, ()
        pages = wb.pages
        sent = r.wsent
        r.wsent = len(pages)
        return sent, tuple(pages[sent:])

    def _chunk(self, r: _Request, tokens: tuple[int, ...], sample: bool, num_draft: int = 0) -> ScheduledChunk:
        s = r.state
        assert isinstance(s, _RUNNING)
        start = r.num_computed
        ps = self.cfg.page_size
        # Published pages are immutable: every page this chunk writes must be owned.
        for pool, bt in ((self.pool, s.blocks), (self.wpool, s.window)):
            if bt is None or pool is None:
                continue
            pages, state = bt.pages, pool.state
            for p in range(start // ps, (start + len(tokens) - 1) // ps + 1):
                if state[pages[p]] != PageState.OWNED or not pages[p]:
                    raise InvariantViolation(f"chunk would write published page {pages[p]}")
        r.num_computed += len(tokens)
        if sample:
            r.pending += 1
        r.drafts = num_draft
        offset, new = self._page_delta(r, s.blocks.pages)
        woffset, wnew = self._window_delta(r, s.window)
        return ScheduledChunk(r.rid, tokens, start, new, sample, num_draft, offset, woffset, wnew)

    def _decode_chunk(self, r: _Request, blocks: BlockTable, tok: int) -> ScheduledChunk:
        """_chunk for one token that samples: the same checks, fewer steps."""
        if self.wpool is not None:
            return self._chunk(r, (tok,), True)
        start = r.num_computed
        pages = blocks.pages
        if self.pool.state[pages[start // self.cfg.page_size]] != PageState.OWNED:
            raise InvariantViolation(f"chunk would write published page {pages[start // self.cfg.page_size]}")
        r.num_computed = start + 1
        r.pending += 1
        sent = r.pages_sent
        if sent == len(pages) and r.announced:  # most decode steps: no page to send
            return ScheduledChunk(r.rid, (tok,), start, (), True, 0, sent)
        offset, new = self._page_delta(r, pages)
        return ScheduledChunk(r.rid, (tok,), start, new, True, 0, offset)

    def _draft(self, r: _Request, k: int) -> list[int]:
        """Up to k drafts for r's next decode, bounded by its max_tokens and the context length
        (every drafted position must be one the request could reach) and by free pages."""
        k = min(k, r.spec.max_tokens - r.num_outputs - 1, self.cfg.max_model_len - len(r.tokens) - 1)
        if k <= 0:
            return []
        if r.drafter is None:
            r.drafter = NgramDrafter(r.tokens, self.cfg.ngram_max, self.cfg.ngram_min)
        draft = r.drafter.draft(k)
        for pool, bt in ((self.pool, r.blocks), (self.wpool, r.wblocks)):
            if not draft or pool is None or bt is None:
                continue
            need = self._pages_for(r.num_computed + 1 + len(draft)) - len(bt.pages)
            if need > 0:
                if pool.can_allocate(need):
                    pool.allocate(bt, need)
                else:  # only what the pages it has can hold
                    del draft[max(0, len(bt.pages) * self.cfg.page_size - r.num_computed - 1) :]
        return draft

    def _reserve(self, r: _Request, n_tokens: int, scheduled: set[str]) -> bool:
        """Make r's pages cover n_tokens, preempting the running request that frees the most
        (never one already in this plan) while memory is short. False if r cannot run now."""
        bt, wb = r.blocks, r.wblocks
        assert bt is not None
        need = self._pages_for(n_tokens) - len(bt.pages)
        wneed = 0
        if wb is not None:
            self._drop_window(r, wb)
            wneed = self._pages_for(n_tokens) - len(wb.pages)
        while (need > 0 and not self.pool.can_allocate(need)) or (
                wneed > 0 and self.wpool is not None and not self.wpool.can_allocate(wneed)):
            victims = [v for v in self._running if v.rid not in scheduled]
            if not victims:
                return False
            victim = max(victims, key=lambda v: len(v.blocks or ()))
            self._preempt(victim)
            if victim is r:
                return False
        if need > 0:
            self.pool.allocate(bt, need)
        if wneed > 0 and self.wpool is not None and wb is not None:
            self.wpool.allocate(wb, wneed)
        return True

    # ---- the sliding-window table ---------------------------------------------------------
    def _window_floor(self, start: int) -> int:
        """Leading window-table entries no query at a position >= start reads. One page more
        than the window needs is kept, so that a later turn's page-aligned prefix hit at
        about `start` still finds every window page it needs (_window_hits)."""
        ps = self.cfg.page_size
        return max(0, start - self._window - ps + 1) // ps

    def _window_lo(self, n_pages: int) -> int:
        """The first window page a prefill resuming after n_pages cached pages reads."""
        ps = self.cfg.page_size
        return max(0, n_pages * ps - self._window + 1) // ps

    def _window_pages_needed(self, total: int) -> int:
        """Most window pages one request holds at once (a window, a chunk, the slack page)."""
        chunk = min(total, self.cfg.max_num_batched_tokens)
        return min(self._pages_for(total), self._pages_for(self._window + chunk) + 2)

    def _drop_window(self, r: _Request, wb: BlockTable) -> None:
        """Give back the window pages behind r's next chunk's window, publishing full ones
        first (their tokens are known: they lie a window behind): another request's prefix
        hit may need them as its own window."""
        floor = self._window_floor(r.num_computed)
        lo = r.wfloor
        if floor <= lo:
            return
        wpool = self.wpool
        assert wpool is not None
        if self.cfg.enable_prefix_caching:
            ps = self.cfg.page_size
            extend_hashes(r.hashes, r.tokens[: floor * ps], ps, r.spec.cache_salt)
            pages = wb.pages
            for i in range(lo, floor):
                if pages[i] and wpool.state[pages[i]] == PageState.OWNED:
                    wpool.publish(pages[i], r.hashes[i])
        wpool.drop(wb, lo, floor, self._fence(), self._group(r))
        r.wfloor = floor
        if r.wsent > lo:
            r.wsent = lo

    def _window_hits(self, r: _Request, n: int) -> tuple[int, list[int]]:
        """(n', pages): the longest prefix hit n' <= n whose window pages [lo(n'), n') are all
        in the window pool, and those pages."""
        wpool = self.wpool
        assert wpool is not None
        found = [wpool.lookup(h) for h in r.hashes[:n]]
        last_miss = [-1] * (n + 1)  # last_miss[m]: the last i < m with no window page
        for i, p in enumerate(found):
            last_miss[i + 1] = i if p is None else last_miss[i]
        for m in range(n, 0, -1):
            lo = self._window_lo(m)
            if last_miss[m] < lo:
                return m, [p for p in found[lo:m] if p is not None]
        return 0, []

    def _preempt(self, r: _Request) -> None:
        s = r.state
        assert isinstance(s, (fsm.Prefilling, fsm.PrefillDone, fsm.Decoding))
        preempted, bt, wb = fsm.preempt(s)
        self._publish_partial(r, bt)
        g = self._group(r)
        self.pool.release(bt, self._fence(), g)
        if wb is not None and self.wpool is not None:
            self.wpool.release(wb, self._fence(), g)
        r.state = fsm.requeue(preempted)
        r.num_computed = r.num_confirmed = r.num_published = r.pages_sent = r.wfloor = r.wsent = 0
        self._running.remove(r)
        self._enqueue(r, front=True)
        self._preempted_now.add(r.rid)
        self.num_preemptions += 1

    def _admit(self, r: _Request) -> bool:
        """Waiting -> Prefilling: share its prefix-cache hits and allocate pages for all its
        known tokens up front (so a started prefill never waits for memory). False, with
        nothing changed, if the pool cannot hold it now."""
        assert isinstance(r.state, fsm.Waiting)
        ps = self.cfg.page_size
        hits: list[int] = []
        if self.cfg.enable_prefix_caching:
            extend_hashes(r.hashes, r.tokens, ps, r.spec.cache_salt)
            # The last known token is always recomputed: its logits are needed.
            for h in r.hashes[: (r.num_tokens - 1) // ps]:
                page = self.pool.lookup(h)
                if page is None:
                    break
                hits.append(page)
        whits: list[int] = []
        wpool = self.wpool
        if wpool is not None and hits:
            n, whits = self._window_hits(r, len(hits))
            del hits[n:]
        loads: list[int] = []  # tier slots of the pages after the device hits
        if self.tier is not None and self.tier_cost.use_host(ps):
            limit = (r.num_tokens - 1) // ps
            for h in r.hashes[len(hits) : limit]:
                slot = self.tier.lookup(h)
                if slot is None:
                    break
                if slot in self._fetching:  # its disk read is in flight: wait for it
                    return False
                loads.append(slot)
            if self.disk is not None and not r.fetched and self.tier_cost.use_disk(ps) \
                    and self._fetch(r, len(hits) + len(loads), limit):
                return False
        n_hit = len(hits) + len(loads)
        partial, n_partial = 0, 0
        if self._partial_pages and r.num_tokens - 1 > n_hit * ps:
            lo = n_hit * ps
            partial, n_partial = self.pool.match_partial(
                self._partial_parent(r, n_hit), r.tokens[lo : min(lo + ps, r.num_tokens - 1)])
        cached_hits = sum(1 for p in hits if self.pool.state[p] == PageState.CACHED)
        need = self._pages_for(r.num_tokens) - len(hits)
        if not self.pool.can_allocate(need + cached_hits):
            return False
        wb = None
        if wpool is not None:
            if not wpool.can_allocate(1 + sum(1 for p in whits if wpool.state[p] == PageState.CACHED)):
                return False
            wb = wpool.new_table()
            r.wfloor = len(hits) - len(whits)
            wpool.skip(wb, r.wfloor)
            for p in whits:
                wpool.share(wb, p)
        bt = self.pool.new_table()
        for p in hits:
            self.pool.share(bt, p)
        if loads:
            assert self.tier is not None
            for slot in loads:  # pinned first: the allocation's evictions store into the tier
                self.tier.pin(slot, self._planning)
            self.pool.allocate(bt, len(loads))
            for slot, page in zip(loads, bt.pages[len(hits) :], strict=True):
                self._ops.append(TierOp(TierOp.LOAD, slot, page))
            need -= len(loads)
            self.num_tier_hit_tokens += len(loads) * ps
            if partial and not self.pool.claimable(partial):  # those allocations evicted it
                partial, n_partial = 0, 0
        if partial:  # (a cached page: counted in can_allocate's available pages)
            self.pool.claim(bt, partial)
            need -= 1
            self.num_partial_hit_tokens += n_partial
        self.pool.allocate(bt, need)
        r.state = fsm.start_prefill(r.state, bt, wb)
        # (loaded pages are published, like computed ones, once the step loading them is advanced)
        r.num_computed = r.num_confirmed = n_hit * ps + n_partial
        r.num_published = len(hits)
        r.fetched = False
        if r.num_cached_tokens < 0:
            r.num_cached_tokens = n_hit * ps + n_partial
        return True

    def _schedule_prefill(
        self, r: _Request, budget: int, chunks: list[ScheduledChunk], scheduled: set[str]
    ) -> int:
        """Schedule as much of r's remaining prefill as budget and memory allow; returns the
        tokens used. Completing the prefill samples its first (next) token."""
        s = r.state
        assert isinstance(s, fsm.Prefilling)
        remaining = r.num_tokens - r.num_computed
        n = min(remaining, budget)
        wb = s.window
        if wb is not None and self.wpool is not None:
            # Window pages a chunk at a time, as many as the pool has now (never preempting
            # for a prefill); none at all: it waits for pages to come back.
            self._drop_window(r, wb)
            ps = self.cfg.page_size
            n = min(n, (len(wb.pages) + self.wpool.num_available()) * ps - r.num_computed)
            if n <= 0:
                return 0
            need = self._pages_for(r.num_computed + n) - len(wb.pages)
            if need > 0:
                self.wpool.allocate(wb, need)
        done = n == remaining
        toks = tuple(r.tokens[r.num_computed : r.num_computed + n])
        chunks.append(self._chunk(r, toks, sample=done))
        scheduled.add(r.rid)
        if done:
            r.state = fsm.complete_prefill(s)
        return n

    def _publish(self, r: _Request) -> None:
        if not self.cfg.enable_prefix_caching:
            return
        bt = r.blocks
        if bt is None:
            return
        ps = self.cfg.page_size
        n_full = min(r.num_confirmed, len(r.tokens)) // ps
        if n_full <= r.num_published:
            return
        extend_hashes(r.hashes, r.tokens[: n_full * ps], ps, r.spec.cache_salt)
        pages = bt.pages
        events = self.kv_events
        first = -1  # start of the run of pages published now (reported as one event)
        for i in range(r.num_published, n_full):
            if self.pool.state[pages[i]] == PageState.OWNED and self.pool.publish(pages[i], r.hashes[i]):
                if first < 0:
                    first = i
            elif first >= 0 and events.enabled:
                self._report_stored(r, first, i)
                first = -1
        if first >= 0 and events.enabled:
            self._report_stored(r, first, n_full)
        wb, wpool = r.wblocks, self.wpool
        if wb is not None and wpool is not None:
            wpages = wb.pages
            for i in range(max(r.num_published, r.wfloor), min(n_full, len(wpages))):
                if wpool.state[wpages[i]] == PageState.OWNED:
                    wpool.publish(wpages[i], r.hashes[i])
        r.num_published = n_full

    def _report_stored(self, r: _Request, lo: int, hi: int) -> None:
        ps = self.cfg.page_size
        self.kv_events.stored(r.hashes[lo:hi], r.hashes[lo - 1] if lo else None, r.tokens[lo * ps : hi * ps], ps)

    def flush_cache(self) -> int:
        """Evict every cached (unused) prefix page, in both pools, and drop the host tier's
        copies; pages that live requests hold stay. Returns the number of full-attention pages
        evicted."""
        before = self.pool.evictions
        hook, self.pool.on_evict = self.pool.on_evict, None  # a flush copies nothing to the tier
        self.pool.drop_cache()
        self.pool.on_evict = hook
        if self.wpool is not None:
            self.wpool.drop_cache()
        if self.tier is not None:
            self.tier.clear()
        if self.disk is not None:
            self.disk.clear()
        return self.pool.evictions - before

    def _stop_reason(self, r: _Request, tok: int) -> FinishReason | None:
        if tok in r.spec.stop_token_ids and r.num_outputs >= r.spec.min_tokens:
            return FinishReason.STOP
        if r.num_outputs >= r.spec.max_tokens or len(r.tokens) >= self.cfg.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, r: _Request, reason: FinishReason) -> None:
        s = r.state
        assert not isinstance(s, fsm.Finished)
        r.state, bt, wb = fsm.finish(s, reason)
        g = self._group(r)
        if bt is not None:
            self._publish_partial(r, bt)
            self.pool.release(bt, self._fence(), g)
        if wb is not None and self.wpool is not None:
            self.wpool.release(wb, self._fence(), g)
        if self.retention is not None and r.spec.session_key is not None:
            self.retention.turn_ended(r.spec.session_key, self.now)
            self.retention.prune(self.now, self.pool.groups)
        if r in self._running:
            self._running.remove(r)
        else:
            key = next((k for k in self._waiting if k[2] == r.rid), None)
            if key is not None:
                self._waiting.remove(key)
        if reason == FinishReason.ABORT:
            self._requests.pop(r.rid, None)
        if r.announced:  # else execution never heard of it
            self._released.append(r.rid)

    # ---- invariants ---------------------------------------------------------------------
    def check_invariants(self) -> None:
        self.pool.check_invariants()
        if self.wpool is not None:
            self.wpool.check_invariants()
        for tier in (self.tier, self.disk):
            if tier is not None:
                tier.check_invariants()
        if self._ops:
            raise InvariantViolation("tier operations left outside a plan")
        if self.tier is not None and any(not self.tier.pins[s] for s in self._fetching):
            raise InvariantViolation("a host slot being read from disk is not pinned")
        ps = self.cfg.page_size
        waiting_ids = [k[2] for k in self._waiting]
        if len(set(waiting_ids)) != len(waiting_ids):
            raise InvariantViolation("a request is queued twice")
        running_ids = {r.rid for r in self._running}
        if running_ids & set(waiting_ids):
            raise InvariantViolation("a request is both running and waiting")
        for rid in waiting_ids:
            r = self._requests[rid]
            if not isinstance(r.state, fsm.Waiting) or r.blocks is not None:
                raise InvariantViolation(f"waiting request {rid} in state {type(r.state).__name__}")
        for r in self._running:
            bt = r.blocks
            if bt is None or bt.released:
                raise InvariantViolation(f"running request {r.rid} without pages")
            if len(bt.pages) * ps < r.num_computed:
                raise InvariantViolation(f"request {r.rid}: pages do not cover its KV")
            if r.pages_sent > len(bt.pages) or (r.pages_sent and not r.announced):
                raise InvariantViolation(f"request {r.rid}: execution was sent pages it does not hold")
            if not r.num_confirmed <= r.num_computed <= r.num_tokens + r.drafts:
                raise InvariantViolation(f"request {r.rid}: token counters out of order")
            if r.drafts and not r.pending:
                raise InvariantViolation(f"request {r.rid}: drafts in flight without a step")
            if r.pending > len(self._unadvanced):
                raise InvariantViolation(f"request {r.rid}: more samples in flight than steps")
            wb = r.wblocks
            if (wb is None) != (self.wpool is None):
                raise InvariantViolation(f"request {r.rid}: a window table iff the model has window layers")
            if wb is not None:
                w = wb.pages
                if len(w) * ps < r.num_computed or len(w) > len(bt.pages):
                    raise InvariantViolation(f"request {r.rid}: window pages do not cover its KV")
                if any(w[: r.wfloor]) or not all(w[r.wfloor :]) or r.wsent > len(w):
                    raise InvariantViolation(f"request {r.rid}: window table has holes after its floor "
                                             "or pages before it")
                if r.wfloor > self._window_floor(max(r.num_computed - r.drafts, 0)):
                    raise InvariantViolation(f"request {r.rid}: window pages given back that a query still reads")
        for rid, r in self._requests.items():
            if rid not in running_ids and rid not in waiting_ids and not isinstance(r.state, fsm.Finished):
                raise InvariantViolation(f"request {rid} is lost (neither queued nor running)")
