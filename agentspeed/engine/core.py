"""EngineCore: the busy loop that joins the control plane (Scheduler) and the execution
plane (ModelRunner): plan -> execute -> advance, with overlap depth 1.

With overlap, step N+1 is planned while step N executes on a worker thread (torch releases
the GIL inside its kernels, so planning really runs concurrently on the CPU); the scheduler's
fences keep pages of step N from being reused until N is advanced. Without overlap the loop
is the plain sequence. Both produce the same tokens.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from agentspeed.control.plan import ExecutionPlan, RequestSpec, RequestUpdate, StepResult
from agentspeed.control.scheduler import Scheduler, SchedulerConfig
from agentspeed.errors import ConfigError
from agentspeed.sampling_params import SamplingParams

if TYPE_CHECKING:  # the server process imports this module without torch
    from agentspeed.config import EngineConfig
    from agentspeed.execution.model_runner import ModelRunner

log = logging.getLogger(__name__)


CPU_DEFAULT_DRAFTS = 3


@dataclass(frozen=True, slots=True)
class SchedulingOptions:
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    enable_prefix_caching: bool = True
    # None: on for GPUs (the forward is an async launch, planning hides behind it), off on
    # CPU (planning competes with the forward's threads for the same cores: measured 10%
    # slower, see docs/benchmarks.md), and off with speculative decoding (they do not combine).
    overlap: bool | None = None
    # Speculative decoding by n-gram prompt lookup: most drafts per decode step (0: off), for
    # greedy requests without penalties or logprobs (verification compares argmaxes). None:
    # CPU_DEFAULT_DRAFTS on CPU unless overlap is asked for (measured faster on agent traffic
    # there, docs/benchmarks.md), off on GPUs (not measured there; overlap is on instead).
    num_speculative_tokens: int | None = None
    ngram_max: int = 3
    ngram_min: int = 1
    adaptive_drafts: bool = True  # per-request draft length from its acceptance (control/draft_policy.py)

    def __post_init__(self) -> None:
        # Checked here too (SchedulerConfig checks again): the server fails at start, not in
        # the engine process.
        SchedulerConfig(1, 1, num_speculative_tokens=self.num_speculative_tokens or 0,
                        ngram_max=self.ngram_max, ngram_min=self.ngram_min)
        if self.overlap and self.num_speculative_tokens:
            # A step planned while a draft step runs cannot include that request (how many of
            # its drafts stand is not known yet), so each request would decode every other step.
            raise ConfigError("overlap and speculative decoding do not combine: with overlap a request "
                              "with drafts in flight skips the next step; drop --overlap or "
                              "--num-speculative-tokens")


def speculation_exact(params: SamplingParams) -> bool:
    """Greedy verification keeps outputs identical to plain decoding only for argmax sampling
    whose per-token outputs (penalty histories, logprobs) do not depend on one step's rows."""
    return params.greedy and not params.has_penalties and params.logprobs is None


class EngineCore:
    @classmethod
    def build(cls, cfg: EngineConfig, opts: SchedulingOptions) -> EngineCore:
        """Build the model runner on the engine's execution thread, then the engine.

        All torch work of an engine happens on that one thread, model loading included: each
        OS thread that enters torch gets its own OpenMP team, and two teams on two cores
        made every decode step ~50% slower (measured: 21 -> 32 ms/step for SmolLM2)."""
        from agentspeed.execution.model_runner import ModelRunner

        ex = ThreadPoolExecutor(1, thread_name_prefix="agentspeed-exec")
        try:
            runner = ex.submit(ModelRunner, cfg).result()
        except BaseException:
            ex.shutdown()
            raise
        return cls(runner, opts, ex)

    def __init__(self, runner: ModelRunner, opts: SchedulingOptions,
                 executor: ThreadPoolExecutor | None = None) -> None:
        self.runner = runner
        cpu = runner.device == "cpu"
        k = opts.num_speculative_tokens
        if k is None:
            k = CPU_DEFAULT_DRAFTS if cpu and not opts.overlap else 0
        overlap = opts.overlap if opts.overlap is not None else not cpu and not k
        self.opts = opts = dataclasses.replace(opts, num_speculative_tokens=k, overlap=overlap)
        self.scheduler = Scheduler(
            SchedulerConfig(
                num_pages=runner.kv.num_pages,
                page_size=runner.page_size,
                max_num_batched_tokens=opts.max_num_batched_tokens,
                max_num_seqs=opts.max_num_seqs,
                max_model_len=runner.max_model_len,
                enable_prefix_caching=opts.enable_prefix_caching,
                num_speculative_tokens=k,
                ngram_max=opts.ngram_max,
                ngram_min=opts.ngram_min,
                adaptive_drafts=opts.adaptive_drafts,
            )
        )
        # Steps always execute on this one thread, overlap or not: every OS thread that
        # enters torch gets its own OpenMP team, and two teams spinning on two cores halve
        # the speed of both.
        self._exec = executor or ThreadPoolExecutor(1, thread_name_prefix="agentspeed-exec")
        self._in_flight: tuple[ExecutionPlan, Future[StepResult]] | None = None
        self.steps = 0
        # Logprobs of the last advanced step, for requests that asked for them.
        self.last_logprobs: dict[str, tuple[float, tuple[tuple[int, float], ...]]] = {}

    def add_request(self, spec: RequestSpec, params: SamplingParams) -> None:
        """Raises RequestRejected if the request can never be served."""
        if self.scheduler.cfg.num_speculative_tokens and speculation_exact(params):
            spec = msgspec.structs.replace(spec, speculate=True)
        self.scheduler.submit(spec)
        self.runner.add_request(spec.request_id, params, spec.prompt_token_ids)

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    def step(self) -> list[RequestUpdate]:
        """Advance the engine by one step; returns the request updates it produced."""
        if not self.opts.overlap:
            plan = self.scheduler.next_plan()
            if plan.empty:
                return self.scheduler.advance_idle()
            self.steps += 1
            result = self._exec.submit(self.runner.execute_plan, plan).result()
            self.last_logprobs = result.logprobs
            return self.scheduler.advance(result)
        if self._in_flight is None:
            plan = self.scheduler.next_plan()
            if plan.empty:
                return self.scheduler.advance_idle()
            self._in_flight = (plan, self._exec.submit(self.runner.execute_plan, plan))
        # Plan the next step while the current one runs.
        nxt = self.scheduler.next_plan()
        _, fut = self._in_flight
        result = fut.result()
        self.steps += 1
        self.last_logprobs = result.logprobs
        updates = self.scheduler.advance(result)
        self._in_flight = None if nxt.empty else (nxt, self._exec.submit(self.runner.execute_plan, nxt))
        return updates

    def shutdown(self) -> None:
        """Finish the step in flight and stop the runner (on its thread) and the thread."""
        if self._in_flight is not None:
            self._in_flight[1].result()
            self._in_flight = None
        self._exec.submit(self.runner.shutdown).result()
        self._exec.shutdown()
