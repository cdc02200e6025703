"""The model runner's per-step grammar work for its constrained rows.

A step's masks depend only on tokens accepted in earlier steps, so they are filled on a
grammar thread while the step's forward runs (the libraries' fill is C++/Rust and the
forward spends its time in torch kernels that release the GIL), and applied to the
sampling rows just before sampling. Rows without a constraint are never touched; a step
without constrained rows does no grammar work at all."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from agentspeed.structured.backend import Matcher
from agentspeed.structured.bitmask import allocate, apply_bitmask

log = logging.getLogger(__name__)


class GrammarStep:
    def __init__(self, vocab_size: int, overlap: bool = False) -> None:
        """overlap: fill on a grammar thread during the forward; else on the calling thread
        before it (benchmarks/engine/bench_structured.py compares the two)."""
        self.vocab_size = vocab_size
        self.overlap = overlap
        self.mask = allocate(8, vocab_size)  # host memory: the libraries fill it there
        self._rows: list[int] = []  # the sampling rows of the fill in progress
        self._pool: ThreadPoolExecutor | None = None

    def start(self, rows: Sequence[tuple[int, Matcher]]) -> Future[None] | None:
        """Begin filling the masks of rows (sampling-row index, matcher); None if no row
        needs one. The result must be passed to apply() before the next start()."""
        rows = [(r, m) for r, m in rows if not m.terminated]
        if not rows:
            return None
        need = max(r for r, _ in rows) + 1
        if need > self.mask.shape[0]:
            self.mask = allocate(max(need, 2 * self.mask.shape[0]), self.vocab_size)
        fut: Future[None]
        if self.overlap:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="agentspeed-grammar")
            fut = self._pool.submit(self._fill, rows)
        else:
            fut = Future()
            self._fill(rows)
            fut.set_result(None)
        self._rows = [r for r, _ in rows]
        return fut

    def _fill(self, rows: list[tuple[int, Matcher]]) -> None:
        for r, m in rows:
            m.fill(self.mask, r)

    def apply(self, logits: torch.Tensor, pending: Future[None]) -> None:
        """Wait for the fill and mask logits' constrained rows in place."""
        pending.result()
        mask = self.mask if logits.device.type == "cpu" else self.mask.to(logits.device, non_blocking=True)
        apply_bitmask(logits, mask, self._rows)

    @staticmethod
    def accept(request_id: str, matcher: Matcher, tokens: Sequence[int]) -> None:
        """Advance a matcher by the tokens that stand. A token the grammar refuses cannot
        come from a masked sample; it is logged (with the request) rather than ignored."""
        for t in tokens:
            if matcher.terminated:
                return
            if not matcher.accept(t):
                log.error("request %s: token %d is outside its grammar", request_id, t)
                return

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
