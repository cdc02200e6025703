"""Hugging Face safetensors checkpoints (single file or sharded with an index). Tensors are
read lazily, slice by slice, so a tensor-parallel rank reads only its shard."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from agentspeed.config import ModelConfig
from agentspeed.errors import ModelLoadError
from agentspeed.modeling.layers.weights import LazyTensor
from agentspeed.modeling.loaders import checkpoint_quant
from agentspeed.modeling.loaders.checkpoint_quant import FP8Weights, MXFP4Weights
from agentspeed.modeling.loaders.hf_config import model_config_from_hf

log = logging.getLogger(__name__)


def read_model_config(path: Path) -> ModelConfig:
    """config.json (and generation_config.json) -> ModelConfig; an unsupported architecture
    or checkpoint quantization raises UnsupportedModelError before any weight is read."""
    cfg = json.loads((path / "config.json").read_text())
    checkpoint_quant.checkpoint_quant(cfg)
    gen_path = path / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else None
    return model_config_from_hf(cfg, gen)


def checkpoint_dtype(path: Path) -> torch.dtype | None:
    cfg = json.loads((path / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None


def _files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {path}")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"checkpoint shard(s) missing from {path}: {', '.join(missing)}")
    return files


def _lazy(handle: Any, name: str) -> LazyTensor:
    sl = handle.get_slice(name)
    shape = tuple(sl.get_shape())

    def reader(rows: slice | None, cols: slice | None) -> torch.Tensor:
        if rows is None and cols is None:
            return sl[:]
        if cols is None:
            return sl[rows]
        return sl[rows if rows is not None else slice(None), cols]

    return LazyTensor(shape, reader)


def _fp8_lazy(weight: LazyTensor, scale: LazyTensor, fp8: FP8Weights) -> LazyTensor:
    shape = (weight.shape[0], weight.shape[1])

    def reader(rows: slice | None, cols: slice | None) -> torch.Tensor:
        return checkpoint_quant.dequantize(weight.read, scale.read, shape, fp8.block, rows, cols)

    return LazyTensor(weight.shape, reader)


def _index(path: Path) -> dict[str, Any]:
    """Tensor name -> the open shard holding it; a corrupt or truncated file raises
    ModelLoadError naming it."""
    where: dict[str, Any] = {}
    for f in _files(path):
        try:
            handle = safe_open(str(f), framework="pt")
            names = list(handle.keys())
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise ModelLoadError(f"corrupt or truncated safetensors file {f}: {e}") from None
        where.update(dict.fromkeys(names, handle))
    return where


def read_checkpoint_quant(path: Path) -> FP8Weights | MXFP4Weights | None:
    return checkpoint_quant.checkpoint_quant(json.loads((path / "config.json").read_text()))


def _mxfp4_lazy(blocks: LazyTensor, scales: LazyTensor) -> LazyTensor:
    *lead, rows, groups, _ = blocks.shape
    shape = (*lead, groups * 32, rows)

    def reader(rows: slice | None, cols: slice | None) -> torch.Tensor:
        out = checkpoint_quant.dequantize_mxfp4(blocks.read_dense(), scales.read_dense())
        if rows is not None:
            out = out[rows]
        return out if cols is None else out[:, cols]

    return LazyTensor(shape, reader)


def _scale_names(where: dict[str, Any], quant: FP8Weights | MXFP4Weights | None) -> set[str]:
    """Tensors read together with another one (FP8 scales, MXFP4 blocks' scales)."""
    if isinstance(quant, FP8Weights):
        return {n for n in where if n.endswith("." + quant.scale_suffix)}
    if isinstance(quant, MXFP4Weights):
        return {n for n in where if n.endswith("_scales") and n.removesuffix("_scales") + "_blocks" in where}
    return set()


# A multimodal checkpoint's language model, under the causal LM's names.
_TEXT_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                  ("language_model.lm_head.", "lm_head."))


def _rename(path: Path) -> Callable[[str], str]:
    cfg = json.loads((path / "config.json").read_text())
    if "Gemma3ForConditionalGeneration" not in (cfg.get("architectures") or []):
        return lambda name: name
    log.info("%s: a multimodal checkpoint, served text-only (its vision tower is not loaded)", path.name)

    def rename(name: str) -> str:
        for old, new in _TEXT_PREFIXES:
            if name.startswith(old):
                return new + name[len(old):]
        return name

    return rename


def iter_safetensors(path: Path) -> Iterator[tuple[str, LazyTensor]]:
    """(name, lazy tensor) for every tensor of every shard, FP8 weights paired with their
    scales (wherever the shards put them) and read dequantized to fp32, MXFP4 blocks and
    scales read as the dequantized tensor they stand for; a multimodal checkpoint's language
    model under the causal LM's names."""
    rename = _rename(path)
    for name, t in _iter_tensors(path):
        yield rename(name), t


def _iter_tensors(path: Path) -> Iterator[tuple[str, LazyTensor]]:
    quant = read_checkpoint_quant(path)
    fp8 = quant if isinstance(quant, FP8Weights) else None
    where = _index(path)
    scales = _scale_names(where, quant)
    dequantized = 0
    for name, handle in where.items():
        if name in scales:
            continue  # read with its weight
        if isinstance(quant, MXFP4Weights) and name.endswith("_blocks") and name.removesuffix("_blocks") + "_scales" in scales:
            base = name.removesuffix("_blocks")
            dequantized += 1
            yield base, _mxfp4_lazy(_lazy(handle, name), _lazy(where[base + "_scales"], base + "_scales"))
            continue
        lazy = _lazy(handle, name)
        dtype = handle.get_slice(name).get_dtype()
        if dtype in checkpoint_quant.FP8_DTYPES:
            if fp8 is None:
                raise ModelLoadError(f"{name} is stored as {dtype} but config.json has no quantization_config")
            scale = name.removesuffix("weight") + fp8.scale_suffix
            if len(lazy.shape) != 2 or scale not in where:
                raise ModelLoadError(f"{name}: an {dtype} tensor without its {fp8.scale_suffix}")
            lazy = _fp8_lazy(lazy, _lazy(where[scale], scale), fp8)
            dequantized += 1
        yield name, lazy
    if quant is not None:
        log.info("%s: %d weights dequantized at load (activations run in the compute dtype)",
                 quant.describe(), dequantized)


def count_safetensors(path: Path) -> int:
    """How many tensors iter_safetensors yields."""
    where = _index(path)
    return len(where) - len(_scale_names(where, read_checkpoint_quant(path)))
