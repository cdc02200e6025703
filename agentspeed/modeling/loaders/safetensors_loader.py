"""Hugging Face safetensors checkpoints (single file or sharded with an index). Tensors are
read lazily, slice by slice, so a tensor-parallel rank reads only its shard."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from agentspeed.config import ModelConfig
from agentspeed.errors import ModelLoadError
from agentspeed.modeling.layers.weights import LazyTensor
from agentspeed.modeling.loaders.hf_config import model_config_from_hf


def read_model_config(path: Path) -> ModelConfig:
    cfg = json.loads((path / "config.json").read_text())
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


def iter_safetensors(path: Path) -> Iterator[tuple[str, LazyTensor]]:
    """(name, lazy tensor) for every tensor of every shard; a corrupt or truncated file
    raises ModelLoadError naming it."""
    for f in _files(path):
        try:
            handle = safe_open(str(f), framework="pt")
            names = list(handle.keys())
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise ModelLoadError(f"corrupt or truncated safetensors file {f}: {e}") from None
        for name in names:
            yield name, _lazy(handle, name)


def count_safetensors(path: Path) -> int:
    total = 0
    for f in _files(path):
        try:
            with safe_open(str(f), framework="pt") as h:
                total += len(list(h.keys()))
        except Exception as e:
            raise ModelLoadError(f"corrupt or truncated safetensors file {f}: {e}") from None
    return total
