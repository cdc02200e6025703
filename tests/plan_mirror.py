"""A test double of the execution plane's view of plans (no model): what the runner does
with new_requests, page deltas and releases, with its protocol checks as asserts."""

from __future__ import annotations

from agentspeed.control.plan import ExecutionPlan, apply_pages


class PageRows:
    """The execution plane's view of plans: each request registered once (NewRequest) before
    its first chunk, rows built from page deltas only, dropped when released."""

    def __init__(self) -> None:
        self.rows: dict[str, list[int]] = {}
        self.wrows: dict[str, list[int]] = {}  # sliding-window rows (hybrid models)
        self.registered: set[str] = set()
        self.last_windows: list[tuple[int, ...]] = []  # each chunk's window row, last apply()

    def apply(self, plan: ExecutionPlan) -> list[tuple[int, ...]]:
        """The full page row of each chunk of the plan, as execution sees it."""
        for rid in plan.released:
            assert rid in self.rows, f"release of {rid}, which was never registered"
            del self.rows[rid]
            self.wrows.pop(rid, None)
        for n in plan.new_requests:
            assert n.request_id not in self.registered, f"{n.request_id} registered twice"
            self.registered.add(n.request_id)
            self.rows[n.request_id] = []
            self.wrows[n.request_id] = []
        out = []
        self.last_windows = []
        for c in plan.chunks:
            assert c.request_id in self.rows, f"chunk for {c.request_id}, which no plan registered"
            row = self.rows[c.request_id]
            apply_pages(row, c)
            out.append(tuple(row))
            wrow = self.wrows[c.request_id]
            apply_pages(wrow, c, window=True)
            self.last_windows.append(tuple(wrow))
        return out
