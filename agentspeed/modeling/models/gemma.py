"""Gemma 3 (text): Llama-shaped attention with q/k norm, interleaved sliding-window and
global layers (each with its own RoPE base), norms before and after both attention and MLP,
a GeGLU MLP, embeddings scaled by sqrt(hidden) and a tied head. Gemma stores its RMSNorm
weights as w for a scale of 1 + w; the offset is added once at load. Local SPMD: the
compiler inserts the all-reduces after o_proj and down, before the post-norms."""

from __future__ import annotations

import torch

from agentspeed.config import ModelConfig
from agentspeed.kernels.api import KernelSet
from agentspeed.modeling.comm import Communicator
from agentspeed.modeling.compiler import SpmdModule
from agentspeed.modeling.layers.attention import PagedAttention
from agentspeed.modeling.layers.basic import GeluTanhAndMul, RMSNorm
from agentspeed.modeling.layers.embedding import VocabParallelEmbedding
from agentspeed.modeling.layers.linear import RowParallelLinear, merged_column, qkv_column
from agentspeed.modeling.models.base import CausalLM
from agentspeed.modeling.models.llama import decoder_layer

# Checkpoint name under model.layers.{i}. -> (module key, parameter, part)
_LAYER_WEIGHTS = {
    "input_layernorm.weight": ("attn_norm", "weight", None),
    "self_attn.q_proj.weight": ("qkv", "weight", "q"),
    "self_attn.k_proj.weight": ("qkv", "weight", "k"),
    "self_attn.v_proj.weight": ("qkv", "weight", "v"),
    "self_attn.q_norm.weight": ("attn", "q_norm", None),
    "self_attn.k_norm.weight": ("attn", "k_norm", None),
    "self_attn.o_proj.weight": ("o_proj", "weight", None),
    "post_attention_layernorm.weight": ("post_attn_norm", "weight", None),
    "pre_feedforward_layernorm.weight": ("mlp_norm", "weight", None),
    "mlp.gate_proj.weight": ("gate_up", "weight", "gate"),
    "mlp.up_proj.weight": ("gate_up", "weight", "up"),
    "mlp.down_proj.weight": ("down", "weight", None),
    "post_feedforward_layernorm.weight": ("post_mlp_norm", "weight", None),
}


class Gemma3ForCausalLM(CausalLM):
    def __init__(
        self, cfg: ModelConfig, comm: Communicator, kernels: KernelSet, dtype: torch.dtype, device: str,
        norm_offset: float = 1.0,
    ) -> None:
        """norm_offset: 1 for Hugging Face checkpoints; 0 for GGUF files (llama.cpp's
        converter stores 1 + w)."""
        super().__init__(cfg, cfg.head_dim, device)
        tp = comm.world_size
        H, KVH, D, hidden = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size

        def norm(size: int = hidden) -> RMSNorm:
            return RMSNorm(size, cfg.rms_norm_eps, kernels, dtype, device, offset=norm_offset)

        layers: list[tuple[str, SpmdModule]] = []
        for i in range(cfg.num_layers):
            window = cfg.window(i)
            mods: dict[str, SpmdModule] = {
                "attn_norm": norm(),
                "qkv": qkv_column(hidden, H, KVH, D, False, comm, dtype, device),
                "attn": PagedAttention(
                    i, H // tp, max(1, KVH // tp), D, kernels, cfg.rms_norm_eps, dtype, device,
                    window=window, scale=cfg.attn_scale, norm_offset=norm_offset,
                    local_rope=window is not None and cfg.rope_local_theta is not None,
                ),
                "o_proj": RowParallelLinear(H * D, hidden, False, comm, dtype, device),
                "post_attn_norm": norm(),
                "mlp_norm": norm(),
                "gate_up": merged_column(hidden, {"gate": cfg.intermediate_size, "up": cfg.intermediate_size},
                                         False, comm, dtype, device),
                "act": GeluTanhAndMul(),
                "down": RowParallelLinear(cfg.intermediate_size, hidden, False, comm, dtype, device),
                "post_mlp_norm": norm(),
            }
            layers.append((f"layer{i}", decoder_layer(mods)))
            for name, (key, param, part) in _LAYER_WEIGHTS.items():
                self.targets[f"model.layers.{i}.{name}"] = (mods[key], param, part)
        embed = VocabParallelEmbedding(cfg.vocab_size, hidden, comm, dtype, device)
        self.finish(embed, layers, norm(), comm, dtype, device, embed_scale=hidden**0.5)
