"""Decode steps of a Llama-family model in one native call per run of layers (CPU).

`FusedDecode.of(model)` reads the model's own modules after their weights are prepared and,
where every layer is a pre-norm attention block (RMSNorm, packed q|k|v, optional per-head
q/k norm, NeoX RoPE, paged attention without window or sinks, packed o_proj) followed by a
dense SwiGLU MLP of packed projections or by routed experts, and every op is the
`cpu_native` backend's (linear in its default mode) with no collective anywhere (tensor-parallel
size 1), builds kernels/cpu_decode.py's per-layer arguments. Decode steps of up to 8 token
rows (sequences adding one token each, or drafts being verified) then run the layers natively, Qwen3-MoE's routing and packed
experts included (experts routed otherwise run by their module between runs of native
layers); the embedding, the final norm and the LM head stay with their modules. Anything
else (prefill, mixed steps, sliding windows, fp8 caches, TP, other backends) takes
the modules' path: the same values either way, so the choice is speed only
(tests/test_cpu_decode.py holds the two paths bit-equal; routed experts given the same
routing, torch's router product rounding differently by ~1e-7).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from agentspeed.modeling.compiler import Chain, Residual, RowBlocks
from agentspeed.modeling.context import ForwardContext
from agentspeed.modeling.layers.attention import PagedAttention
from agentspeed.modeling.layers.basic import RMSNorm, SiluAndMul
from agentspeed.modeling.layers.linear import ColumnParallelLinear, RowParallelLinear
from agentspeed.modeling.layers.moe import SparseMoE

if TYPE_CHECKING:  # imported where used: it loads the native library, which may be unavailable
    from agentspeed.kernels import cpu_decode

log = logging.getLogger(__name__)


def _native_ops() -> dict[str, Any] | None:
    from agentspeed.kernels import cpu_native

    if cpu_native._fn is None:
        return None
    return {"rms_norm": cpu_native.rms_norm, "rotary_embedding": cpu_native.rotary_embedding,
            "paged_attention_decode": cpu_native.paged_attention_decode,
            "silu_and_mul": cpu_native.silu_and_mul, "linear": cpu_native.linear}


def _no_collectives(chain: Chain) -> bool:
    """Every boundary of the chain is a no-op: none, or a collective over one rank."""
    assert chain._plan is not None
    return all(b is None or b.comm.world_size == 1 for b in (chain._exit, *(b for b, _ in chain._plan)))


def _fp32(t: torch.Tensor | None) -> bool:
    return t is None or (t.dtype == torch.float32 and t.is_contiguous())


class _Refused(Exception):
    """Why a layer cannot take the native path (logged once at build)."""


def _layer(layer: Any, ops: dict[str, Any]) -> tuple[cpu_decode.LayerWeights, PagedAttention, Any]:
    """One decoder layer's weights, its attention module and, for routed experts, the MLP
    block the caller runs (else None)."""
    from agentspeed.kernels import cpu_decode

    def need(ok: bool, why: str) -> None:
        if not ok:
            raise _Refused(why)

    need(isinstance(layer, Chain) and layer.step_names == ["attn", "mlp"], "not a decoder layer")
    attn_res, mlp_res = layer.steps()
    need(isinstance(attn_res, Residual) and isinstance(mlp_res, Residual), "not residual blocks")
    attn_chain, mlp_chain = attn_res.body, mlp_res.body
    need(all(_no_collectives(c) for c in (layer, attn_chain, mlp_chain)), "collectives (tensor parallel)")
    need(attn_chain.step_names == ["attn_norm", "qkv", "attn", "o_proj"], "attention block layout")
    norm, qkv, attn, o = attn_chain.steps()
    need(isinstance(norm, RMSNorm) and isinstance(qkv, ColumnParallelLinear) and isinstance(attn, PagedAttention)
         and isinstance(o, RowParallelLinear), "attention block modules")
    need(attn.window is None and attn.sinks is None and not attn.local_rope, "sliding window or sinks")
    need(norm.kernels.rms_norm is ops["rms_norm"] and attn.kernels.rms_norm is ops["rms_norm"]
         and attn.kernels.rotary_embedding is ops["rotary_embedding"]
         and attn.kernels.paged_attention_decode is ops["paged_attention_decode"], "kernel backends")
    need(qkv._linear is ops["linear"] and o._linear is ops["linear"], "linear backend")
    need(cpu_decode.packed_args(qkv._w) is not None and cpu_decode.packed_args(o._w) is not None,
         "projections not packed integer types")
    qk = attn.qk_norm_eps is not None
    need(_fp32(norm.weight) and _fp32(qkv.bias) and _fp32(o.bias)
         and (not qk or (_fp32(attn.q_norm) and _fp32(attn.k_norm))), "fp32 norms and biases")
    mlp_norm = gate_up = down = experts = None
    moe_block = None
    names = mlp_chain.step_names
    if names == ["ffn"] and isinstance(mlp_chain.steps()[0], RowBlocks):
        ffn = mlp_chain.steps()[0].body
        need(_no_collectives(ffn) and ffn.step_names == ["mlp_norm", "gate_up", "act", "down"], "MLP layout")
        mlp_norm, gate_up, act, down = ffn.steps()
        need(isinstance(mlp_norm, RMSNorm) and isinstance(gate_up, ColumnParallelLinear)
             and isinstance(act, SiluAndMul) and isinstance(down, RowParallelLinear), "MLP modules")
        need(mlp_norm.kernels.rms_norm is ops["rms_norm"] and act.kernels.silu_and_mul is ops["silu_and_mul"]
             and gate_up._linear is ops["linear"] and down._linear is ops["linear"], "MLP backends")
        need(gate_up.bias is None and down.bias is None and _fp32(mlp_norm.weight)
             and cpu_decode.packed_args(gate_up._w) is not None and cpu_decode.packed_args(down._w) is not None,
             "MLP projections not packed integer types")
    elif names == ["mlp_norm", "moe"] and isinstance(mlp_chain.steps()[1], SparseMoE):
        mlp_norm, moe = mlp_chain.steps()
        experts = _qwen3_experts(moe, mlp_norm, ops)
        if experts is None:  # other routing: the module runs it, between runs of native layers
            moe_block, mlp_norm = mlp_res, None
    else:
        raise _Refused("MLP block layout")
    w = cpu_decode.LayerWeights(
        attn_norm=norm.weight, qkv=qkv._w, qkv_bias=qkv.bias,
        q_norm=attn.q_norm if qk else None, k_norm=attn.k_norm if qk else None,
        o=o._w, o_bias=o.bias, mlp_norm=None if mlp_norm is None else mlp_norm.weight,
        gate_up=None if gate_up is None else gate_up._w, down=None if down is None else down._w,
        moe=experts, eps=norm.eps, qk_eps=attn.qk_norm_eps or 0.0, scale=attn.scale,
        heads=attn.num_heads, kv_heads=attn.num_kv_heads, head_dim=attn.head_dim)
    if mlp_norm is not None:
        need(mlp_norm.eps == norm.eps, "MLP norm eps differs")
    return w, attn, moe_block


def _qwen3_experts(moe: SparseMoE, norm: Any, ops: dict[str, Any]) -> cpu_decode.RoutedExperts | None:
    """The layer's experts for the native loop where they are packed in SparseMoE's fused
    call (mode auto or int16) behind Qwen3-MoE's routing (softmax, greedy top k, no
    biases, groups or shared experts, plain SwiGLU); None otherwise."""
    from agentspeed.kernels import cpu_decode, cpu_ggml

    c = moe.cfg
    if not (isinstance(norm, RMSNorm) and norm.kernels.rms_norm is ops["rms_norm"] and _fp32(norm.weight)
            and isinstance(moe._fused, cpu_ggml.FusedMoE) and norm.weight.shape[0] == moe._fused.plan.N
            and c.scoring == "softmax" and c.topk_method == "greedy" and c.num_groups == 1 and c.num_shared == 0
            and moe.bias is None and moe.router_bias is None and moe.b13 is None and moe.b2 is None
            and c.swiglu_limit is None and _fp32(moe.gate)):
        return None
    return cpu_decode.RoutedExperts(moe.gate.data, moe._fused, c.top_k, c.norm_topk_prob, c.routed_scaling_factor)


class FusedDecode:
    """The model's decode steps through kernels/cpu_decode.py; see the module docstring."""

    def __init__(self, embed: Any, runs: list[tuple[cpu_decode.DecodeLayers, list[int], Any]], norm: Any) -> None:
        """runs: (native layers, their layer indices, the MLP block to run after them or None)."""
        self.embed, self.runs, self.norm = embed, runs, norm
        self.layers = sum(len(idx) for _, idx, _ in runs)
        from agentspeed.kernels import cpu_decode, cpu_native

        self._step, self.max_rows, self._split = cpu_decode.Step, cpu_decode.MAX_ROWS, cpu_native.SPLIT_TOKENS

    @staticmethod
    def of(model: Any) -> FusedDecode | None:
        """For a built CausalLM whose weights are prepared; None (the reason logged) where its
        layers do not all take the native path."""
        ops = _native_ops()
        if ops is None:
            return None
        from agentspeed.kernels import cpu_decode

        body = model.body
        names = body.step_names
        if not (isinstance(body, Chain) and _no_collectives(body) and names[0] == "embed_tokens"
                and names[-1] == "norm"):
            return None
        steps = body.steps()
        runs: list[tuple[cpu_decode.DecodeLayers, list[int], Any]] = []
        pending: list[cpu_decode.LayerWeights] = []
        idx: list[int] = []
        try:
            for name, layer in zip(names[1:-1], steps[1:-1]):
                if not name.startswith("layer"):
                    raise _Refused(f"{name} before the layers")
                w, attn, moe_block = _layer(layer, ops)
                pending.append(w)
                idx.append(attn.layer_idx)
                if moe_block is not None:
                    runs.append((cpu_decode.DecodeLayers(pending, model.cfg.hidden_size), idx, moe_block))
                    pending, idx = [], []
        except _Refused as e:
            log.info("decode steps run layer by layer: %s", e)
            return None
        if pending:
            runs.append((cpu_decode.DecodeLayers(pending, model.cfg.hidden_size), idx, None))
        fused = FusedDecode(steps[0], runs, steps[-1])
        log.info("decode steps of up to %d token rows: %d layers in %d native call(s)",
                 cpu_decode.MAX_ROWS, fused.layers, len(runs))
        return fused

    def takes(self, ctx: ForwardContext) -> bool:
        """Whether this step is one the native layers run: up to MAX_ROWS token rows, each
        sequence's one new token or drafts being verified (a decode step: the decode attention
        kernel's), one page table for every layer, caches of a type they store."""
        a = ctx.attn
        if (ctx.positions.shape[0] > self.max_rows or not a.is_decode or a.decode_split is not None
                or ctx.attn_window is not None or ctx.rope is None):
            return False
        for run, idx, _ in self.runs:
            kvs = [ctx.kv_caches[i] for i in idx]
            if any(kv.v is None or kv.k_scale is not None for kv in kvs):
                return False
            if not run.bind_caches([(kv.k, kv.v) for kv in kvs]):  # type: ignore[misc]
                return False
        return True

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The body's output (final norm applied) for a step `takes` accepted."""
        a = ctx.attn
        assert ctx.rope is not None
        x = self.embed.forward(input_ids, ctx)
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        k0 = ctx.kv_caches[self.runs[0][1][0]].k
        one_each = ctx.positions.shape[0] == len(a.query_lens_cpu)  # as the decode attention wrapper
        step = self._step(ctx.rope, a.slot_mapping, a.page_table, a.seq_lens, None if one_each else a.query_start_loc,
                          a.page_size, k0.numel() // (k0.shape[-2] * k0.shape[-1]), self._split)
        for run, _, moe_block in self.runs:
            run.run(x, step)
            if moe_block is not None:
                x = moe_block.forward(x, ctx)
                if not x.is_contiguous():
                    x = x.contiguous()
        return self.norm.forward(x, ctx)
