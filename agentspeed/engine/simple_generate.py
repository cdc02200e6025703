"""A minimal batch generation driver over the paged cache: prefill every prompt in one
forward, then decode all live sequences together until each stops. Pages are handed out
from a simple free list; this is the foundation's driver, which the scheduler replaces."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from agentspeed.control.plan import ExecutionPlan, NewRequest, ScheduledChunk
from agentspeed.errors import ConfigError
from agentspeed.execution.model_runner import ModelRunner
from agentspeed.sampling_params import SamplingParams


@dataclass(slots=True)
class _Seq:
    rid: str
    prompt: list[int]
    params: SamplingParams
    pages: list[int]
    output: list[int] = field(default_factory=list)
    done: bool = False
    finish_reason: str = ""


@dataclass(frozen=True, slots=True)
class Completion:
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS) or "length"


def generate(
    runner: ModelRunner,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams],
    eos_token_ids: Sequence[int] = (),
) -> list[Completion]:
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    ps = runner.page_size
    free = list(range(runner.kv.num_pages - 1, 0, -1))  # page 0 is the null page
    seqs: list[_Seq] = []
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        if not prompt:
            raise ConfigError(f"prompt {i} is empty")
        total = min(len(prompt) + p.max_tokens, runner.max_model_len)
        if len(prompt) >= runner.max_model_len:
            raise ConfigError(f"prompt {i} has {len(prompt)} tokens; the model's limit is {runner.max_model_len}")
        need = -(-total // ps)
        if need > len(free):
            raise ConfigError("the batch does not fit in the KV cache; use fewer or shorter prompts")
        seqs.append(_Seq(f"gen-{i}", list(prompt), p, [free.pop() for _ in range(need)]))
    eos = set(eos_token_ids)

    # The runner takes requests only through plans: the first registers every sequence and
    # sends all its pages; later ones send one token per live sequence and no pages.
    steps = itertools.count()
    new = tuple(NewRequest(s.rid, tuple(s.prompt), s.params) for s in seqs)
    chunks = [ScheduledChunk(s.rid, s.prompt, 0, s.pages) for s in seqs]
    live = seqs
    released: tuple[str, ...] = ()
    while live:
        plan = ExecutionPlan(next(steps), tuple(chunks), released, new)
        result = runner.execute_plan(plan)
        new, released = (), ()
        for s in live:
            tok = result.sampled[s.rid]
            s.output.append(tok)
            if tok in eos and not s.params.ignore_eos:
                s.done, s.finish_reason = True, "stop"
            elif len(s.output) >= s.params.max_tokens or len(s.prompt) + len(s.output) >= runner.max_model_len:
                s.done, s.finish_reason = True, "length"
        released = tuple(s.rid for s in live if s.done)
        live = [s for s in live if not s.done]
        chunks = [
            ScheduledChunk(s.rid, s.output[-1:], len(s.prompt) + len(s.output) - 1, (), page_offset=len(s.pages))
            for s in live
        ]
    runner.execute_plan(ExecutionPlan(next(steps), (), released))  # runs nothing: releases the last
    return [Completion(s.output, s.finish_reason) for s in seqs]
