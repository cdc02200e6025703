"""The paged KV cache tensors, one `LayerKV` per layer.

MHA/GQA: K and V of shape [num_pages, page_size, num_kv_heads_local, head_dim].
MLA: one latent tensor [num_pages, page_size, kv_lora_rank + rope_dim], the same on every
tensor-parallel rank (the latent is shared by all heads).
With kv_cache_dtype fp8 the values are float8_e4m3fn and every token row has a float32 scale
([num_pages, page_size] per tensor); bfloat16/float16 store 16-bit values without scales
(on a CPU computing in fp32 that halves the bytes long-context decode reads). Page 0 is the null page: padding entries of page tables
point at it and nothing meaningful is ever read from it."""

from __future__ import annotations

import logging
import os

import torch

from agentspeed.config import CacheConfig, ModelConfig
from agentspeed.modeling.context import LayerKV

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
_SCALE = torch.float32


def kv_heads_local(cfg: ModelConfig, tp: int) -> int:
    return max(1, cfg.num_kv_heads // tp)


_STORAGE = {"fp8": FP8, "bfloat16": torch.bfloat16, "float16": torch.float16}


def storage_dtype(cache: CacheConfig, dtype: torch.dtype) -> torch.dtype:
    """What the cache stores; kernels compute in the model's dtype whatever this is."""
    return _STORAGE.get(cache.kv_cache_dtype, dtype)


def bytes_per_token(cfg: ModelConfig, cache: CacheConfig, tp: int, dtype: torch.dtype) -> int:
    """KV bytes one token costs on this rank, all layers, scales included."""
    item = storage_dtype(cache, dtype).itemsize
    scale = _SCALE.itemsize if cache.kv_cache_dtype == "fp8" else 0
    if cfg.mla is not None:
        per_layer = cfg.mla.cache_dim * item + scale
    else:
        per_layer = 2 * (kv_heads_local(cfg, tp) * cfg.head_dim * item + scale)
    return cfg.num_layers * per_layer


def bytes_per_page(cfg: ModelConfig, cache: CacheConfig, tp: int, dtype: torch.dtype) -> int:
    return bytes_per_token(cfg, cache, tp, dtype) * cache.page_size


def available_cpu_memory() -> int:
    """Bytes of memory the OS reports available (MemAvailable), else free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_cache_bytes(cache: CacheConfig, device: str, useful_max: int) -> int:
    """The KV budget in bytes for this rank (see CacheConfig)."""
    if cache.kv_cache_memory is not None:
        return cache.kv_cache_memory
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        used = total - free
        return max(0, int(total * cache.gpu_memory_utilization) - used)
    return min(int(available_cpu_memory() * cache.cpu_memory_fraction), cache.cpu_kv_cap, useful_max)


class KVCache:
    def __init__(
        self,
        cfg: ModelConfig,
        cache: CacheConfig,
        tp: int,
        dtype: torch.dtype,
        device: str,
        max_tokens_useful: int = 1 << 20,
    ) -> None:
        """max_tokens_useful caps the automatic CPU sizing (no point in more KV than the
        longest context times the most concurrent sequences)."""
        per_page = bytes_per_page(cfg, cache, tp, dtype)
        if cache.num_pages is not None:
            num_pages = cache.num_pages
        else:
            useful = (max_tokens_useful // cache.page_size + 2) * per_page
            num_pages = kv_cache_bytes(cache, device, useful) // per_page
        if num_pages < 2:
            raise ValueError(
                f"KV cache memory too small for even one page of {per_page} bytes: "
                "raise --kv-cache-memory / --gpu-memory-utilization"
            )
        self.num_pages = num_pages
        self.page_size = cache.page_size
        self.bytes_per_token = per_page // cache.page_size
        self.dtype = storage_dtype(cache, dtype)
        fp8 = cache.kv_cache_dtype == "fp8"

        def new(*row: int) -> torch.Tensor:
            return torch.zeros((num_pages, cache.page_size, *row), dtype=self.dtype, device=device)

        def scales() -> torch.Tensor | None:
            return torch.ones((num_pages, cache.page_size), dtype=_SCALE, device=device) if fp8 else None

        if cfg.mla is not None:
            self.layers = [LayerKV(new(cfg.mla.cache_dim), None, scales()) for _ in range(cfg.num_layers)]
            layout = f"latent {cfg.mla.kv_lora_rank}+{cfg.mla.qk_rope_head_dim}"
        else:
            row = (kv_heads_local(cfg, tp), cfg.head_dim)
            self.layers = [LayerKV(new(*row), new(*row), scales(), scales()) for _ in range(cfg.num_layers)]
            layout = f"{row[0]} kv heads x {row[1]}"
        log.info(
            "KV cache: %d pages x %d tokens = %d tokens of KV (%.2f GiB on this rank); "
            "%s, %s, %d bytes/token",
            num_pages - 1, cache.page_size, self.num_tokens, num_pages * per_page / (1 << 30),
            layout, str(self.dtype).removeprefix("torch."), self.bytes_per_token,
        )

    @property
    def num_tokens(self) -> int:
        """Tokens of KV the pool holds, excluding the null page."""
        return (self.num_pages - 1) * self.page_size
