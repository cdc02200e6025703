"""Attention core over the paged KV cache: Shard(-1) qkv in, Shard(-1) attention output out.
Heads are sharded, so everything here is local to the rank."""

from __future__ import annotations

import torch
from torch import nn

from agentspeed.kernels.api import KernelSet
from agentspeed.modeling.compiler import SpmdModule
from agentspeed.modeling.context import ForwardContext
from agentspeed.modeling.layers.weights import LazyTensor, copy_into
from agentspeed.modeling.placement import Shard


class PagedAttention(SpmdModule):
    in_placement = Shard(-1)
    out_placement = Shard(-1)

    def __init__(
        self,
        layer_idx: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        kernels: KernelSet,
        qk_norm_eps: float | None,
        dtype: torch.dtype,
        device: str,
        *,
        window: int | None = None,
        scale: float | None = None,
        norm_offset: float = 0.0,
        local_rope: bool = False,
        sinks: bool = False,
        head_start: int = 0,
    ) -> None:
        """num_heads/num_kv_heads are this rank's (local) counts. qk_norm_eps enables
        per-head RMSNorm on q and k (Qwen3, Gemma 3), whose checkpoint weights are stored
        minus norm_offset (Gemma's 1 + w). window: a sliding window of that many keys;
        scale: the softmax scale (default head_dim^-0.5); local_rope: rotate with the
        model's second (sliding layers') RoPE table; sinks: a learned logit per head in the
        softmax (GPT-OSS), this rank's heads from head_start on."""
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        # Windowed or sink layers take kernels that can mask them; the model's other layers
        # keep theirs (Gemma 3's global layers, for one, stay on the native kernels).
        if window is not None or sinks:
            kernels = kernels.variant(sliding_window=window is not None, attention_sinks=sinks)
        self.kernels = kernels
        self.qk_norm_eps = qk_norm_eps
        self.window = window
        self.norm_offset = norm_offset
        self.local_rope = local_rope
        self.head_start = head_start
        self.sinks: nn.Parameter | None = None
        if sinks:
            self.sinks = nn.Parameter(torch.zeros(num_heads, dtype=torch.float32, device=device), requires_grad=False)
        if qk_norm_eps is not None:
            self.q_norm = nn.Parameter(torch.ones(head_dim, dtype=dtype, device=device), requires_grad=False)
            self.k_norm = nn.Parameter(torch.ones(head_dim, dtype=dtype, device=device), requires_grad=False)

    def load(self, param: str, t: LazyTensor, part: str | None = None) -> None:
        if param == "sinks":
            rows = slice(self.head_start, self.head_start + self.num_heads)
            copy_into(getattr(self, param), t.read_dense(rows), param)
            return
        w = t.read_dense()
        copy_into(getattr(self, param), w.float() + self.norm_offset if self.norm_offset else w, param)

    def forward(self, qkv: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        T = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        ks = self.kernels
        if self.qk_norm_eps is not None:
            q = ks.rms_norm(q, self.q_norm, self.qk_norm_eps)
            k = ks.rms_norm(k, self.k_norm, self.qk_norm_eps)
        q, k = ks.rotary_embedding(q, k, ctx.rope_local if self.local_rope else ctx.rope)
        kv = ctx.kv_caches[self.layer_idx]
        w, sk = self.window, self.sinks
        meta = ctx.attn_window if w is not None and ctx.attn_window is not None else ctx.attn
        ks.store_kv(k, v, kv.k, kv.v, meta.slot_mapping, kv.k_scale, kv.v_scale)
        if meta.is_decode:
            out = ks.paged_attention_decode(q, kv.k, kv.v, meta, self.scale, kv.k_scale, kv.v_scale, w, sk)
        elif meta.decode_split is not None:
            # Decode rows of a mixed step go to the decode kernel (on CPU the native one reads
            # the pages in place; the prefill path would gather each whole context).
            rows, dmeta, pmeta = meta.decode_split
            out = torch.empty_like(q)
            out[:rows] = ks.paged_attention_decode(q[:rows], kv.k, kv.v, dmeta, self.scale, kv.k_scale, kv.v_scale,
                                                   w, sk)
            out[rows:] = ks.paged_attention_prefill(q[rows:], kv.k, kv.v, pmeta, self.scale, kv.k_scale,
                                                    kv.v_scale, w, sk)
        else:
            out = ks.paged_attention_prefill(q, kv.k, kv.v, meta, self.scale, kv.k_scale, kv.v_scale, w, sk)
        return out.reshape(T, self.q_size)
