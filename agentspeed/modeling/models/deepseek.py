"""DeepSeek-V2/V3: multi-head latent attention (with or without q LoRA, YaRN rope) and a
mixture-of-experts FFN (routed top-k with group-limited routing, shared experts, dense first
layers). Local SPMD like every model here: heads and expert intermediates are sharded, the
compiler inserts the all-reduces after o_proj and after each MLP block."""

from __future__ import annotations

import torch

from agentspeed.config import ModelConfig
from agentspeed.kernels.api import KernelSet
from agentspeed.modeling.comm import Communicator
from agentspeed.modeling.compiler import SpmdModule
from agentspeed.modeling.layers.basic import RMSNorm
from agentspeed.modeling.layers.embedding import VocabParallelEmbedding
from agentspeed.modeling.layers.linear import RowParallelLinear
from agentspeed.modeling.layers.mla import MLAttention
from agentspeed.modeling.layers.moe import SparseMoE
from agentspeed.modeling.models.base import CausalLM
from agentspeed.modeling.models.llama import decoder_layer, dense_mlp

# Checkpoint name under model.layers.{i}. -> (module key, parameter, part)
_ATTN_WEIGHTS = {
    "input_layernorm.weight": ("attn_norm", "weight", None),
    "self_attn.q_proj.weight": ("q_proj", "weight", "q"),
    "self_attn.q_a_proj.weight": ("q_a_proj", "weight", None),
    "self_attn.q_a_layernorm.weight": ("q_a_layernorm", "weight", None),
    "self_attn.q_b_proj.weight": ("q_b_proj", "weight", "q"),
    "self_attn.kv_a_proj_with_mqa.weight": ("kv_a_proj_with_mqa", "weight", None),
    "self_attn.kv_a_layernorm.weight": ("kv_a_layernorm", "weight", None),
    "self_attn.kv_b_proj.weight": ("attn", "w_kv_b", None),
    "self_attn.o_proj.weight": ("o_proj", "weight", None),
    "post_attention_layernorm.weight": ("mlp_norm", "weight", None),
}
_DENSE_WEIGHTS = {
    "mlp.gate_proj.weight": ("gate_up", "weight", "gate"),
    "mlp.up_proj.weight": ("gate_up", "weight", "up"),
    "mlp.down_proj.weight": ("down", "weight", None),
}


class DeepseekForCausalLM(CausalLM):
    def __init__(
        self, cfg: ModelConfig, comm: Communicator, kernels: KernelSet, dtype: torch.dtype, device: str
    ) -> None:
        mla, moe = cfg.mla, cfg.moe
        if mla is None:
            raise ValueError("a DeepSeek model needs an MLA config")
        super().__init__(cfg, mla.qk_rope_head_dim, device)
        layers: list[tuple[str, SpmdModule]] = []
        for i in range(cfg.num_layers):
            attn = MLAttention(i, cfg, comm, kernels, dtype, device)
            mods: dict[str, SpmdModule] = {
                "attn_norm": RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels, dtype, device),
                "attn": attn,
                "o_proj": RowParallelLinear(cfg.num_heads * mla.v_head_dim, cfg.hidden_size, False, comm, dtype, device),
                "mlp_norm": RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels, dtype, device),
            }
            prefix = f"model.layers.{i}."
            for name, (key, param, part) in _ATTN_WEIGHTS.items():
                owner = mods[key] if key in mods else getattr(attn, key, None)
                if owner is not None:
                    self.targets[prefix + name] = (owner, param, part)
            if moe is None or not moe.is_moe_layer(i):
                mods.update(dense_mlp(cfg.hidden_size, cfg.intermediate_size, comm, kernels, dtype, device))
                for name, (key, param, part) in _DENSE_WEIGHTS.items():
                    self.targets[prefix + name] = (mods[key], param, part)
            else:
                v3 = cfg.architecture == "DeepseekV3ForCausalLM"
                experts = SparseMoE(cfg.hidden_size, moe, v3, comm, kernels, dtype, device)
                mods["moe"] = experts
                self.targets.update(experts.checkpoint_targets(prefix))
            layers.append((f"layer{i}", decoder_layer(mods)))
        embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, comm, dtype, device)
        norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels, dtype, device)
        self.finish(embed, layers, norm, comm, dtype, device)
