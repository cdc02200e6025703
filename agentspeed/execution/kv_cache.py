"""The paged KV cache tensors: per layer, K and V of shape
[num_pages, page_size, num_kv_heads_local, head_dim]. Page 0 is the null page: padding
entries of page tables point at it and nothing meaningful is ever read from it."""

from __future__ import annotations

import torch

from agentspeed.config import CacheConfig, ModelConfig


def kv_heads_local(cfg: ModelConfig, tp: int) -> int:
    return max(1, cfg.num_kv_heads // tp)


def bytes_per_page(cfg: ModelConfig, cache: CacheConfig, tp: int, dtype: torch.dtype) -> int:
    per_token = 2 * cfg.num_layers * kv_heads_local(cfg, tp) * cfg.head_dim * dtype.itemsize
    return per_token * cache.page_size


class KVCache:
    def __init__(self, cfg: ModelConfig, cache: CacheConfig, tp: int, dtype: torch.dtype, device: str) -> None:
        if cache.num_pages is not None:
            num_pages = cache.num_pages
        else:
            num_pages = cache.kv_cache_memory // bytes_per_page(cfg, cache, tp, dtype)
        if num_pages < 2:
            raise ValueError("KV cache memory too small for even one page")
        self.num_pages = num_pages
        self.page_size = cache.page_size
        shape = (num_pages, cache.page_size, kv_heads_local(cfg, tp), cfg.head_dim)
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(cfg.num_layers)
        ]

    @property
    def num_tokens(self) -> int:
        """Tokens of KV the pool holds, excluding the null page."""
        return (self.num_pages - 1) * self.page_size
