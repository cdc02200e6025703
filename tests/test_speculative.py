"""Speculative decoding by n-gram lookup: the drafter against a brute-force oracle, the
scheduler's draft/verify/rollback under random interleavings (a shadow KV cache checks that
every step reads exactly the true tokens at every context position, so a rejected draft left
behind or a wrong rollback fails), directed cases, greedy verification, and the engine
producing the very tokens it produces without speculation."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from plan_mirror import PageRows

from agentspeed.control.ngram import NgramDrafter
from agentspeed.control.plan import LAST_SAMPLED, ExecutionPlan, RequestSpec, StepResult
from agentspeed.control.scheduler import RequestRejected, Scheduler, SchedulerConfig
from agentspeed.errors import ConfigError


def oracle_draft(tokens: list[int], k: int, max_n: int, min_n: int) -> list[int]:
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        suffix = tokens[-n:]
        for e in range(len(tokens) - 1, n - 1, -1):  # latest earlier occurrence first
            if tokens[e - n : e] == suffix:
                return tokens[e : e + k]
    return []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=60), st.lists(st.integers(0, 4), max_size=20),
       st.integers(1, 5), st.integers(1, 3), st.integers(0, 2))
def test_drafter_matches_oracle_as_tokens_grow(start: list[int], more: list[int], k: int, max_n: int,
                                               extra: int) -> None:
    tokens = list(start)
    d = NgramDrafter(tokens, max_n + extra, max_n)
    assert d.draft(k) == oracle_draft(tokens, k, max_n + extra, max_n)
    for t in more:  # the drafter indexes the shared list incrementally
        tokens.append(t)
        assert d.draft(k) == oracle_draft(tokens, k, max_n + extra, max_n)


def test_drafter_examples() -> None:
    t = [1, 2, 3, 1, 2]
    d = NgramDrafter(t)
    assert d.draft(3) == [3, 1, 2] and d.draft(0) == []
    t.append(3)
    assert d.draft(2) == [1, 2]
    t.append(9)
    assert d.draft(3) == []
    with pytest.raises(ValueError):
        NgramDrafter([], 2, 3)


# ---- the scheduler under random interleavings ---------------------------------------------
EOS, STOP = 0, 3
COVERAGE = {"drafts": 0, "accepted": 0, "rejected": 0, "stopped_mid_chunk": 0, "preemptions": 0,
            "overlapped": 0, "fixed_runs": 0, "adaptive_runs": 0, "short_drafts": 0}


class SpeculativeMachine(RuleBasedStateMachine):
    """Random submit/abort/plan/advance, overlap depth 1, a small pool (preemption,
    eviction), prefix sharing, and a fake model that accepts a random number of each chunk's
    drafts. Every step is "executed" when advanced, in order: it must find the true token at
    every context position in the shadow cache, then writes its own tokens there (drafts too:
    a rejected draft is garbage that must be rewritten before anyone reads it)."""

    def __init__(self) -> None:
        super().__init__()
        self.ps = 4
        self.rng = random.Random(0)
        self.in_flight: list[ExecutionPlan] = []
        self.mirror = PageRows()
        self.n = 0
        self.live: set[str] = set()
        self.full: dict[str, list[int]] = {}  # prompt + outputs, as the updates told
        self.shadow: dict[tuple[int, int], int] = {}  # (page, slot) -> token written there
        self.prefix = [5, 6, 3, 5, 6, 3, 5, 6]  # repeats with STOP inside: drafts that stop mid-chunk
        self.agree: dict[str, int] = {}  # per request: the model accepts no (0), some (1), all (2) drafts

    @initialize(adaptive=st.booleans())
    def build(self, adaptive: bool) -> None:
        self.sched = Scheduler(SchedulerConfig(num_pages=14, page_size=self.ps, max_num_batched_tokens=16,
                                               max_num_seqs=4, max_model_len=48, num_speculative_tokens=3,
                                               adaptive_drafts=adaptive))
        COVERAGE["adaptive_runs" if adaptive else "fixed_runs"] += 1

    @rule(length=st.integers(1, 20), max_tokens=st.integers(1, 14), shared=st.booleans(),
          speculate=st.booleans(), agree=st.integers(0, 2))
    def submit(self, length: int, max_tokens: int, shared: bool, speculate: bool, agree: int) -> None:
        rid = f"r{self.n}"
        self.n += 1
        # A small alphabet: n-gram matches (drafts) are frequent.
        body = [self.rng.randrange(1, 8) for _ in range(length)]
        prompt = (self.prefix + body) if shared else body
        spec = RequestSpec(rid, tuple(prompt), max_tokens, stop_token_ids=frozenset({EOS, STOP}),
                           speculate=speculate)
        try:
            self.sched.submit(spec)
        except RequestRejected:
            return
        self.live.add(rid)
        self.full[rid] = list(prompt)
        self.agree[rid] = agree

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.live)))
        self.sched.abort(rid)
        self.live.discard(rid)

    @precondition(lambda self: len(self.in_flight) < 2)
    @rule()
    def plan(self) -> None:
        plan = self.sched.next_plan()
        if plan.empty:
            return
        for c in plan.chunks:
            if c.num_draft:
                # Drafts only when nothing of the request is in flight (its last token known).
                assert c.sample
                assert all(c.request_id not in {x.request_id for x in p.chunks} for p in self.in_flight)
                assert c.start + len(c.token_ids) <= 48
        COVERAGE["overlapped"] += bool(self.in_flight)
        self.in_flight.append(plan)

    def _execute(self, plan: ExecutionPlan, accept: random.Random, eos_prob: float) -> StepResult:
        ps = self.ps
        sampled: dict[str, int] = {}
        accepted: dict[str, tuple[int, ...]] = {}
        for c, pages in zip(plan.chunks, self.mirror.apply(plan)):  # plans execute in order
            full = self.full[c.request_id]
            if c.request_id not in self.live:
                # Finished or aborted while in flight: the scheduler will drop this chunk's
                # results; what it writes to its (fenced) pages is garbage to anyone later.
                for q in range(c.start, c.start + len(c.token_ids)):
                    self.shadow[(pages[q // ps], q % ps)] = -1
                continue
            toks = [full[c.start] if t == LAST_SAMPLED else t for t in c.token_ids]
            real = len(toks) - c.num_draft
            assert toks[:real] == full[c.start : c.start + real], f"{c.request_id}: wrong input tokens"
            if c.num_draft:
                assert c.start == len(full) - 1, "a draft chunk must start at the last known token"
            for q in range(c.start):
                got = self.shadow.get((pages[q // ps], q % ps))
                assert got == full[q], f"{c.request_id} reads {got} at position {q}, truth {full[q]}"
            for i, t in enumerate(toks):
                q = c.start + i
                self.shadow[(pages[q // ps], q % ps)] = t
            if not c.sample:
                continue
            new = lambda: EOS if accept.random() < eos_prob else accept.randrange(1, 8)  # noqa: E731
            if c.num_draft:
                drafts = toks[real:]
                agree = self.agree[c.request_id]
                a = (0, accept.randrange(c.num_draft + 1), c.num_draft)[agree]
                out = [*drafts[:a], new()]  # the model agrees with the first a drafts
                COVERAGE["drafts"] += 1
                COVERAGE["short_drafts"] += c.num_draft < 3
                COVERAGE["accepted" if a else "rejected"] += 1
                sampled[c.request_id], accepted[c.request_id] = out[0], tuple(out[1:])
            else:
                sampled[c.request_id] = new()
        return StepResult(plan.step_id, sampled, {}, accepted)

    @precondition(lambda self: self.in_flight)
    @rule(seed=st.integers(0, 2**16), eos_prob=st.sampled_from([0.0, 0.1, 0.4]))
    def advance(self, seed: int, eos_prob: float) -> None:
        plan = self.in_flight.pop(0)
        self._apply(self._execute(plan, random.Random(seed), eos_prob))

    def _apply(self, result: StepResult) -> None:
        for u in self.sched.advance(result):
            if u.request_id not in self.full:
                continue
            self.full[u.request_id].extend(u.new_token_ids)
            produced = (result.sampled.get(u.request_id), *result.accepted.get(u.request_id, ()))
            if u.finish_reason is not None:
                self.live.discard(u.request_id)
                if u.new_token_ids and len(u.new_token_ids) < len(produced) and u.new_token_ids[-1] in (EOS, STOP):
                    COVERAGE["stopped_mid_chunk"] += 1
            else:
                assert tuple(u.new_token_ids) == produced, "tokens lost without a finish"

    @invariant()
    def invariants_hold(self) -> None:
        self.sched.check_invariants()

    def teardown(self) -> None:
        for _ in range(800):
            if not self.in_flight and not self.sched.has_unfinished():
                break
            if len(self.in_flight) < 2:
                p = self.sched.next_plan()
                if not p.empty:
                    self.in_flight.append(p)
            if self.in_flight:
                self._apply(self._execute(self.in_flight.pop(0), random.Random(1), 0.0))
            self.sched.check_invariants()
        assert not self.sched.has_unfinished(), "scheduler did not drain (deadlock?)"
        COVERAGE["preemptions"] += self.sched.num_preemptions
        assert self.sched.pool.num_available() == self.sched.pool.num_usable


TestSpeculativeStateful = SpeculativeMachine.TestCase
TestSpeculativeStateful.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None, suppress_health_check=list(HealthCheck)
)


def test_stateful_run_exercised_speculation() -> None:
    """Guards the stateful test against silently testing nothing interesting."""
    assert all(v > 0 for v in COVERAGE.values()), COVERAGE


# ---- directed cases ---------------------------------------------------------------------
def _drive(sched: Scheduler, model: dict[str, list[int]]) -> tuple[dict[str, list[int]], list[ExecutionPlan]]:
    """Run to the end with a fake greedy model: request r's i-th output is model[r][i]; a
    chunk's drafts are checked against it as real verification would."""
    outs: dict[str, list[int]] = {r: [] for r in model}
    plans = []
    for _ in range(1000):
        if not sched.has_unfinished():
            return outs, plans
        plan = sched.next_plan()
        plans.append(plan)
        sampled, accepted = {}, {}
        for c in plan.chunks:
            if not c.sample:
                continue
            want = model[c.request_id][len(outs[c.request_id]):]
            drafts = c.token_ids[len(c.token_ids) - c.num_draft :]
            a = 0
            while a < len(drafts) and drafts[a] == want[a]:
                a += 1
            sampled[c.request_id], accepted[c.request_id] = want[0], tuple(want[1 : a + 1])
        for u in sched.advance(StepResult(plan.step_id, sampled, {}, accepted)):
            outs[u.request_id].extend(u.new_token_ids)
        sched.check_invariants()
    raise AssertionError("did not finish")


def test_repetitive_answer_takes_fewer_steps_and_same_tokens() -> None:
    prompt = (1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8)
    answer = [1, 2, 3, 4, 5, 6, 7, 8] * 3
    runs = {}
    for k in (0, 3):
        sched = Scheduler(SchedulerConfig(num_pages=64, page_size=4, max_model_len=128, num_speculative_tokens=k))
        sched.submit(RequestSpec("a", prompt, len(answer), speculate=True))
        runs[k] = _drive(sched, {"a": answer})
        assert runs[k][0]["a"] == answer
        assert (sched.num_accepted_tokens > 0) == (k > 0)
    assert len(runs[3][1]) < len(runs[0][1]) / 3 + 2  # ~4 tokens per step
    drafts = [c for p in runs[3][1] for c in p.chunks if c.num_draft]
    assert drafts and all(c.num_draft <= 3 for c in drafts)


def test_rejected_drafts_roll_back_and_are_rewritten() -> None:
    prompt = (1, 2, 3, 1, 2)
    sched = Scheduler(SchedulerConfig(num_pages=64, page_size=4, max_model_len=64, num_speculative_tokens=3))
    sched.submit(RequestSpec("a", prompt, 6, speculate=True))
    p = sched.next_plan()
    sched.advance(StepResult(p.step_id, {"a": 9}))  # prefill samples 9: "1 2 3 1 2 9"
    p = sched.next_plan()
    [c] = p.chunks
    assert c.token_ids == (9,) and c.num_draft == 0  # 9 never seen: nothing to draft
    sched.advance(StepResult(p.step_id, {"a": 1}))
    p = sched.next_plan()
    [c] = p.chunks  # "1 2 3 1 2 9 1": the latest earlier "1" is followed by "2 9 1"
    assert c.token_ids == (1, 2, 9, 1) and c.start == 6 and c.num_draft == 3
    sched.advance(StepResult(p.step_id, {"a": 2}, {}, {"a": (7,)}))  # accepts draft "2", then 7
    assert sched.num_draft_tokens == 3 and sched.num_accepted_tokens == 1
    p = sched.next_plan()
    [c] = p.chunks
    assert c.start == 8 and c.token_ids[0] == 7  # rolled back to after "2 7": 9 and 1 rewritten
    sched.check_invariants()


def test_a_stop_token_among_accepted_tokens_ends_the_request_there() -> None:
    sched = Scheduler(SchedulerConfig(num_pages=64, page_size=4, max_model_len=64, num_speculative_tokens=3))
    sched.submit(RequestSpec("a", (7, 4, 5, 0, 9, 7), 10, stop_token_ids=frozenset({0}), speculate=True))
    p = sched.next_plan()
    sched.advance(StepResult(p.step_id, {"a": 4}))
    p = sched.next_plan()
    [c] = p.chunks  # "... 9 7 4": "7 4" was followed by "5 0 9"
    assert c.token_ids == (4, 5, 0, 9)
    [u] = sched.advance(StepResult(p.step_id, {"a": 5}, {}, {"a": (0, 9, 1)}))
    assert u.new_token_ids == (5, 0) and u.finish_reason is not None and u.finish_reason.value == "stop"
    assert not sched.has_unfinished() and sched.pool.num_available() == sched.pool.num_usable


def test_drafts_respect_max_tokens_context_and_free_memory() -> None:
    rep = tuple([1, 2, 3, 4] * 4)
    sched = Scheduler(SchedulerConfig(num_pages=64, page_size=4, max_model_len=64, num_speculative_tokens=5))
    sched.submit(RequestSpec("a", rep, 3, speculate=True))
    p = sched.next_plan()
    sched.advance(StepResult(p.step_id, {"a": 1}))
    [c] = sched.next_plan().chunks
    assert c.num_draft == 1  # 2 outputs left: one plain, one draft
    # Context: 14 prompt tokens + 1 output in a 16-token context leaves room for 0 drafts.
    sched = Scheduler(SchedulerConfig(num_pages=64, page_size=4, max_model_len=16, num_speculative_tokens=5))
    sched.submit(RequestSpec("b", rep[:14], 2, speculate=True))
    p = sched.next_plan()
    sched.advance(StepResult(p.step_id, {"b": 3}))
    [c] = sched.next_plan().chunks
    assert c.num_draft == 0
    # Memory: with every page taken, drafts are cut to what the request's own pages hold
    # (positions 11 of 8-11), and nobody is preempted for them.
    sched = Scheduler(SchedulerConfig(num_pages=5, page_size=4, max_model_len=64, num_speculative_tokens=5))
    assert sched.pool.num_usable == 4
    sched.submit(RequestSpec("c", rep[:10], 6, speculate=True))
    sched.submit(RequestSpec("d", (9,), 3))
    p = sched.next_plan()
    sched.advance(StepResult(p.step_id, {"c": 3, "d": 8}))
    assert sched.pool.num_available() == 0
    c = next(c for c in sched.next_plan().chunks if c.request_id == "c")
    assert c.token_ids == (3, 4) and c.num_draft == 1 and sched.num_preemptions == 0


def test_requests_without_speculate_get_no_drafts() -> None:
    sched = Scheduler(SchedulerConfig(num_pages=64, page_size=4, num_speculative_tokens=3))
    sched.submit(RequestSpec("a", (1, 2, 1, 2, 1), 8))
    outs, plans = _drive(sched, {"a": [2, 1, 2, 1, 2, 1, 2, 1]})
    assert outs["a"] == [2, 1, 2, 1, 2, 1, 2, 1]
    assert not any(c.num_draft for p in plans for c in p.chunks)


def test_config_bounds() -> None:
    with pytest.raises(ConfigError, match="num_speculative_tokens"):
        SchedulerConfig(num_pages=4, page_size=4, num_speculative_tokens=8)
    with pytest.raises(ConfigError, match="ngram"):
        SchedulerConfig(num_pages=4, page_size=4, ngram_min=3, ngram_max=2)


# ---- verification and the engine ----------------------------------------------------------
def test_greedy_verification() -> None:
    from agentspeed.execution.model_runner import _verify

    assert _verify([5, 6, 7], 5, [6, 8, 9]) == (6, 8)  # 5 and 6 stand, 7 != 8: stop with 8
    assert _verify([4, 6, 7], 5, [6, 8, 9]) == ()  # the first draft is wrong
    assert _verify([5, 6, 9], 5, [6, 9, 2]) == (6, 9, 2)  # all stand: the bonus token too


def test_engine_gives_the_same_tokens_with_speculation(smollm2_path: Path) -> None:
    """Real text through the whole engine (drafts, the multi-query decode kernel, verification,
    rollback): every token identical to plain greedy decoding, and drafts were accepted."""
    from agentspeed.engine.llm import LLM
    from agentspeed.sampling_params import SamplingParams

    code = "def area(width, height):\n    return width * height\n\n"
    prompts = [[{"role": "user", "content": f"Repeat this code twice:\n{code}"}],
               [{"role": "user", "content": "Count from 1 to 25, separated by commas."}],
               [{"role": "user", "content": "Name three colors."}]]
    params = [SamplingParams(max_tokens=48, temperature=0), SamplingParams(max_tokens=60, temperature=0),
              SamplingParams(max_tokens=20, temperature=0.8, seed=1)]  # sampled: never speculated
    outs = {}
    for k in (0, 3):
        llm = LLM(str(smollm2_path), num_speculative_tokens=k, num_kv_pages=256)
        outs[k] = [o.outputs[0].token_ids for o in llm.chat(prompts, params)]
        sched = llm.engine.scheduler
        if k:
            assert sched.num_accepted_tokens > 20, (sched.num_draft_tokens, sched.num_accepted_tokens)
        llm.shutdown()
    assert outs[3] == outs[0]


def test_overlap_and_speculation_are_refused_together() -> None:
    from agentspeed.config import SchedulingConfig

    with pytest.raises(ConfigError, match="overlap and speculative decoding"):
        SchedulingConfig(overlap=True, num_speculative_tokens=3)
    SchedulingConfig(overlap=None, num_speculative_tokens=3)  # auto: off with speculation
