"""The Llama family: Llama 2/3, SmolLM2, Mistral, Qwen2/2.5 (qkv bias), Qwen3 (q/k norm).

Written as local SPMD: every module states its placements and the compiler adds the
collectives; nothing here talks to other ranks.
"""

from __future__ import annotations

import torch
from torch import nn

from agentspeed.config import ModelConfig
from agentspeed.kernels.api import KernelSet
from agentspeed.modeling.comm import Communicator
from agentspeed.modeling.compiler import Chain, Insertion, Residual, SpmdModule, compile_placements
from agentspeed.modeling.context import ForwardContext
from agentspeed.modeling.layers.attention import PagedAttention
from agentspeed.modeling.layers.basic import RMSNorm, SiluAndMul
from agentspeed.modeling.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from agentspeed.modeling.layers.linear import RowParallelLinear, merged_column, qkv_column
from agentspeed.modeling.layers.rotary import cos_sin_table
from agentspeed.modeling.placement import Replicate

# Checkpoint name -> (target key, part). Target keys are filled per layer in __init__.
_LAYER_WEIGHTS = {
    "input_layernorm.weight": ("attn_norm", None),
    "self_attn.q_proj.weight": ("qkv", "q"),
    "self_attn.k_proj.weight": ("qkv", "k"),
    "self_attn.v_proj.weight": ("qkv", "v"),
    "self_attn.q_proj.bias": ("qkv", "q"),
    "self_attn.k_proj.bias": ("qkv", "k"),
    "self_attn.v_proj.bias": ("qkv", "v"),
    "self_attn.q_norm.weight": ("attn", "q_norm"),
    "self_attn.k_norm.weight": ("attn", "k_norm"),
    "self_attn.o_proj.weight": ("o_proj", None),
    "self_attn.o_proj.bias": ("o_proj", None),
    "post_attention_layernorm.weight": ("mlp_norm", None),
    "mlp.gate_proj.weight": ("gate_up", "gate"),
    "mlp.up_proj.weight": ("gate_up", "up"),
    "mlp.down_proj.weight": ("down", None),
}


class LlamaForCausalLM(nn.Module):
    """forward(input_ids [T], ctx) -> fp32 logits [len(ctx.logits_indices), vocab_size],
    replicated on every rank."""

    def __init__(
        self, cfg: ModelConfig, comm: Communicator, kernels: KernelSet, dtype: torch.dtype, device: str
    ) -> None:
        super().__init__()
        self.cfg = cfg
        tp = comm.world_size
        H, KVH, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # One RoPE table for all layers; each forward gathers its tokens' rows once.
        self.cos_sin: torch.Tensor
        self.register_buffer(
            "cos_sin",
            cos_sin_table(D, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling, device),
            persistent=False,
        )
        # target key -> (module, parameter name, part)
        self.targets: dict[str, tuple[SpmdModule, str, str | None]] = {}

        embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, comm, dtype, device)
        self.targets["model.embed_tokens.weight"] = (embed, "weight", None)
        steps: list[tuple[str, SpmdModule]] = [("embed_tokens", embed)]
        for i in range(cfg.num_layers):
            mods: dict[str, SpmdModule] = {
                "attn_norm": RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels, dtype, device),
                "qkv": qkv_column(cfg.hidden_size, H, KVH, D, cfg.attention_bias, comm, dtype, device),
                "attn": PagedAttention(
                    i, H // tp, max(1, KVH // tp), D, kernels,
                    cfg.rms_norm_eps if cfg.qk_norm else None, dtype, device,
                ),
                "o_proj": RowParallelLinear(H * D, cfg.hidden_size, cfg.o_proj_bias, comm, dtype, device),
                "mlp_norm": RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels, dtype, device),
                "gate_up": merged_column(
                    cfg.hidden_size, {"gate": cfg.intermediate_size, "up": cfg.intermediate_size},
                    False, comm, dtype, device,
                ),
                "act": SiluAndMul(kernels),
                "down": RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, False, comm, dtype, device),
            }
            attn_block = Chain(
                [(n, mods[n]) for n in ("attn_norm", "qkv", "attn", "o_proj")], out_placement=Replicate()
            )
            mlp_block = Chain(
                [(n, mods[n]) for n in ("mlp_norm", "gate_up", "act", "down")], out_placement=Replicate()
            )
            steps.append((f"layer{i}", Chain([("attn", Residual(attn_block)), ("mlp", Residual(mlp_block))])))
            for name, (key, part) in _LAYER_WEIGHTS.items():
                param = name.rsplit(".", 1)[1]
                if key == "attn":
                    param, part = part or param, None
                self.targets[f"model.layers.{i}.{name}"] = (mods[key], param, part)
        norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels, dtype, device)
        self.targets["model.norm.weight"] = (norm, "weight", None)
        steps.append(("norm", norm))
        # Token ids come in replicated; hidden states leave replicated.
        self.body = Chain(steps, in_placement=Replicate(), out_placement=Replicate())

        lm_head = ParallelLMHead(
            cfg.vocab_size, cfg.hidden_size, comm, dtype, device,
            tied_to=embed if cfg.tie_word_embeddings else None,
        )
        if not cfg.tie_word_embeddings:
            self.targets["lm_head.weight"] = (lm_head, "weight", None)
        self.head = Chain([("lm_head", lm_head)], out_placement=Replicate())
        self.collectives: list[Insertion] = compile_placements(self, comm)

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        ctx.rope = self.cos_sin[ctx.positions]
        hidden = self.body(input_ids, ctx)
        logits = self.head(hidden[ctx.logits_indices], ctx)
        return logits[:, : self.cfg.vocab_size].float()

    def required_weights(self) -> set[str]:
        """Checkpoint names that must be present (biases and q/k norms only when configured)."""
        need = set()
        for name in self.targets:
            if name.endswith("o_proj.bias") and not self.cfg.o_proj_bias:
                continue
            if name.endswith("_proj.bias") and "o_proj" not in name and not self.cfg.attention_bias:
                continue
            if ("q_norm" in name or "k_norm" in name) and not self.cfg.qk_norm:
                continue
            need.add(name)
        return need
