"""Per-forward context handed to every SPMD module (built by the execution plane)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from agentspeed.kernels.api import AttentionMetadata


@dataclass(frozen=True, slots=True)
class LayerKV:
    """One layer's paged KV cache, owned by the execution plane.

    MHA/GQA: k and v are [num_pages, page_size, kv_heads, head_dim]. MLA: k is the latent
    cache [num_pages, page_size, kv_lora_rank + rope_dim] and v is None. When the cache is
    fp8, k_scale/v_scale hold one float32 scale per token [num_pages, page_size]
    (stored * scale = value); otherwise they are None.
    """

    k: torch.Tensor
    v: torch.Tensor | None = None
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None


@dataclass(slots=True)
class ForwardContext:
    positions: torch.Tensor  # [T] int64, position of every flattened token
    attn: AttentionMetadata
    kv_caches: Sequence[LayerKV]  # per layer
    logits_indices: torch.Tensor  # [B'] rows of the flattened tokens whose logits are wanted
    rope: torch.Tensor | None = None  # [T, rot] cos|sin per token; the model fills it once
    rope_local: torch.Tensor | None = None  # the same from a second table (Gemma 3's sliding layers)
    # The sliding-window layers' metadata when they have their own page table (a hybrid KV
    # cache whose window pages are given back); None: they use attn like every layer.
    attn_window: AttentionMetadata | None = None
