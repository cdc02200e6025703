"""Multi-head latent attention (DeepSeek-V2/V3): Replicate hidden states in, Shard(-1)
per-head outputs out (o_proj, row-parallel, follows).

Every rank computes the full latent (kv_a projection, one kv_lora_rank vector + one shared
roped key per token) and stores it in its latent cache; heads, and so q projections and the
per-head up-projection kv_b, are sharded. Nothing here talks to other ranks.

Decode uses the absorbed form: q_nope is multiplied into the latent space by W_UK, attention
runs directly over the latent cache, and the latent output is projected by W_UV; no per-head
K/V is ever materialised. Prefill uses the expanded form (`mla_prefill`): the context's
latents are up-projected to per-head K/V and attended like MHA. Per layer, for q new tokens over a context of L (causal
halves the attention terms when q = L), expanded costs L*H*(nope+v)*lora MACs to expand
plus q*L*H*(qk+v) to attend; absorbed costs q*L*H*(2*lora+rope) plus q*H*lora*(nope+v) for
the projections. With DeepSeek-V3's dims a fresh 4K prompt is ~3x cheaper expanded; absorbed
only wins below ~170 new tokens over a long cached context (a candidate for a future
per-sequence choice in a backend).
"""

from __future__ import annotations

import torch
from torch import nn

from agentspeed.config import ModelConfig
from agentspeed.kernels.api import KernelSet
from agentspeed.modeling.comm import Communicator
from agentspeed.modeling.compiler import SpmdModule
from agentspeed.modeling.context import ForwardContext
from agentspeed.modeling.layers.basic import RMSNorm
from agentspeed.modeling.layers.linear import ReplicatedLinear, even_split, merged_column
from agentspeed.modeling.layers.rotary import softmax_scale_factor
from agentspeed.modeling.layers.weights import LazyTensor, copy_into
from agentspeed.modeling.placement import Replicate, Shard

# transformers builds q_a_layernorm / kv_a_layernorm with the default eps, not rms_norm_eps.
_LATENT_NORM_EPS = 1e-6


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """[..., (x0, x1), (x2, x3), ...] -> [..., x0, x2, ..., x1, x3, ...]: DeepSeek rotates
    adjacent pairs; after this permutation the usual NeoX rotation (halves) is the same map.
    q and k get the same permutation, so their dot products are unchanged."""
    return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


class MLAttention(SpmdModule):
    in_placement = Replicate()
    out_placement = Shard(-1)

    def __init__(
        self, layer_idx: int, cfg: ModelConfig, comm: Communicator, kernels: KernelSet,
        dtype: torch.dtype, device: str,
    ) -> None:
        super().__init__()
        mla = cfg.mla
        assert mla is not None, "MLAttention needs an MLA config"
        self.layer_idx = layer_idx
        self.kernels = kernels
        self.num_heads, head_start = even_split(cfg.num_heads, comm, "num_attention_heads")
        self.head_start = head_start
        self.nope, self.rope, self.v_dim = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
        self.lora = mla.kv_lora_rank
        self.interleave = mla.rope_interleave
        self.scale = mla.qk_head_dim**-0.5 * softmax_scale_factor(cfg.rope_scaling)
        q_out = {"q": cfg.num_heads * mla.qk_head_dim}
        self.q_lora = mla.q_lora_rank is not None
        if mla.q_lora_rank is not None:
            self.q_a_proj = ReplicatedLinear(cfg.hidden_size, mla.q_lora_rank, dtype, device)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, _LATENT_NORM_EPS, kernels, dtype, device)
            self.q_b_proj = merged_column(mla.q_lora_rank, q_out, False, comm, dtype, device)
        else:
            self.q_proj = merged_column(cfg.hidden_size, q_out, False, comm, dtype, device)
        self.kv_a_proj_with_mqa = ReplicatedLinear(cfg.hidden_size, mla.cache_dim, dtype, device)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, _LATENT_NORM_EPS, kernels, dtype, device)
        # kv_b_proj [H * (nope + v), lora] viewed per head; this rank keeps its heads.
        self.w_kv_b = nn.Parameter(
            torch.empty(self.num_heads, self.nope + self.v_dim, self.lora, dtype=dtype, device=device),
            requires_grad=False,
        )

    def load(self, param: str, t: LazyTensor, part: str | None = None) -> None:
        assert param == "w_kv_b", param
        per_head = self.nope + self.v_dim
        rows = slice(self.head_start * per_head, (self.head_start + self.num_heads) * per_head)
        copy_into(self.w_kv_b, t.read_dense(rows).view(self.num_heads, per_head, self.lora), "kv_b_proj.weight")

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        T = x.shape[0]
        ks = self.kernels
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q_nope, q_pe = q.view(T, self.num_heads, self.nope + self.rope).split([self.nope, self.rope], -1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.lora, self.rope], -1)
        latent = self.kv_a_layernorm(latent)
        k_pe = k_pe[:, None]
        if self.interleave:
            q_pe, k_pe = deinterleave(q_pe), deinterleave(k_pe)
        q_pe, k_pe = ks.rotary_embedding(q_pe, k_pe, ctx.rope)
        kv = ctx.kv_caches[self.layer_idx]
        ks.store_mla_kv(torch.cat((latent, k_pe[:, 0]), -1), kv.k, ctx.attn.slot_mapping, kv.k_scale)
        if ctx.attn.is_decode:
            w_uk, w_uv = self.w_kv_b[:, : self.nope], self.w_kv_b[:, self.nope :]
            # [H, T, nope] @ [H, nope, lora] -> queries in latent space
            q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)
            o = ks.mla_decode(torch.cat((q_lat, q_pe), -1), kv.k, ctx.attn, self.scale, self.lora, kv.k_scale)
            # [H, T, lora] @ [H, lora, v] -> per-head values
            out = torch.bmm(o.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)
        else:
            out = ks.mla_prefill(q_nope, q_pe, kv.k, self.w_kv_b, ctx.attn, self.scale, kv.k_scale)
        return out.reshape(T, self.num_heads * self.v_dim)
