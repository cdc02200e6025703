"""Retention by session: which cached prefix pages to evict first when an agent's sessions
outnumber the KV pool.

An agent session re-sends its whole conversation every turn, after a tool call of seconds
to minutes. Plain LRU evicts the pages of the session that has waited longest, which is the
one most likely to come back next. This policy keeps a session's pages through its expected
gap instead, learned from the gaps it has shown.

Contract (the page pool asks `eviction_order`; the scheduler reports turns):
  - A cached page belongs to a group: the session key of the request that gave it back last,
    or None (no session, or retention off). Within a group pages go oldest-first (LRU).
  - A session's expected gap is the exponentially weighted mean (weight `ALPHA` on the newest)
    of the gaps it has shown between a turn's end and its next turn's arrival; `initial_gap_s`
    until it has shown one. Its pages are retained for `SLACK` times that gap, at most `cap_s`.
  - Eviction order at time `now`, first to last:
      1. sessions idle for longer than cap_s, longest idle first;
      2. pages without a session (group None), LRU;
      3. sessions idle past their retention but not cap_s, longest idle first;
      4. retained sessions, the one expected back latest first (Belady's choice, on estimates);
      5. sessions with a turn queued or running, last: their cached pages are the context of
         a turn about to read them. Among them the one whose last turn ended most recently
         goes first: turns are admitted in arrival order, so it is the one admitted last.
  - Time is an input (the `now` arguments), never read from a clock here: under tensor
    parallelism every rank runs the same scheduler, so rank 0's clock travels with the inputs.
  - Records of sessions idle past cap_s with no cached pages are dropped once more than
    `max_sessions` are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

ALPHA = 0.5  # weight of the newest gap: tool latencies within one session vary by 10x and more
SLACK = 2.0  # retained for twice the expected gap: a late return still finds its pages


@dataclass(slots=True)
class SessionRecord:
    last_end: float = 0.0  # when its last turn ended
    gap: float = 0.0  # expected gap (seconds)
    gaps_seen: int = 0
    live: int = 0  # turns queued or running


class SessionRetention:
    def __init__(self, initial_gap_s: float = 10.0, cap_s: float = 300.0, max_sessions: int = 65536) -> None:
        if initial_gap_s <= 0 or cap_s <= 0:
            raise ValueError("session retention needs positive initial gap and cap")
        self.initial_gap_s = initial_gap_s
        self.cap_s = cap_s
        self.max_sessions = max_sessions
        self.sessions: dict[str, SessionRecord] = {}

    # ---- turns --------------------------------------------------------------------------
    def turn_started(self, key: str, now: float) -> None:
        """A turn of session `key` arrived; a gap since its last turn's end is learned."""
        s = self.sessions.get(key)
        if s is None:
            self.sessions[key] = SessionRecord(gap=self.initial_gap_s, live=1)
            return
        if s.live == 0:
            observed = max(0.0, now - s.last_end)
            s.gap = observed if s.gaps_seen == 0 else ALPHA * observed + (1 - ALPHA) * s.gap
            s.gaps_seen += 1
        s.live += 1

    def turn_ended(self, key: str, now: float) -> None:
        s = self.sessions.get(key)
        if s is None:
            return
        s.live = max(0, s.live - 1)
        s.last_end = now

    def retention_s(self, s: SessionRecord) -> float:
        return min(self.cap_s, SLACK * s.gap)

    # ---- eviction -----------------------------------------------------------------------
    def eviction_order(self, groups: Collection[str | None], now: float) -> list[str | None]:
        """`groups` (those holding cached pages) in the order their pages should be evicted."""
        ranked: list[tuple[int, float, str | None]] = []
        for g in groups:
            s = None if g is None else self.sessions.get(g)
            if g is None or s is None:
                ranked.append((1, 0.0, g))
                continue
            idle = now - s.last_end
            if s.live:
                ranked.append((4, idle, g))
            elif idle > self.cap_s:
                ranked.append((0, -idle, g))
            elif idle > self.retention_s(s):
                ranked.append((2, -idle, g))
            else:  # expected back at last_end + gap: the latest goes first
                ranked.append((3, -(s.last_end + s.gap), g))
        ranked.sort(key=lambda t: (t[0], t[1]))
        return [g for _, _, g in ranked]

    def prune(self, now: float, groups: Callable[[], Collection[str | None]]) -> None:
        """Forget sessions idle past cap_s that hold no cached pages (`groups()`: those that
        do), when too many are kept."""
        if len(self.sessions) <= self.max_sessions:
            return
        has_pages = set(groups())
        for key in [k for k, s in self.sessions.items()
                    if not s.live and now - s.last_end > self.cap_s and k not in has_pages]:
            del self.sessions[key]
