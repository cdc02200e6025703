"""The adaptive draft length (control/draft_policy.py): the cost model's optimum against brute
force, the table's monotonicity, the per-request estimate's back-off and recovery, and the
scheduler drafting less for a request whose drafts keep failing, with the same tokens."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from agentspeed.control.draft_policy import (
    ALPHA_STEPS,
    FULL_COST_BATCH,
    DraftPolicy,
    DraftStats,
    best_draft_length,
)
from agentspeed.control.plan import RequestSpec, StepResult
from agentspeed.control.scheduler import Scheduler, SchedulerConfig


def brute(alpha: float, cost: float, k_max: int) -> float:
    return max(sum(alpha**i for i in range(k + 1)) / (1 + cost * k) for k in range(k_max + 1))


@given(st.floats(0, 1, allow_subnormal=False), st.floats(0.01, 1.5), st.integers(1, 7))
def test_best_length_is_the_optimum(alpha: float, cost: float, k_max: int) -> None:
    k = best_draft_length(alpha, cost, k_max)
    assert 0 <= k <= k_max
    got = sum(alpha**i for i in range(k + 1)) / (1 + cost * k)
    assert abs(got - brute(alpha, cost, k_max)) < 1e-9


def test_break_even_is_acceptance_equal_to_cost() -> None:
    # One draft pays exactly when its acceptance beats its cost; more never rescue a loss.
    assert best_draft_length(0.19, 0.2, 7) == 0
    assert best_draft_length(0.21, 0.2, 7) >= 1
    assert best_draft_length(1.0, 0.3, 5) == 5
    assert best_draft_length(0.0, 0.01, 7) == 0


@given(st.integers(1, 7), st.floats(0.0, 0.5, allow_subnormal=False), st.floats(0.0, 0.8, allow_subnormal=False))
def test_table_is_monotone(k_max: int, c1: float, extra: float) -> None:
    p = DraftPolicy(k_max, c1, c1 + extra)
    for b in range(1, FULL_COST_BATCH + 2):
        row = [p.length(b, i, ALPHA_STEPS) for i in range(ALPHA_STEPS + 1)]
        assert row == sorted(row), "more acceptance never drafts less"
        assert all(0 <= k <= k_max for k in row)
        nxt = [p.length(b + 1, i, ALPHA_STEPS) for i in range(ALPHA_STEPS + 1)]
        assert all(x >= y for x, y in zip(row, nxt)), "a larger batch never drafts more"


def test_failing_drafts_back_off_and_probe_rarely_then_recover() -> None:
    p = DraftPolicy(3)
    s = DraftStats()
    lengths = []
    for _ in range(200):
        k = s.next_length(p, 8)
        lengths.append(k)
        if k:
            s.update(k, 0)
    probes = [i for i, k in enumerate(lengths) if k]
    # A few drafts at first, then probes whose gaps double up to the cap.
    assert len(probes) < 15, probes
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert gaps[-1] == DraftStats.MAX_BACKOFF + 1 and gaps == sorted(gaps)
    # Drafts start being accepted: the next probe succeeds and drafting resumes at once.
    for _ in range(DraftStats.MAX_BACKOFF + 1):
        k = s.next_length(p, 8)
        if k:
            s.update(k, k)
            break
    assert k == 1
    ks = []
    for _ in range(6):
        k = s.next_length(p, 8)
        ks.append(k)
        s.update(k, k)
    assert all(ks) and ks[-1] == 3, ks  # probes back to back, then full drafts


def test_batch_one_drafts_more_than_a_full_batch() -> None:
    p = DraftPolicy(7)
    alpha = ALPHA_STEPS // 2  # half the drafts tried are accepted
    assert p.length(1, alpha, ALPHA_STEPS) > p.length(8, alpha, ALPHA_STEPS) >= 1
    assert p.length(100, alpha, ALPHA_STEPS) == p.length(8, alpha, ALPHA_STEPS)


def _drafted(adaptive: bool) -> tuple[int, list[int]]:
    """A request whose every draft is wrong: after each prompt token the model says a new one
    (1 100 2 101 3 102 ...), so the prompt's continuation is always drafted and rejected."""
    prompt = tuple(range(1, 41))
    answer = [t for i in range(30) for t in (i + 1, 100 + i)]
    sched = Scheduler(SchedulerConfig(num_pages=64, page_size=4, max_model_len=256, num_speculative_tokens=3,
                                      adaptive_drafts=adaptive))
    sched.submit(RequestSpec("a", prompt, len(answer), speculate=True))
    out: list[int] = []
    while sched.has_unfinished():
        plan = sched.next_plan()
        sampled, accepted = {}, {}
        for c in plan.chunks:
            if c.sample:
                want = answer[len(out):]
                drafts = c.token_ids[len(c.token_ids) - c.num_draft:]
                a = 0
                while a < len(drafts) and drafts[a] == want[a]:
                    a += 1
                sampled["a"], accepted["a"] = want[0], tuple(want[1: a + 1])
        for u in sched.advance(StepResult(plan.step_id, sampled, {}, accepted)):
            out.extend(u.new_token_ids)
        sched.check_invariants()
    assert sched.num_accepted_tokens == 0
    return sched.num_draft_tokens, out


def test_scheduler_stops_drafting_for_a_request_whose_drafts_fail() -> None:
    fixed, out_fixed = _drafted(False)
    adaptive, out_adaptive = _drafted(True)
    assert out_fixed == out_adaptive
    assert fixed >= 60 and adaptive < fixed / 4, (fixed, adaptive)
