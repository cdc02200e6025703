"""The model runner: owns the model, the KV cache tensors and the sampler on one rank, and
turns each step's ExecutionPlan into logits and sampled tokens, keeping per-request state
(execution/request_state.py) across steps. Every tensor-parallel rank runs
the same calls with the same chunks (SPMD); sampled tokens are taken from rank 0."""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Sequence

import msgspec
import torch

from agentspeed.config import EngineConfig
from agentspeed.control.plan import LAST_SAMPLED, ExecutionPlan, ScheduledChunk, StepResult, TierOp
from agentspeed.errors import ConfigError
from agentspeed.execution import host_alloc
from agentspeed.execution.inputs import build_inputs
from agentspeed.execution.kv_cache import KVCache, window_group
from agentspeed.execution.kv_disk import DiskKVTier
from agentspeed.execution.kv_tier import HostKVTier, build_tier, resolve_mode
from agentspeed.execution.request_state import RequestState, RequestTable
from agentspeed.execution.sampler import Sampler
from agentspeed.execution.structured import GrammarStep
from agentspeed.modeling.build import build_model
from agentspeed.modeling.comm import Communicator
from agentspeed.modeling.context import ForwardContext
from agentspeed.structured.backend import Matcher

log = logging.getLogger(__name__)

StepCosts = tuple[tuple[float, int], tuple[float, int], tuple[float, int]]
_NO_COSTS: StepCosts = ((0.0, 0), (0.0, 0), (0.0, 0))
# A step of at least this many tokens is timed as prefill (decode steps cost per token far more).
PREFILL_MEASURE_TOKENS = 256


class ModelRunner:
    def __init__(self, cfg: EngineConfig, hybrid_kv: bool = False) -> None:
        """hybrid_kv: a hybrid model's sliding-window layers get their own page table and
        pool (kv_cache.window_group), which only a scheduler that sends window page deltas
        can drive (EngineCore passes cfg.cache.hybrid_kv); a bare runner, driven by hand
        (tests, benchmarks), keeps one table for all layers."""
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        device_hint = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
        if device_hint == "cuda" and cfg.parallel.tp > 1:
            torch.cuda.set_device(cfg.parallel.rank)
        if device_hint == "cpu" and cfg.parallel.tp > 1:
            # Ranks share the cores: more OpenMP threads than cores makes every parallel
            # region wait on a descheduled thread.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.parallel.tp))
        self.comm = Communicator.init(cfg.parallel, device_hint)
        built = build_model(cfg, self.comm)
        self.model = built.model
        self.model_config = built.config
        self.source = built.source
        self.device = built.device
        self.dtype = built.dtype
        self.kernels = built.kernels
        self.page_size = cfg.cache.page_size
        self.max_model_len = min(
            cfg.max_model_len or built.config.max_position_embeddings, built.config.max_position_embeddings
        )
        window = window_group(built.config, self.max_model_len) if hybrid_kv else None
        self.kv = KVCache(
            built.config, cfg.cache, self.comm.world_size, built.dtype, built.device,
            max_tokens_useful=self.max_model_len * cfg.scheduling.max_num_seqs,
            window=window, chunk_tokens=cfg.scheduling.max_num_batched_tokens,
        )
        self.tier: HostKVTier | None = None
        if cfg.cache.kv_offload_memory is not None:
            if window is not None or not cfg.scheduling.enable_prefix_caching:
                raise ConfigError("--kv-offload-memory needs the prefix cache, and is not supported for models "
                                  "whose sliding-window layers have their own pool "
                                  "(--disable-hybrid-kv-cache-manager keeps one pool)")
            mode = resolve_mode(cfg.cache.kv_offload_dtype, built.device, self.kv.dtype)
            self.tier = build_tier(self.kv.layers, cfg.cache.kv_offload_memory, mode, built.device)
        self.disk: DiskKVTier | None = None
        if self.tier is not None and cfg.cache.kv_offload_dir is not None and cfg.cache.kv_offload_disk:
            n = DiskKVTier.slots_for(self.tier, cfg.cache.kv_offload_disk)
            if n < 1:
                raise ConfigError(f"--kv-offload-disk {cfg.cache.kv_offload_disk} bytes holds no page")
            self.disk = DiskKVTier(self.tier, cfg.cache.kv_offload_dir, n, self.comm.rank)
            log.info("KV disk tier: %d pages in %s", n, self.disk.dir)
        self.sampler = Sampler(built.kernels, built.device, cfg.seed)
        self.requests = RequestTable(built.device, windowed=window is not None)
        self.grammar = GrammarStep(built.config.vocab_size)  # EngineCore sets its overlap
        self._matchers: dict[str, Matcher] = {}
        # the last step's (seconds, pages) of tier loads and of disk reads, and (seconds, tokens)
        # of its forward when prefill-sized: what the scheduler's TierCost learns from
        self.last_costs: StepCosts = _NO_COSTS
        # Installed after loading: the weights, the KV pool and load-time buffers stay glibc's
        # (fresh pages, faulted as they are first touched); the forwards' activations, allocated
        # and freed in the same sizes step after step, come from reused blocks.
        if device_hint == "cpu" and cfg.host_allocator == "caching":
            host_alloc.install()
        elif cfg.host_allocator == "system" and host_alloc.active():
            log.warning("--host-allocator system: this process already uses the caching allocator (an "
                        "earlier engine here installed it; it stays for the process's life)")

    def expect_matcher(self, request_id: str, matcher: Matcher) -> None:
        """The grammar matcher of a constrained request not yet in a plan (EngineCore hands
        it over at admission; the request's first plan attaches it to its state)."""
        self._matchers[request_id] = matcher

    def drop_matcher(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    @torch.inference_mode()
    def forward(self, chunks: Sequence[ScheduledChunk]) -> torch.Tensor:
        """fp32 logits [rows, vocab], in chunk order: one row per chunk with sample=True, 1 +
        num_draft rows for a chunk with drafts. Samples nothing: for tests and benchmarks
        that drive the model directly (a request id not seen before gets a bare row)."""
        states = [self.requests.apply(c, create=True) for c in chunks]
        return self._forward(chunks, states)

    def _forward(self, chunks: Sequence[ScheduledChunk], states: list[RequestState]) -> torch.Tensor:
        inputs = build_inputs(chunks, states, self.requests, self.page_size)
        ctx = ForwardContext(inputs.positions, inputs.attn, self.kv.layers, inputs.logits_indices,
                             attn_window=inputs.attn_window)
        return self.model(inputs.input_ids, ctx)

    @torch.inference_mode()
    def execute_plan(self, plan: ExecutionPlan) -> StepResult:
        """Run one scheduler step: the only way requests reach the runner. Steps must run in
        plan order: a LAST_SAMPLED input is the token this runner sampled for that request in
        the previous step, and page deltas build on the previous plans'."""
        self.last_costs = _NO_COSTS
        failed: list[int] = []
        if self.tier is not None:
            self.tier.finish_store()  # the last plan's write-back, if write_back() did not run
            if plan.tier_ops:
                failed = self._tier_ops(plan.tier_ops)
        table = self.requests
        for rid in plan.released:  # finished before this plan was made: no chunk of it needs them
            table.release(rid)
        for new in plan.new_requests:
            st = table.add(new)
            if new.params.structured_outputs is not None:
                # Absent on TP ranks > 0 (their samples are replaced by rank 0's) and for a
                # request aborted before this plan ran.
                st.matcher = self._matchers.pop(new.request_id, None)
        chunks: list[ScheduledChunk] = []
        states: list[RequestState] = []
        for c in plan.chunks:
            st = table.apply(c)
            if LAST_SAMPLED in c.token_ids:
                c = msgspec.structs.replace(
                    c, token_ids=[st.last_sampled if t == LAST_SAMPLED else t for t in c.token_ids])
            chunks.append(c)
            states.append(st)
        t0 = time.perf_counter()
        result = self._sample(chunks, states, plan.step_id) if chunks else StepResult(plan.step_id)
        if self.tier is not None and plan.num_tokens >= PREFILL_MEASURE_TOKENS:
            load, fetch, _ = self.last_costs
            self.last_costs = (load, fetch, (time.perf_counter() - t0, plan.num_tokens))
        return msgspec.structs.replace(result, tier_failed=tuple(failed)) if failed else result

    def write_back(self) -> None:
        """Complete the write-back of the plan run last (the engine queues this behind each
        step on the step's thread, so that on a CPU it runs while the engine handles the
        step's result; execute_plan completes it otherwise)."""
        if self.tier is not None:
            self.tier.finish_store()

    def _tier_ops(self, ops: Sequence[TierOp]) -> list[int]:
        """Run a plan's tier copies in order, consecutive ones of a kind as one batch, and
        start its write-back (tier.begin_store); returns the host slots of the fetches that
        failed on any rank."""
        tier, disk = self.tier, self.disk
        assert tier is not None
        failed: set[int] = set()
        fetches: list[TierOp] = []
        load_s = fetch_s = 0.0
        n_load = 0
        for kind, run in itertools.groupby(ops, key=lambda op: op.kind):
            batch = list(run)
            t0 = time.perf_counter()
            if kind == TierOp.WRITEBACK:  # (last in the plan)
                tier.begin_store([op.src for op in batch], [op.dst for op in batch])
            elif kind == TierOp.STORE:
                tier.store([op.src for op in batch], [op.dst for op in batch])
            elif kind == TierOp.LOAD:
                tier.load([op.src for op in batch], [op.dst for op in batch])
                load_s += time.perf_counter() - t0
                n_load += len(batch)
            else:
                assert disk is not None
                if kind == TierOp.SPILL:
                    disk.spill([(op.src, op.dst, op.key) for op in batch])
                else:
                    failed |= set(disk.fetch([(op.src, op.dst, op.key) for op in batch]))
                    fetches += batch
                    fetch_s += time.perf_counter() - t0
        if fetches and self.comm.world_size > 1:  # every rank must forget the same copies
            flags = self.comm.all_reduce(torch.tensor([float(op.dst in failed) for op in fetches]))
            failed = {op.dst for op, f in zip(fetches, flags.tolist(), strict=True) if f > 0}
        self.last_costs = ((load_s, n_load), (fetch_s, len(fetches)), (0.0, 0))
        return sorted(failed)

    def _sample(self, chunks: list[ScheduledChunk], states: list[RequestState], step_id: int) -> StepResult:
        sampling = [(c, st) for c, st in zip(chunks, states) if c.sample]
        constrained = [(i, st.matcher) for i, (_, st) in enumerate(sampling) if st.matcher is not None]
        pending = self.grammar.start(constrained) if constrained else None  # fills during the forward
        logits = self._forward(chunks, states)
        if not sampling:
            return StepResult(step_id)
        drafts = any(c.num_draft for c, _ in sampling)
        firsts = logits
        if drafts:
            # Row 0 of a chunk with drafts is the plain decode's row (what `sampled` holds);
            # the argmax of every row is what verification compares the drafts with.
            rows, first = 0, []
            for c, _ in sampling:
                first.append(rows)
                rows += 1 + c.num_draft
            firsts = logits[torch.tensor(first, device=logits.device)]
        mask = (lambda lg: self.grammar.apply(lg, pending)) if pending is not None else None
        out = self.sampler.sample(firsts, [st for _, st in sampling], mask)
        n = len(sampling)
        if not drafts:
            ids = self.comm.broadcast(out.token_ids, src=0).tolist()
            accepted: dict[str, tuple[int, ...]] = {}
        else:
            both = self.comm.broadcast(torch.cat((out.token_ids, logits.argmax(-1))), src=0).tolist()
            ids, best = both[:n], both[n:]
            accepted = {c.request_id: _verify(c.token_ids[len(c.token_ids) - c.num_draft :], t, best[f + 1 :])
                        for (c, _), t, f in zip(sampling, ids, first) if c.num_draft}
        sampled: dict[str, int] = {}
        for (c, st), t in zip(sampling, ids):
            more = accepted.get(c.request_id, ())
            sampled[c.request_id] = t
            st.last_sampled = more[-1] if more else t
            if st.counts is not None:
                st.record([t, *more])
            if st.matcher is not None:
                self.grammar.accept(c.request_id, st.matcher, [t, *more])
        lps = out.logprobs
        logprobs = {c.request_id: lp for (c, _), lp in zip(sampling, lps) if lp is not None} if lps else {}
        return StepResult(step_id, sampled, logprobs, accepted)

    def shutdown(self) -> None:
        self.write_back()
        if self.disk is not None:
            self.disk.shutdown()
        self.grammar.shutdown()
        self.comm.shutdown()


def _verify(drafts: Sequence[int], first: int, best: Sequence[int]) -> tuple[int, ...]:
    """Greedy verification: best[i] is the argmax after draft i. Draft i stands while it equals
    the token before it (first, then each accepted argmax); returns the argmaxes after the
    drafts that stand, so the result is exactly what plain greedy decoding would produce."""
    out: list[int] = []
    prev = first
    for i, d in enumerate(drafts):
        if d != prev:
            break
        prev = best[i]
        out.append(prev)
    return tuple(out)
