"""The Llama family: Llama 2/3, SmolLM2, Mistral, Qwen2/2.5 (qkv bias), Qwen3 (q/k norm),
Qwen3-MoE (Qwen3's attention, routed experts in place of the MLP) and GPT-OSS (qkv/o biases,
attention sinks, alternating sliding windows, biased experts with a clamped SwiGLU).

Written as local SPMD: every module states its placements and the compiler adds the
collectives; nothing here talks to other ranks.
"""

from __future__ import annotations

import torch

from agentspeed.config import ModelConfig
from agentspeed.kernels.api import KernelSet
from agentspeed.modeling.comm import Communicator
from agentspeed.modeling.compiler import Chain, Residual, RowBlocks, SpmdModule
from agentspeed.modeling.layers.attention import PagedAttention
from agentspeed.modeling.layers.basic import RMSNorm, SiluAndMul
from agentspeed.modeling.layers.embedding import VocabParallelEmbedding
from agentspeed.modeling.layers.linear import RowParallelLinear, merged_column, qkv_column
from agentspeed.modeling.layers.moe import SparseMoE
from agentspeed.modeling.models.base import CausalLM
from agentspeed.modeling.placement import Replicate


def dense_mlp(
    hidden: int, intermediate: int, comm: Communicator, kernels: KernelSet, dtype: torch.dtype, device: str
) -> dict[str, SpmdModule]:
    """The SwiGLU MLP's modules (after its norm): gate_up (column), act, down (row)."""
    return {
        "gate_up": merged_column(hidden, {"gate": intermediate, "up": intermediate}, False, comm, dtype, device),
        "act": SiluAndMul(kernels, in_place=True),  # over gate_up's own output
        "down": RowParallelLinear(intermediate, hidden, False, comm, dtype, device),
    }


# Most token rows a dense MLP takes at once: a 2048-token prefill step of Qwen2.5-1.5B would
# otherwise hold 2048 x 17920 fp32 gate|up values (147 MB) at its peak (docs/benchmarks.md,
# "Peak memory of a prefill step"). 256 rows (18 MB of gate|up) rather than 512: the int8 K-quant
# GEMMs ran as fast per row at 256 as at 512, Q8_0's fp32 down projection 9-15% slower per row;
# the prefill's mapped activations 97.5 -> 77.6 MB ("Host memory").
MLP_ROWS = 256


def decoder_layer(mods: dict[str, SpmdModule]) -> Chain:
    """Pre-norm residual attention block then MLP block. mods holds attn_norm, the attention
    steps up to o_proj, mlp_norm and the MLP steps (in insertion order); a dense MLP
    (gate_up, act, down) runs MLP_ROWS token rows at a time, its norm included (row-wise too:
    the step's whole normed [T, H] is never held beside the residual and the MLP's output)."""
    names = list(mods)
    split = names.index("mlp_norm")
    attn = Chain([(n, mods[n]) for n in names[:split]], out_placement=Replicate())
    ffn = [(n, mods[n]) for n in names[split:]]
    if [n for n, _ in ffn] == ["mlp_norm", "gate_up", "act", "down"]:
        ffn = [("ffn", RowBlocks(Chain(ffn), MLP_ROWS))]
    mlp = Chain(ffn, out_placement=Replicate())
    return Chain([("attn", Residual(attn)), ("mlp", Residual(mlp))])


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


class LlamaForCausalLM(CausalLM):
    def __init__(
        self, cfg: ModelConfig, comm: Communicator, kernels: KernelSet, dtype: torch.dtype, device: str
    ) -> None:
        super().__init__(cfg, cfg.head_dim, device)
        tp = comm.world_size
        H, KVH, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        layers: list[tuple[str, SpmdModule]] = []
        for i in range(cfg.num_layers):
            mods: dict[str, SpmdModule] = {
                "attn_norm": RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels, dtype, device),
                "qkv": qkv_column(cfg.hidden_size, H, KVH, D, cfg.attention_bias, comm, dtype, device),
                "attn": PagedAttention(
                    i, H // tp, max(1, KVH // tp), D, kernels,
                    cfg.rms_norm_eps if cfg.qk_norm else None, dtype, device,
                    window=cfg.window(i), sinks=cfg.attention_sinks, head_start=comm.rank * (H // tp),
                ),
                "o_proj": RowParallelLinear(H * D, cfg.hidden_size, cfg.o_proj_bias, comm, dtype, device),
                "mlp_norm": RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels, dtype, device),
            }
            if cfg.moe is not None and cfg.moe.is_moe_layer(i):
                mods["moe"] = moe = SparseMoE(cfg.hidden_size, cfg.moe, False, comm, kernels, dtype, device)
                gpt_oss = cfg.architecture == "GptOssForCausalLM"
                prefix = f"model.layers.{i}."
                if gpt_oss:  # safetensors' 3-D expert tensors, or GGUF's per-expert ones
                    hf, gguf = moe.gpt_oss_targets(prefix), moe.gpt_oss_gguf_targets(prefix)
                    self.targets.update({**hf, **gguf})
                    self.alternatives.append((frozenset(hf.keys() - gguf.keys()), frozenset(gguf.keys() - hf.keys())))
                else:
                    self.targets.update(moe.checkpoint_targets(prefix))
            else:
                mods.update(dense_mlp(cfg.hidden_size, cfg.intermediate_size, comm, kernels, dtype, device))
            if cfg.attention_sinks:
                self.targets[f"model.layers.{i}.self_attn.sinks"] = (mods["attn"], "sinks", None)
            layers.append((f"layer{i}", decoder_layer(mods)))
            for name, (key, part) in _LAYER_WEIGHTS.items():
                if key not in mods:
                    continue
                param = name.rsplit(".", 1)[1]
                if key == "attn":
                    param, part = part or param, None
                self.targets[f"model.layers.{i}.{name}"] = (mods[key], param, part)
        embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, comm, dtype, device)
        norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels, dtype, device)
        self.finish(embed, layers, norm, comm, dtype, device)

    def required_weights(self) -> set[str]:
        """Checkpoint names that must be present (biases and q/k norms only when configured)."""
        need = set()
        for name in self.targets.keys() - self.alternative_names():
            if name.endswith("o_proj.bias") and not self.cfg.o_proj_bias:
                continue
            if name.endswith("_proj.bias") and "o_proj" not in name and not self.cfg.attention_bias:
                continue
            if ("q_norm" in name or "k_norm" in name) and not self.cfg.qk_norm:
                continue
            need.add(name)
        return need
