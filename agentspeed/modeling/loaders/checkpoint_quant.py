"""Quantized safetensors checkpoints: config.json's `quantization_config` read, never ignored.

Supported are the FP8 weight formats open models ship in:
- `quant_method: fp8` (DeepSeek-V3, Kimi-K2, Qwen3-FP8): e4m3 weights with a
  `weight_scale_inv` per `weight_block_size` block (128x128), which multiplies them;
- `quant_method: compressed-tensors`, float-quantized 8-bit weights (llm-compressor's
  FP8 / FP8_DYNAMIC / FP8_BLOCK): a `weight_scale` per tensor, per output channel, per
  group or per block.
Weights are dequantized once, slice by slice as a rank reads them, into the compute dtype;
there is no FP8 GEMM on CPU to keep them for. Activations run in the compute dtype (the
checkpoint's activation scheme is a speed choice of FP8 hardware, not part of the weights).
- `quant_method: mxfp4` (GPT-OSS): experts as `<name>_blocks` (two e2m1 codes per byte, 32
  per block) and `<name>_scales` (an e8m0 power of two per block), read as `<name>` in
  transformers' layout.
Anything else (AWQ, GPTQ, bitsandbytes, int4 packs, FP8 KV-cache scales) is an
UnsupportedModelError naming it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from agentspeed.errors import UnsupportedModelError

FP8_DTYPES = ("F8_E4M3", "F8_E5M2")


@dataclass(frozen=True, slots=True)
class FP8Weights:
    """How this checkpoint's FP8 weights are scaled. block (rows, cols) is the area one scale
    covers; None means a single scale per tensor or (scale of N rows) one per output row."""

    method: str
    scale_suffix: str  # the scale of `x.weight` is `x.<scale_suffix>`
    block: tuple[int, int] | None

    def describe(self) -> str:
        how = f"{self.block[0]}x{self.block[1]} blocks" if self.block else "per-tensor/channel scales"
        return f"{self.method} FP8 weights ({how})"


@dataclass(frozen=True, slots=True)
class MXFP4Weights:
    """GPT-OSS's MXFP4 experts: `x_blocks` [..., rows, K / 32, 16] uint8 and `x_scales`
    [..., rows, K / 32] uint8 stand for `x` [..., K, rows] (transformers' x @ W layout)."""

    method: str = "mxfp4"

    def describe(self) -> str:
        return "mxfp4 expert weights"


# e2m1 codes 0-15: sign bit 3, then 0, 0.5, 1, 1.5, 2, 3, 4, 6
_FP4 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 [..., K, rows] of MXFP4 blocks [..., rows, K / 32, 16] (low nibble first) times
    2^(scale - 127) per 32 values."""
    lut = torch.tensor(_FP4, dtype=torch.float32)
    b = blocks.to(torch.uint8)
    codes = torch.stack([b & 0x0F, b >> 4], dim=-1).flatten(-2).long()  # [..., rows, G, 32]
    vals = torch.ldexp(lut[codes], (scales.to(torch.int32) - 127)[..., None])
    return vals.flatten(-2).transpose(-1, -2).contiguous()


def _unsupported(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"unsupported checkpoint quantization: {what}; supported: block-scaled FP8 (quant_method fp8), "
        "compressed-tensors FP8 weights and GPT-OSS's mxfp4"
    )


def checkpoint_quant(cfg: dict[str, Any]) -> FP8Weights | MXFP4Weights | None:
    """config.json -> the scheme its weights use, None if it has no quantization_config;
    UnsupportedModelError for any other scheme."""
    q = cfg.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method == "mxfp4":
        if "GptOssForCausalLM" not in (cfg.get("architectures") or []):
            raise _unsupported("mxfp4 outside GPT-OSS")
        return MXFP4Weights()
    if method == "fp8":
        if q.get("fmt", "e4m3") != "e4m3":
            raise _unsupported(f"fp8 format {q['fmt']!r}")
        block = q.get("weight_block_size")
        return FP8Weights("fp8", "weight_scale_inv", (int(block[0]), int(block[1])) if block else None)
    if method == "compressed-tensors":
        return _compressed_tensors(q)
    raise _unsupported(f"quant_method {method!r}")


def _compressed_tensors(q: dict[str, Any]) -> FP8Weights:
    fmt = q.get("format")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise _unsupported(f"compressed-tensors format {fmt!r}")
    if q.get("kv_cache_scheme"):
        raise _unsupported("compressed-tensors kv_cache_scheme (FP8 KV-cache scales); use --kv-cache-dtype")
    blocks: set[tuple[int, int] | None] = set()
    for name, group in (q.get("config_groups") or {}).items():
        w = group.get("weights") or {}
        if w.get("type") != "float" or int(w.get("num_bits", 0)) != 8:
            raise _unsupported(f"compressed-tensors group {name!r}: {w.get('num_bits')}-bit {w.get('type')} weights")
        strategy = w.get("strategy")
        if strategy in ("tensor", "channel"):
            blocks.add(None)
        elif strategy == "block":
            bs: list[int] = w.get("block_structure") or []
            if len(bs) != 2:
                raise _unsupported(f"compressed-tensors block strategy without a block_structure in {name!r}")
            blocks.add((int(bs[0]), int(bs[1])))
        elif strategy == "group":
            blocks.add((1, int(w["group_size"])))
        else:
            raise _unsupported(f"compressed-tensors weight strategy {strategy!r}")
    if len(blocks) != 1:
        raise _unsupported("compressed-tensors groups with different weight scale layouts")
    return FP8Weights("compressed-tensors", "weight_scale", blocks.pop())


def _span(sl: slice | None, n: int) -> tuple[int, int]:
    return (0, n) if sl is None else sl.indices(n)[:2]


def dequantize(read_w: Any, read_scale: Any, shape: tuple[int, int], block: tuple[int, int] | None,
               rows: slice | None, cols: slice | None) -> torch.Tensor:
    """fp32 rows x cols of an FP8 weight of `shape`: its stored values times their scales.
    read_w(rows, cols) reads the FP8 slice; read_scale(rows, cols) a slice of the scales."""
    n, k = shape
    r0, r1 = _span(rows, n)
    c0, c1 = _span(cols, k)
    w = read_w(slice(r0, r1), slice(c0, c1)).float()
    full = read_scale(None, None).float()
    if full.numel() == 1:
        return w * full.reshape(())
    if block is None:  # one scale per output row
        return w * full.reshape(-1)[r0:r1, None]
    bn, bk = block
    s = full.reshape(-(-n // bn), -(-k // bk))[r0 // bn: (r1 - 1) // bn + 1, c0 // bk: (c1 - 1) // bk + 1]
    s = s.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
    ro, co = r0 - (r0 // bn) * bn, c0 - (c0 // bk) * bk
    return w * s[ro: ro + (r1 - r0), co: co + (c1 - c0)]
