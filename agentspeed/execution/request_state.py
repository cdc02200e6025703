"""The execution plane's per-request state, kept across steps and updated only from plans.

A request is registered by the NewRequest of its first plan and dropped when a plan
releases it. In between, each chunk's page delta updates the request's row of one
persistent page table, so building a step's inputs copies only the page ids that changed
and gathers the batch's rows in one tensor op, instead of re-flattening every request's
whole table each step (at 32K context that is 2,048 page ids per request per step:
benchmarks/engine/bench_build_inputs.py). Penalty counts live here too, updated by the
tokens each step samples, so penalties never rebuild tensors from token histories.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agentspeed.control.errors import InvariantViolation
from agentspeed.control.plan import LAST_SAMPLED, NewRequest, ScheduledChunk, apply_pages
from agentspeed.sampling_params import SamplingParams
from agentspeed.structured.backend import Matcher


@dataclass(slots=True)
class RequestState:
    """What execution knows of one request. pages mirrors its page-table row on the host
    (kernels plan from it without a device sync). counts/seen exist only for requests with
    penalties, created at its first sample (they need the logits' width)."""

    request_id: str
    params: SamplingParams
    prompt: tuple[int, ...]
    slot: int
    pages: list[int]
    wpages: list[int]  # its sliding-window row (hybrid caches; empty otherwise)
    last_sampled: int = LAST_SAMPLED
    generator: torch.Generator | None = None
    counts: torch.Tensor | None = None  # [vocab] float32: times each token was sampled
    seen: torch.Tensor | None = None  # [vocab] bool: in the prompt or sampled (repetition penalty)
    matcher: Matcher | None = None  # its grammar's state (constrained requests, on rank 0)

    def record(self, tokens: list[int]) -> None:
        """Note tokens this request produced (for its penalties)."""
        if self.counts is not None and tokens:
            idx = torch.tensor(tokens, dtype=torch.int64, device=self.counts.device)
            self.counts.index_put_((idx,), torch.ones(len(tokens), device=self.counts.device), accumulate=True)
            if self.seen is not None:
                self.seen[idx] = True


class RequestTable:
    """Live requests and the page table their rows live in (grown by doubling); with
    windowed, a second table for the sliding-window layers' rows (a hybrid cache)."""

    def __init__(self, device: str, num_rows: int = 16, width: int = 64, windowed: bool = False) -> None:
        self.device = device
        self.requests: dict[str, RequestState] = {}
        self.table = torch.zeros((num_rows, width), dtype=torch.int32, device=device)
        self.wtable = torch.zeros((num_rows, width), dtype=torch.int32, device=device) if windowed else None
        self._free = list(range(num_rows - 1, -1, -1))

    def __len__(self) -> int:
        return len(self.requests)

    def add(self, new: NewRequest) -> RequestState:
        if new.request_id in self.requests:
            raise InvariantViolation(f"request {new.request_id} registered twice")
        return self._create(new.request_id, new.params, tuple(new.prompt_token_ids))

    def _create(self, rid: str, params: SamplingParams, prompt: tuple[int, ...]) -> RequestState:
        if not self._free:
            n = self.table.shape[0]
            self.table = torch.cat((self.table, torch.zeros_like(self.table)))
            if self.wtable is not None:
                self.wtable = torch.cat((self.wtable, torch.zeros_like(self.wtable)))
            self._free = list(range(2 * n - 1, n - 1, -1))
        st = RequestState(rid, params, prompt, self._free.pop(), [], [])
        self.requests[rid] = st
        return st

    def apply(self, chunk: ScheduledChunk, create: bool = False) -> RequestState:
        """The chunk's request with its page delta applied. create: a request not yet known
        gets a bare state (plain forwards that sample nothing); otherwise that is an error."""
        st = self.requests.get(chunk.request_id)
        if st is None:
            if not create:
                raise InvariantViolation(f"chunk for request {chunk.request_id}, which no plan registered")
            st = self._create(chunk.request_id, SamplingParams(), ())
        if chunk.new_pages or chunk.page_offset != len(st.pages):
            self.table = self._update(self.table, st.slot, st.pages, chunk, False)
        if self.wtable is not None and (chunk.window_pages or chunk.window_offset != len(st.wpages)):
            self.wtable = self._update(self.wtable, st.slot, st.wpages, chunk, True)
        return st

    def _update(self, table: torch.Tensor, slot: int, row: list[int], chunk: ScheduledChunk,
                window: bool) -> torch.Tensor:
        """Apply the chunk's delta to row and to its table row; returns the (maybe grown) table."""
        old = len(row)
        apply_pages(row, chunk, window)
        n = len(row)
        if n > table.shape[1]:
            width = max(n, 2 * table.shape[1])
            grown = torch.zeros((table.shape[0], width), dtype=torch.int32, device=self.device)
            grown[:, : table.shape[1]] = table
            table = grown
        off, new = (chunk.window_offset, chunk.window_pages) if window else (chunk.page_offset, chunk.new_pages)
        if new:
            table[slot, off:n] = torch.tensor(new, dtype=torch.int32, device=self.device)
        if old > n:  # a shorter row than before (a preempted request restarting)
            table[slot, n:old] = 0
        return table

    def release(self, request_id: str) -> None:
        st = self.requests.pop(request_id, None)
        if st is not None:
            self.table[st.slot, : len(st.pages)] = 0
            if self.wtable is not None:
                self.wtable[st.slot, : len(st.wpages)] = 0
            self._free.append(st.slot)

    def rows(self, states: list[RequestState], width: int, window: bool = False) -> torch.Tensor:
        """[len(states), width] int32: the page-table rows of a batch (zeros past a row's
        pages); window: their sliding-window rows."""
        idx = torch.tensor([s.slot for s in states], dtype=torch.int64, device=self.device)
        table = self.wtable if window else self.table
        assert table is not None
        return table[:, :width].index_select(0, idx)
