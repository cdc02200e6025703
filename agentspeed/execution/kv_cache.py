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
from agentspeed.execution.host_alloc import lazy_zeros
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


def window_group(cfg: ModelConfig, max_model_len: int) -> tuple[int, tuple[int, ...]] | None:
    """(window, layers) when the model's sliding-window layers can give pages back: they all
    share one window, shorter than the context. None otherwise (one table for all layers)."""
    if cfg.mla is not None:
        return None
    windows = {cfg.window(i) for i in range(cfg.num_layers)} - {None}
    if len(windows) != 1:
        return None
    w = windows.pop()
    assert w is not None
    if w >= max_model_len:
        return None
    return w, tuple(i for i in range(cfg.num_layers) if cfg.window(i) is not None)


# The window layers' pool gets this share of the full pool's page count (a window per
# sequence is all a running request needs; the rest caches the last window of finished
# turns for their next turn's prefix hit), and never less than one request needs.
WINDOW_POOL_SHARE = 4


def window_pages(full: int, min_window: int) -> int:
    """The window pool's pages beside a full pool of `full`: a WINDOW_POOL_SHARE-th of it,
    at least min_window, at most as many."""
    return min(full, max(-(-full // WINDOW_POOL_SHARE), min_window))


def split_pages(budget: int, full_layers: int, window_layers: int, layer_page: int, min_window: int,
                max_full: int) -> tuple[int, int]:
    """(full pages, window pages) for `budget` bytes when a page of one layer costs
    layer_page bytes: the window pool a WINDOW_POOL_SHARE-th of the full one's pages (at
    least min_window, at most as many), the full one the rest. Without full layers the full
    pool only keeps the prefix index (no memory): max_full pages."""
    if full_layers == 0:
        return max_full, min(max_full, budget // (window_layers * layer_page))
    full = budget * WINDOW_POOL_SHARE // ((WINDOW_POOL_SHARE * full_layers + window_layers) * layer_page)
    window = window_pages(full, min_window)
    full = min(full, (budget - window * window_layers * layer_page) // (full_layers * layer_page))
    return full, min(window, full)


class KVCache:
    def __init__(
        self,
        cfg: ModelConfig,
        cache: CacheConfig,
        tp: int,
        dtype: torch.dtype,
        device: str,
        max_tokens_useful: int = 1 << 20,
        window: tuple[int, tuple[int, ...]] | None = None,
        chunk_tokens: int = 2048,
    ) -> None:
        """max_tokens_useful caps the automatic CPU sizing (no point in more KV than the
        longest context times the most concurrent sequences). window: (window, layers) from
        window_group for a hybrid cache, whose window layers get their own, smaller pool
        (chunk_tokens: a step's token budget, for the least that pool may have)."""
        per_page = bytes_per_page(cfg, cache, tp, dtype)
        ps = cache.page_size
        self.window: int | None = window[0] if window is not None else None
        self.window_layers: tuple[int, ...] = window[1] if window is not None else ()
        n_win = len(self.window_layers)
        layer_page = per_page // cfg.num_layers
        min_window = -(-((self.window or 0) + chunk_tokens) // ps) + 3
        useful_pages = max_tokens_useful // ps + 2
        if cache.num_pages is not None:
            num_pages = cache.num_pages
            wpages = window_pages(num_pages, min_window)
        else:
            budget = kv_cache_bytes(cache, device, useful_pages * per_page)
            if n_win:
                num_pages, wpages = split_pages(budget, cfg.num_layers - n_win, n_win, layer_page, min_window,
                                                useful_pages)
            else:
                num_pages, wpages = budget // per_page, 0
        if cache.window_num_pages is not None:
            wpages = cache.window_num_pages
        if num_pages < 2 or (n_win and wpages < 2):
            raise ValueError(
                f"KV cache memory too small for even one page of {per_page} bytes: "
                "raise --kv-cache-memory / --gpu-memory-utilization"
            )
        self.num_pages = num_pages
        self.window_num_pages = wpages if n_win else 0
        self.page_size = ps
        self.bytes_per_token = per_page // ps
        self.dtype = storage_dtype(cache, dtype)
        fp8 = cache.kv_cache_dtype == "fp8"

        def new(pages: int, *row: int) -> torch.Tensor:
            if str(device) == "cpu":  # resident as pages fill, not at startup (host_alloc.lazy_zeros)
                return lazy_zeros((pages, ps, *row), self.dtype)
            return torch.zeros((pages, ps, *row), dtype=self.dtype, device=device)

        def scales(pages: int) -> torch.Tensor | None:
            return torch.ones((pages, ps), dtype=_SCALE, device=device) if fp8 else None

        windowed = set(self.window_layers)
        pages_of = [wpages if i in windowed else num_pages for i in range(cfg.num_layers)]
        if cfg.mla is not None:
            self.layers = [LayerKV(new(n, cfg.mla.cache_dim), None, scales(n)) for n in pages_of]
            layout = f"latent {cfg.mla.kv_lora_rank}+{cfg.mla.qk_rope_head_dim}"
        else:
            row = (kv_heads_local(cfg, tp), cfg.head_dim)
            self.layers = [LayerKV(new(n, *row), new(n, *row), scales(n), scales(n)) for n in pages_of]
            layout = f"{row[0]} kv heads x {row[1]}"
        total = sum(pages_of) * layer_page
        log.info(
            "KV cache: %d pages x %d tokens = %d tokens of KV (%.2f GiB on this rank); "
            "%s, %s, %d bytes/token",
            num_pages - 1, ps, self.num_tokens, total / (1 << 30),
            layout, str(self.dtype).removeprefix("torch."), self.bytes_per_token,
        )
        if n_win:
            log.info("KV cache: %d sliding-window layers (window %d) keep only their window, in a pool of "
                     "%d pages (%d tokens); %d full-attention layers", n_win, self.window, wpages - 1,
                     (wpages - 1) * ps, cfg.num_layers - n_win)

    @property
    def num_tokens(self) -> int:
        """Tokens of KV the pool holds, excluding the null page."""
        return (self.num_pages - 1) * self.page_size
