"""Per-forward context handed to every SPMD module (built by the execution plane)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from agentspeed.kernels.api import AttentionMetadata


@dataclass(slots=True)
class ForwardContext:
    positions: torch.Tensor  # [T] int64, position of every flattened token
    attn: AttentionMetadata
    kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]]  # per layer (k_cache, v_cache)
    logits_indices: torch.Tensor  # [B'] rows of the flattened tokens whose logits are wanted
    rope: torch.Tensor | None = None  # [T, rot] cos|sin per token; the model fills it once
