"""Triton backends (CUDA; tested on the CPU under TRITON_INTERPRET=1).

Registration does not import triton: it only checks that the package is installed, and the
kernel module (which imports triton) loads on the first call. That keeps triton's import
off every CPU-only process, and lets the interpreter be switched on after this package is
imported: TRITON_INTERPRET must be set before `import triton`, because triton wraps its own
`@jit` helpers (tl.zeros, tl.max, ...) for the interpreter or the GPU at its import.

Where triton is not installed this package registers nothing and raises nothing. A triton
that is installed but cannot load fails loudly at the first call (never a silent fallback).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

import torch

from agentspeed.kernels.api import AttentionMetadata
from agentspeed.kernels.registry import Traits, register_kernel

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The widest latent / rope parts one program holds: its fp32 accumulator is
# BLOCK_H x next_power_of_2(lora_rank).
MAX_LORA_RANK = 1024
MAX_ROPE_DIM = 256


def _installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a half-imported or spec-less module in sys.modules
        return False


HAVE_TRITON = _installed()


def mla_supports(traits: Traits) -> bool:
    """Whether a model's traits fit the triton `mla_decode`. Every trait is optional (traits
    may be empty): kv_lora_rank / lora_rank up to MAX_LORA_RANK, qk_rope_head_dim / rope_dim
    up to MAX_ROPE_DIM, any page size >= 1."""
    lora = traits.get("kv_lora_rank", traits.get("lora_rank"))
    rope = traits.get("qk_rope_head_dim", traits.get("rope_dim"))
    page = traits.get("page_size")
    if lora is not None and not 1 <= int(lora) <= MAX_LORA_RANK:
        return False
    if rope is not None and not 0 <= int(rope) <= MAX_ROPE_DIM:
        return False
    return page is None or int(page) >= 1


@functools.cache
def _mla_decode_impl() -> Callable[..., torch.Tensor]:
    from agentspeed.kernels.triton.mla_decode import mla_decode_triton

    return mla_decode_triton


def mla_decode_op(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    lora_rank: int,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The registered `mla_decode` op: `mla_decode.mla_decode_triton` with default planning,
    its module (and triton) imported on the first call. (Not named `mla_decode`: importing
    the submodule of that name would rebind the package attribute.)"""
    return _mla_decode_impl()(q, kv_cache, meta, scale, lora_rank, kv_scale)


if HAVE_TRITON:
    register_kernel("mla_decode", "triton", ("cuda",), DTYPES, priority=20,
                    supports=mla_supports)(mla_decode_op)

__all__ = ["DTYPES", "HAVE_TRITON", "MAX_LORA_RANK", "MAX_ROPE_DIM", "mla_decode_op", "mla_supports"]
