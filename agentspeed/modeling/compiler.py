"""The placement compiler: SPMD modules declare the placement of their input and output;
at model build, `compile_placements` walks every `Chain` and, at each boundary where the
producer's output placement differs from the consumer's input placement, inserts the
collective that converts one into the other. An impossible pair is refused at build time
with an error naming both modules.

    Partial   -> Replicate : all-reduce
    Shard(d)  -> Replicate : all-gather along d
    Partial   -> Shard(d)  : reduce-scatter along d
    Replicate -> Shard(d)  : local slice along d
    anything else that differs: PlacementError
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from agentspeed.errors import PlacementError
from agentspeed.modeling.comm import Communicator
from agentspeed.modeling.placement import Partial, Placement, Replicate, Shard


class SpmdModule(nn.Module):
    """A module with declared placements. Subclasses set in_placement/out_placement and
    implement forward(x, ctx); ctx is the per-step ForwardContext (may be ignored)."""

    in_placement: Placement = Replicate()
    out_placement: Placement = Replicate()


def collective_for(src: Placement, dst: Placement, producer: str, consumer: str) -> str | None:
    """The collective converting src into dst (None when equal); raises on impossible pairs."""
    if src == dst:
        return None
    if isinstance(dst, Replicate):
        if isinstance(src, Partial):
            return "all_reduce"
        if isinstance(src, Shard):
            return "all_gather"
    if isinstance(dst, Shard):
        if isinstance(src, Partial):
            return "reduce_scatter"
        if isinstance(src, Replicate):
            return "slice"
    raise PlacementError(
        f"no collective converts {src} output of {producer!r} into {dst} input of {consumer!r}"
    )


class Redistribute(nn.Module):
    """A compiler-inserted collective at one module boundary."""

    def __init__(
        self, collective: str, src: Placement, dst: Placement, comm: Communicator
    ) -> None:
        super().__init__()
        self.collective = collective
        self.src, self.dst = src, dst
        self.comm = comm
        self.dim = dst.dim if isinstance(dst, Shard) else src.dim if isinstance(src, Shard) else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.comm
        if self.collective == "all_reduce":
            return c.all_reduce(x)
        if self.collective == "all_gather":
            return c.all_gather(x, self.dim)
        if self.collective == "reduce_scatter":
            return c.reduce_scatter(x, self.dim)
        return c.slice(x, self.dim)

    def extra_repr(self) -> str:
        return f"{self.collective}: {self.src} -> {self.dst}"


@dataclass(frozen=True, slots=True)
class Insertion:
    """One collective the compiler inserted: between producer's output and consumer's input."""

    producer: str
    consumer: str
    src: Placement
    dst: Placement
    collective: str


class Chain(SpmdModule):
    """Named SPMD steps run in order. Its placements default to the first step's input and
    the last step's output; give them explicitly to demand a conversion at entry/exit."""

    def __init__(
        self,
        steps: Sequence[tuple[str, SpmdModule]],
        in_placement: Placement | None = None,
        out_placement: Placement | None = None,
    ) -> None:
        super().__init__()
        if not steps:
            raise ValueError("a Chain needs at least one step")
        self.step_names = [name for name, _ in steps]
        for name, mod in steps:
            self.add_module(name, mod)
        self.in_placement = in_placement if in_placement is not None else steps[0][1].in_placement
        self.out_placement = out_placement if out_placement is not None else steps[-1][1].out_placement
        # boundaries[i] runs before step i; boundaries[n] after the last. Filled by the compiler.
        self.boundaries: nn.ModuleList | None = None
        self._plan: list[tuple[Redistribute | None, SpmdModule]] | None = None
        self._exit: Redistribute | None = None

    def steps(self) -> list[SpmdModule]:
        return [getattr(self, n) for n in self.step_names]

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        plan = self._plan
        if plan is None:
            raise RuntimeError("Chain used before compile_placements() ran on the model")
        # The hot path: call forward() directly and skip no-op boundaries. A decoder layer
        # is ~20 module calls; nn.Module.__call__'s hook machinery per call is measurable
        # at batch 1 (none of these modules carries hooks).
        for boundary, step in plan:
            if boundary is not None:
                x = boundary.forward(x)
            x = step.forward(x, ctx)
        return x if self._exit is None else self._exit.forward(x)


class Residual(SpmdModule):
    """x + body(x). Both summands must be replicated, so the body's output is declared
    Replicate and the compiler inserts whatever collective the body's last step needs.
    The sum is written into the body's output, which must be a fresh tensor (a norm's or a
    linear's result, never x or a view of it): one activation fewer per block (with RowBlocks'
    single output, a 2,690-token prefill's peak +279 -> +244 MiB; docs/benchmarks.md)."""

    def __init__(self, body: Chain) -> None:
        super().__init__()
        if body.in_placement != Replicate() or body.out_placement != Replicate():
            raise PlacementError("a Residual body must take and return Replicate()")
        self.body = body

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        y = self.body.forward(x, ctx)
        return y.add_(x)


class RowBlocks(SpmdModule):
    """body over at most `rows` token rows at a time: the same output, the body's intermediates
    (an MLP's [T, 2F] gate|up and [T, F] activations, fp32) bounded by `rows` instead of the
    step's token count. Rows are independent through a position-wise body, so only the peak
    memory changes. The blocks' results go straight into one output tensor (a cat of them held
    both at once). Placements are the body's; a body that needs a collective (at its entry,
    between its steps or at its exit) is refused: it would run once per block."""

    def __init__(self, body: Chain, rows: int) -> None:
        super().__init__()
        if rows < 1:
            raise ValueError(f"RowBlocks needs rows >= 1, got {rows}")
        self.body, self.rows = body, rows
        self.in_placement, self.out_placement = body.in_placement, body.out_placement

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        if x.shape[0] <= self.rows:
            return self.body.forward(x, ctx)
        out: torch.Tensor | None = None  # filled block by block (not a cat of all blocks)
        for i in range(0, x.shape[0], self.rows):
            y = self.body.forward(x[i:i + self.rows], ctx)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out[i:i + y.shape[0]] = y
        assert out is not None
        return out


def compile_placements(root: nn.Module, comm: Communicator) -> list[Insertion]:
    """Insert the collectives of every Chain under root (including root). Idempotent.
    Returns what was inserted, outermost first, in execution order."""
    inserted: list[Insertion] = []
    chains = [(n, m) for n, m in root.named_modules() if isinstance(m, Chain)]
    blocked = {id(m.body) for m in root.modules() if isinstance(m, RowBlocks)}
    for name, mod in chains:
        prefix = f"{name}." if name else ""
        entry = f"{name or '<root>'} (input)"
        exit_ = f"{name or '<root>'} (output)"
        steps = mod.steps()
        names = [prefix + n for n in mod.step_names]
        edges = [(entry, mod.in_placement, names[0], steps[0].in_placement)]
        for i in range(1, len(steps)):
            edges.append((names[i - 1], steps[i - 1].out_placement, names[i], steps[i].in_placement))
        edges.append((names[-1], steps[-1].out_placement, exit_, mod.out_placement))
        boundaries: list[nn.Module] = []
        for producer, src, consumer, dst in edges:
            coll = collective_for(src, dst, producer, consumer)
            if coll is None:
                boundaries.append(nn.Identity())
            else:
                boundaries.append(Redistribute(coll, src, dst, comm))
                inserted.append(Insertion(producer, consumer, src, dst, coll))
        if id(mod) in blocked and any(isinstance(b, Redistribute) for b in boundaries):
            raise PlacementError(f"{name or '<root>'}: a RowBlocks body must not need a collective "
                                 "(it would run once per row block)")
        mod.boundaries = nn.ModuleList(boundaries)
        redist = [b if isinstance(b, Redistribute) else None for b in boundaries]
        mod._plan = list(zip(redist[:-1], steps))
        mod._exit = redist[-1]
    return inserted
