"""Control plane: hypothesis stateful test over random interleavings, directed scheduler
tests, and the FSM's static (mypy) and run-time rejection of illegal transitions."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from plan_mirror import PageRows

from agentspeed.control import fsm
from agentspeed.control.errors import HandleReleased, IllegalTransition, InvariantViolation
from agentspeed.control.kv_events import PagesStored
from agentspeed.control.page_pool import PagePool, PageState
from agentspeed.control.plan import LAST_SAMPLED, ExecutionPlan, RequestSpec, StepResult, TierOp
from agentspeed.control.scheduler import RequestRejected, Scheduler, SchedulerConfig
from agentspeed.control.tier import TierIndex

EOS = 0
# What the stateful runs exercised (checked by test_stateful_run_exercised_pressure).
COVERAGE = {"preemptions": 0, "evictions": 0, "overlapped_plans": 0, "prefix_hits": 0, "window_drops": 0,
            "window_prefix_hits": 0, "window_preemptions": 0, "partial_claims": 0, "session_groups": 0,
            "tier_stores": 0, "tier_loads": 0, "tier_writebacks": 0, "disk_spills": 0, "disk_fetches": 0, "disk_failures": 0}


def written_pages(plan: ExecutionPlan, pages: list[tuple[int, ...]], page_size: int) -> dict[int, str]:
    out = {}
    for c, row in zip(plan.chunks, pages):
        for p in range(c.start // page_size, (c.start + len(c.token_ids) - 1) // page_size + 1):
            out[row[p]] = c.request_id
    return out


class SchedulerMachine(RuleBasedStateMachine):
    """Random submit/abort/plan/advance with overlap (a second plan while one is in flight),
    random finishes (EOS), a pool small enough to force preemption and eviction; sessions
    (follow-up turns that re-send a finished turn, the clock moving between them) for
    retention and partial pages. A model of every KV slot's token checks that each chunk
    reads, below its start, exactly its own tokens' KV (prefix hits and claimed partial pages
    included)."""

    WINDOW: int | None = None
    TIER = 0  # host-tier slots
    DISK = 0  # disk-tier slots

    def __init__(self) -> None:
        super().__init__()
        self.ps = 4
        self.sched = Scheduler(SchedulerConfig(num_pages=12, page_size=self.ps, max_num_batched_tokens=16,
                                               max_num_seqs=4, max_model_len=40, window=self.WINDOW,
                                               window_num_pages=11 if self.WINDOW else 0, kv_events=True,
                                               tier_slots=self.TIER, disk_slots=self.DISK))
        self.reported: set[bytes] = set()  # the prefix index as the KV events describe it
        self.wpages: dict[int, list[tuple[int, ...]]] = {}
        self.rng = random.Random(0)
        self.in_flight: list[ExecutionPlan] = []
        self.mirror = PageRows()
        self.pages: dict[int, list[tuple[int, ...]]] = {}  # step id -> each chunk's page row
        self.n = 0
        self.live: set[str] = set()
        self.outputs: dict[str, list[int]] = {}
        self.prefixes = [[7, 7, 7, 7, 8, 8, 8, 8], [9, 9, 9, 9, 9, 9, 9, 9, 1, 2, 3, 4]]
        self.tokens: dict[str, list[int]] = {}  # each request's prompt + outputs
        self.session_of: dict[str, str | None] = {}
        self.done: list[str] = []  # finished (not aborted) requests, for follow-up turns
        self.slots: dict[int, list[tuple[str, int] | int | None]] = {}  # page -> what each slot holds
        self.tier_slots: dict[int, list[tuple[str, int] | int | None]] = {}  # tier slot -> the same
        self.disk_slots: dict[int, list[tuple[str, int] | int | None]] = {}  # disk slot -> the same
        self.failed: dict[int, tuple[int, ...]] = {}  # step id -> host slots whose disk read fails
        self.partial_seen = 0

    def _submit(self, rid: str, prompt: list[int], max_tokens: int, session: str | None) -> None:
        spec = RequestSpec(rid, tuple(prompt), max_tokens, stop_token_ids=frozenset({EOS}), session_key=session)
        try:
            self.sched.submit(spec)
        except RequestRejected:
            total = len(prompt) + max_tokens
            wpool = self.sched.wpool
            assert total > 40 or -(-total // self.ps) > 11 or (
                wpool is not None and self.sched._window_pages_needed(total) > wpool.num_usable)
            return
        self.live.add(rid)
        self.outputs[rid] = []
        self.tokens[rid] = list(prompt)
        self.session_of[rid] = session

    @rule(length=st.integers(1, 24), max_tokens=st.integers(1, 12), shared=st.booleans(),
          prefix=st.integers(0, 1), session=st.sampled_from([None, "s0", "s1", "s2"]))
    def submit(self, length: int, max_tokens: int, shared: bool, prefix: int, session: str | None) -> None:
        rid = f"r{self.n}"
        self.n += 1
        body = [self.rng.randrange(1, 50) for _ in range(length)]
        prompt = (self.prefixes[prefix] + body) if shared else body
        self._submit(rid, prompt, max_tokens, session)

    @precondition(lambda self: self.done)
    @rule(data=st.data(), extra=st.integers(0, 6), max_tokens=st.integers(1, 8))
    def next_turn(self, data: st.DataObject, extra: int, max_tokens: int) -> None:
        """A session's next turn: the previous turn's prompt and outputs, then new tokens."""
        prev = data.draw(st.sampled_from(self.done))
        rid = f"r{self.n}"
        self.n += 1
        prompt = self.tokens[prev] + [self.rng.randrange(1, 50) for _ in range(extra)]
        self._submit(rid, prompt, max_tokens, self.session_of[prev])

    @rule(dt=st.sampled_from([0.0, 0.5, 5.0, 30.0, 400.0]))
    def tick(self, dt: float) -> None:
        self.sched.now += dt

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
            assert not plan.released and not plan.new_requests
            return
        self._run(plan)

    def _run(self, plan: ExecutionPlan) -> None:
        """What executing the plan does to the model of the KV (checked first), in flight."""
        pages = self.pages[plan.step_id] = self.mirror.apply(plan)
        wpages = self.wpages[plan.step_id] = self.mirror.last_windows
        # Never reuse a page an in-flight step touches for another request's writes.
        for old in self.in_flight:
            for rows, now in ((self.pages[old.step_id], pages), (self.wpages[old.step_id], wpages)):
                if self.WINDOW is None and rows is self.wpages[old.step_id]:
                    continue
                touched = {p: c.request_id for c, row in zip(old.chunks, rows) for p in row if p}
                for page, rid in written_pages(plan, now, self.ps).items():
                    assert touched.get(page, rid) == rid, f"page {page} reused while fenced"
        if self.WINDOW is not None:
            # Every position a query of this step can see is in a live window page.
            for c, row in zip(plan.chunks, wpages):
                first = max(0, c.start - self.WINDOW + 1)
                assert all(row[i] for i in range(first // self.ps, (c.start + len(c.token_ids) - 1) // self.ps + 1))
                COVERAGE["window_drops"] += not row[0]
        # The execution plane's tier copies, in order, then the forward.
        # A fetch may fail (a corrupt file): its host slot then holds garbage (-99s), which
        # a later load would put in front of some request's reads.
        failed = []
        for op in plan.tier_ops:
            if op.kind == TierOp.WRITEBACK:
                continue  # below, after the forward's writes
            if op.kind == TierOp.SPILL:
                self.disk_slots[op.dst] = list(self.tier_slots[op.src])
                COVERAGE["disk_spills"] += 1
            elif op.kind == TierOp.FETCH:
                COVERAGE["disk_fetches"] += 1
                if self.rng.random() < 0.2:
                    failed.append(op.dst)
                    self.tier_slots[op.dst] = [-99] * self.ps
                    COVERAGE["disk_failures"] += 1
                else:
                    self.tier_slots[op.dst] = list(self.disk_slots[op.src])
            elif op.kind == TierOp.STORE:
                self.tier_slots[op.dst] = list(self.slots.get(op.src, [None] * self.ps))
                COVERAGE["tier_stores"] += 1
            else:
                self.slots[op.dst] = list(self.tier_slots[op.src])
                COVERAGE["tier_loads"] += 1
        self.failed[plan.step_id] = tuple(failed)
        for c, row in zip(plan.chunks, pages):
            self._check_reads(c.request_id, c.start, row)
            for i, t in enumerate(c.token_ids):  # what the step writes
                pos = c.start + i
                slot = self.slots.setdefault(row[pos // self.ps], [None] * self.ps)
                slot[pos % self.ps] = t if t >= 0 else (c.request_id, pos)
        # Write-backs may run beside the forward: copying the page after the forward wrote it
        # is what they must survive (a page the forward writes would be caught by the reads).
        wbs = [op for op in plan.tier_ops if op.kind == TierOp.WRITEBACK]
        assert all(op.kind == TierOp.WRITEBACK for op in plan.tier_ops[len(plan.tier_ops) - len(wbs):])
        for op in wbs:
            self.tier_slots[op.dst] = list(self.slots.get(op.src, [None] * self.ps))
            COVERAGE["tier_writebacks"] += 1
        if self.sched.num_partial_hit_tokens > self.partial_seen:
            COVERAGE["partial_claims"] += 1
            self.partial_seen = self.sched.num_partial_hit_tokens
        for c in plan.chunks:
            assert all(t >= 0 for t in c.token_ids) or (len(c.token_ids) == 1 and self.in_flight)
            hit = self.sched.num_cached_tokens(c.request_id) > 0
            COVERAGE["prefix_hits"] += hit
            COVERAGE["window_prefix_hits"] += hit and self.WINDOW is not None
        COVERAGE["overlapped_plans"] += bool(self.in_flight)
        self.in_flight.append(plan)

    def _check_reads(self, rid: str, start: int, row: tuple[int, ...]) -> None:
        """Every position below start holds rid's own token there (its KV is what it reads)."""
        own = self.tokens[rid]
        for pos in range(start):
            slot = self.slots.get(row[pos // self.ps], [None] * self.ps)[pos % self.ps]
            if isinstance(slot, tuple):  # a token sampled by the step that wrote it
                src, at = slot
                slot = self.tokens[src][at] if at < len(self.tokens[src]) else None
            assert slot == own[pos], f"{rid} reads position {pos} as {slot}, its token is {own[pos]}"

    @precondition(lambda self: self.in_flight)
    @rule(eos_prob=st.sampled_from([0.0, 0.2, 0.6]))
    def advance(self, eos_prob: float) -> None:
        self._advance(eos_prob)

    def _advance(self, eos_prob: float) -> None:
        plan = self.in_flight.pop(0)
        sampled = {c.request_id: (EOS if self.rng.random() < eos_prob else self.rng.randrange(1, 50))
                   for c in plan.chunks if c.sample}
        before = self.sched.pool.evictions
        for u in self.sched.advance(StepResult(plan.step_id, sampled, tier_failed=self.failed.pop(plan.step_id))):
            if u.request_id in self.outputs:
                self.outputs[u.request_id].extend(u.new_token_ids)
                self.tokens[u.request_id].extend(u.new_token_ids)
            if u.finish_reason is not None:
                self.live.discard(u.request_id)
                if u.finish_reason.name in ("STOP", "LENGTH"):
                    self.done.append(u.request_id)
        assert self.sched.pool.evictions == before  # (evictions happen while planning only)
        COVERAGE["session_groups"] += any(g is not None for g in self.sched.pool.groups())

    @invariant()
    def invariants_hold(self) -> None:
        self.sched.check_invariants()

    @invariant()
    def kv_events_replay_to_the_index(self) -> None:
        # A gateway that applies the events in order knows exactly the pages the pool can hit.
        for e in self.sched.kv_events.drain():
            if isinstance(e, PagesStored):
                assert len(e.tokens) == len(e.keys) * self.ps
                # (the parent itself may be gone: a page whose twin held its key when it was
                # published is not in the index, and neither is it in the events)
                assert not self.reported & set(e.keys)
                self.reported |= set(e.keys)
            else:
                assert set(e.keys) <= self.reported
                self.reported -= set(e.keys)
        assert self.reported == set(self.sched.pool._index)

    def teardown(self) -> None:
        # Drain: everything finishes and every page comes back.
        for _ in range(500):
            if not self.in_flight and not self.sched.has_unfinished():
                break
            if len(self.in_flight) < 2:
                p = self.sched.next_plan()
                if not p.empty:
                    self._run(p)
            if self.in_flight:
                self._advance(0.0)
            self.sched.check_invariants()
        assert not self.sched.has_unfinished(), "scheduler did not drain (deadlock?)"
        COVERAGE["preemptions"] += self.sched.num_preemptions
        COVERAGE["window_preemptions"] += self.sched.num_preemptions * (self.WINDOW is not None)
        COVERAGE["evictions"] += self.sched.pool.evictions
        for pool in (self.sched.pool, self.sched.wpool):
            if pool is not None:
                assert pool.num_available() == pool.num_usable
                pool.check_invariants()
        if self.sched.tier is not None:  # no load left waiting
            assert not any(self.sched.tier.pins)


class WindowSchedulerMachine(SchedulerMachine):
    """The same with a hybrid model's second table: a 6-token sliding window, its own pool."""

    WINDOW = 6


class TierSchedulerMachine(SchedulerMachine):
    """The same with a host tier of 6 pages below the pool: evicted pages are copied there
    and prefix misses load them back (the reads check covers the copies)."""

    TIER = 6


class DiskSchedulerMachine(SchedulerMachine):
    """The same with a host tier of 3 pages and a disk tier of 12 below it; a fifth of the
    disk reads fail (corrupt files) and must never be loaded."""

    TIER = 3
    DISK = 12


TestSchedulerStateful = SchedulerMachine.TestCase
TestSchedulerStateful.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None, suppress_health_check=list(HealthCheck)
)
TestTierSchedulerStateful = TierSchedulerMachine.TestCase
TestTierSchedulerStateful.settings = settings(
    max_examples=100, stateful_step_count=60, deadline=None, suppress_health_check=list(HealthCheck)
)
TestDiskSchedulerStateful = DiskSchedulerMachine.TestCase
TestDiskSchedulerStateful.settings = settings(
    max_examples=200, stateful_step_count=60, deadline=None, suppress_health_check=list(HealthCheck)
)
TestWindowSchedulerStateful = WindowSchedulerMachine.TestCase
TestWindowSchedulerStateful.settings = settings(
    max_examples=100, stateful_step_count=60, deadline=None, suppress_health_check=list(HealthCheck)
)


def test_stateful_run_exercised_pressure() -> None:
    """Guards the stateful test against silently testing nothing interesting."""
    assert all(v > 0 for v in COVERAGE.values()), COVERAGE


def run_to_end(sched: Scheduler, answer: list[int], overlap: bool = False) -> dict[str, list[int]]:
    """Drive the scheduler with a fake model that emits answer[i] as i-th output token."""
    outs: dict[str, list[int]] = {}
    in_flight: list[ExecutionPlan] = []
    for _ in range(10_000):
        if not sched.has_unfinished() and not in_flight:
            return outs
        if len(in_flight) < (2 if overlap else 1):
            p = sched.next_plan()
            if not p.empty:
                in_flight.append(p)
                if overlap:
                    continue
        plan = in_flight.pop(0)
        sampled = {c.request_id: answer[len(outs.get(c.request_id, []))] for c in plan.chunks if c.sample}
        for u in sched.advance(StepResult(plan.step_id, sampled)):
            outs.setdefault(u.request_id, []).extend(u.new_token_ids)
        sched.check_invariants()
    raise AssertionError("did not finish")


@pytest.mark.parametrize("partial", [True, False])
def test_multi_turn_prefix_hits_cover_previous_turn(partial: bool) -> None:
    ps = 4
    sched = Scheduler(SchedulerConfig(num_pages=64, page_size=ps, max_model_len=512, partial_page_reuse=partial))
    turn1 = list(range(1, 23))  # 22 tokens
    sched.submit(RequestSpec("t1", tuple(turn1), 9))
    answer = list(range(100, 109))
    out1 = run_to_end(sched, answer)["t1"]
    assert out1 == answer
    turn2 = turn1 + out1 + [200, 201, 202]
    sched.submit(RequestSpec("t2", tuple(turn2), 3))
    sched.next_plan()
    # KV exists for prompt + answer except the last sampled token (never fed back): 30 tokens,
    # all reused with partial pages, the 28 of its full pages without
    kv = len(turn1) + len(out1) - 1
    assert sched.num_cached_tokens("t2") == (kv if partial else kv // ps * ps)
    assert sched.num_partial_hit_tokens == (kv % ps if partial else 0)
    sched.check_invariants()


@pytest.mark.parametrize("n_out", [1, 13, 14])
def test_pages_completed_in_the_finishing_step_are_cached(n_out: int) -> None:
    ps = 4  # (full pages: partial ones are tested above)
    sched = Scheduler(SchedulerConfig(num_pages=64, page_size=ps, max_model_len=512, partial_page_reuse=False))
    turn1 = list(range(1, 41))
    sched.submit(RequestSpec("t1", tuple(turn1), n_out))
    out1 = run_to_end(sched, list(range(100, 100 + n_out)))["t1"]
    sched.submit(RequestSpec("t2", tuple(turn1 + out1 + [7, 7, 7]), 1))
    sched.next_plan()
    assert sched.num_cached_tokens("t2") == (len(turn1) + n_out - 1) // ps * ps


def test_prefix_caching_off_hits_nothing() -> None:
    sched = Scheduler(SchedulerConfig(num_pages=64, page_size=4, enable_prefix_caching=False))
    sched.submit(RequestSpec("a", tuple(range(1, 30)), 2))
    run_to_end(sched, [5, 6])
    sched.submit(RequestSpec("b", tuple(range(1, 30)), 2))
    sched.next_plan()
    assert sched.num_cached_tokens("b") == 0


@pytest.mark.parametrize("overlap", [False, True])
def test_preemption_under_pressure_still_completes(overlap: bool) -> None:
    sched = Scheduler(SchedulerConfig(num_pages=9, page_size=4, max_num_batched_tokens=64))
    for i in range(6):
        sched.submit(RequestSpec(f"r{i}", tuple(range(1 + i, 12 + i)), 12))
    answer = list(range(50, 62))
    outs = run_to_end(sched, answer, overlap)
    assert sched.num_preemptions > 0
    assert all(outs[f"r{i}"] == answer for i in range(6))
    assert sched.pool.num_available() == sched.pool.num_usable


def test_chunked_prefill_respects_budget_and_decodes_go_first() -> None:
    sched = Scheduler(SchedulerConfig(num_pages=64, page_size=4, max_num_batched_tokens=8))
    sched.submit(RequestSpec("short", (1, 2, 3), 4))
    p = sched.next_plan()
    sched.advance(StepResult(p.step_id, {"short": 9}))
    sched.submit(RequestSpec("long", tuple(range(1, 21)), 2))
    p = sched.next_plan()
    assert p.chunks[0].request_id == "short" and len(p.chunks[0].token_ids) == 1
    assert p.chunks[1].request_id == "long" and len(p.chunks[1].token_ids) == 7 and not p.chunks[1].sample
    assert p.num_tokens <= 8


def test_overlap_decode_uses_placeholder() -> None:
    sched = Scheduler(SchedulerConfig(num_pages=64, page_size=4))
    sched.submit(RequestSpec("a", (1, 2, 3), 5))
    p0 = sched.next_plan()
    p1 = sched.next_plan()  # planned while p0 is in flight
    assert p1.chunks[0].token_ids == (LAST_SAMPLED,) and p1.chunks[0].start == 3
    sched.advance(StepResult(p0.step_id, {"a": 11}))
    sched.advance(StepResult(p1.step_id, {"a": 12}))
    p2 = sched.next_plan()
    assert p2.chunks[0].token_ids == (12,)


def test_abort_mid_prefill_and_mid_decode_frees_every_page() -> None:
    sched = Scheduler(SchedulerConfig(num_pages=32, page_size=4, max_num_batched_tokens=8))
    sched.submit(RequestSpec("pre", tuple(range(1, 30)), 4))
    sched.submit(RequestSpec("dec", (1, 2), 40))
    p = sched.next_plan()
    sched.advance(StepResult(p.step_id, {c.request_id: 3 for c in p.chunks if c.sample}))
    p = sched.next_plan()  # in flight while we abort
    sched.abort("pre")
    sched.abort("dec")
    sched.check_invariants()
    assert sched.pool.num_available() < sched.pool.num_usable  # fenced until advanced
    sched.advance(StepResult(p.step_id, {c.request_id: 3 for c in p.chunks if c.sample}))
    sched.check_invariants()
    assert sched.pool.num_available() == sched.pool.num_usable
    assert not sched.has_unfinished()


def test_requests_that_can_never_fit_are_rejected() -> None:
    sched = Scheduler(SchedulerConfig(num_pages=5, page_size=4, max_model_len=64))
    with pytest.raises(RequestRejected, match="context length"):
        sched.submit(RequestSpec("a", tuple(range(60)), 10))
    with pytest.raises(RequestRejected, match="whole KV cache"):
        sched.submit(RequestSpec("b", tuple(range(14)), 4))
    with pytest.raises(RequestRejected, match="empty"):
        sched.submit(RequestSpec("c", (), 4))


def test_illegal_transition_raises_at_run_time() -> None:
    pool = PagePool(4, 4)
    with pytest.raises(IllegalTransition, match="start_decode"):
        fsm.start_decode(fsm.Waiting())  # type: ignore[arg-type]
    bt = pool.new_table()
    pool.allocate(bt, 2)
    pool.release(bt)
    with pytest.raises(HandleReleased):
        _ = bt.pages
    assert pool.state[1] == PageState.FREE


def test_mypy_rejects_illegal_transition(tmp_path: Path) -> None:
    case = tmp_path / "illegal.py"
    case.write_text(
        "from agentspeed.control import fsm\n"
        "from agentspeed.control.page_pool import BlockTable\n"
        "s = fsm.start_prefill(fsm.Waiting(), BlockTable())\n"
        "fsm.start_decode(s)  # Prefilling is not a legal source of start_decode\n"
    )
    ok = tmp_path / "legal.py"
    ok.write_text(
        "from agentspeed.control import fsm\n"
        "from agentspeed.control.page_pool import BlockTable\n"
        "s = fsm.start_prefill(fsm.Waiting(), BlockTable())\n"
        "d = fsm.start_decode(fsm.complete_prefill(s))\n"
    )
    # Share the project's mypy cache (scripts/test.sh warms it) so this takes seconds.
    cache = Path(__file__).resolve().parents[1] / ".mypy_cache"
    run = [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--cache-dir", str(cache)]
    bad = subprocess.run([*run, str(case)], capture_output=True, text=True)
    assert bad.returncode == 1 and 'incompatible type "Prefilling"' in bad.stdout, bad.stdout
    good = subprocess.run([*run, str(ok)], capture_output=True, text=True)
    assert good.returncode == 0, good.stdout


def test_control_plane_imports_no_torch() -> None:
    code = "import sys, agentspeed.control.scheduler; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def _session_rounds(retention: bool, rounds: int = 6, gaps: tuple[float, ...] = (1.0,)) -> tuple[int, int]:
    """Three agent sessions taking turns round-robin (each re-sends its conversation plus a
    tool result), a pool that holds two of them: (prompt tokens cached, prompt tokens)."""
    ps = 4
    sched = Scheduler(SchedulerConfig(num_pages=32, page_size=ps, max_model_len=512, session_retention=retention,
                                      partial_page_reuse=False))
    rng = random.Random(0)
    conv = {k: [rng.randrange(1, 50) for _ in range(40)] for k in "ABC"}
    cached = total = 0
    for rnd in range(rounds):
        for k in "ABC":
            rid = f"{k}{rnd}"
            sched.submit(RequestSpec(rid, tuple(conv[k]), 4, session_key=k))
            answer = [rng.randrange(1, 50) for _ in range(4)]
            while sched.has_unfinished():
                plan = sched.next_plan()
                for u in sched.advance(StepResult(plan.step_id, {c.request_id: answer.pop(0)
                                                                 for c in plan.chunks if c.sample})):
                    conv[k] += u.new_token_ids
                    if u.finish_reason is not None and rnd:  # (the first round is cold)
                        cached += u.num_cached_tokens
                        total += len(conv[k]) - 4
                sched.check_invariants()
            conv[k] += [rng.randrange(1, 50) for _ in range(4)]  # the tool's result
            sched.now += gaps[rnd % len(gaps)]
    return cached, total


def test_session_retention_beats_lru_on_round_robin_sessions() -> None:
    # LRU evicts the session that waited longest: the next to return. Retention evicts the
    # one expected back latest (the one that just finished), so two of three keep their pages.
    lru, total = _session_rounds(False)
    kept, total2 = _session_rounds(True)
    assert total == total2
    assert lru / total < 0.2, (lru, total)
    assert kept / total > 0.4 and kept > 2.5 * lru, (kept, lru, total)


def test_sessions_idle_past_the_cap_go_first() -> None:
    from agentspeed.control.retention import SessionRetention

    r = SessionRetention(initial_gap_s=10.0, cap_s=100.0)
    for key, start, end in (("old", 0.0, 1.0), ("back_soon", 50.0, 190.0), ("back_late", 60.0, 180.0),
                            ("lapsed", 70.0, 100.0), ("live", 80.0, 90.0)):
        r.turn_started(key, start)
        r.turn_ended(key, end)
    r.turn_started("live", 120.0)
    r.turn_started("back_soon", 194.0)  # gap 4 s: retained for 8, expected back at 195 + 4
    r.turn_ended("back_soon", 195.0)
    r.turn_started("back_late", 190.0)  # gap 10 s: retained for 20, expected back at 191 + 10
    r.turn_ended("back_late", 191.0)
    now = 198.5
    r.turn_started("queued_late", 100.0)
    r.turn_ended("queued_late", 150.0)
    r.turn_started("queued_late", 151.0)  # queued behind "live" (its last turn ended earlier)
    order = r.eviction_order(["live", "back_soon", None, "queued_late", "lapsed", "old", "back_late"], now)
    # idle past the cap; no session; lapsed (idle 98.5 s > 2 x 10 s); retained, latest back first;
    # live, the one admitted last first
    assert order == ["old", None, "lapsed", "back_late", "back_soon", "queued_late", "live"]
    assert r.sessions["back_soon"].gap == 4.0 and r.sessions["lapsed"].gap == 10.0


def test_retention_forgets_long_idle_sessions_without_pages() -> None:
    from agentspeed.control.retention import SessionRetention

    r = SessionRetention(cap_s=10.0, max_sessions=2)
    for i, key in enumerate(("a", "b", "c")):
        r.turn_started(key, float(i))
        r.turn_ended(key, float(i))
    r.prune(100.0, lambda: ["b"])  # b still holds cached pages
    assert set(r.sessions) == {"b"}


def test_a_fetch_with_every_host_slot_pinned_leaves_no_disk_pin():
    """Found by the stateful test: a disk read planned while every host slot is pinned is not
    planned, and its disk slot was left pinned by a step whose plan came out empty and so was
    never advanced; a later failed read of the same page then could not forget the copy."""
    m = DiskSchedulerMachine()

    def abort(rid: str) -> None:
        m.sched.abort(rid)
        m.live.discard(rid)

    steps = [
        lambda: m.submit(length=23, max_tokens=1, prefix=0, session="s0", shared=False),
        m.plan, lambda: m.advance(eos_prob=0.0),
        lambda: m.submit(length=4, max_tokens=1, prefix=1, session=None, shared=True),
        lambda: m.submit(length=3, max_tokens=1, prefix=0, session=None, shared=False),
        lambda: abort("r0"), lambda: abort("r2"),
        m.plan, lambda: m.advance(eos_prob=0.0),
        lambda: m.submit(length=9, max_tokens=1, prefix=0, session=None, shared=True),
        m.plan,
        lambda: m.submit(length=7, max_tokens=1, prefix=0, session=None, shared=False),
        lambda: abort("r3"), lambda: abort("r4"),
        lambda: m.submit(length=14, max_tokens=1, prefix=1, session=None, shared=True),
        m.plan, lambda: m.advance(eos_prob=0.0),
        m.plan, lambda: m.advance(eos_prob=0.0),
    ]
    for step in steps:
        step()
        m.invariants_hold()
        m.kv_events_replay_to_the_index()
    assert m.sched.num_disk_failed  # (the read that failed is what this sequence reaches)
    m.teardown()


def test_tier_unpin_undoes_only_the_last_pin():
    t = TierIndex(2)
    s = t.store(b"k" * 16)
    assert s is not None
    t.pin(s, 5)
    with pytest.raises(InvariantViolation):
        t.unpin(s, 6)
    t.unpin(s, 5)
    assert not t.fenced(5) and t.pins[s] == 0
    t.check_invariants()
