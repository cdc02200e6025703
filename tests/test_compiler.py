"""The placement compiler: legal conversions, refusal of impossible pairs at build time,
exactly the expected collectives for the Llama family, and no collectives in model code."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from agentspeed.config import CacheConfig, ModelConfig
from agentspeed.control.plan import ScheduledChunk
from agentspeed.errors import PlacementError
from agentspeed.execution.inputs import build_inputs
from agentspeed.execution.kv_cache import KVCache
from agentspeed.execution.request_state import RequestTable
from agentspeed.kernels.api import KernelSet
from agentspeed.modeling.comm import Communicator
from agentspeed.modeling.compiler import (
    Chain,
    Insertion,
    Redistribute,
    Residual,
    RowBlocks,
    SpmdModule,
    collective_for,
    compile_placements,
)
from agentspeed.modeling.context import ForwardContext
from agentspeed.modeling.models.llama import LlamaForCausalLM
from agentspeed.modeling.placement import Partial, Placement, Replicate, Shard

PACKAGE = Path(__file__).resolve().parents[1] / "agentspeed"


class Step(SpmdModule):
    """A do-nothing SPMD step with the given placements."""

    def __init__(self, src: Placement, dst: Placement) -> None:
        super().__init__()
        self.in_placement, self.out_placement = src, dst

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        return x


class RecordingComm(Communicator):
    """world_size 1 semantics (identity), but records every collective call."""

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(rank, world_size)
        self.calls: list[tuple[str, int | None]] = []

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(("all_reduce", None))
        return x

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        self.calls.append(("all_gather", dim))
        return x

    def reduce_scatter(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        self.calls.append(("reduce_scatter", dim))
        return x

    def slice(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        self.calls.append(("slice", dim))
        return x


# ---------------------------------------------------------------- collective_for


@pytest.mark.parametrize(
    ("src", "dst", "expected"),
    [
        (Partial(), Replicate(), "all_reduce"),
        (Shard(-1), Replicate(), "all_gather"),
        (Shard(0), Replicate(), "all_gather"),
        (Partial(), Shard(-1), "reduce_scatter"),
        (Partial(), Shard(0), "reduce_scatter"),
        (Replicate(), Shard(-1), "slice"),
        (Replicate(), Shard(1), "slice"),
        (Replicate(), Replicate(), None),
        (Partial(), Partial(), None),
        (Shard(-1), Shard(-1), None),
    ],
)
def test_collective_for_legal_pairs(src: Placement, dst: Placement, expected: str | None) -> None:
    assert collective_for(src, dst, "producer", "consumer") == expected


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (Replicate(), Partial()),
        (Shard(-1), Partial()),
        (Shard(0), Shard(1)),
        (Shard(1), Shard(0)),
        (Shard(-1), Shard(0)),
    ],
)
def test_collective_for_impossible_pairs(src: Placement, dst: Placement) -> None:
    with pytest.raises(PlacementError) as e:
        collective_for(src, dst, "the_producer", "the_consumer")
    msg = str(e.value)
    assert "the_producer" in msg and "the_consumer" in msg
    assert str(src) in msg and str(dst) in msg


@pytest.mark.parametrize(
    ("src", "dst", "method", "dim"),
    [
        (Partial(), Replicate(), "all_reduce", None),
        (Shard(-1), Replicate(), "all_gather", -1),
        (Shard(0), Replicate(), "all_gather", 0),
        (Partial(), Shard(1), "reduce_scatter", 1),
        (Replicate(), Shard(-1), "slice", -1),
    ],
)
def test_redistribute_calls_the_chosen_collective(
    src: Placement, dst: Placement, method: str, dim: int | None
) -> None:
    comm = RecordingComm()
    coll = collective_for(src, dst, "a", "b")
    assert coll == method
    r = Redistribute(coll, src, dst, comm)
    x = torch.randn(3, 4)
    assert r(x) is x
    assert comm.calls == [(method, dim)]
    assert method in repr(r)


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (Partial(), Replicate()),
        (Shard(-1), Replicate()),
        (Partial(), Shard(-1)),
        (Replicate(), Shard(0)),
    ],
)
def test_world_size_one_redistribute_is_identity(src: Placement, dst: Placement) -> None:
    coll = collective_for(src, dst, "a", "b")
    assert coll is not None
    r = Redistribute(coll, src, dst, Communicator())
    x = torch.randn(4, 6)
    torch.testing.assert_close(r(x), x, rtol=0, atol=0)
    assert r(x).shape == x.shape


def test_slice_takes_this_ranks_chunk_without_a_process_group() -> None:
    x = torch.arange(24.0).view(4, 6)
    for rank in range(2):
        r = Redistribute("slice", Replicate(), Shard(-1), Communicator(rank, 2))
        torch.testing.assert_close(r(x), x[:, rank * 3 : (rank + 1) * 3])
        r0 = Redistribute("slice", Replicate(), Shard(0), Communicator(rank, 2))
        torch.testing.assert_close(r0(x), x[rank * 2 : (rank + 1) * 2])


# ---------------------------------------------------------------- compile_placements


def test_impossible_pair_refused_at_build_time_naming_both_modules() -> None:
    root = nn.Module()
    root.block = Chain(
        [
            ("makes_replicate", Step(Replicate(), Replicate())),
            ("wants_partial", Step(Partial(), Partial())),
        ]
    )
    with pytest.raises(PlacementError) as e:
        compile_placements(root, Communicator())
    msg = str(e.value)
    assert "block.makes_replicate" in msg and "block.wants_partial" in msg


def test_shard_dim_mismatch_refused_naming_both_modules() -> None:
    chain = Chain([("rows", Step(Replicate(), Shard(0))), ("cols", Step(Shard(1), Replicate()))])
    with pytest.raises(PlacementError) as e:
        compile_placements(chain, Communicator())
    msg = str(e.value)
    assert "'rows'" in msg and "'cols'" in msg and "Shard(0)" in msg and "Shard(1)" in msg


def test_chain_entry_and_exit_boundaries_are_checked() -> None:
    entry = Chain([("first", Step(Partial(), Replicate()))], in_placement=Replicate())
    with pytest.raises(PlacementError, match=r"<root> \(input\).*first"):
        compile_placements(entry, Communicator())
    exit_ = Chain([("last", Step(Replicate(), Replicate()))], out_placement=Partial())
    with pytest.raises(PlacementError, match=r"last.*<root> \(output\)"):
        compile_placements(exit_, Communicator())


def test_residual_body_must_be_replicated() -> None:
    with pytest.raises(PlacementError):
        Residual(Chain([("x", Step(Replicate(), Partial()))]))


class Scale(Step):
    """A replicated step whose output is a fresh tensor: x times k, keeping the first `cols` columns."""

    def __init__(self, k: float, cols: int | None = None) -> None:
        super().__init__(Replicate(), Replicate())
        self.k, self.cols = k, cols

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        return x[..., :self.cols] * self.k


def test_residual_sums_into_the_body_output_and_leaves_x_alone() -> None:
    res = Residual(Chain([("scale", Scale(3.0))]))
    compile_placements(res, Communicator())
    x = torch.arange(6.0).view(2, 3)
    keep = x.clone()
    torch.testing.assert_close(res(x), 4 * keep)
    torch.testing.assert_close(x, keep)  # the in-place add wrote the body's output, not x


def test_row_blocks_fill_one_output_of_the_body_rows_shape() -> None:
    """7 rows in blocks of 3, 3, 1, the body narrowing 4 columns to 2: the whole step's result."""
    blocks = RowBlocks(Chain([("scale", Scale(2.0, cols=2))]), 3)
    compile_placements(Chain([("blocks", blocks)]), Communicator())
    x = torch.randn(7, 4)
    got = blocks(x)
    assert got.shape == (7, 2)
    torch.testing.assert_close(got, 2 * x[:, :2])


def test_chain_used_before_compile_raises() -> None:
    chain = Chain([("a", Step(Replicate(), Replicate()))])
    with pytest.raises(RuntimeError, match="compile_placements"):
        chain(torch.zeros(2))
    compile_placements(chain, Communicator())
    torch.testing.assert_close(chain(torch.ones(2)), torch.ones(2))


def test_nested_chain_inside_residual_before_compile_raises() -> None:
    res = Residual(Chain([("a", Step(Replicate(), Replicate()))]))
    with pytest.raises(RuntimeError):
        res(torch.zeros(2))


def test_compile_inserts_and_runs_a_small_chain() -> None:
    comm = RecordingComm()
    chain = Chain(
        [
            ("col", Step(Replicate(), Shard(-1))),
            ("act", Step(Shard(-1), Shard(-1))),
            ("row", Step(Shard(-1), Partial())),
            ("scatter_in", Step(Shard(0), Shard(0))),
            ("gather_in", Step(Replicate(), Replicate())),
        ]
    )
    ins = compile_placements(chain, comm)
    assert [(i.producer, i.consumer, i.collective) for i in ins] == [
        ("row", "scatter_in", "reduce_scatter"),
        ("scatter_in", "gather_in", "all_gather"),
    ]
    assert chain.boundaries is not None and len(chain.boundaries) == 6
    chain(torch.zeros(4, 4))
    assert comm.calls == [("reduce_scatter", 0), ("all_gather", 0)]
    # idempotent
    assert compile_placements(chain, comm) == ins
    assert len(chain.boundaries) == 6


# ---------------------------------------------------------------- the Llama family

TINY_CFG = ModelConfig(
    architecture="LlamaForCausalLM",
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def expected_llama_insertions(num_layers: int) -> list[Insertion]:
    ins = [Insertion("body.embed_tokens", "body.layer0", Partial(), Replicate(), "all_reduce")]
    for i in range(num_layers):
        for block, last in (("attn", "o_proj"), ("mlp", "ffn")):
            chain = f"body.layer{i}.{block}.body"
            ins.append(
                Insertion(
                    f"{chain}.{last}", f"{chain} (output)", Partial(), Replicate(), "all_reduce"
                )
            )
    ins.append(Insertion("head.lm_head", "head (output)", Shard(-1), Replicate(), "all_gather"))
    return ins


def build_tiny(cfg: ModelConfig, comm: Communicator) -> LlamaForCausalLM:
    kernels = KernelSet("cpu", torch.float32, {"head_dim": cfg.head_dim, "page_size": 4})
    return LlamaForCausalLM(cfg, comm, kernels, torch.float32, "cpu")


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize(
    "overrides",
    [{}, {"num_layers": 3, "tie_word_embeddings": True}, {"qk_norm": True, "attention_bias": True}],
)
def test_llama_gets_exactly_the_expected_collectives(
    world_size: int, overrides: dict[str, Any]
) -> None:
    cfg = dataclasses.replace(TINY_CFG, **overrides)
    model = build_tiny(cfg, Communicator(0, world_size))
    expected = expected_llama_insertions(cfg.num_layers)
    assert model.collectives == expected
    # Exactly these Redistribute modules exist in the tree, nothing else.
    redists = [m for m in model.modules() if isinstance(m, Redistribute)]
    assert sorted(r.collective for r in redists) == sorted(i.collective for i in expected)
    assert (
        sum(c == "all_reduce" for c in (i.collective for i in expected)) == 2 * cfg.num_layers + 1
    )
    # Re-running the compiler changes nothing.
    assert compile_placements(model, Communicator(0, world_size)) == expected


def test_llama_forward_runs_exactly_those_collectives_in_order() -> None:
    torch.manual_seed(0)
    comm = RecordingComm()
    model = build_tiny(TINY_CFG, comm)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    kv = KVCache(TINY_CFG, CacheConfig(page_size=4, num_pages=8), 1, torch.float32, "cpu")
    table = RequestTable("cpu")
    chunk = ScheduledChunk("a", [1, 2, 3, 4, 5], 0, [1, 2])
    inputs = build_inputs([chunk], [table.apply(chunk, create=True)], table, 4)
    ctx = ForwardContext(inputs.positions, inputs.attn, kv.layers, inputs.logits_indices)
    with torch.inference_mode():
        logits = model(inputs.input_ids, ctx)
    assert logits.shape == (1, TINY_CFG.vocab_size)
    assert torch.isfinite(logits).all()
    expected = [("all_reduce", None)] * (1 + 2 * TINY_CFG.num_layers) + [("all_gather", -1)]
    assert comm.calls == expected


def test_row_blocks_refuse_a_body_with_collectives_inside() -> None:
    body = Chain([("row", Step(Shard(-1), Partial())), ("norm", Step(Replicate(), Replicate()))])
    with pytest.raises(PlacementError, match="RowBlocks"):
        compile_placements(Chain([("blocks", RowBlocks(body, 2))]), Communicator(0, 2))
    with pytest.raises(ValueError):
        RowBlocks(body, 0)


def test_mlp_row_blocks_leave_the_forward_unchanged() -> None:
    """A dense MLP run 2 token rows at a time (7 rows: blocks of 2, 2, 2, 1) gives the logits
    of the whole step at once, and the blocks really run (the body sees at most 2 rows)."""
    torch.manual_seed(0)
    model = build_tiny(TINY_CFG, Communicator(0, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    blocks = [m for m in model.modules() if isinstance(m, RowBlocks)]
    assert len(blocks) == TINY_CFG.num_layers

    def logits(rows: int) -> torch.Tensor:
        for m in blocks:
            m.rows = rows
        kv = KVCache(TINY_CFG, CacheConfig(page_size=4, num_pages=8), 1, torch.float32, "cpu")
        table = RequestTable("cpu")
        chunk = ScheduledChunk("a", [1, 2, 3, 4, 5, 6, 7], 0, [1, 2])
        inputs = build_inputs([chunk], [table.apply(chunk, create=True)], table, 4)
        ctx = ForwardContext(inputs.positions, inputs.attn, kv.layers, inputs.logits_indices)
        with torch.inference_mode():
            return model(inputs.input_ids, ctx)

    whole = logits(64)
    seen: list[int] = []
    body = blocks[0].body
    run = body.forward

    def counted(x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        seen.append(x.shape[0])
        return run(x, ctx)

    body.forward = counted  # type: ignore[method-assign]
    try:
        blocked = logits(2)
    finally:
        del body.forward
    assert seen == [2, 2, 2, 1]
    torch.testing.assert_close(blocked, whole, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- model code is local SPMD

COMM_METHODS = {
    name
    for name in vars(Communicator)
    if not name.startswith("_") and callable(getattr(Communicator, name)) and name != "init"
} | {
    "all_to_all",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "send",
    "recv",
    "isend",
    "irecv",
}


def collective_uses(path: Path) -> list[str]:
    """Every way `path` could talk to other ranks: torch.distributed imports or references,
    `dist.` attribute use, or a call of a Communicator collective method."""
    src = path.read_text()
    found = []
    if "torch.distributed" in src:
        found.append("mentions torch.distributed")
    for node in ast.walk(ast.parse(src, str(path))):
        if isinstance(node, ast.Import):
            found += [
                f"imports {a.name}" for a in node.names if a.name.startswith("torch.distributed")
            ]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if mod.startswith("torch.distributed") or (
                mod == "torch" and any(a.name == "distributed" for a in node.names)
            ):
                found.append(f"imports from {mod}")
        elif isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "dist":
                found.append(f"line {node.lineno}: dist.{node.attr}")
            if node.attr in COMM_METHODS:
                found.append(f"line {node.lineno}: .{node.attr}")
    found += [f"text dist.: {m.group(0)!r}" for m in re.finditer(r"\bdist\.\w+", src)]
    return found


def model_code_files() -> list[Path]:
    files = sorted((PACKAGE / "modeling" / "models").glob("*.py")) + sorted(
        (PACKAGE / "modeling" / "layers").glob("*.py")
    )
    assert len(files) >= 4
    return files


def test_model_code_never_calls_a_collective() -> None:
    offenders = {
        str(f.relative_to(PACKAGE)): u for f in model_code_files() if (u := collective_uses(f))
    }
    assert not offenders, f"model code must not talk to other ranks: {offenders}"


def test_collective_checker_is_not_vacuous() -> None:
    assert {
        "all_reduce",
        "all_gather",
        "reduce_scatter",
        "slice",
        "broadcast",
        "barrier",
    } <= COMM_METHODS
    uses = collective_uses(PACKAGE / "modeling" / "comm.py")
    assert any("torch.distributed" in u for u in uses)
    assert any("dist.all_reduce" in u for u in uses)
    assert collective_uses(
        PACKAGE / "modeling" / "compiler.py"
    )  # Redistribute calls comm.all_reduce
