"""Mixture of experts (DeepSeek-V2/V3, Qwen3-MoE): Replicate in, Partial out.

Tensor parallelism shards every expert (routed and shared) along its intermediate
dimension, like a column-parallel gate/up followed by a row-parallel down: each rank
computes a summand of every expert's output, and the compiler's all-reduce after the block
sums them. The router is replicated (every rank routes identically), so no tokens move
between ranks.

Experts from a GGUF file stay packed (one GgmlLinear per expert, read by the linear
kernel that reads the dense layers' packed weights); from safetensors they are stacked
dense tensors of the compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from agentspeed.config import MoEConfig
from agentspeed.kernels.api import KernelSet
from agentspeed.kernels.ggml import GgmlLinear, GgmlWeight
from agentspeed.modeling.comm import Communicator
from agentspeed.modeling.compiler import SpmdModule
from agentspeed.modeling.layers.linear import RowParallelLinear, even_split, merged_column
from agentspeed.modeling.layers.weights import LazyTensor, copy_into
from agentspeed.modeling.placement import Partial, Replicate


def route(logits: torch.Tensor, bias: torch.Tensor | None, cfg: MoEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 router logits [T, E] -> (weights [T, k], expert ids [T, k]), transformers' rules."""
    E, G = cfg.num_experts, cfg.num_groups
    if cfg.scoring == "sigmoid":  # DeepSeek-V3, noaux_tc
        scores = logits.sigmoid()
        choice = scores + bias if bias is not None else scores
        group_scores = choice.view(-1, G, E // G).topk(min(2, E // G), dim=-1)[0].sum(-1)
        choice = choice.masked_fill(~_group_mask(group_scores, cfg), float("-inf"))
        ids = choice.topk(cfg.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    elif cfg.scoring == "topk_softmax":  # GPT-OSS: the chosen logits' softmax
        top, ids = logits.topk(cfg.top_k, dim=-1)
        weights = top.softmax(-1)
    else:  # DeepSeek-V2, Qwen3-MoE: softmax, greedy or group-limited greedy
        scores = logits.softmax(-1)
        if cfg.topk_method == "group_limited_greedy":
            group_scores = scores.view(-1, G, E // G).max(-1).values
            scores = scores.masked_fill(~_group_mask(group_scores, cfg), 0.0)
        weights, ids = scores.topk(cfg.top_k, dim=-1, sorted=False)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, ids


def _group_mask(group_scores: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """[T, E] bool: experts in each token's topk_groups best groups."""
    keep = group_scores.topk(cfg.topk_groups, dim=-1, sorted=False)[1]
    groups = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
    return groups.repeat_interleave(cfg.num_experts // cfg.num_groups, dim=1)


class SparseMoE(SpmdModule):
    in_placement = Replicate()
    out_placement = Partial()

    def __init__(
        self, hidden: int, cfg: MoEConfig, with_bias: bool, comm: Communicator, kernels: KernelSet,
        dtype: torch.dtype, device: str,
    ) -> None:
        """with_bias: the router has an e_score_correction_bias (V3)."""
        super().__init__()
        if cfg.num_experts % cfg.num_groups:
            raise ValueError(f"n_routed_experts={cfg.num_experts} is not divisible by n_group={cfg.num_groups}")
        self.cfg = cfg
        self.kernels = kernels
        E = cfg.num_experts
        self.local, self.start = even_split(cfg.intermediate_size, comm, "moe_intermediate_size")
        self.gate = nn.Parameter(torch.empty(E, hidden, dtype=torch.float32, device=device), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.zeros(E, dtype=torch.float32, device=device), requires_grad=False)
            if with_bias else None
        )
        # Experts stacked: [E, gate_local | up_local, hidden] and [E, hidden, local].
        self.w13 = nn.Parameter(torch.empty(E, 2 * self.local, hidden, dtype=dtype, device=device), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(E, hidden, self.local, dtype=dtype, device=device), requires_grad=False)
        # GPT-OSS: router logits biased; expert biases (gate|up local, and down: added by rank 0
        # only, the block's output being a partial sum).
        self.router_bias: nn.Parameter | None = None
        self.b13: nn.Parameter | None = None
        self.b2: nn.Parameter | None = None
        if cfg.router_bias:
            self.router_bias = nn.Parameter(torch.zeros(E, dtype=torch.float32, device=device), requires_grad=False)
        if cfg.expert_bias:
            self.b13 = nn.Parameter(torch.zeros(E, 2 * self.local, dtype=dtype, device=device), requires_grad=False)
            self.b2 = nn.Parameter(torch.zeros(E, hidden, dtype=dtype, device=device), requires_grad=False)
        self.rank = comm.rank
        self.shared: tuple[SpmdModule, SpmdModule] | None = None
        if cfg.num_shared:
            size = cfg.intermediate_size * cfg.num_shared
            self.shared_gate_up = merged_column(hidden, {"gate": size, "up": size}, False, comm, dtype, device)
            self.shared_down = RowParallelLinear(size, hidden, False, comm, dtype, device)
            self.shared = (self.shared_gate_up, self.shared_down)
        self._packed: dict[tuple[int, str], GgmlWeight] = {}
        # After prepare_weights of packed experts: per-expert weights for `_linear`.
        self._w13: list[Any] | None = None
        self._w2: list[Any] | None = None
        self._linear: Any = F.linear
        # The linear backend's fused routed-experts call (x, ids, weights) -> y.
        self._fused: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def checkpoint_targets(self, prefix: str) -> dict[str, tuple[SpmdModule, str, str | None]]:
        """Hugging Face checkpoint names under `prefix` (model.layers.{i}.) -> (module,
        parameter, part) for the loaders."""
        t: dict[str, tuple[SpmdModule, str, str | None]] = {prefix + "mlp.gate.weight": (self, "gate", None)}
        if self.bias is not None:
            t[prefix + "mlp.gate.e_score_correction_bias"] = (self, "bias", None)
        for e in range(self.cfg.num_experts):
            for w in ("gate", "up", "down"):
                t[f"{prefix}mlp.experts.{e}.{w}_proj.weight"] = (self, "expert", f"{e}.{w}")
        if self.cfg.num_shared:
            t[prefix + "mlp.shared_experts.gate_proj.weight"] = (self.shared_gate_up, "weight", "gate")
            t[prefix + "mlp.shared_experts.up_proj.weight"] = (self.shared_gate_up, "weight", "up")
            t[prefix + "mlp.shared_experts.down_proj.weight"] = (self.shared_down, "weight", None)
        return t

    def gpt_oss_targets(self, prefix: str) -> dict[str, tuple[SpmdModule, str, str | None]]:
        """GPT-OSS's names: a biased router, all experts' projections in 3-D tensors."""
        names = ("router.weight", "router.bias", "experts.gate_up_proj", "experts.gate_up_proj_bias",
                 "experts.down_proj", "experts.down_proj_bias")
        return {f"{prefix}mlp.{n}": (self, n, None) for n in names}

    def gpt_oss_gguf_targets(self, prefix: str) -> dict[str, tuple[SpmdModule, str, str | None]]:
        """GPT-OSS from GGUF (llama.cpp's converter): the router and down biases under
        transformers' names, one tensor per expert projection, gate and up biases apart."""
        t: dict[str, tuple[SpmdModule, str, str | None]] = {
            f"{prefix}mlp.{n}": (self, n, None)
            for n in ("router.weight", "router.bias", "experts.down_proj_bias", "experts.gate_proj_bias",
                       "experts.up_proj_bias")}
        for e in range(self.cfg.num_experts):
            for w in ("gate", "up", "down"):
                t[f"{prefix}mlp.experts.{e}.{w}_proj.weight"] = (self, "expert", f"{e}.{w}")
        return t

    def _load_gpt_oss(self, param: str, t: LazyTensor) -> None:
        # gate_up_proj [E, hidden, 2I] with gate and up interleaved (even, odd columns);
        # down_proj [E, I, hidden]: x @ W layouts, read whole and sliced here.
        rows = slice(self.start, self.start + self.local)
        w = t.read_dense()
        if param == "router.weight":
            copy_into(self.gate, w, "router weight")
        elif param == "router.bias":
            assert self.router_bias is not None
            copy_into(self.router_bias, w, "router bias")
        elif param == "experts.gate_up_proj":
            wt = w.transpose(1, 2)
            copy_into(self.w13, torch.cat([wt[:, 0::2][:, rows], wt[:, 1::2][:, rows]], dim=1), "experts gate_up")
        elif param == "experts.gate_up_proj_bias":
            assert self.b13 is not None
            copy_into(self.b13, torch.cat([w[:, 0::2][:, rows], w[:, 1::2][:, rows]], dim=1), "experts gate_up bias")
        elif param in ("experts.gate_proj_bias", "experts.up_proj_bias"):  # GGUF: [E, I] each
            assert self.b13 is not None
            half = slice(0, self.local) if param == "experts.gate_proj_bias" else slice(self.local, 2 * self.local)
            copy_into(self.b13[:, half], w[:, rows], param.replace("_", " "))
        elif param == "experts.down_proj":
            copy_into(self.w2, w.transpose(1, 2)[:, :, rows], "experts down")
        else:
            assert self.b2 is not None
            copy_into(self.b2, w if self.rank == 0 else torch.zeros_like(w), "experts down bias")

    def load(self, param: str, t: LazyTensor, part: str | None = None) -> None:
        """param: gate | bias | expert (part "<expert>.<gate|up|down>"), or a GPT-OSS name."""
        if param.startswith(("router.", "experts.")):
            self._load_gpt_oss(param, t)
            return
        if param in ("gate", "bias"):
            target = self.gate if param == "gate" else self.bias
            assert target is not None, "this router has no correction bias"
            copy_into(target, t.read_dense(), f"router {param}")
            return
        assert part is not None
        e_str, which = part.split(".")
        e = int(e_str)
        rows = slice(self.start, self.start + self.local)
        src = t.read(None, rows) if which == "down" else t.read(rows)
        if isinstance(src, GgmlWeight):  # kept packed until prepare_weights
            self._packed[(e, which)] = src
        elif which == "down":
            copy_into(self.w2[e], src, f"expert {e} down")
        else:
            off = 0 if which == "gate" else self.local
            copy_into(self.w13[e, off : off + self.local], src, f"expert {e} {which}")

    def prepare_weights(self, kernels: KernelSet) -> None:
        """Packed experts become one GgmlLinear per expert projection, in the linear kernel's
        layout (widened to dense there if that kernel reads no packed weights), and the dense
        stacks (never written, so never resident) are dropped. Experts only partly packed
        (a tensor-parallel shard that split a block) are widened into the dense stacks."""
        if not self._packed:
            return
        E, local = self.cfg.num_experts, self.local
        if len(self._packed) == 3 * E:
            p = self._packed
            self._w13 = [kernels.linear_prepare(GgmlLinear(2 * local, ((0, p[e, "gate"]), (local, p[e, "up"]))))
                         for e in range(E)]
            self._w2 = [kernels.linear_prepare(GgmlLinear(p[e, "down"].shape[0], ((0, p[e, "down"]),)))
                        for e in range(E)]
            self._linear = kernels.linear
            self.w13 = self.w2 = None  # type: ignore[assignment]
            if kernels.packed_moe is not None:
                limit = self.cfg.swiglu_limit
                swiglu = None if limit is None else (limit, self.cfg.swiglu_alpha)
                self._fused = kernels.packed_moe(self._w13, self._w2, self.b13, self.b2, swiglu)
        else:
            with torch.no_grad():
                for (e, which), w in self._packed.items():
                    dense = kernels.widen(GgmlLinear(w.shape[0], ((0, w),)))
                    if which == "down":
                        self.w2[e] = dense
                    else:
                        off = 0 if which == "gate" else local
                        self.w13[e, off: off + local] = dense
        self._packed = {}

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        weights, ids = route(F.linear(x.float(), self.gate, self.router_bias), self.bias, self.cfg)
        out = self._experts(x, weights.to(x.dtype), ids)
        if self.shared is not None:
            gate_up, down = self.shared
            out = out + down(self.kernels.silu_and_mul(gate_up(x)))
        return out

    def _experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self._fused is not None:
            return self._fused(x, ids, weights).to(x.dtype)
        # Dense experts (safetensors), or packed ones the backend has no fused call for: sort the
        # (token, expert) pairs by expert so each expert runs one matmul over its tokens. The
        # per-expert counts come to the host once per layer.
        k = ids.shape[1]
        flat = ids.flatten()
        order = flat.argsort(stable=True)
        token = order // k
        counts = torch.bincount(flat, minlength=self.cfg.num_experts).tolist()
        xs = x[token]
        ys = torch.empty_like(xs)
        w13 = self._w13 if self._w13 is not None else self.w13
        w2 = self._w2 if self._w2 is not None else self.w2
        b13, b2, act = self.b13, self.b2, self._act
        start = 0
        for e, n in enumerate(counts):
            if n:
                seg = xs[start : start + n]
                h = act(self._linear(seg, w13[e], None if b13 is None else b13[e]))
                ys[start : start + n] = self._linear(h, w2[e], None if b2 is None else b2[e])
                start += n
        ys *= weights.flatten()[order, None]
        return torch.zeros_like(x).index_add_(0, token, ys)

    def _act(self, gate_up: torch.Tensor) -> torch.Tensor:
        limit = self.cfg.swiglu_limit
        if limit is None:
            return self.kernels.silu_and_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        gate = gate.clamp(max=limit)
        return (up.clamp(-limit, limit) + 1) * gate * torch.sigmoid(gate * self.cfg.swiglu_alpha)
