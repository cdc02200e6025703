"""How many tokens to draft for one request's next decode step, from how often its drafts
have been accepted lately.

A verification step with k drafts costs about 1 + c*k decode rows of this request's share of
the step, where c, the cost of one more query row relative to a plain decode row, grows with
the batch: at batch 1 the step is bound by reading the weights and the KV once, so extra rows
are nearly free; at batch 8 and beyond the rows compete for compute (on this CPU, measured by
benchmarks/model/bench_verify_step.py: c ~ 0.1 at batch 1, 0.22-0.38 at batch 8). With a per-token
acceptance probability a, k drafts yield 1 + a + ... + a^k tokens. The policy drafts the k
that maximises yield per cost; k = 0 when no draft pays, i.e. a < c.

Agent answers switch between quoting their context (drafts accepted for long runs) and free
text (drafts rejected), so the estimate of a forgets quickly. A request that stops drafting
probes again with one draft after a back-off that doubles while the probes keep failing; an
accepted probe is followed by another at once, so a request that starts quoting resumes within
a few steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ALPHA_STEPS = 32  # the acceptance estimate is looked up on this grid
FULL_COST_BATCH = 8  # batch from which a draft row costs cost_at_full


def best_draft_length(alpha: float, cost: float, k_max: int) -> int:
    """argmax over 0 <= k <= k_max of (1 + alpha + ... + alpha^k) / (1 + cost*k)."""
    best_k, best, gain, p = 0, 1.0, 1.0, 1.0
    for k in range(1, k_max + 1):
        p *= alpha
        gain += p
        v = gain / (1.0 + cost * k)
        if v > best + 1e-12:
            best_k, best = k, v
    return best_k


@dataclass(frozen=True, slots=True)
class DraftPolicy:
    """Draft lengths for every (batch size, acceptance estimate), computed once.

    length(batch, hits, tries) is in [0, k_max]; a caller may rely on it being non-decreasing
    in the acceptance hits/tries and non-increasing in the batch.
    """

    k_max: int
    cost_at_one: float = 0.1
    cost_at_full: float = 0.3
    table: tuple[tuple[int, ...], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        rows = []
        for b in range(1, FULL_COST_BATCH + 1):
            c = self.cost_at_one + (self.cost_at_full - self.cost_at_one) * (b - 1) / (FULL_COST_BATCH - 1)
            rows.append(tuple(best_draft_length(i / ALPHA_STEPS, c, self.k_max) for i in range(ALPHA_STEPS + 1)))
        object.__setattr__(self, "table", tuple(rows))

    def length(self, batch: int, hits: float, tries: float) -> int:
        row = self.table[min(max(batch, 1), FULL_COST_BATCH) - 1]
        return row[int(hits / tries * ALPHA_STEPS)] if tries > 0 else row[-1]


@dataclass(slots=True)
class DraftStats:
    """One request's recent draft acceptance: decayed counts of drafts that were tried (the
    accepted ones and the first rejected one; later drafts of a step were never judged on
    their own) and of those accepted. Starts at the prior PRIOR_HITS / PRIOR_TRIES."""

    PRIOR_HITS = 1.2
    PRIOR_TRIES = 2.0
    DECAY = 0.75  # per verified step
    MAX_BACKOFF = 64

    hits: float = PRIOR_HITS
    tries: float = PRIOR_TRIES
    skip: int = 0  # decode steps left before the next probe (when the policy says 0)
    backoff: int = 1

    def update(self, drafted: int, accepted: int) -> None:
        tried = accepted + (accepted < drafted)
        self.hits = self.hits * self.DECAY + accepted
        self.tries = self.tries * self.DECAY + tried
        if accepted:  # a probe that succeeds is followed by another at once, not after the back-off
            self.skip, self.backoff = 0, 1

    def next_length(self, policy: DraftPolicy, batch: int) -> int:
        """Drafts for this decode step: the policy's length, or 1 for a probe when the
        back-off has run out. Call once per decode step of the request."""
        k = policy.length(batch, self.hits, self.tries)
        if k:
            self.backoff = 1
            return k
        if self.skip > 0:
            self.skip -= 1
            return 0
        # A probe; if it fails the estimate stays below break-even and the next wait is longer.
        self.skip = self.backoff
        self.backoff = min(2 * self.backoff, self.MAX_BACKOFF)
        return 1
