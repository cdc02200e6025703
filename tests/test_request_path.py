"""The request path's contracts: prefix keys are collision-resistant and salted, priority
orders waiting requests, and the execution plane hears of a request only through plans."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agentspeed.control.plan import RequestSpec, StepResult
from agentspeed.control.prefix_cache import chain_hash, extend_hashes
from agentspeed.control.scheduler import Scheduler, SchedulerConfig
from agentspeed.engine.llm import LLM
from agentspeed.engine.output_processor import OutputProcessor
from agentspeed.sampling_params import SamplingParams


def _old_key(parent: int | None, tokens: list[int], extra: object = None) -> int:
    """The prefix key before SHA-256 (Python's hash over a tuple), kept here to show the flaw."""
    return hash((parent, tuple(tokens), extra))


def test_crafted_collision_of_the_old_key_does_not_collide() -> None:
    # An int hashes to itself modulo 2**61 - 1, so these two pages had the same old key:
    # a client sending the second could read (or poison) the KV of the first.
    a, b = [0, 1, 2, 3], [2**61 - 1, 1, 2, 3]
    assert _old_key(None, a) == _old_key(None, b)
    assert chain_hash(None, a) != chain_hash(None, b)
    assert chain_hash(chain_hash(None, a), a) != chain_hash(chain_hash(None, b), a)
    # the encoding is unambiguous: salt None vs "", and salt bytes vs token bytes
    assert chain_hash(None, a, None) != chain_hash(None, a, "")
    assert chain_hash(None, a, "x") != chain_hash(None, a, "y")
    assert len(chain_hash(None, a)) == 32


def test_extend_hashes_equals_the_chain() -> None:
    toks = list(range(100, 141))
    keys = extend_hashes([], toks, 8, "s")
    assert len(keys) == 5
    want, parent = [], None
    for i in range(5):
        parent = chain_hash(parent, toks[i * 8 : (i + 1) * 8], "s")
        want.append(parent)
    assert keys == want
    assert extend_hashes(keys[:2], toks, 8, "s") == want  # extends from where it was


def _finish(sched: Scheduler, tok: int = 5) -> None:
    while sched.has_unfinished():
        p = sched.next_plan()
        sched.advance(StepResult(p.step_id, {c.request_id: tok for c in p.chunks if c.sample}))


def test_crafted_collision_gets_no_prefix_hit() -> None:
    sched = Scheduler(SchedulerConfig(num_pages=64, page_size=4))
    sched.submit(RequestSpec("victim", (0, 1, 2, 3, 4, 5, 6, 7, 8), 1))
    _finish(sched)
    sched.submit(RequestSpec("attacker", (2**61 - 1, 1, 2, 3, 4, 5, 6, 7, 8), 1))
    sched.next_plan()
    assert sched.num_cached_tokens("attacker") == 0


def test_cache_salt_partitions_the_prefix_cache() -> None:
    sched = Scheduler(SchedulerConfig(num_pages=64, page_size=4))
    prompt = tuple(range(1, 30))
    sched.submit(RequestSpec("a", prompt, 1, cache_salt="tenant-a"))
    _finish(sched)
    sched.submit(RequestSpec("b", prompt, 1, cache_salt="tenant-b"))
    sched.submit(RequestSpec("c", prompt, 1))
    sched.submit(RequestSpec("a2", prompt, 1, cache_salt="tenant-a"))
    sched.next_plan()
    assert sched.num_cached_tokens("b") == 0 and sched.num_cached_tokens("c") == 0
    assert sched.num_cached_tokens("a2") == 28


def test_cache_salt_partitions_partial_pages() -> None:
    sched = Scheduler(SchedulerConfig(num_pages=64, page_size=4))
    sched.submit(RequestSpec("a", (1, 2), 2, cache_salt="tenant-a"))  # KV for 3 tokens: one partial page
    _finish(sched)
    sched.submit(RequestSpec("b", (1, 2, 5, 9), 1, cache_salt="tenant-b"))
    sched.submit(RequestSpec("c", (1, 2, 5, 9), 1))
    p = sched.next_plan()
    assert sched.num_cached_tokens("b") == 0 and sched.num_cached_tokens("c") == 0
    sched.advance(StepResult(p.step_id, {c.request_id: 5 for c in p.chunks if c.sample}))
    _finish(sched)
    sched.submit(RequestSpec("a2", (1, 2, 5, 9), 1, cache_salt="tenant-a"))
    sched.next_plan()
    assert sched.num_cached_tokens("a2") == 3


def test_priority_orders_waiting_requests_under_a_full_batch() -> None:
    sched = Scheduler(SchedulerConfig(num_pages=64, page_size=4, max_num_seqs=1))
    sched.submit(RequestSpec("running", (1, 2, 3), 3))
    p = sched.next_plan()
    assert [c.request_id for c in p.chunks] == ["running"]
    for rid, prio in [("late-5", 5), ("urgent-0", -2), ("mid-3", 3), ("also-3", 3)]:
        sched.submit(RequestSpec(rid, (4, 5, 6), 1, priority=prio))
    order: list[str] = []
    sched.advance(StepResult(p.step_id, {"running": 9}))
    while sched.has_unfinished():
        p = sched.next_plan()
        order += [c.request_id for c in p.chunks if c.request_id not in order and c.request_id != "running"]
        sched.advance(StepResult(p.step_id, {c.request_id: 9 for c in p.chunks if c.sample}))
    assert order == ["urgent-0", "mid-3", "also-3", "late-5"]  # lower first, ties by arrival


def test_output_processor_carries_salt_priority_and_session() -> None:
    proc = OutputProcessor(None, [2])
    spec = proc.add_request("r", [1, 2, 3], SamplingParams(n=2, seed=7, max_tokens=4), session_key="s",
                            cache_salt="t", priority=-1)
    assert (spec.session_key, spec.cache_salt, spec.priority) == ("s", "t", -1)
    assert spec.params.n == 1 and spec.params.seed == 7 and 2 in spec.stop_token_ids


class _Recorder:
    """Wraps the runner; records every attribute the engine reads from it."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.seen: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        self.seen.add(name)
        return getattr(self._inner, name)


def test_runner_receives_nothing_outside_the_plan(tiny_models: dict[str, Path]) -> None:
    kinds = [SamplingParams(max_tokens=6, temperature=0, logprobs=2),
             SamplingParams(max_tokens=6, temperature=0.8, seed=3, n=2),
             SamplingParams(max_tokens=6, temperature=0, frequency_penalty=0.5, repetition_penalty=1.3),
             SamplingParams(max_tokens=6, temperature=0)]
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22], [5, 6, 7, 8, 30], [40, 41, 40, 41, 40]]

    def outputs(llm: LLM) -> list[list[list[int]]]:
        return [[list(o.token_ids) for o in r.outputs] for r in llm.generate(
            [{"prompt_token_ids": p} for p in prompts], kinds)]

    plain = LLM(str(tiny_models["llama"]), skip_tokenizer_init=True, page_size=4, num_kv_pages=64)
    want = outputs(plain)
    plain.shutdown()
    llm = LLM(str(tiny_models["llama"]), skip_tokenizer_init=True, page_size=4, num_kv_pages=64)
    rec = _Recorder(llm.engine.runner)
    llm.engine.runner = rec  # type: ignore[assignment]
    assert outputs(llm) == want
    assert rec.seen == {"execute_plan"}
    assert not hasattr(llm.runner, "add_request") and not hasattr(llm.runner, "execute")
    # releases ride on the next plan: once another request ran, no state of these is left
    first_ids = set(llm.runner.requests.requests)
    assert first_ids
    [later] = llm.generate({"prompt_token_ids": [9, 9, 9]}, SamplingParams(max_tokens=2, temperature=0))
    assert not first_ids & set(llm.runner.requests.requests)
    assert set(llm.runner.requests.requests) <= {later.request_id}
    llm.shutdown()


@pytest.mark.parametrize("bad", [0, 1])
def test_rejected_request_is_an_error_output_not_an_exception(tiny_models: dict[str, Path], bad: int) -> None:
    llm = LLM(str(tiny_models["llama"]), skip_tokenizer_init=True, page_size=4, num_kv_pages=64,
              max_model_len=64)
    prompts = [{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": list(range(1, 70))}]
    outs = llm.generate([prompts[bad], prompts[1 - bad]], SamplingParams(max_tokens=4, temperature=0, n=2))
    rejected, ok = (outs[0], outs[1]) if bad else (outs[1], outs[0])
    assert [o.finish_reason for o in rejected.outputs] == ["error", "error"]
    assert "context length" in rejected.outputs[0].text
    assert [len(o.token_ids) for o in ok.outputs] == [4, 4]
    llm.shutdown()


def test_frontend_imports_nothing_below_the_engine_boundary() -> None:
    """The server process (HTTP + AsyncLLM + OutputProcessor) talks to the engine only through
    messages: it imports neither the execution plane nor the modeling layer."""
    import subprocess
    import sys

    code = ("import sys, agentspeed.entrypoints.openai.api_server, agentspeed.engine.async_llm\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('agentspeed.execution', 'agentspeed.modeling')))\n"
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
