"""EngineCore: the busy loop that joins the control plane (Scheduler) and the execution
plane (ModelRunner): plan -> execute -> advance, with overlap depth 1.

With overlap, step N+1 is planned while step N executes on a worker thread (torch releases
the GIL inside its kernels, so planning really runs concurrently on the CPU); the scheduler's
fences keep pages of step N from being reused until N is advanced. Without overlap the loop
is the plain sequence. Both produce the same tokens.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import msgspec

from agentspeed.config import resolve_defaults
from agentspeed.control.fsm import FinishReason
from agentspeed.control.plan import ExecutionPlan, RequestSpec, RequestUpdate, StepResult, TierOp
from agentspeed.control.scheduler import RequestRejected, Scheduler, SchedulerConfig
from agentspeed.sampling_params import SamplingParams
from agentspeed.structured.backend import GrammarError
from agentspeed.structured.manager import StructuredOutputManager

if TYPE_CHECKING:  # the server process imports this module without torch
    from agentspeed.config import EngineConfig
    from agentspeed.execution.model_runner import ModelRunner

log = logging.getLogger(__name__)


def speculation_exact(params: SamplingParams) -> bool:
    """Greedy verification keeps outputs identical to plain decoding only for argmax sampling
    whose per-token outputs (penalty histories, logprobs) do not depend on one step's rows."""
    return params.greedy and not params.has_penalties and params.logprobs is None


class EngineCore:
    @classmethod
    def build(cls, cfg: EngineConfig) -> EngineCore:
        """Build the model runner on the engine's execution thread, then the engine.

        All torch work of an engine happens on that one thread, model loading included: each
        OS thread that enters torch gets its own OpenMP team, and two teams on two cores
        made every decode step ~50% slower (measured: 21 -> 32 ms/step for SmolLM2)."""
        from agentspeed.execution.model_runner import ModelRunner

        ex = ThreadPoolExecutor(1, thread_name_prefix="agentspeed-exec")
        try:
            runner = ex.submit(ModelRunner, cfg, cfg.cache.hybrid_kv).result()
        except BaseException:
            ex.shutdown()
            raise
        return cls(runner, cfg, ex)

    def __init__(self, runner: ModelRunner, cfg: EngineConfig, executor: ThreadPoolExecutor | None = None) -> None:
        """cfg's device-dependent defaults are resolved here, for the device the runner
        placed the model on (config.resolve_defaults); self.cfg is the resolved config."""
        self.runner = runner
        self.cfg = cfg = resolve_defaults(cfg, runner.device)
        self.scheduler = Scheduler(SchedulerConfig.of(
            cfg.scheduling, num_pages=runner.kv.num_pages, page_size=runner.page_size,
            max_model_len=runner.max_model_len, window=runner.kv.window,
            window_num_pages=runner.kv.window_num_pages,
            tier_slots=runner.tier.num_slots if runner.tier is not None else 0,
            tier_writeback=cfg.cache.kv_offload_writeback,
            disk_slots=runner.disk.num_slots if runner.disk is not None else 0))
        # Steps always execute on this one thread, overlap or not: every OS thread that
        # enters torch gets its own OpenMP team, and two teams spinning on two cores halve
        # the speed of both.
        self._exec = executor or ThreadPoolExecutor(1, thread_name_prefix="agentspeed-exec")
        self._in_flight: tuple[ExecutionPlan, Future[StepResult]] | None = None
        self._write_back: Future[None] | None = None  # the last step's tier write-back
        self.steps = 0
        self._rejected: list[RequestUpdate] = []
        self.structured = StructuredOutputManager(
            cfg.structured_output_backend, runner.source, runner.model_config.vocab_size,
            runner.model_config.eos_token_ids)
        # Constrained requests that would have drafted: their drafts would need checking
        # against the grammar, so they decode without (the metric says how many).
        self.num_spec_disabled_structured = 0
        # Grammar masks are filled during the forward where steps overlap planning.
        runner.grammar.overlap = bool(cfg.scheduling.overlap)
        # The scheduler's time (session retention): read before each input and step. Under
        # TP the engine-core process replaces it with rank 0's time for the step, sent along.
        self.clock: Callable[[], float] = time.monotonic
        # Feed the scheduler's tier cost model from this rank's step timings (TP workers take
        # rank 0's figures instead: core_proc turns this off).
        self.measure_tier_cost = runner.tier is not None

    def add_request(self, spec: RequestSpec, params: SamplingParams | None = None) -> None:
        """Queue a request (params, if given, replace spec.params). One that can never be
        served (RequestRejected) ends with an ERROR update from the next step() instead."""
        self.scheduler.now = self.clock()
        params = spec.params if params is None else params
        speculate = bool(self.cfg.scheduling.num_speculative_tokens and speculation_exact(params))
        if params.structured_outputs is not None:
            try:
                compiled = self.structured.compile(params.structured_outputs)
            except GrammarError as e:
                self._rejected.append(RequestUpdate(spec.request_id, (), FinishReason.ERROR, 0, str(e)))
                return
            if self.runner.comm.rank == 0:  # the other ranks' samples are replaced by rank 0's
                self.runner.expect_matcher(spec.request_id, self.structured.matcher(compiled))
            self.num_spec_disabled_structured += speculate
            speculate = False
        spec = msgspec.structs.replace(spec, params=params, speculate=speculate)
        try:
            self.scheduler.submit(spec)
        except RequestRejected as e:
            self.runner.drop_matcher(spec.request_id)
            self._rejected.append(RequestUpdate(spec.request_id, (), FinishReason.ERROR, 0, str(e)))

    def abort(self, request_id: str) -> None:
        self.scheduler.now = self.clock()
        self.scheduler.abort(request_id)
        self.runner.drop_matcher(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None or bool(self._rejected)

    def step(self) -> list[RequestUpdate]:
        """Advance the engine by one step (if there is one to run); returns the request
        updates it produced, rejections of requests added since the last step first."""
        if self._rejected:
            rejected, self._rejected = self._rejected, []
            return rejected + self._step()
        return self._step()

    def _step(self) -> list[RequestUpdate]:
        self.scheduler.now = self.clock()
        if not self.cfg.scheduling.overlap:
            plan = self.scheduler.next_plan()
            if plan.empty:
                return self.scheduler.advance_idle()
            self.steps += 1
            result = self._submit(plan).result()
            self._observe()
            return self.scheduler.advance(result)
        if self._in_flight is None:
            plan = self.scheduler.next_plan()
            if plan.empty:
                return self.scheduler.advance_idle()
            self._in_flight = (plan, self._submit(plan))
        # Plan the next step while the current one runs.
        nxt = self.scheduler.next_plan()
        _, fut = self._in_flight
        result = fut.result()
        self._observe()  # (before the next step runs: it rewrites the runner's timings)
        self.steps += 1
        updates = self.scheduler.advance(result)
        self._in_flight = None if nxt.empty else (nxt, self._submit(nxt))
        return updates

    def _submit(self, plan: ExecutionPlan) -> Future[StepResult]:
        """Run plan on the step's thread, then its tier write-back (while this thread handles
        the result)."""
        done = self._write_back
        if done is not None and done.done():
            self._write_back = None
            done.result()  # (raises what it raised)
        fut = self._exec.submit(self.runner.execute_plan, plan)
        if plan.tier_ops and plan.tier_ops[-1].kind == TierOp.WRITEBACK:
            self._write_back = self._exec.submit(self.runner.write_back)
        return fut

    def _observe(self) -> None:
        if self.measure_tier_cost:
            self.scheduler.tier_cost.observe(*self.runner.last_costs)

    def shutdown(self) -> None:
        """Finish the step in flight and stop the runner (on its thread) and the thread."""
        if self._in_flight is not None:
            self._in_flight[1].result()
            self._in_flight = None
        if self._write_back is not None:
            self._write_back.result()
        self._exec.submit(self.runner.shutdown).result()
        self._exec.shutdown()
